"""train/objective.py: Wan's flow matching against float64 numpy and the sigma distributions'
quantiles against their closed forms."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.objective import FlowMatching, flow_matching_loss, noisy_latents, sample_sigmas, shift_sigma

QUARTILES = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
NORMAL_QUARTILES = np.array([statistics.NormalDist().inv_cdf(q) for q in QUARTILES])


def _shift64(u, s):
    return s * u / (1 + (s - 1) * u)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_uniform_sigmas_have_the_shifted_uniform_quantiles(shift):
    sigmas = np.asarray(sample_sigmas(jax.random.key(0), 200_000, FlowMatching(shift=shift, distribution="uniform")))
    np.testing.assert_allclose(np.quantile(sigmas, QUARTILES), _shift64(QUARTILES, shift), atol=4e-3)


@pytest.mark.parametrize("mean, std, shift", [(0.0, 1.0, 1.0), (-0.5, 1.4, 3.0), (0.3, 0.7, 5.0)])
def test_logit_normal_sigmas_have_the_closed_form_quantiles(mean, std, shift):
    objective = FlowMatching(shift=shift, distribution="logit_normal", logit_mean=mean, logit_std=std)
    sigmas = np.asarray(sample_sigmas(jax.random.key(1), 200_000, objective))
    want = _shift64(1 / (1 + np.exp(-(mean + std * NORMAL_QUARTILES))), shift)
    np.testing.assert_allclose(np.quantile(sigmas, QUARTILES), want, atol=4e-3)


def test_shift_sigma_matches_the_samplers_formula():
    u = np.linspace(0, 1, 11)
    np.testing.assert_allclose(np.asarray(shift_sigma(jnp.asarray(u, jnp.float32), 5.0)), _shift64(u, 5.0), rtol=1e-6)


def test_noisy_latents_match_float64_numpy():
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 3, 4, 4, 2)), rng.normal(size=(2, 3, 4, 4, 2))
    sigma = np.array([0.1, 0.85])
    x_t, target = noisy_latents(*(jnp.asarray(a, jnp.float32) for a in (x0, noise, sigma)))
    s = sigma[:, None, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), (1 - s) * x0 + s * noise, atol=1e-6)
    np.testing.assert_allclose(np.asarray(target), noise - x0, atol=1e-6)


def test_loss_is_the_mse_against_noise_minus_x0():
    """The loss, recomputed in float64 from what the model was shown: noise = (x_t - (1-s) x0) / s."""
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 8, 8, 4)), jnp.float32)
    seen = {}

    def predict(x_t, timestep):
        seen["x_t"], seen["t"] = x_t, timestep
        return 0.5 * x_t  # any fixed function of the input

    loss, aux = flow_matching_loss(predict, x0, jax.random.key(3), FlowMatching(shift=3.0))
    s = np.asarray(aux["sigma"], np.float64)
    np.testing.assert_allclose(np.asarray(seen["t"]), 1000 * s, rtol=1e-6)
    x_t, x0_64 = np.asarray(seen["x_t"], np.float64), np.asarray(x0, np.float64)
    s5 = s[:, None, None, None, None]
    noise = (x_t - (1 - s5) * x0_64) / s5
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # standard normal noise
    want = np.mean((0.5 * x_t - (noise - x0_64)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(aux["per_sample"]).mean(), want, rtol=1e-4)
    assert loss.dtype == jnp.float32


def test_same_key_same_loss_other_key_other_noise():
    x0 = jnp.ones((2, 1, 4, 4, 2), jnp.float32)
    run = lambda key: flow_matching_loss(lambda x, t: x, x0, key, FlowMatching())[0]  # noqa: E731
    assert float(run(jax.random.key(0))) == float(run(jax.random.key(0)))
    assert float(run(jax.random.key(0))) != float(run(jax.random.key(1)))


@pytest.mark.parametrize("fields, message", [
    ({"shift": 0.0}, "shift=0.0 must be positive"),
    ({"distribution": "beta"}, "must be one of"),
    ({"logit_std": -1.0}, "logit_std"),
])
def test_bad_objective_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        FlowMatching(**fields)
