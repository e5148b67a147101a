"""Wan's flow-matching training objective.

For clean latents x0 and Gaussian noise n at noise level sigma in (0, 1):
    x_sigma = (1 - sigma) x0 + sigma n,   target v = n - x0,   timestep = sigma * 1000,
and the loss is the mean squared error between the DiT's prediction and v, in float32 (the
same parametrisation models/wan/sampler.py integrates). sigma is drawn per sample: u from
uniform(0, 1) or logit-normal (sigmoid of N(mean, std), SD3's choice, which spends more steps
at mid noise), then shifted like the sampler's schedule, sigma = s u / (1 + (s - 1) u), so the
training noise levels lean the way inference visits them (shift > 1: towards high noise,
which long or large videos need; Wan samples 720p at shift 5).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

F32 = jnp.float32
NUM_TRAIN_TIMESTEPS = 1000  # timestep = sigma * 1000, as Wan's scheduler
DISTRIBUTIONS = ("logit_normal", "uniform")
SIGMA_EPS = 1e-5  # keep sigma off 0 and 1: both ends carry no training signal for v


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """How noise levels are drawn: shift s, and u ~ `distribution` (logit_mean/logit_std for
    logit_normal)."""

    shift: float = 5.0
    distribution: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"objective shift={self.shift} must be positive (1 = no shift; Wan uses 3 to 5)")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"objective distribution={self.distribution!r} must be one of {DISTRIBUTIONS}")
        if self.logit_std <= 0:
            raise ValueError(f"objective logit_std={self.logit_std} must be positive")


def shift_sigma(u: Float[Array, "*B"], shift: float) -> Float[Array, "*B"]:
    """Returns s u / (1 + (s - 1) u): the sampler's shift applied to noise levels u in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(key: jax.Array, batch: int, objective: FlowMatching) -> Float[Array, "B"]:
    """Returns float32 [batch] noise levels in [SIGMA_EPS, 1 - SIGMA_EPS]."""
    if objective.distribution == "uniform":
        u = jax.random.uniform(key, (batch,), F32)
    else:
        u = jax.nn.sigmoid(objective.logit_mean + objective.logit_std * jax.random.normal(key, (batch,), F32))
    return jnp.clip(shift_sigma(u, objective.shift), SIGMA_EPS, 1 - SIGMA_EPS)


def noisy_latents(
    x0: Float[Array, "B F H W C"], noise: Float[Array, "B F H W C"], sigma: Float[Array, "B"]
) -> tuple[Float[Array, "B F H W C"], Float[Array, "B F H W C"]]:
    """Returns (x_sigma, target v = noise - x0), float32."""
    x0, noise = x0.astype(F32), noise.astype(F32)
    s = sigma.astype(F32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(
    predict: Callable[[Array, Array], Array],
    x0: Float[Array, "B F H W C"],
    key: jax.Array,
    objective: FlowMatching,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Returns (loss, {"sigma": [B], "per_sample": [B]}): the float32 MSE of
    predict(x_sigma, timestep [B]) against noise - x0, averaged over every element."""
    sigma_key, noise_key = jax.random.split(key)
    sigma = sample_sigmas(sigma_key, x0.shape[0], objective)
    noise = jax.random.normal(noise_key, x0.shape, F32)
    x_sigma, target = noisy_latents(x0, noise, sigma)
    prediction = predict(x_sigma, sigma * NUM_TRAIN_TIMESTEPS).astype(F32)
    per_sample = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_sample), {"sigma": sigma, "per_sample": per_sample}
