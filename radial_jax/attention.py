"""One attention entry point over a static block mask, and the one dense attention.

`radial_attention(..., implementation=)` names one implementation or an ordered list of them
(IMPLEMENTATIONS; README's table). An implementation raises NotImplementedError for what it
cannot do (no GPU, an unsupported dtype or shape) and the next one is tried; "auto" is
("pallas", "reference") on a GPU and ("reference",) elsewhere. `dense_attention` is the dense
path every model uses (cuDNN on a GPU in bf16/f16, else XLA in float32 over query chunks); the
"dense" implementation is it with the block mask applied token by token.
"""

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from radial_jax.kernels import KernelTuning, block_sparse_attention, is_hopper
from radial_jax.reference import attention_reference

# pallas: the best Pallas kernel here (mosaic on Hopper, else triton; interpret mode off GPU);
# mosaic/triton: that kernel only; reference: the pure-jnp twin; dense: dense_attention + mask.
IMPLEMENTATIONS = ("pallas", "mosaic", "triton", "reference", "dense")
XLA_LOGITS_BUDGET = 64 << 20  # bytes of float32 logits per query chunk on the XLA path
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


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
            backend = _BACKENDS[name]
            if name in _KERNEL_BACKENDS:
                backend = functools.partial(backend, tuning=tuning)
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


def check_implementation(implementation: str | Sequence[str]) -> tuple[str, ...]:
    """Returns the implementation names as a tuple ("auto" unresolved); ValueError if unknown."""
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
        raise ValueError(f"implementation=() is empty; pass 'auto' or names from {IMPLEMENTATIONS}")
    for name in names:
        if name not in IMPLEMENTATIONS and not (name == "auto" and len(names) == 1):
            raise ValueError(f"implementation={name!r} must be 'auto' or one of {IMPLEMENTATIONS}")
    return names


def _resolve(implementation: str | Sequence[str]) -> tuple[str, ...]:
    if implementation == "auto":
        if jax.default_backend() == "gpu":
            return ("pallas", "reference")
        warnings.warn("radial_attention: no GPU, implementation='auto' runs the jnp reference "
                      "(implementation='pallas' runs the kernel in interpret mode, slower still)", stacklevel=3)
        return ("reference",)
    return check_implementation(implementation)


def dense_attention(
    q: Float[Array, "B L N D"],
    k: Float[Array, "B M N D"],
    v: Float[Array, "B M N D"],
    *,
    scale: float | None = None,
    block_mask: np.ndarray | None = None,
    block_size: int = 128,
) -> Float[Array, "B L N D"]:
    """Returns softmax attention over all keys (or those block_mask lets through), in q's dtype.

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, heads, head_dim]; block_mask:
    None (every key) or static bool numpy [ceil(seq_q/B), ceil(seq_kv/B)], rows with no
    visible key returning zeros. Without a mask on a GPU in bf16/f16 this is cuDNN flash
    attention; otherwise XLA's attention in float32 over query chunks, so the logits (and the
    token mask) never exceed XLA_LOGITS_BUDGET bytes.
    """
    if block_mask is not None and block_mask.all():
        block_mask = None
    if block_mask is None and jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES:
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, RuntimeError):  # shape/dtype cuDNN declines, or no cuDNN
            pass
    # float32: the CPU fallback has no fast bf16 path, and jax.nn's XLA attention mixes bf16
    # with float32 logits in a way strict dtype promotion rejects.
    f32 = jnp.float32
    out = _chunked_xla_attention(q.astype(f32), k.astype(f32), v.astype(f32), scale, block_mask, block_size)
    return out.astype(q.dtype)


def _chunked_xla_attention(q, k, v, scale, block_mask, block_size):
    batch, q_len, heads, head_dim = q.shape
    rows = XLA_LOGITS_BUDGET // (4 * batch * heads * k.shape[1])
    if rows >= q_len:
        return _xla_attention(q, k, v, scale, block_mask, block_size, 0)
    chunk = max(128, rows // 128 * 128)
    num_chunks = -(-q_len // chunk)
    padded = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - q_len), (0, 0), (0, 0)))
    q_chunks = padded.reshape(batch, num_chunks, chunk, heads, head_dim).swapaxes(0, 1)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
    out = jax.lax.map(lambda xs: _xla_attention(xs[0], k, v, scale, block_mask, block_size, xs[1]),
                      (q_chunks, starts))  # fmt: skip
    return out.swapaxes(0, 1).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :q_len]


def _xla_attention(q, k, v, scale, block_mask, block_size, first_row):
    """XLA attention of the query rows first_row.. (traced) with the block mask's token rows."""
    if block_mask is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    q_blocks = jnp.minimum((first_row + jnp.arange(q.shape[1])) // block_size, block_mask.shape[0] - 1)
    kv_blocks = jnp.arange(k.shape[1]) // block_size
    token_mask = jnp.asarray(block_mask)[q_blocks][:, kv_blocks]  # [chunk, seq_kv]
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=token_mask[None, None], implementation="xla")
    # jax.nn averages all values in a fully masked row; ours returns zeros there.
    return jnp.where(token_mask.any(axis=1)[None, :, None, None], out, jnp.zeros_like(out))


def _reference(q, k, v, block_mask, block_size, scale):
    return attention_reference(q, k, v, block_mask, block_size=block_size, scale=scale)[0]


def _dense(q, k, v, block_mask, block_size, scale):
    return dense_attention(q, k, v, scale=scale, block_mask=block_mask, block_size=block_size)


def _kernel(backend: str | None):
    """Returns the implementation running the Pallas kernel `backend` (None: the best one here)."""

    def run(q, k, v, block_mask, block_size, scale, tuning=None):
        chosen = backend
        if backend == "mosaic" and not is_hopper():  # a CPU too: the Mosaic kernel has no interpret mode
            raise NotImplementedError("the mosaic kernel needs a Hopper GPU (sm90)")
        if jax.default_backend() != "gpu":
            warnings.warn(f"implementation={backend or 'pallas'!r} without a GPU runs the kernel in interpret "
                          "mode (slow)")  # fmt: skip
            chosen = "interpret"
        return block_sparse_attention(q, k, v, block_mask, block_size=block_size, scale=scale, backend=chosen,
                                      tuning=tuning)  # fmt: skip

    return run


_KERNEL_BACKENDS = ("pallas", "mosaic", "triton")
_BACKENDS = {"pallas": _kernel(None), "mosaic": _kernel("mosaic"), "triton": _kernel("triton"),
             "reference": _reference, "dense": _dense}  # fmt: skip
