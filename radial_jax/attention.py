"""One attention entry point over a static block mask; picks an implementation.

`implementation` names one backend or an ordered list of them. A backend raises
NotImplementedError for what it cannot do (no GPU, an unsupported dtype or shape) and the next
one is tried; "auto" is ("pallas", "reference") on a GPU and ("reference",) elsewhere.
"""

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from radial_jax.kernels import KernelTuning, block_sparse_attention
from radial_jax.mask import expand_block_mask
from radial_jax.reference import attention_reference

IMPLEMENTATIONS = ("pallas", "reference", "dense")


def radial_attention(
    q: Float[Array, "B L N D"],
    k: Float[Array, "B M N D"],
    v: Float[Array, "B M N D"],
    *,
    block_mask: np.ndarray,
    block_size: int = 128,
    implementation: str | Sequence[str] = "auto",
    scale: float | None = None,
    tuning: KernelTuning | None = None,
) -> Float[Array, "B L N D"]:
    """Returns block-sparse softmax attention, [batch, seq_q, heads, head_dim] in q's dtype.

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, heads, head_dim] (the
    jax.nn.dot_product_attention layout). block_mask: bool numpy [ceil(seq_q/B), ceil(seq_kv/B)],
    e.g. from `radial_block_mask`; query block i sees key block j iff block_mask[i, j]. Rows
    with no visible key return zeros. scale defaults to head_dim ** -0.5. tuning: the Pallas
    kernels' tunables (radial_jax.kernels.KernelTuning; None: its defaults).
    """
    block_mask = check_inputs(q, k, v, block_mask, block_size)
    errors = []
    for name in _resolve(implementation):
        try:
            backend = functools.partial(_pallas, tuning=tuning) if name == "pallas" else _BACKENDS[name]
            return backend(q, k, v, block_mask, block_size, scale)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no attention implementation could run: " + "; ".join(errors))


def check_inputs(q, k, v, block_mask, block_size) -> np.ndarray:
    """Returns block_mask as a bool numpy array after checking shapes and dtypes (ValueError)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, heads and head_dim")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size={block_size} must be a positive multiple of 16")
    if isinstance(block_mask, jax.Array) and isinstance(block_mask, jax.core.Tracer):
        raise ValueError("block_mask must be a static numpy array, not a traced value")
    block_mask = np.asarray(block_mask)
    expected = (-(-q.shape[1] // block_size), -(-k.shape[1] // block_size))
    if block_mask.dtype != bool or block_mask.shape != expected:
        raise ValueError(
            f"block_mask must be bool {expected} (ceil(seq/block_size) for q and kv), "
            f"got {block_mask.dtype} {block_mask.shape}"
        )
    return block_mask


def _resolve(implementation: str | Sequence[str]) -> tuple[str, ...]:
    if implementation == "auto":
        if jax.default_backend() == "gpu":
            return ("pallas", "reference")
        warnings.warn("radial_attention: no GPU, implementation='auto' runs the jnp reference "
                      "(implementation='pallas' runs the kernel in interpret mode, slower still)", stacklevel=3)
        return ("reference",)
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    for name in names:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={name!r} must be 'auto' or one of {IMPLEMENTATIONS}")
    return names


def _reference(q, k, v, block_mask, block_size, scale):
    return attention_reference(q, k, v, block_mask, block_size=block_size, scale=scale)[0]


def _dense(q, k, v, block_mask, block_size, scale):
    """jax.nn.dot_product_attention (cuDNN on GPU); a non-trivial mask is expanded to tokens."""
    if block_mask.all():
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    token_mask = expand_block_mask(block_mask, block_size, q.shape[1], k.shape[1])
    if token_mask.size > 1 << 30:
        raise NotImplementedError(f"dense with a mask builds a {token_mask.shape} token mask; too large")
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=jnp.asarray(token_mask)[None, None])
    # jax.nn averages all values in a fully masked row; ours returns zeros there.
    has_key = jnp.asarray(token_mask.any(axis=1))[None, :, None, None]
    return jnp.where(has_key, out, jnp.zeros_like(out))


def _pallas(q, k, v, block_mask, block_size, scale, tuning=None):
    if jax.default_backend() != "gpu":
        warnings.warn("implementation='pallas' without a GPU runs the kernel in interpret mode (slow)")
    return block_sparse_attention(q, k, v, block_mask, block_size=block_size, scale=scale, tuning=tuning)


_BACKENDS = {"pallas": _pallas, "reference": _reference, "dense": _dense}
