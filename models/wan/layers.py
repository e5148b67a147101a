"""Building blocks of the Wan2.1 DiT: norms, linear layers with the original's precision split,
and the sinusoidal timestep embedding.

Precision follows the original (it runs under bfloat16 autocast with float32 weights, and
switches autocast to float32 for the time embedding, modulation and head): the large matmuls
use config.param_dtype/config.dtype, everything marked `precise` is float32 at HIGHEST
precision (on a GPU DEFAULT would mean TF32), and norms compute in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.wan.config import WanConfig
from radial_jax.sharding import LogicalAxes, param, with_axes

F32 = jnp.float32
TIMESTEP_MAX_PERIOD = 10000.0  # sinusoidal embedding wavelengths span 2*pi .. 2*pi*10000


def compute_dtype(config: WanConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    config: WanConfig,
    rngs: nnx.Rngs,
    precise: bool = False,
    kernel_init=nnx.initializers.xavier_uniform(),
) -> nnx.Linear:
    """Returns an nnx.Linear: kernel [in, out] and bias [out], float32 if `precise`; the kernel
    carries the logical axis names `axes` (radial_jax.sharding), the bias axes[1]."""
    param_dtype = F32 if precise else jnp.dtype(config.param_dtype)
    dtype = F32 if precise else compute_dtype(config)
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype,
        precision=jax.lax.Precision.HIGHEST if dtype == F32 else None,
        kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(nnx.initializers.zeros_init(), axes[1:]),
        rngs=rngs,
    )


def layer_norm(x: Float[Array, "*B C"], eps: float) -> Float[Array, "*B C"]:
    """Returns the float32 LayerNorm of x without affine parameters (biased variance, like torch)."""
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 scale and bias; returns float32."""

    def __init__(self, dim: int, *, eps: float, axes: LogicalAxes = ("embed",)):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), F32), axes)
        self.bias = param(jnp.zeros((dim,), F32), axes)

    def __call__(self, x: Float[Array, "*B C"]) -> Float[Array, "*B C"]:
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a float32 scale; returns float32.

    The original normalises in float32, rounds back to the input dtype and then multiplies by
    the float32 weight; that rounding is kept so bfloat16 runs see the original's values.
    """

    def __init__(self, dim: int, *, eps: float, axes: LogicalAxes = ("heads",)):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), F32), axes)

    def __call__(self, x: Float[Array, "*B C"]) -> Float[Array, "*B C"]:
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype).astype(F32) * self.scale[...]


def sinusoidal_embedding(timestep: Float[Array, "B"], dim: int) -> Float[Array, "B C"]:
    """Returns float32 [batch, dim]: cos(t * w_j) then sin(t * w_j), w_j = 10000 ** (-j / (dim/2)).

    The original computes in float64; the frequencies are rounded once from float64 here and
    the angles formed in float32 (as diffusers does), which costs ~1e-5 relative at t ~ 1000.
    """
    half = dim // 2
    freqs = np.power(TIMESTEP_MAX_PERIOD, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
    angles = timestep.astype(F32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)
