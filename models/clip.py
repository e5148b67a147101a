"""The CLIP image encoder of Wan2.1 I2V (open-clip xlm-roberta-large-vit-huge-14, visual tower) in Flax NNX.

Wan2.1 (wan/modules/clip.py, CLIPModel.visual) resizes the conditioning image to 224x224,
normalises it with OpenAI CLIP's mean and std, and runs the ViT-H/14 visual tower without its
last block (`use_31_block=True`): [B, 257, 1280] features of the class token and 16x16 patches,
before any final norm. diffusers gets the same tensor as transformers'
CLIPVisionModel(...).hidden_states[-2]. So `CLIPVisionEncoder` holds only the first
`num_layers - 1` blocks of a `num_layers`-block checkpoint; the converters skip the rest.

The network is a pre-norm ViT: a patch conv without bias, a class token and learned positions,
a pre-norm, then blocks of x + attn(norm1(x)), x + mlp(norm2(x)) with exact GELU. Layer norms
compute in float32 (the original's LayerNorm upcasts). Parameter names follow the original
(patch_embedding, cls_embedding, pos_embedding, pre_norm, transformer.n.norm1/attn/norm2/mlp.0/
mlp.2, attn.proj) except that its fused `to_qkv` is three Linears q, k, v (transformers keeps
them apart; the original's converter splits the fused weight by rows).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from radial_jax.sharding import param, with_axes

# OpenAI CLIP's pixel statistics (the original's transforms.Normalize), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT hyper-parameters (the original's vision_* fields); num_layers counts the checkpoint's
    blocks, of which the first num_layers - 1 run. dtype is params and compute."""

    image_size: int = 224  # pixels, square
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5
    dtype: str = "bfloat16"  # Wan runs it under float16 autocast; bf16 keeps float32's range

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of num_heads={self.num_heads}")
        if self.num_layers < 2:
            raise ValueError(f"num_layers={self.num_layers}: Wan uses the penultimate block's output, needs >= 2")

    @property
    def num_tokens(self) -> int:
        """Class token + patches (257 for ViT-H/14 at 224)."""
        return 1 + (self.image_size // self.patch_size) ** 2


CLIP_VIT_H_14 = CLIPVisionConfig()
CLIP_TINY = CLIPVisionConfig(image_size=28, dim=160, mlp_dim=320, num_heads=2, num_layers=3, dtype="float32")


class LayerNorm(nnx.Module):
    """Affine LayerNorm computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = param(jnp.ones((dim,), dtype), ("embed",))
        self.bias = param(jnp.zeros((dim,), dtype), ("embed",))
        self.eps = eps

    def __call__(self, x: Float[Array, "*B C"]) -> Float[Array, "*B C"]:
        x32 = x.astype(F32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(F32) + self.bias[...].astype(F32)).astype(x.dtype)


def _linear(in_dim: int, out_dim: int, dtype, rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, dtype=dtype, param_dtype=dtype, rngs=rngs,
                      kernel_init=with_axes(nnx.initializers.lecun_normal(), axes),
                      bias_init=with_axes(nnx.initializers.zeros_init(), axes[1:]))  # fmt: skip


class SelfAttention(nnx.Module):
    """Multi-head softmax attention over all tokens (257: no need for a fused kernel)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.q, self.k, self.v = (_linear(config.dim, config.dim, dtype, rngs, ("embed", "heads")) for _ in range(3))
        self.proj = _linear(config.dim, config.dim, dtype, rngs, ("heads", "embed"))
        self.num_heads = config.num_heads

    def __call__(self, x: Float[Array, "B L C"]) -> Float[Array, "B L C"]:
        b, length, _ = x.shape
        q, k, v = (proj(x).reshape(b, length, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        # float32 logits and softmax: the CPU has no fast bf16 path and strict promotion wants one dtype.
        logits = jnp.einsum("blnd,bmnd->bnlm", q.astype(F32), k.astype(F32)) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bnlm,bmnd->blnd", probs, v.astype(F32)).astype(x.dtype)
        return self.proj(out.reshape(b, length, -1))


class AttentionBlock(nnx.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); mlp is the original's Sequential (0: fc, 1: GELU, 2: fc)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.norm1 = LayerNorm(config.dim, eps=config.eps, dtype=dtype)
        self.attn = SelfAttention(config, rngs=rngs)
        self.norm2 = LayerNorm(config.dim, eps=config.eps, dtype=dtype)
        self.mlp = nnx.List([
            _linear(config.dim, config.mlp_dim, dtype, rngs, ("embed", "mlp")),
            None,  # exact GELU (nn.GELU())
            _linear(config.mlp_dim, config.dim, dtype, rngs, ("mlp", "embed")),
        ])  # fmt: skip

    def __call__(self, x: Float[Array, "B L C"]) -> Float[Array, "B L C"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp[2](jax.nn.gelu(self.mlp[0](self.norm2(x)), approximate=False))


class CLIPVisionEncoder(nnx.Module):
    """Normalised pixels [B, S, S, 3] -> penultimate-block features [B, 1 + (S/P)^2, dim] float32."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, dim = jnp.dtype(config.dtype), config.dim
        gain = dim**-0.5  # the original's init scale for the class token and positions
        self.patch_embedding = nnx.Conv(3, dim, (config.patch_size,) * 2, strides=(config.patch_size,) * 2,
                                        padding="VALID", use_bias=False, dtype=dtype, param_dtype=dtype,
                                        kernel_init=with_axes(nnx.initializers.lecun_normal(),
                                                              (None, None, None, "embed")),
                                        rngs=rngs)  # fmt: skip
        self.cls_embedding = param(jax.random.normal(rngs.params(), (1, 1, dim), F32).astype(dtype) * gain,
                                   (None, None, "embed"))  # fmt: skip
        self.pos_embedding = param(
            jax.random.normal(rngs.params(), (1, config.num_tokens, dim), F32).astype(dtype) * gain, (None, None, "embed")
        )
        self.pre_norm = LayerNorm(dim, eps=config.eps, dtype=dtype)
        self.transformer = nnx.List([AttentionBlock(config, rngs=rngs) for _ in range(config.num_layers - 1)])

    def __call__(self, pixels: Float[Array, "B S S 3"]) -> Float[Array, "B I C"]:
        """pixels: as `preprocess` returns them ([B, image_size, image_size, 3])."""
        c = self.config
        if pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"pixels must be [B, {c.image_size}, {c.image_size}, 3], got {pixels.shape}")
        patches = self.patch_embedding(pixels.astype(c.dtype))  # [B, S/P, S/P, dim]
        x = patches.reshape(patches.shape[0], -1, c.dim)
        cls = jnp.broadcast_to(self.cls_embedding[...], (x.shape[0], 1, c.dim))
        x = self.pre_norm(jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...])
        for block in self.transformer:
            x = block(x)
        return x.astype(F32)


def preprocess(image: Float[Array | np.ndarray, "B H W 3"], image_size: int) -> Float[Array, "B S S 3"]:
    """Returns the encoder's input [B, image_size, image_size, 3] from images in [-1, 1].

    As the original: resized (aspect not kept) with bicubic interpolation, no antialiasing,
    mapped to [0, 1] and normalised by CLIP_MEAN/CLIP_STD. jax's cubic kernel is Keys' a=-0.5
    where torch's bicubic uses a=-0.75: resampled pixels differ slightly (not at 224x224 input).
    """
    image = image.astype(F32)
    if image.shape[1:3] != (image_size, image_size):
        image = jax.image.resize(image, (image.shape[0], image_size, image_size, 3), "cubic", antialias=False)
    mean, std = jnp.asarray(CLIP_MEAN, F32), jnp.asarray(CLIP_STD, F32)
    return ((image * 0.5 + 0.5) - mean) / std


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, image):
    encoder = nnx.merge(graphdef, state)
    return encoder(preprocess(image, encoder.config.image_size))


def encode_image(encoder: CLIPVisionEncoder, image: Float[Array | np.ndarray, "B H W 3"]) -> Float[Array, "B I C"]:
    """Returns Wan's CLIP features [B, 257, 1280] (float32) of images in [-1, 1], jitted."""
    graphdef, state = nnx.split(encoder)
    return _encode(graphdef, state, jnp.asarray(image, F32))
