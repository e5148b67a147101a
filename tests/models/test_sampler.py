"""Flow samplers against diffusers' UniPCMultistepScheduler / FlowMatchEulerDiscreteScheduler and
Wan2.1's schedule, on random model outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.wan.sampler import (
    LIGHTX2V_TIMESTEPS, cfg, default_shift, distilled_sampler, distilled_sigmas, euler_sampler, flow_sigmas,
    initial_noise, unipc_sampler,
)  # fmt: skip

LATENT = (1, 3, 4, 5, 16)  # [B, F, H, W, C]
TOLERANCE = 1e-5  # of the reference's max |value|, at every step; float32 coefficients give ~1e-6
CASES = [(50, 5.0, 2), (10, 3.0, 2), (12, 5.0, 3), (6, 2.0, 1)]  # steps, shift, order


def wan_original_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (sigmas, int timesteps) transcribed from Wan2.1 fm_solvers_unipc.py:
    FlowUniPCMultistepScheduler(shift=1).set_timesteps(num_steps, shift=shift)."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)  # shift=1 leaves them as is
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64).numpy()
    return np.concatenate([sigmas, [0]]).astype(np.float32), timesteps


def diffusers_unipc(num_steps, shift, order, schedule):
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                        flow_shift=shift, solver_order=order)  # fmt: skip
    if schedule == "wan":  # diffusers shifts the sigmas it is given: hand it Wan's unshifted grid
        scheduler.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, num_steps + 1)[:-1])
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps,shift", [(50, 5.0), (50, 3.0), (7, 8.0)])
def test_wan_schedule_matches_the_original_scheduler(num_steps, shift):
    sigmas, timesteps = flow_sigmas(num_steps, shift, "wan")
    expected_sigmas, expected_timesteps = wan_original_schedule(num_steps, shift)
    np.testing.assert_array_equal(sigmas, expected_sigmas)
    np.testing.assert_array_equal(timesteps, expected_timesteps)


@pytest.mark.parametrize("num_steps,shift,order", CASES)
@pytest.mark.parametrize("schedule", ["wan", "diffusers"])
def test_schedule_matches_diffusers_unipc(schedule, num_steps, shift, order):
    sampler = unipc_sampler(num_steps, shift, schedule, order=order)
    scheduler = diffusers_unipc(num_steps, shift, order, schedule)
    np.testing.assert_array_equal(sampler.sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(sampler.timesteps, scheduler.timesteps.numpy())


def test_wan_and_diffusers_schedules_differ_only_by_the_documented_offset():
    wan, _ = flow_sigmas(50, 5.0, "wan")
    diffusers, _ = flow_sigmas(50, 5.0, "diffusers")
    unshift = lambda s: s / (5.0 - 4.0 * s)  # noqa: E731  inverse of the shift at 5
    offset = unshift(diffusers[1:-1].astype(np.float64)) - unshift(wan[1:-1].astype(np.float64))
    np.testing.assert_allclose(offset, 0.001, atol=1e-6)


@pytest.mark.parametrize("num_steps,shift,order", CASES)
@pytest.mark.parametrize("schedule", ["wan", "diffusers"])
def test_unipc_every_step_matches_diffusers_on_random_outputs(schedule, num_steps, shift, order):
    rng = np.random.default_rng(num_steps)
    noise = rng.normal(size=LATENT).astype(np.float32)
    outputs = rng.normal(size=(num_steps, *LATENT)).astype(np.float32)
    sampler = unipc_sampler(num_steps, shift, schedule, order=order)
    scheduler = diffusers_unipc(num_steps, shift, order, schedule)
    state, step = sampler.init(jnp.asarray(noise)), jax.jit(sampler.step)
    expected = torch.from_numpy(noise)
    for i in range(num_steps):
        assert float(sampler.timestep(state)) == scheduler.timesteps[i].item()
        expected = scheduler.step(torch.from_numpy(outputs[i]), scheduler.timesteps[i], expected).prev_sample
        state = step(state, jnp.asarray(outputs[i]))
        error = np.abs(np.asarray(state.sample) - expected.numpy()).max()
        assert error <= TOLERANCE * np.abs(expected.numpy()).max(), f"step {i}"


@pytest.mark.parametrize("make", [unipc_sampler, euler_sampler])
def test_step_under_fori_loop_equals_a_python_loop(make):
    sampler = make(8, 5.0)
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(size=LATENT).astype(np.float32))
    outputs = jnp.asarray(rng.normal(size=(8, *LATENT)).astype(np.float32))

    @jax.jit
    def sample_all(noise, outputs):
        return jax.lax.fori_loop(0, 8, lambda _, s: sampler.step(s, outputs[s.step]), sampler.init(noise))

    state = sampler.init(noise)
    for i in range(8):
        state = sampler.step(state, outputs[i])
    looped = sample_all(noise, outputs)
    assert int(looped.step) == 8
    np.testing.assert_allclose(looped.sample, state.sample, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_steps,shift", [(10, 5.0), (4, 3.0)])
def test_euler_every_step_matches_diffusers_flow_match_euler(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = euler_sampler(num_steps, shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # given sigmas, already shifted
    scheduler.set_timesteps(sigmas=sampler.sigmas[:-1].astype(np.float64))
    rng = np.random.default_rng(1)
    state = sampler.init(jnp.asarray(rng.normal(size=LATENT).astype(np.float32)))
    expected = torch.from_numpy(np.array(state.sample))
    for i in range(num_steps):
        output = rng.normal(size=LATENT).astype(np.float32)
        expected = scheduler.step(torch.from_numpy(output), scheduler.timesteps[i], expected).prev_sample
        state = sampler.step(state, jnp.asarray(output))
        np.testing.assert_allclose(state.sample, expected.numpy(), rtol=0, atol=TOLERANCE)


DISTILLED = [(LIGHTX2V_TIMESTEPS, 5.0), ((999, 750, 500, 250), 8.0), ((1000, 500), 3.0)]


@pytest.mark.parametrize("train_timesteps,shift", DISTILLED)
def test_distilled_sampler_matches_diffusers_flow_match_euler_at_the_same_sigmas(train_timesteps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = distilled_sampler(train_timesteps, shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)  # shifts the sigmas it is given, as LightX2V
    scheduler.set_timesteps(sigmas=[t / 1000 for t in train_timesteps])
    np.testing.assert_allclose(sampler.sigmas, scheduler.sigmas.numpy(), rtol=1e-7, atol=0)
    np.testing.assert_allclose(sampler.timesteps, scheduler.timesteps.numpy(), rtol=1e-7, atol=0)
    rng = np.random.default_rng(4)
    state = sampler.init(jnp.asarray(rng.normal(size=LATENT).astype(np.float32)))
    expected = torch.from_numpy(np.array(state.sample))
    for i in range(sampler.num_steps):
        output = rng.normal(size=LATENT).astype(np.float32)
        expected = scheduler.step(torch.from_numpy(output), scheduler.timesteps[i], expected).prev_sample
        state = sampler.step(state, jnp.asarray(output))
        np.testing.assert_allclose(state.sample, expected.numpy(), rtol=0, atol=TOLERANCE)


def lightx2v_step_distill_float64(noise, outputs, train_timesteps, shift):
    """Returns (timesteps, final sample) of LightX2V's WanStepDistillScheduler transcribed in
    float64: a 1000-point shifted grid indexed at 1000 - t; each step predicts x0 and re-noises
    it to the next sigma with the flow ("LCM"), the last step returns x0."""
    grid = np.linspace(1.0, 0.0, 1001)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    sigmas = grid[[1000 - t for t in train_timesteps]]
    x = noise.astype(np.float64)
    for i, v in enumerate(outputs.astype(np.float64)):
        x0 = x - sigmas[i] * v
        x = x0 + sigmas[i + 1] * v if i + 1 < len(sigmas) else x0
    return sigmas * 1000, x


def test_distilled_sampler_matches_lightx2v_step_distill_in_float64():
    rng = np.random.default_rng(5)
    noise = rng.normal(size=LATENT).astype(np.float32)
    outputs = rng.normal(size=(4, *LATENT)).astype(np.float32)
    timesteps, expected = lightx2v_step_distill_float64(noise, outputs, LIGHTX2V_TIMESTEPS, 5.0)
    sampler = distilled_sampler()
    np.testing.assert_allclose(sampler.timesteps, timesteps, rtol=1e-7)  # 1000, 937.5, 833.3.., 625
    state = sampler.init(jnp.asarray(noise))
    for output in outputs:
        state = sampler.step(state, jnp.asarray(output))
    np.testing.assert_allclose(state.sample, expected, rtol=0, atol=TOLERANCE * np.abs(expected).max())


@pytest.mark.parametrize("timesteps", [(), (750, 1000), (1001, 500), (500, 0)])
def test_bad_distilled_timesteps_raise(timesteps):
    with pytest.raises(ValueError, match="must be decreasing values in"):
        distilled_sigmas(timesteps, 5.0)


def test_nested_distilled_timesteps_are_refused():
    # Under the test suite's jaxtyping/beartype hook the annotation (a flat sequence of numbers)
    # refuses them first (TypeCheckError, a TypeError); without it the function's own check does.
    with pytest.raises((ValueError, TypeError), match="must be decreasing values in|train_timesteps"):
        distilled_sigmas(((1000, 750),), 5.0)


@pytest.mark.parametrize("make", [unipc_sampler, euler_sampler, lambda n, shift: distilled_sampler(shift=shift)])
def test_exact_flow_of_a_point_mass_lands_on_it(make):
    """For data = one point x0 the true flow is v = (x - x0) / sigma; both samplers must end at x0."""
    sampler = make(20, 5.0)
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=LATENT).astype(np.float32))
    state = sampler.init(initial_noise(0, LATENT))
    for i in range(sampler.num_steps):
        state = sampler.step(state, (state.sample - x0) / sampler.sigmas[i])
    np.testing.assert_allclose(state.sample, x0, atol=1e-4)


def test_cfg_is_uncond_plus_scaled_difference_in_the_input_dtype():
    rng = np.random.default_rng(3)
    cond, uncond = rng.normal(size=(2, *LATENT))
    np.testing.assert_allclose(cfg(jnp.asarray(cond, jnp.float32), jnp.asarray(uncond, jnp.float32), 5.0),
                               uncond + 5.0 * (cond - uncond), rtol=1e-5, atol=1e-5)  # fmt: skip
    assert cfg(jnp.asarray(cond, jnp.bfloat16), jnp.asarray(uncond, jnp.bfloat16), 5.0).dtype == jnp.bfloat16


def test_defaults_and_seeded_noise():
    assert default_shift(720, 1280) == 5.0 and default_shift(480, 832) == 3.0
    np.testing.assert_array_equal(initial_noise(7, LATENT), initial_noise(7, LATENT))
    assert not np.array_equal(initial_noise(7, LATENT), initial_noise(8, LATENT))


@pytest.mark.parametrize("kwargs,error", [
    (dict(num_steps=0, shift=5.0), "num_steps"), (dict(num_steps=5, shift=0.0), "shift"),
    (dict(num_steps=5, shift=5.0, schedule="karras"), "schedule"),
])  # fmt: skip
def test_bad_schedule_arguments_raise(kwargs, error):
    with pytest.raises(ValueError, match=error):
        flow_sigmas(**kwargs)
