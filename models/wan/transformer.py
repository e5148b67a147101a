"""The Wan2.1 diffusion transformer (T2V and I2V) in Flax NNX, channels-last.

Parameter paths follow the original PyTorch module names (wan/modules/model.py: blocks.N.
self_attn.q, ffn.0, modulation, head.head, img_emb.proj.1, ...) so checkpoint converters are
plain name tables; leaves use Flax names (kernel [in, out], bias, scale).

Call: model(latents [B, F, H, W, C], timestep [B], context [B, T, text_dim], *, plan=None,
dense=False, clip_fea=None, y=None, remat=False) -> [B, F, H, W, out_dim] float32. The
attention plan (radial_jax.RadialPlan; None: dense everywhere) and whether this sampling step
runs dense (dense=plan.is_dense_step(step, num_steps)) are static Python values: jit with them
static and a sampler compiles two programs at most. remat=True wraps each block in
jax.checkpoint (training).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.wan.attention import CrossAttention, SelfAttention
from models.wan.config import WanConfig
from models.wan.layers import (
    F32, LayerNorm, compute_dtype, gelu_exact, gelu_tanh, layer_norm, linear, sinusoidal_embedding,
)
from models.wan.rope import rope_tables
from radial_jax.attention import dense_attention
from radial_jax.parallel import (
    TokenSharding, sequence_parallel, sequence_parallel_cross, sequence_parallel_size, token_sharding,
)
from radial_jax.plan import Attend, RadialPlan, self_attention
from radial_jax.sharding import constrain, param, with_axes

TORCH_LAYER_NORM_EPS = 1e-5  # the image projection uses torch.nn.LayerNorm's default
EMBEDDING_INIT_STD = 0.02  # the original's init for text and time embeddings
STREAM_AXES = ("batch", "activation_length", "activation_embed")  # the residual stream [B, L, C]
FFN_AXES = ("batch", "activation_length", "activation_mlp")  # the FFN's hidden [B, L, ffn_dim]


def _modulation(rngs: nnx.Rngs, rows: int, dim: int) -> nnx.Param:
    return param(jax.random.normal(rngs.params(), (1, rows, dim), F32) * dim**-0.5, (None, None, "embed"))


class WanBlock(nnx.Module):
    """Self-attention, cross-attention and FFN, modulated by the 6-way time projection."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.eps = config.eps
        self.self_attn = SelfAttention(config, rngs=rngs)
        self.norm3 = LayerNorm(config.dim, eps=config.eps)  # the original calls the cross-attn norm norm3
        self.cross_attn = CrossAttention(config, rngs=rngs)
        self.ffn = nnx.List([
            linear(config.dim, config.ffn_dim, axes=("embed", "mlp"), config=config, rngs=rngs),
            None,  # tanh-GELU: index 1 of the original nn.Sequential
            linear(config.ffn_dim, config.dim, axes=("mlp", "embed"), config=config, rngs=rngs),
        ])
        self.modulation = _modulation(rngs, 6, config.dim)

    def __call__(
        self,
        x: Float[Array, "B L C"],
        e0: Float[Array, "B 6 C"],
        context: Float[Array, "B T C"],
        context_img: Float[Array, "B I C"] | None,
        rope: tuple[Array, Array],
        attend: Attend,
        cross_attend: Attend = dense_attention,
    ) -> Float[Array, "B L C"]:
        """Returns the float32 residual stream [batch, tokens, dim] after the block.

        attend: self-attention over the tokens; cross_attend: dense attention to the context.
        """
        e = self.modulation[...] + e0
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (e[:, i : i + 1] for i in range(6))
        y = self.self_attn(layer_norm(x, self.eps) * (1 + scale) + shift, rope, attend)
        x = x + y.astype(F32) * gate
        x = x + self.cross_attn(self.norm3(x), context, context_img, cross_attend).astype(F32)
        h = layer_norm(x, self.eps) * (1 + ffn_scale) + ffn_shift
        y = self.ffn[2](constrain(gelu_tanh(self.ffn[0](h)), FFN_AXES))
        return x + y.astype(F32) * ffn_gate


