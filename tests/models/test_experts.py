"""Wan2.2 A14B's two experts: the step where the sampler switches from the high-noise to the
low-noise expert equals diffusers' WanPipeline (run with two tiny transformers), and our
pipeline runs each step with the expert and guidance scale the switch gives, compiling one
program per dense/radial (not one per expert)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from models.wan import pipeline
from models.wan.experts import HIGH_NOISE, LOW_NOISE, WAN22_I2V_A14B, WAN22_T2V_A14B, ExpertSwitch, expert_guidance
from models.wan.sampler import flow_sigmas
from models.wan.transformer import WanModel
from radial_jax.plan import RadialPlan

VIDEO = dict(frames=5, height=32, width=32)
# (steps, shift, boundary): the originals' defaults (40 steps; T2V shift 12, I2V 5), diffusers'
# scheduler shift for A14B (3.0), and short runs where the switch falls on step 1 or 2.
SWITCH_CASES = [(40, 12.0, 0.875), (40, 5.0, 0.9), (20, 3.0, 0.875), (12, 8.0, 0.875), (4, 3.0, 0.9), (6, 1.0, 0.9)]


def diffusers_expert_per_step(num_steps: int, shift: float, boundary: float) -> list[int]:
    """Returns which transformer diffusers' WanPipeline calls at each step (0: transformer, the
    high-noise expert; 1: transformer_2), recorded by forward hooks on two tiny models."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from pipeline_testing import tiny_vae
    from wan_testing import tiny_diffusers

    calls = []
    experts = [tiny_diffusers(seed=i, num_layers=1) for i in (0, 1)]
    for index, expert in enumerate(experts):
        expert.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=scheduler,
                       transformer=experts[0], transformer_2=experts[1], boundary_ratio=boundary)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 8, 24, generator=torch.Generator().manual_seed(0))
    pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, height=16, width=16, num_frames=1,
         num_inference_steps=num_steps, guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent")  # fmt: skip
    assert len(calls) == 2 * num_steps  # cond and uncond, from the same expert
    return calls[::2]


@pytest.mark.parametrize("num_steps,shift,boundary", SWITCH_CASES)
def test_expert_of_every_step_equals_diffusers_pipeline(num_steps, shift, boundary):
    switch = ExpertSwitch(boundary=boundary, guidance=(4.0, 3.0), shift=shift, steps=num_steps)
    _, timesteps = flow_sigmas(num_steps, shift, "diffusers")  # diffusers' grid (tests/models/test_sampler.py)
    ours = switch.experts(timesteps)
    assert ours.tolist() == diffusers_expert_per_step(num_steps, shift, boundary)
    assert ours[0] == HIGH_NOISE and ours[-1] == LOW_NOISE  # a real switch in every case, not one expert


def test_boundary_timestep_is_inclusive_for_the_high_noise_expert():
    switch = dataclasses.replace(WAN22_T2V_A14B)
    assert switch.experts(np.array([876.0, 875.0, 874.0])).tolist() == [HIGH_NOISE, HIGH_NOISE, LOW_NOISE]
    assert WAN22_I2V_A14B.experts(np.array([900.0, 899.0])).tolist() == [HIGH_NOISE, LOW_NOISE]


def test_guidance_defaults_per_expert_and_a_lone_scale_serves_both():
    assert expert_guidance(WAN22_T2V_A14B, None, None) == (4.0, 3.0)  # high, low (the original's (3.0, 4.0) reversed)
    assert expert_guidance(WAN22_T2V_A14B, 5.0, None) == (5.0, 5.0)
    assert expert_guidance(WAN22_T2V_A14B, 5.0, 2.0) == (5.0, 2.0)
    assert expert_guidance(WAN22_T2V_A14B, None, 2.0) == (4.0, 2.0)


@pytest.mark.parametrize("bad", [dict(boundary=1.0), dict(boundary=0.0), dict(guidance=(4.0, -1.0)), dict(steps=0)])
def test_expert_switch_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        dataclasses.replace(WAN22_T2V_A14B, **bad)


def test_expert_switch_refuses_one_guidance_scale():
    # Under the test suite's jaxtyping/beartype hook the annotation (tuple[float, float]) refuses
    # it first (TypeCheckError, a TypeError, naming the parameter); without it __post_init__ does.
    with pytest.raises((ValueError, TypeError), match="guidance"):
        dataclasses.replace(WAN22_T2V_A14B, guidance=(4.0,))


def two_expert_components(attention: RadialPlan | None = None, *, steps: int = 6, shift: float = 3.0):
    """Returns the tiny preset with a second DiT (other random weights) and a switch that hands
    over mid-run at these settings."""
    components = pipeline.tiny_components(seed=0, attention=attention)
    low = pipeline.random_weights(lambda rngs: WanModel(components.dit.config, rngs=rngs), seed=11)
    switch = ExpertSwitch(boundary=0.875, guidance=(4.0, 2.5), shift=shift, steps=steps)
    return dataclasses.replace(components, low_noise_dit=low, experts=switch)


def test_generate_runs_each_step_on_its_expert_with_its_guidance(monkeypatch):
    components = two_expert_components()
    leaf = {id(jax.tree.leaves(pipeline.nnx.state(dit))[0]): name
            for name, dit in (("high", components.dit), ("low", components.low_noise_dit))}
    real_step, seen = pipeline.denoise_step, []

    def spy(graphdef, params, sampler, state, context, negative_context, guidance, *args, **kwargs):
        seen.append((leaf[id(jax.tree.leaves(params)[0])], float(guidance)))
        return real_step(graphdef, params, sampler, state, context, negative_context, guidance, *args, **kwargs)

    monkeypatch.setattr(pipeline, "denoise_step", spy)
    pipeline.generate(components, "a cat", **VIDEO)  # steps and shift: the switch's defaults
    timesteps = pipeline.make_sampler("unipc", 6, 3.0).timesteps
    expected = [("high", 4.0) if t >= 875 else ("low", 2.5) for t in timesteps]
    assert seen == expected and ("high", 4.0) in seen and ("low", 2.5) in seen


def test_two_experts_compile_one_program_per_dense_and_radial_step():
    radial = RadialPlan(dense_timesteps=1, dense_layers=1, block_size=16)
    components = two_expert_components(radial)
    pipeline.denoise_step.clear_cache()
    dense = []
    pipeline.generate(components, "a cat", **VIDEO, on_step=lambda step, n, is_dense: dense.append(is_dense))
    assert dense == [True] + [False] * 5
    assert pipeline.denoise_step._cache_size() == 2  # dense and radial; both experts share each program


def test_experts_must_share_one_config():
    components = two_expert_components()
    other = dataclasses.replace(components.dit.config, num_layers=1)
    components.low_noise_dit = pipeline.random_weights(lambda rngs: WanModel(other, rngs=rngs), seed=1)
    with pytest.raises(ValueError, match="must share one config"):
        pipeline.generate(components, "a cat", **VIDEO)


def test_a_single_dit_refuses_a_low_noise_guidance():
    with pytest.raises(ValueError, match="guidance_low is for a Wan2.2 A14B"):
        pipeline.generate(pipeline.tiny_components(seed=0), "a cat", guidance_low=3.0, steps=2, **VIDEO)
