"""The generation pipeline on the tiny preset: determinism, the cfg step's arithmetic, compile
count, text encoder release, I2V conditioning, argument checks."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from radial_jax import RadialPlan
from models import static_graph
from models.wan import pipeline
from models.wan import sampler as sampler_lib
from models.wan import vae as vae_lib

VIDEO = dict(frames=9, height=32, width=48, steps=3)  # latents 3 x 4 x 6


@pytest.fixture(scope="module")
def tiny():
    return pipeline.tiny_components(seed=0)


def test_generate_is_deterministic_for_a_seed_and_changes_with_it(tiny):
    first = pipeline.generate(tiny, "a cat", seed=1, **VIDEO)
    assert first.shape == (9, 32, 48, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(pipeline.generate(tiny, "a cat", seed=1, **VIDEO), first)
    assert np.abs(pipeline.generate(tiny, "a cat", seed=2, **VIDEO).astype(int) - first).mean() > 1


def test_negative_prompt_matters_under_guidance_and_not_at_guidance_one(tiny):
    def run(negative, guidance):
        return pipeline.generate(tiny, "a cat", negative_prompt=negative, guidance=guidance, **VIDEO)

    np.testing.assert_array_equal(run("blurry", 1.0), run("static", 1.0))  # no uncond pass at all
    assert np.abs(run("blurry", 5.0).astype(int) - run("static", 5.0)).mean() > 1


def test_denoise_step_is_one_euler_update_of_the_guided_flow(tiny):
    euler = pipeline.make_sampler("euler", 4, 3.0)
    noise = sampler_lib.initial_noise(0, pipeline.latent_shape(9, 32, 48, 16))
    context = pipeline.encode_prompts(tiny.text_encoder, tiny.tokenizer, ["a cat", "blurry"])
    t = jnp.full((1,), euler.timesteps[0])
    cond, uncond = (tiny.dit(noise, t, context[i : i + 1], dense=True) for i in (0, 1))
    expected = noise + (euler.sigmas[1] - euler.sigmas[0]) * (uncond + 4.0 * (cond - uncond))
    graphdef, params = static_graph.split(tiny.dit)
    state = pipeline.denoise_step(graphdef, params, euler, euler.init(jnp.array(noise)), context[:1], context[1:],
                                  jnp.float32(4.0), None, None, plan=None, dense=True)  # fmt: skip
    np.testing.assert_allclose(state.sample, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))


def test_jitted_step_compiles_twice_with_dense_timesteps_and_not_again_on_a_rerun():
    radial = RadialPlan(dense_timesteps=2, dense_layers=1, block_size=16)
    components = pipeline.tiny_components(seed=0, attention=radial)
    pipeline.denoise_step.clear_cache()
    seen = []
    pipeline.generate(components, "a cat", **VIDEO, on_step=lambda step, n, dense: seen.append(dense))
    assert seen == [True, True, False] and pipeline.denoise_step._cache_size() == 2
    pipeline.generate(components, "a dog", seed=5, **VIDEO)
    assert pipeline.denoise_step._cache_size() == 2


def test_free_text_encoder_releases_its_arrays_and_a_second_call_says_why():
    components = pipeline.tiny_components(seed=3)
    leaves = [weakref.ref(x) for x in jax.tree.leaves(nnx.state(components.text_encoder))]
    pipeline.generate(components, "a cat", free_text_encoder=True, **VIDEO)
    gc.collect()
    assert components.text_encoder is None and all(ref() is None for ref in leaves)
    with pytest.raises(ValueError, match="text_encoder is None"):
        pipeline.generate(components, "a cat", **VIDEO)


def test_image_condition_is_first_frame_mask_then_latents_of_image_and_black_frames(tiny):
    image = jax.random.uniform(jax.random.key(0), (1, 32, 48, 3), minval=-1, maxval=1)
    y = pipeline.image_condition(tiny.vae, image, 9, 32, 48)
    assert y.shape == (1, 3, 4, 6, 4 + 16)
    np.testing.assert_array_equal(y[:, 0, ..., :4], 1.0)
    np.testing.assert_array_equal(y[:, 1:, ..., :4], 0.0)
    video = np.zeros((1, 9, 32, 48, 3), np.float32)
    video[:, 0] = np.asarray(image[0])  # same size: the bicubic resize is the identity
    np.testing.assert_allclose(y[..., 4:], vae_lib.encode(tiny.vae, jnp.asarray(video)), rtol=1e-5, atol=1e-5)


def test_i2v_generation_follows_the_image():
    components = pipeline.tiny_components(seed=0, model_type="i2v")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(2)]
    first, second = (pipeline.generate(components, "a cat", image=image, **VIDEO) for image in images)
    assert first.shape == (9, 32, 48, 3) and np.abs(first.astype(int) - second).mean() > 1
    with pytest.raises(ValueError, match="needs an image"):
        pipeline.generate(components, "a cat", **VIDEO)


def test_text_to_video_refuses_an_image(tiny):
    with pytest.raises(ValueError, match="text-to-video checkpoint"):
        pipeline.generate(tiny, "a cat", image=np.zeros((32, 48, 3), np.uint8), **VIDEO)


@pytest.mark.parametrize(
    "frames, height, width, message",
    [(80, 480, 832, "4k\\+1"), (0, 480, 832, "4k\\+1"), (81, 480, 830, "multiples of 16"), (81, 8, 832, "multiples")],
)
def test_check_video_size_says_what_to_pass(frames, height, width, message):
    with pytest.raises(ValueError, match=message):
        pipeline.check_video_size(frames, height, width)


def test_byte_tokenizer_round_trips_and_pads():
    tokenizer = pipeline.byte_tokenizer(text_len=16)
    ids, mask = tokenizer(["  héllo   world ", "x" * 40])
    assert ids.shape == (2, 16) and mask[0].sum() == len("héllo world".encode()) + 1 and ids[1, -1] == 1
    assert tokenizer.decode(ids[0], mask[0]) == "héllo world"


def test_distilled_sampler_runs_one_step_per_timestep_at_its_sigmas(tiny):
    seen = []
    video = pipeline.generate(tiny, "a cat", frames=9, height=32, width=48, sampler="distilled", guidance=1.0,
                              shift=5.0, on_step=lambda step, n, dense: seen.append((step, n)))  # fmt: skip
    assert seen == [(i, 4) for i in range(4)] and video.shape == (9, 32, 48, 3)
    sampler = pipeline.make_sampler("distilled", None, 5.0)
    np.testing.assert_allclose(sampler.sigmas, [1.0, 0.9375, 5 / 6, 0.625, 0.0], rtol=1e-6)  # shift 5 of t/1000
    assert pipeline.make_sampler("distilled", 2, 3.0, (1000, 500)).num_steps == 2


@pytest.mark.parametrize("args, message", [
    (("distilled", 50, 5.0), "steps=50 but the distilled sampler runs one step per timestep"),
    (("euler", 4, 5.0, (1000, 750, 500, 250)), "timesteps are the distilled sampler's"),
])  # fmt: skip
def test_make_sampler_refuses_timesteps_it_cannot_run(args, message):
    with pytest.raises(ValueError, match=message):
        pipeline.make_sampler(*args)


def test_bf16_vae_tiny_components_decode_close_to_f32():
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 4, 6, 16)).astype(np.float32))
    f32 = pipeline.decode_video(pipeline.tiny_components(seed=0).vae, latents).astype(int)
    bf16_vae = pipeline.tiny_components(seed=0, vae_dtype="bfloat16").vae
    assert bf16_vae.decoder.conv1.kernel.get_value().dtype == jnp.bfloat16
    difference = np.abs(pipeline.decode_video(bf16_vae, latents).astype(int) - f32)
    assert 0 < difference.mean() <= 2 and difference.max() <= 20  # uint8 levels (tests/models/test_vae.py)


def test_decode_video_is_the_clipped_decode_rounded_to_uint8_one_chunk_at_a_time():
    vae = pipeline.tiny_components(seed=0).vae
    # Large latents, so the tiny VAE's pixels leave [-1, 1] and the clip inside each chunk matters.
    latents = jnp.asarray(4.0 * np.random.default_rng(1).normal(size=(1, 3, 4, 6, 16)).astype(np.float32))
    chunks = list(vae_lib.decode_chunks(vae, latents))
    assert [chunk.shape for chunk in chunks] == [(1, 1, 32, 48, 3), (1, 4, 32, 48, 3), (1, 4, 32, 48, 3)]
    whole = np.asarray(vae_lib.decode(vae, latents))
    np.testing.assert_array_equal(np.concatenate([np.asarray(c) for c in chunks], axis=1), whole)
    assert whole.dtype == np.float32 and whole.min() == -1.0 and whole.max() == 1.0  # clipped, and it clipped
    video = pipeline.decode_video(vae, latents)
    assert video.dtype == np.uint8 and video.shape == (9, 32, 48, 3)
    np.testing.assert_array_equal(video, np.round((whole[0] + np.float32(1.0)) * np.float32(127.5)).astype(np.uint8))


def test_decode_chunks_refuses_bad_latents_when_called_not_at_the_first_chunk():
    vae = pipeline.tiny_components(seed=0).vae
    with pytest.raises(ValueError, match=r"latents must be \[B, F, H, W, 16\]"):
        vae_lib.decode_chunks(vae, jnp.zeros((1, 2, 4, 6, 3)))  # never iterated