class Head(nnx.Module):
    """Final modulated LayerNorm and projection to patch pixels, float32 as in the original."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.eps = config.eps
        # The original zero-initialises head.head for training from scratch; we keep a random
        # init so that an unconverted model's output still depends on every layer (tests).
        self.head = linear(config.dim, math.prod(config.patch_size) * config.out_dim, axes=("embed", None),
                           config=config, rngs=rngs, precise=True)  # fmt: skip
        self.modulation = _modulation(rngs, 2, config.dim)

    def __call__(self, x: Float[Array, "B L C"], e: Float[Array, "B C"]) -> Float[Array, "B L P"]:
        mod = self.modulation[...] + e[:, None, :]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        return self.head(layer_norm(x, self.eps) * (1 + scale) + shift)


class ImageEmbedding(nnx.Module):
    """I2V: CLIP features [B, 257, img_dim] -> context tokens [B, 257, dim] (the original MLPProj)."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.proj = nnx.List([
            LayerNorm(config.img_dim, eps=TORCH_LAYER_NORM_EPS, axes=("norm",)),
            linear(config.img_dim, config.img_dim, axes=(None, "mlp"), config=config, rngs=rngs),
            None,  # exact GELU
            linear(config.img_dim, config.dim, axes=("mlp", "embed"), config=config, rngs=rngs),
            LayerNorm(config.dim, eps=TORCH_LAYER_NORM_EPS),
        ])

    def __call__(self, clip_fea: Float[Array, "B I E"]) -> Float[Array, "B I C"]:
        h = self.proj[3](gelu_exact(self.proj[1](self.proj[0](clip_fea))))
        return self.proj[4](h)


