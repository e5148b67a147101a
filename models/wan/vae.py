"""The Wan2.1 video VAE in Flax NNX: causal 3D conv encoder/decoder, 4x8x8 compression, z_dim 16.

Channels-last: videos are [B, F, H, W, 3] in [-1, 1], latents [B, 1 + (F-1)/4, H/8, W/8, z_dim].
Like the original (Wan2.1 wan/modules/vae.py) the video is processed in temporal chunks with a
cache of the last two input frames of every causal conv: the encoder takes the first frame
alone, then 4 frames at a time, each giving one latent frame; the decoder takes one latent
frame at a time, giving 1 pixel frame for the first and 4 for each later one. Peak memory is
one chunk's activations, so 81- and 161-frame 720p videos fit on one GPU. Each chunk is one
jitted call (the first chunk and the steady-state chunk compile once per spatial size, for any
frame count) carrying the caches as a pytree; the caches are donated between calls. At 720p
(latents 90 x 160) a decode step holds ~8 GiB of caches and ~11 GiB of temporaries in float32
(memory analysis of the step compiled by XLA for the CPU; ~4 + 9 GiB in bf16), for any frame count.

Latents are normalised as Wan does: encode returns (mu - latents_mean) / latents_std and
decode undoes that before decoding; decoded videos are clipped to [-1, 1].
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models import static_graph
from models.wan.vae_blocks import AttentionBlock, ResidualBlock, Resample, RMSNorm, conv3d, conv_with_cache

TEMPORAL_STRIDE = 4  # pixel frames per latent frame (after the first)
SPATIAL_STRIDE = 8  # pixels per latent pixel, each way

# Per-channel statistics of Wan2.1 VAE latents (wan/modules/vae.py, WanVAE.__init__).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE hyper-parameters (the original's _video_vae cfg); dtype is params and compute."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"  # Wan runs its VAE in float32

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries"
            )
        if sum(self.temporal_downsample) != 2 or len(self.dim_mult) != 4:
            raise ValueError("only Wan's 4x8x8 layout is supported: 4 levels, 2 of them temporal")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries")


WAN21_VAE = VAEConfig()
VAE_TINY = VAEConfig(base_dim=8)  # CPU tests and the no-checkpoint demo


class Encoder3d(nnx.Module):
    """Video [B, F, H, W, 3] -> [B, F', H/8, W/8, 2*z_dim] (mu and log-variance)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = conv3d(3, dims[0], dtype=dtype, rngs=rngs)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if level != len(config.dim_mult) - 1:
                mode = "downsample3d" if config.temporal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
        self.downsamples = nnx.List(blocks)
        self.middle = nnx.List(_middle(dims[-1], dtype, rngs))
        self.head_norm = RMSNorm(dims[-1], dtype=dtype)
        self.head_conv = conv3d(dims[-1], 2 * config.z_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: list | None = None) -> tuple[jax.Array, list]:
        """Returns (features of this chunk, the caches for the next); cache None: first chunk."""
        return _run_chunk(self, (*self.downsamples, *self.middle), x, cache)


class Decoder3d(nnx.Module):
    """Latents [B, F, h, w, z_dim] -> video [B, F', 8h, 8w, 3] (F' = 1 first chunk, else 4F)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = conv3d(config.z_dim, dims[0], dtype=dtype, rngs=rngs)
        self.middle = nnx.List(_middle(dims[0], dtype, rngs))
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:  # the previous level's upsampler halved the channels
                in_dim //= 2
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dtype=dtype, rngs=rngs))
                in_dim = out_dim
            if level != len(mult) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
                blocks.append(Resample(out_dim, mode, dtype=dtype, rngs=rngs))
        self.upsamples = nnx.List(blocks)
        self.head_norm = RMSNorm(dims[-1], dtype=dtype)
        self.head_conv = conv3d(dims[-1], 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: list | None = None) -> tuple[jax.Array, list]:
        """Returns (pixels of this chunk, the caches for the next); cache None: first chunk."""
        return _run_chunk(self, (*self.middle, *self.upsamples), x, cache)


def _middle(dim, dtype, rngs):
    return [
        ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
        AttentionBlock(dim, dtype=dtype, rngs=rngs),
        ResidualBlock(dim, dim, dtype=dtype, rngs=rngs),
    ]


def _run_chunk(coder, blocks, x, cache):
    """conv1, blocks, head (the original's order); caches are a flat list in that order."""
    old = iter(cache) if cache is not None else iter([None] * (len(blocks) + 2))
    new = []
    x, layer_cache = conv_with_cache(coder.conv1, x, next(old))
    new.append(layer_cache)
    for block in blocks:
        x, layer_cache = block(x, next(old))
        new.append(layer_cache)
    x, layer_cache = conv_with_cache(coder.head_conv, jax.nn.silu(coder.head_norm(x)), next(old))
    new.append(layer_cache)
    return x, new


class WanVAE(nnx.Module):
    """The Wan2.1 VAE; use `encode` and `decode` below. conv1/conv2 are the original's 1x1x1
    convs after the encoder and before the decoder (diffusers: quant_conv, post_quant_conv)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        z = config.z_dim
        self.encoder = Encoder3d(config, rngs=rngs)
        self.conv1 = conv3d(2 * z, 2 * z, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.conv2 = conv3d(z, z, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.decoder = Decoder3d(config, rngs=rngs)


def _encode_chunk(graphdef, state, video_chunk, cache):
    vae = nnx.merge(graphdef.graphdef, state)
    features, cache = vae.encoder(video_chunk.astype(vae.config.dtype), cache)
    return vae.conv1(features).astype(jnp.float32), cache


def _decode_chunk(graphdef, state, latent_frame, cache):
    vae = nnx.merge(graphdef.graphdef, state)
    pixels, cache = vae.decoder(vae.conv2(latent_frame.astype(vae.config.dtype)), cache)
    return jnp.clip(pixels.astype(jnp.float32), -1.0, 1.0), cache


_encode_first = jax.jit(functools.partial(_encode_chunk, cache=None), static_argnums=0)
_encode_next = jax.jit(_encode_chunk, static_argnums=0, donate_argnums=3)
_decode_first = jax.jit(functools.partial(_decode_chunk, cache=None), static_argnums=0)
_decode_next = jax.jit(_decode_chunk, static_argnums=0, donate_argnums=3)


def encode_moments(
    vae: WanVAE, video: Float[Array | np.ndarray, "B F H W 3"]
) -> tuple[Float[Array, "B f h w z"], Float[Array, "B f h w z"]]:
    """Returns (mu, log-variance) of the posterior, float32, not normalised (diffusers' latent_dist).

    video: [B, F, H, W, 3] in [-1, 1], F = 4k+1, H and W multiples of 8; the outputs are
    [B, 1 + (F-1)/4, H/8, W/8, z_dim]. log-variance is not clamped.
    """
    _check_video(video.shape)
    graphdef, state = static_graph.split(vae)
    moments, cache = _encode_first(graphdef, state, video[:, :1])
    chunks = [moments]
    for start in range(1, video.shape[1], TEMPORAL_STRIDE):
        moments, cache = _encode_next(graphdef, state, video[:, start : start + TEMPORAL_STRIDE], cache)
        chunks.append(moments)
    return tuple(jnp.split(jnp.concatenate(chunks, axis=1), 2, axis=-1))


def encode(vae: WanVAE, video: Float[Array | np.ndarray, "B F H W 3"]) -> Float[Array, "B f h w z"]:
    """Returns Wan-normalised latents (mu - mean) / std, float32 [B, 1 + (F-1)/4, H/8, W/8, z_dim]."""
    mu, _ = encode_moments(vae, video)
    mean, inv_std = _latent_stats(vae.config)
    return (mu - mean) * inv_std  # the original multiplies by 1/std


def decode(vae: WanVAE, latents: Float[Array | np.ndarray, "B f h w z"]) -> Float[Array, "B F H W 3"]:
    """Returns the video, float32 [B, 1 + 4(f-1), 8h, 8w, 3] clipped to [-1, 1].

    latents: Wan-normalised, [B, f, h, w, z_dim] (as `encode` returns and the DiT samples).
    """
    return jnp.concatenate(list(decode_chunks(vae, latents)), axis=1)


def decode_chunks(vae: WanVAE, latents: Float[Array | np.ndarray, "B f h w z"]) -> Iterator[Float[Array, "B n H W 3"]]:
    """Yields `decode`'s video one latent frame at a time: [B, 1, H, W, 3], then [B, 4, H, W, 3] each,
    float32 clipped to [-1, 1]; each chunk is dispatched (not finished) when it is yielded, so a
    consumer can start its copy to the host while the next one runs."""
    if latents.ndim != 5 or latents.shape[-1] != vae.config.z_dim:  # checked now, not at the first next()
        raise ValueError(f"latents must be [B, F, H, W, {vae.config.z_dim}], got {latents.shape}")
    mean, inv_std = _latent_stats(vae.config)
    return _chunks(*static_graph.split(vae), latents.astype(jnp.float32) / inv_std + mean)


def _chunks(graphdef, state, z):
    pixels, cache = _decode_first(graphdef, state, z[:, :1])
    yield pixels
    for frame in range(1, z.shape[1]):
        pixels, cache = _decode_next(graphdef, state, z[:, frame : frame + 1], cache)
        yield pixels


def _latent_stats(config: VAEConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(config.latents_mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(config.latents_std, np.float32)
    return mean, inv_std


def _check_video(shape: tuple[int, ...]) -> None:
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"video must be [B, F, H, W, 3], got shape {shape}")
    frames, height, width = shape[1:4]
    if (frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"frames={frames} must be 4k+1 (e.g. 1, 5, 81)")
    if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ValueError(f"height={height} and width={width} must be multiples of {SPATIAL_STRIDE}")
