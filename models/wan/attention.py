"""Wan2.1 self- and cross-attention, and the choice of attention function per layer and step.

Self-attention goes through one `attend(q, k, v)` function chosen by the model for each block
(dense, or radial_jax.radial_attention with the radial mask of the latent shape); the modules
never see backend flags. Cross-attention to text (and CLIP image tokens, I2V) is always dense.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

import radial_jax
from models.wan.config import AttentionConfig, WanConfig
from models.wan.layers import F32, RMSNorm, compute_dtype, linear
from models.wan.rope import apply_rope

Attend = Callable[[Array, Array, Array], Array]
XLA_LOGITS_BUDGET = 64 << 20  # bytes of float32 logits per query chunk on the XLA path
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def dense_attention(
    q: Float[Array, "B L N D"], k: Float[Array, "B M N D"], v: Float[Array, "B M N D"]
) -> Float[Array, "B L N D"]:
    """Returns softmax attention over all keys, in q's dtype.

    On a GPU in bf16/f16 this is cuDNN flash attention; elsewhere XLA's attention in float32
    over query chunks, so the logits never form an [L, M] array beyond XLA_LOGITS_BUDGET bytes.
    """
    if jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES:
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, RuntimeError):  # shape/dtype cuDNN declines, or no cuDNN
            pass
    # float32: the CPU fallback has no fast bf16 path, and jax.nn's XLA attention mixes bf16
    # with float32 logits in a way strict dtype promotion rejects.
    f32 = jnp.float32
    return _chunked_xla_attention(q.astype(f32), k.astype(f32), v.astype(f32)).astype(q.dtype)


def _chunked_xla_attention(q, k, v):
    batch, q_len, heads, head_dim = q.shape
    rows = XLA_LOGITS_BUDGET // (4 * batch * heads * k.shape[1])
    if rows >= q_len:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    chunk = max(128, rows // 128 * 128)
    num_chunks = -(-q_len // chunk)
    padded = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - q_len), (0, 0), (0, 0)))
    q_chunks = padded.reshape(batch, num_chunks, chunk, heads, head_dim).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"), q_chunks)
    return out.swapaxes(0, 1).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :q_len]


@functools.lru_cache(maxsize=32)
def radial_mask(num_frames: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> np.ndarray:
    """Returns the (read-only, cached) Wan radial block mask, bool [QB, KB]."""
    mask = radial_jax.radial_block_mask(
        num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor, model="wan"
    )
    mask.setflags(write=False)
    return mask


def self_attention_fn(attention: AttentionConfig, grid: tuple[int, int, int], *, dense: bool) -> Attend:
    """Returns attend(q, k, v) for one block: dense, or radial over the latent grid (F, H, W)."""
    if dense or attention.backend == "dense":
        return dense_attention
    frames, height, width = grid
    mask = radial_mask(frames, height * width, attention.block_size, attention.decay_factor)
    implementation = "reference" if attention.backend == "reference" else attention.implementation
    return functools.partial(
        radial_jax.radial_attention, block_mask=mask, block_size=attention.block_size, implementation=implementation
    )


class SelfAttention(nnx.Module):
    """Self-attention with RMSNorm on q and k (across all heads) and 3D RoPE."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        dim = config.dim
        self.num_heads = config.num_heads
        self.dtype = compute_dtype(config)
        self.q = linear(dim, dim, config=config, rngs=rngs)
        self.k = linear(dim, dim, config=config, rngs=rngs)
        self.v = linear(dim, dim, config=config, rngs=rngs)
        self.o = linear(dim, dim, config=config, rngs=rngs)
        self.norm_q = RMSNorm(dim, eps=config.eps)
        self.norm_k = RMSNorm(dim, eps=config.eps)

    def __call__(
        self, x: Float[Array, "B L C"], rope: tuple[Array, Array], attend: Attend
    ) -> Float[Array, "B L C"]:
        """Returns [batch, tokens, dim] in the compute dtype; x: float32 [batch, tokens, dim]."""
        batch, length, dim = x.shape
        heads = (batch, length, self.num_heads, dim // self.num_heads)
        q = apply_rope(self.norm_q(self.q(x)).reshape(heads), *rope).astype(self.dtype)
        k = apply_rope(self.norm_k(self.k(x)).reshape(heads), *rope).astype(self.dtype)
        v = self.v(x).reshape(heads)
        return self.o(attend(q, k, v).reshape(batch, length, dim))


class CrossAttention(nnx.Module):
    """Dense attention from video tokens to text tokens, plus CLIP image tokens for I2V.

    I2V adds a second attention over the image tokens with its own k_img/v_img projections
    and sums both results before the output projection, in float32 as the original does.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        dim = config.dim
        self.num_heads = config.num_heads
        self.dtype = compute_dtype(config)
        self.q = linear(dim, dim, config=config, rngs=rngs)
        self.k = linear(dim, dim, config=config, rngs=rngs)
        self.v = linear(dim, dim, config=config, rngs=rngs)
        self.o = linear(dim, dim, config=config, rngs=rngs)
        self.norm_q = RMSNorm(dim, eps=config.eps)
        self.norm_k = RMSNorm(dim, eps=config.eps)
        if config.model_type == "i2v":
            self.k_img = linear(dim, dim, config=config, rngs=rngs)
            self.v_img = linear(dim, dim, config=config, rngs=rngs)
            self.norm_k_img = RMSNorm(dim, eps=config.eps)

    def _heads(self, x: Array) -> Array:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1)

    def __call__(
        self,
        x: Float[Array, "B L C"],
        context: Float[Array, "B T C"],
        context_img: Float[Array, "B I C"] | None = None,
    ) -> Float[Array, "B L C"]:
        """Returns [batch, tokens, dim] in the compute dtype."""
        batch, length, dim = x.shape
        q = self._heads(self.norm_q(self.q(x))).astype(self.dtype)
        k = self._heads(self.norm_k(self.k(context))).astype(self.dtype)
        out = dense_attention(q, k, self._heads(self.v(context))).astype(F32)
        if context_img is not None:
            k_img = self._heads(self.norm_k_img(self.k_img(context_img))).astype(self.dtype)
            out = out + dense_attention(q, k_img, self._heads(self.v_img(context_img))).astype(F32)
        return self.o(out.reshape(batch, length, dim))
