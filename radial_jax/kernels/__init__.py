"""Pallas block-sparse attention kernels driven by a static block mask.

`block_sparse_attention` picks the kernel: Mosaic GPU (TMA + wgmma) on Hopper for 128-token
blocks in bf16/f16, else the Triton-lowered twin (any CUDA GPU, or the CPU in interpret mode).
Both loop over the same index tables (tables.py) and return the row logsumexp beside the
output. Gradients go through jax.custom_vjp. Every tunable of every kernel travels as one
frozen `KernelTuning` (common.py).
"""

import dataclasses
import functools

import jax
import numpy as np

from radial_jax.kernels import mosaic_bwd, mosaic_fwd, triton_bwd, triton_fwd
from radial_jax.kernels.common import (DEFAULT_MOSAIC_BWD, DEFAULT_MOSAIC_FWD, GRID_MOSAIC_FWD, LAZY_MOSAIC_FWD,
                                       KernelTuning, MosaicBwdTuning, MosaicTuning, TritonTuning)
from radial_jax.kernels.tables import BlockTables, block_tables

__all__ = ["BACKENDS", "DEFAULT_MOSAIC_BWD", "DEFAULT_MOSAIC_FWD", "GRID_MOSAIC_FWD", "LAZY_MOSAIC_FWD", "KernelTuning",
           "MosaicBwdTuning", "MosaicTuning", "TritonTuning", "block_sparse_attention", "default_backend", "is_hopper"]

BACKENDS = ("mosaic", "triton", "interpret")


def is_hopper() -> bool:
    """Returns whether the default device is a Hopper GPU (sm90), where the Mosaic kernels run."""
    device = jax.devices()[0]
    return str(getattr(device, "compute_capability", "0")).startswith("9")  # GPU devices only have it


def default_backend(q_dtype, head_dim: int, block_size: int) -> str:
    """Returns the fastest kernel backend that can run here for these inputs."""
    if jax.default_backend() != "gpu":
        return "interpret"
    if is_hopper() and mosaic_fwd.supported(q_dtype, head_dim, block_size) is None:
        return "mosaic"
    return "triton"


def block_sparse_attention(q, k, v, block_mask: np.ndarray, *, block_size: int, scale: float | None = None,
                           return_lse: bool = False, backend: str | None = None,
                           tuning: KernelTuning | None = None):
    """Returns out [B, L, N, D] (and lse [B, N, L], natural log, if return_lse).

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, heads, head_dim];
    block_mask: static bool numpy [ceil(seq_q/B), ceil(seq_kv/B)]. Rows with no key block
    give zeros and lse = -inf. tuning: the kernels' tunables (None: KernelTuning()'s defaults),
    forward and backward alike.
    """
    head_dim = q.shape[-1]
    scale = float(head_dim**-0.5 if scale is None else scale)
    backend = backend or default_backend(q.dtype, head_dim, block_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "mosaic" and (reason := mosaic_fwd.supported(q.dtype, head_dim, block_size)):
        raise NotImplementedError(f"mosaic kernel: {reason}")
    tables = block_tables(block_mask, block_size, q.shape[1], k.shape[1])
    static = _Static(tables, scale, backend, KernelTuning() if tuning is None else tuning)
    out, lse = _attention(q, k, v, static)
    return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the custom_vjp closes over: fixed at trace time, hashable."""

    tables: BlockTables
    scale: float
    backend: str
    tuning: KernelTuning


def _forward(q, k, v, static: _Static):
    if static.backend == "mosaic":
        return mosaic_fwd.mosaic_forward(q, k, v, tables=static.tables, scale=static.scale,
                                         tuning=static.tuning.mosaic_fwd)
    return triton_fwd.triton_forward(q, k, v, tables=static.tables, scale=static.scale,
                                     interpret=static.backend == "interpret", tuning=static.tuning.triton_fwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, static):
    return _forward(q, k, v, static)


def _attention_fwd(q, k, v, static):
    out, lse = _forward(q, k, v, static)
    return (out, lse), (q, k, v, out, lse)


def _attention_bwd(static: _Static, residuals, cotangents):
    """Backward kernels: O(L) memory; the forward's lse and delta = rowsum(dO * O) - dlse."""
    q, k, v, out, lse = residuals
    d_out, d_lse = cotangents
    d_out = d_out.astype(q.dtype)
    args = (q, k, v, out, lse, d_out, d_lse)
    if static.backend == "mosaic":
        return mosaic_bwd.mosaic_backward(*args, tables=static.tables, scale=static.scale,
                                          tuning=static.tuning.mosaic_bwd)
    return triton_bwd.triton_backward(*args, tables=static.tables, scale=static.scale,
                                      interpret=static.backend == "interpret", tuning=static.tuning.triton_bwd)


_attention.defvjp(_attention_fwd, _attention_bwd)