class WanModel(nnx.Module):
    """Wan2.1 DiT. See the module docstring for the call; `config` is static."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
        self.config = config
        dim, patch = config.dim, config.patch_size
        normal = nnx.initializers.normal(EMBEDDING_INIT_STD)
        self.patch_embedding = nnx.Conv(
            config.in_dim, dim, kernel_size=patch, strides=patch, padding="VALID",
            dtype=compute_dtype(config), param_dtype=jnp.dtype(config.param_dtype),
            kernel_init=with_axes(nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2, 3)),
                                  (None, None, None, None, "embed")),
            bias_init=with_axes(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs,
        )
        self.text_embedding = nnx.List([
            linear(config.text_dim, dim, axes=(None, "mlp"), config=config, rngs=rngs, kernel_init=normal),
            None,  # tanh-GELU
            linear(dim, dim, axes=("mlp", "embed"), config=config, rngs=rngs, kernel_init=normal),
        ])
        self.time_embedding = nnx.List([
            linear(config.freq_dim, dim, axes=(None, "mlp"), config=config, rngs=rngs, precise=True,
                   kernel_init=normal),
            None,  # SiLU
            linear(dim, dim, axes=("mlp", "embed"), config=config, rngs=rngs, precise=True, kernel_init=normal),
        ])  # fmt: skip
        self.time_projection = nnx.List([None, linear(dim, 6 * dim, axes=("embed", "mlp"), config=config,
                                                      rngs=rngs, precise=True)])  # fmt: skip
        self.blocks = nnx.List([WanBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.head = Head(config, rngs=rngs)
        if config.uses_clip:
            self.img_emb = ImageEmbedding(config, rngs=rngs)

    def __call__(
        self,
        latents: Float[Array, "B F H W Cin"],
        timestep: Float[Array, "B"],
        context: Float[Array, "B T Ct"],
        *,
        plan: RadialPlan | None = None,
        dense: bool = False,
        clip_fea: Float[Array, "B I E"] | None = None,
        y: Float[Array, "B F H W Cy"] | None = None,
        remat: bool = False,
    ) -> Float[Array, "B F H W Cout"]:
        """Returns the model output (flow prediction) [B, F, H, W, out_dim], float32.

        latents: noisy latents, channels-last; timestep: [B] in [0, 1000]; context: text
        embeddings (umT5), zero-padded here to config.text_len as the original does; plan: the
        self-attention plan (None: dense everywhere); dense=True runs every layer dense (a
        plan.is_dense_step step); I2V also takes clip_fea [B, 257, img_dim] and
        y [B, F, H, W, in_dim - C] (mask + first-frame latents, concatenated to the latents on
        channels); remat: jax.checkpoint each block (training: activations recomputed in the
        backward pass).
        """
        out, _ = self._forward(latents, timestep, context, clip_fea, y, plan, dense, remat, False)
        return out

    def block_outputs(
        self,
        latents: Float[Array, "B F H W Cin"],
        timestep: Float[Array, "B"],
        context: Float[Array, "B T Ct"],
        *,
        plan: RadialPlan | None = None,
        dense: bool = False,
        clip_fea: Float[Array, "B I E"] | None = None,
        y: Float[Array, "B F H W Cy"] | None = None,
    ) -> list[Float[Array, "B L C"]]:
        """Returns the residual stream [B, F*H*W/patch, dim] after each block (to localise mismatches)."""
        _, outputs = self._forward(latents, timestep, context, clip_fea, y, plan, dense, False, True)
        return outputs

    def _forward(self, latents, timestep, context, clip_fea, y, plan, dense: bool, remat: bool, collect: bool):
        x, grid = self._patchify(latents, y)
        e = self._time_embedding(timestep)
        e0 = self.time_projection[1](jax.nn.silu(e)).reshape(e.shape[0], 6, self.config.dim)
        context, context_img = self._context(context, clip_fea)
        rope = rope_tables(grid, self.config.head_dim, self.config.rope_theta)
        frames, height, width = grid
        length = x.shape[1]
        # A `sequence` axis in the active mesh splits the tokens (radial_jax/parallel.py).
        sharding = token_sharding() if sequence_parallel_size() > 1 else None
        if sharding is not None:
            x, rope = _shard_tokens(x, rope, sharding)
        cross_attend = dense_attention if sharding is None else sequence_parallel_cross(dense_attention)

        def stream(x):  # the residual stream's layout at block edges: tokens over `sequence` when split
            if sharding is None:
                return constrain(x, STREAM_AXES)
            return jax.lax.with_sharding_constraint(x, sharding.spec(x.shape[0]))

        outputs = []
        for i, block in enumerate(self.blocks):
            attend = self_attention(plan, frames, height * width, layer=i, dense=dense)
            if sharding is not None:
                attend = sequence_parallel(attend, valid_len=length)
            x = _run_block(block, stream(x), e0, context, context_img, rope, attend, cross_attend, remat=remat)
            x = stream(x)
            if collect:
                outputs.append(x[:, :length])
        return self._unpatchify(self.head(x, e)[:, :length], grid), outputs

    def _patchify(self, latents, y) -> tuple[Array, tuple[int, int, int]]:
        """Returns tokens float32 [B, F*H*W/patch, dim] and the latent grid after patching."""
        config = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be [batch, frames, height, width, channels], got {latents.shape}")
        if y is not None:
            latents = jnp.concatenate([latents.astype(F32), y.astype(F32)], axis=-1)
        if latents.shape[-1] != config.in_dim:
            raise ValueError(f"latents (+ y) have {latents.shape[-1]} channels; this model takes in_dim="
                             f"{config.in_dim}" + (" (I2V: pass y with the mask and image latents)"
                                                   if config.model_type == "i2v" else ""))
        if any(size % p for size, p in zip(latents.shape[1:4], config.patch_size)):
            raise ValueError(f"latent (frames, height, width) {latents.shape[1:4]} must be multiples of "
                             f"patch_size {config.patch_size}")
        tokens = self.patch_embedding(latents)  # [B, F', H', W', dim]
        grid = tuple(tokens.shape[1:4])
        return tokens.reshape(tokens.shape[0], -1, config.dim).astype(F32), grid

    def _time_embedding(self, timestep) -> Array:
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be [batch], got shape {timestep.shape}")
        h = self.time_embedding[0](sinusoidal_embedding(timestep, self.config.freq_dim))
        return self.time_embedding[2](jax.nn.silu(h))

    def _context(self, context, clip_fea) -> tuple[Array, Array | None]:
        config = self.config
        if context.ndim != 3 or context.shape[1] > config.text_len:
            raise ValueError(f"context must be [batch, <= text_len={config.text_len}, text_dim], got {context.shape}")
        context = jnp.pad(context, ((0, 0), (0, config.text_len - context.shape[1]), (0, 0)))
        context = self.text_embedding[2](gelu_tanh(self.text_embedding[0](context)))
        if not config.uses_clip:
            if clip_fea is not None:
                raise ValueError("clip_fea is for Wan2.1 I2V models; this model takes no CLIP features")
            return context, None
        if clip_fea is None:
            raise ValueError("an I2V model needs clip_fea [batch, 257, img_dim] (and y)")
        return context, self.img_emb(clip_fea)

    def _unpatchify(self, patches, grid) -> Array:
        """Returns [B, F, H, W, out_dim] from per-token patch pixels [B, L, pt*ph*pw*out_dim]."""
        (f, h, w), (pt, ph, pw), c = grid, self.config.patch_size, self.config.out_dim
        x = patches.reshape(patches.shape[0], f, h, w, pt, ph, pw, c)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(patches.shape[0], f * pt, h * ph, w * pw, c)


def _shard_tokens(x, rope, sharding: TokenSharding):
    """Returns x and the RoPE tables zero-padded to a multiple of the sequence devices, x split
    over them (its padding rows are never attended: sequence_parallel's valid_len)."""
    pad = -x.shape[1] % sharding.shards
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    rope = tuple(jnp.pad(table, ((0, pad), (0, 0))) for table in rope)
    return jax.lax.with_sharding_constraint(x, sharding.spec(x.shape[0])), rope


def _run_block(block, x, e0, context, context_img, rope, attend: Attend, cross_attend: Attend, *, remat: bool):
    def run(block, x, e0, context, context_img, rope):
        return block(x, e0, context, context_img, rope, attend, cross_attend)

    if remat:
        run = nnx.remat(run)
    return run(block, x, e0, context, context_img, rope)
