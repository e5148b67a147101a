"""Blocks of the Wan2.1 causal video VAE, channels-last, each continuing from a time cache.

Tensors are [B, F, H, W, C] (batch, frames, height, width, channels). A causal conv with a
3-frame kernel needs the 2 input frames before its chunk; the original keeps them in a list of
"feature caches" it mutates. Here every block takes the caches of its convs as a pytree and
returns (output, new caches), so a chunk loop can carry them through jit. `cache=None` marks
the first chunk: convs start from zero history (the original zero-pads the time axis) and the
temporal resamplers behave as the original's first chunk (see Resample).

Attribute names follow the original (wan/modules/vae.py) where it names things (conv1, shortcut,
to_qkv, proj, resample, time_conv); its nn.Sequential slots get names: `residual.0/2/3/6` are
norm1/conv1/norm2/conv2 and `head.0/2` are head_norm/head_conv. Convs are nnx.Conv (kernel
[*window, C_in, C_out]) and 1x1 convs of the attention block nnx.Linear (kernel [C_in, C_out]).
"""

import jax
import jax.numpy as jnp
from flax import nnx

CACHE_FRAMES = 2  # input frames of history a 3-frame causal kernel needs (the original's CACHE_T)
RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

# torch's default Conv/Linear init, uniform(+-1/sqrt(fan_in)), so a randomly initialised model
# has the activation scale of the original's; biases start at zero.
_TORCH_UNIFORM = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def conv3d(in_dim: int, out_dim: int, window=(3, 3, 3), *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Returns a 3D conv, valid in time and 'same' in space (the caller supplies the time history)."""
    padding = ((0, 0), *((k // 2, k // 2) for k in window[1:]))  # tuples: hashable graphdef
    return nnx.Conv(
        in_dim, out_dim, window, padding=padding, dtype=dtype, param_dtype=dtype,
        kernel_init=_TORCH_UNIFORM, rngs=rngs,
    )


def conv_with_cache(conv: nnx.Conv, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Returns (conv over frames [cache, x], the last CACHE_FRAMES of them as the next cache).

    x: [B, F, H, W, C]; cache: [B, 2, H, W, C], the two input frames before x, None (zeros) for
    the first chunk. The output has F frames ([B, F, H', W', C_out]).
    """
    if cache is None:
        cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
    frames = jnp.concatenate([cache, x], axis=1)
    if conv.kernel_size == (3, 3, 3) and conv.padding == ((0, 0), (1, 1), (1, 1)) and conv.strides in (1, (1, 1, 1)):
        return _frame_stacked_conv(conv, frames), frames[:, -CACHE_FRAMES:]
    return conv(frames), frames[:, -CACHE_FRAMES:]


def _frame_stacked_conv(conv: nnx.Conv, frames: jax.Array) -> jax.Array:
    """Returns conv(frames) for a 3x3x3 conv, valid in time and 'same' in space, as one 2D conv.

    frames: [B, F + 2, H, W, C] -> [B, F, H, W, C_out]. Output frame t sums kernel tap k over input
    frame t + k; stacking the three frame windows on the channel axis makes that one 3x3 2D conv
    over B * F images with 3C input channels: the same products and sum, which cuDNN runs 1.2-1.3x
    faster than its 3D conv at the decoder's 720p sizes (benchmarks/results/fast-parts-h200.json).
    """
    b, padded, h, w, c = frames.shape
    f = padded - CACHE_FRAMES
    windows = [frames[:, k : k + f].reshape(b * f, h, w, c) for k in range(3)]
    dtype = conv.dtype or frames.dtype
    stacked = jnp.concatenate(windows, axis=-1).astype(dtype)  # channel k * C + c: window k's c
    kernel = conv.kernel[...]  # [3 (time), 3, 3, C, C_out]
    kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, kernel.shape[-1]).astype(dtype)
    out = jax.lax.conv_general_dilated(stacked, kernel, (1, 1), ((1, 1), (1, 1)), precision=conv.precision,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    if conv.bias is not None:
        out = out + conv.bias[...].astype(dtype)
    return out.reshape(b, f, h, w, out.shape[-1])


class RMSNorm(nnx.Module):
    """x / ||x|| * sqrt(C) * gamma over the channel axis (F.normalize, as the original)."""

    def __init__(self, dim: int, *, dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32: the sum of squares over hundreds of bf16 channels would lose digits.
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        normalized = x32 / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5)
        return normalized.astype(x.dtype) * self.gamma[...]


class ResidualBlock(nnx.Module):
    """norm-silu-conv3d twice plus a (1x1x1 conv) shortcut; cache: (conv1's, conv2's)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim, dtype=dtype)
        self.conv1 = conv3d(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(out_dim, dtype=dtype)
        self.conv2 = conv3d(out_dim, out_dim, dtype=dtype, rngs=rngs)
        self.shortcut = conv3d(in_dim, out_dim, (1, 1, 1), dtype=dtype, rngs=rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache=None) -> tuple[jax.Array, tuple]:
        """x: [B, F, H, W, C_in] -> [B, F, H, W, C_out]."""
        cache1, cache2 = (None, None) if cache is None else cache
        h = x if self.shortcut is None else self.shortcut(x)
        x, cache1 = conv_with_cache(self.conv1, jax.nn.silu(self.norm1(x)), cache1)
        x, cache2 = conv_with_cache(self.conv2, jax.nn.silu(self.norm2(x)), cache2)
        return x + h, (cache1, cache2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame; no time cache."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dtype=dtype)
        linear = dict(dtype=dtype, param_dtype=dtype, kernel_init=_TORCH_UNIFORM, rngs=rngs)
        self.to_qkv = nnx.Linear(dim, 3 * dim, **linear)
        self.proj = nnx.Linear(dim, dim, **linear)

    def __call__(self, x: jax.Array, cache=None) -> tuple[jax.Array, None]:
        """x: [B, F, H, W, C] -> [B, F, H, W, C]."""
        b, f, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * f, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("blc,bmc->blm", q, k, preferred_element_type=jnp.float32) * c**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("blm,bmc->blc", probs, v).reshape(b, f, h, w, c)
        return x + self.proj(out), None


class Resample(nnx.Module):
    """2x spatial up/down-sampling, with 2x temporal up/down-sampling in the "3d" modes.

    upsample: nearest 2x then a 3x3 conv to dim // 2 channels; upsample3d first doubles the frames
    with a causal (3,1,1) conv to 2*dim channels, the two halves being frames 2t and 2t+1.
    downsample: pad right/bottom by one, 3x3 conv with stride 2; downsample3d then halves the
    frames with a (3,1,1) conv of stride 2 over [last frame of the previous chunk, chunk].
    First chunk (cache None), as the original: upsample3d skips its temporal conv (1 frame stays
    1 frame) and leaves a zero history; downsample3d skips its temporal conv and keeps the frame.
    """

    def __init__(self, dim: int, mode: str, *, dtype, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode={mode!r} must be one of {RESAMPLE_MODES}")
        self.mode = mode
        conv = dict(dtype=dtype, param_dtype=dtype, kernel_init=_TORCH_UNIFORM, rngs=rngs)
        if mode.startswith("upsample"):
            self.resample = nnx.Conv(dim, dim // 2, (3, 3), padding=((1, 1), (1, 1)), **conv)
        else:  # ZeroPad2d((0, 1, 0, 1)) then an unpadded stride-2 conv
            self.resample = nnx.Conv(dim, dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), **conv)
        if mode == "upsample3d":
            self.time_conv = nnx.Conv(dim, 2 * dim, (3, 1, 1), padding="VALID", **conv)
        elif mode == "downsample3d":
            self.time_conv = nnx.Conv(dim, dim, (3, 1, 1), strides=(2, 1, 1), padding="VALID", **conv)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache=None) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, F, H, W, C] -> [B, F', 2H, 2W, C/2] (up) or [B, F', H/2, W/2, C] (down)."""
        if self.mode == "upsample3d":
            x, cache = self._double_frames(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at scale 2
        x = self.resample(x)
        if self.mode == "downsample3d":
            x, cache = self._halve_frames(x, cache)
        return x, cache

    def _double_frames(self, x, cache):
        b, f, h, w, c = x.shape
        if cache is None:
            return x, jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
        pairs, cache = conv_with_cache(self.time_conv, x, cache)  # [B, F, H, W, 2C]
        pairs = pairs.reshape(b, f, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
        return pairs.reshape(b, 2 * f, h, w, c), cache

    def _halve_frames(self, x, cache):
        if cache is None:
            return x, x[:, -1:]
        return self.time_conv(jnp.concatenate([cache, x], axis=1)), x[:, -1:]
