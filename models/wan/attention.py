"""Wan2.1 self- and cross-attention.

Self-attention goes through one `attend(q, k, v)` function the model picks for each block
from the attention plan (radial_jax.plan.self_attention); the modules never see backend flags.
Cross-attention to text (and CLIP image tokens, I2V) is always dense (radial_jax.dense_attention).
"""

from flax import nnx
from jaxtyping import Array, Float

from radial_jax.attention import dense_attention
from radial_jax.plan import Attend
from radial_jax.sharding import constrain
from models.wan.config import WanConfig
from models.wan.layers import F32, RMSNorm, compute_dtype, linear
from models.wan.rope import apply_rope

HEADS_AXES = ("batch", "activation_length", "activation_heads", "activation_kv")  # q, k, v [B, L, N, D]
CONTEXT_HEADS_AXES = ("batch", None, "activation_heads", "activation_kv")  # text/image k, v [B, T, N, D]


def _add_projections(module: nnx.Module, config: WanConfig, rngs: nnx.Rngs) -> None:
    """Gives an attention module the original's q, k, v, o Linears and the RMSNorms on q and k."""
    dim = config.dim
    module.num_heads = config.num_heads
    module.dtype = compute_dtype(config)
    module.q = linear(dim, dim, axes=("embed", "heads"), config=config, rngs=rngs)
    module.k = linear(dim, dim, axes=("embed", "heads"), config=config, rngs=rngs)
    module.v = linear(dim, dim, axes=("embed", "heads"), config=config, rngs=rngs)
    module.o = linear(dim, dim, axes=("heads", "embed"), config=config, rngs=rngs)
    module.norm_q = RMSNorm(dim, eps=config.eps)
    module.norm_k = RMSNorm(dim, eps=config.eps)


class SelfAttention(nnx.Module):
    """Self-attention with RMSNorm on q and k (across all heads) and 3D RoPE."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        _add_projections(self, config, rngs)

    def __call__(
        self, x: Float[Array, "B L C"], rope: tuple[Array, Array], attend: Attend
    ) -> Float[Array, "B L C"]:
        """Returns [batch, tokens, dim] in the compute dtype; x: float32 [batch, tokens, dim]."""
        batch, length, dim = x.shape
        heads = (batch, length, self.num_heads, dim // self.num_heads)
        q = constrain(apply_rope(self.norm_q(self.q(x)).reshape(heads), *rope).astype(self.dtype), HEADS_AXES)
        k = constrain(apply_rope(self.norm_k(self.k(x)).reshape(heads), *rope).astype(self.dtype), HEADS_AXES)
        v = constrain(self.v(x).reshape(heads), HEADS_AXES)
        return self.o(attend(q, k, v).reshape(batch, length, dim))


class CrossAttention(nnx.Module):
    """Dense attention from video tokens to text tokens, plus CLIP image tokens for I2V.

    I2V adds a second attention over the image tokens with its own k_img/v_img projections
    and sums both results before the output projection, in float32 as the original does.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        _add_projections(self, config, rngs)
        if config.uses_clip:
            self.k_img = linear(config.dim, config.dim, axes=("embed", "heads"), config=config, rngs=rngs)
            self.v_img = linear(config.dim, config.dim, axes=("embed", "heads"), config=config, rngs=rngs)
            self.norm_k_img = RMSNorm(config.dim, eps=config.eps)

    def _heads(self, x: Array, axes=CONTEXT_HEADS_AXES) -> Array:
        return constrain(x.reshape(x.shape[0], x.shape[1], self.num_heads, -1), axes)

    def __call__(
        self,
        x: Float[Array, "B L C"],
        context: Float[Array, "B T C"],
        context_img: Float[Array, "B I C"] | None = None,
        attend: Attend = dense_attention,
    ) -> Float[Array, "B L C"]:
        """Returns [batch, tokens, dim] in the compute dtype; attend: dense attention to the context."""
        batch, length, dim = x.shape
        q = self._heads(self.norm_q(self.q(x)), HEADS_AXES).astype(self.dtype)
        k = self._heads(self.norm_k(self.k(context))).astype(self.dtype)
        out = attend(q, k, self._heads(self.v(context))).astype(F32)
        if context_img is not None:
            k_img = self._heads(self.norm_k_img(self.k_img(context_img))).astype(self.dtype)
            out = out + attend(q, k_img, self._heads(self.v_img(context_img))).astype(F32)
        return self.o(out.reshape(batch, length, dim))
