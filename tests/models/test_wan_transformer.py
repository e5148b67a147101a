"""The Flax Wan2.1 DiT against diffusers' WanTransformer3DModel (same random weights, f32 CPU),
its parts against torch and float64 formulas, and the radial/dense attention plans."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from models.wan import WAN_TINY, WanConfig, WanModel
from models.wan.layers import layer_norm, sinusoidal_embedding
from models.wan.rope import apply_rope, axis_dims, rope_tables
from radial_jax import RadialPlan
from radial_jax.plan import radial_mask
from wan_testing import (
    LATENT, inputs, ours_kwargs, relative_error, save_and_convert, tiny_diffusers,
    torch_forward,
)

# f32 on the CPU: ~1e-6 is reached; 1e-4 of the output scale still catches a swapped or
# mis-transposed tensor (those give errors of order 1).
TOLERANCE = 1e-4


# Compiled calls: one XLA compile costs less on the CPU than compiling each op for eager mode.
@nnx.jit(static_argnames=("plan", "dense", "remat"))
def call(model, *args, **kwargs):
    return model(*args, **kwargs)


@nnx.jit(static_argnames=("plan", "dense"))
def block_outputs(model, *args, **kwargs):
    return model.block_outputs(*args, **kwargs)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    torch_model = tiny_diffusers("t2v")
    _, ours = save_and_convert(torch_model, tmp_path_factory.mktemp("t2v"))
    return torch_model, ours


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    torch_model = tiny_diffusers("i2v", seed=3)
    _, ours = save_and_convert(torch_model, tmp_path_factory.mktemp("i2v"), shard_size="20KB")
    return torch_model, ours


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_model_matches_diffusers_block_by_block_f32(kind, request):
    torch_model, ours = request.getfixturevalue(kind)
    x, t, context, clip, y = inputs(kind)
    expected, expected_blocks = torch_forward(torch_model, x, t, context, clip, y, hook_blocks=True)
    args, kwargs = ours_kwargs(x, t, context, clip, y)
    for i, (got, want) in enumerate(zip(block_outputs(ours, *args, **kwargs), expected_blocks)):
        assert relative_error(got, want) <= TOLERANCE, f"block {i} of {kind} differs from diffusers"
    out = call(ours, *args, **kwargs)
    assert out.shape == (1, *LATENT, 4) and out.dtype == jnp.float32
    assert relative_error(np.moveaxis(np.asarray(out), -1, 1), expected) <= TOLERANCE


def test_batch_of_two_with_different_timesteps_matches_diffusers(t2v):
    torch_model, ours = t2v
    x, t, context, _, _ = inputs("t2v", batch=2, seed=5)
    expected, _ = torch_forward(torch_model, x, t, context)
    out = call(ours, *ours_kwargs(x, t, context)[0])
    assert relative_error(np.moveaxis(np.asarray(out), -1, 1), expected) <= TOLERANCE


def test_rope_tables_match_diffusers_and_rotation_matches_float64_complex():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, grid = 128, (5, 6, 7)
    cos, sin = rope_tables(grid, head_dim)
    torch_cos, torch_sin = WanRotaryPosEmbed(head_dim, (1, 1, 1), 1024)(torch.zeros(1, 1, *grid))
    # diffusers repeats each pair's angle on both channels of the pair.
    np.testing.assert_allclose(cos, torch_cos[0, :, 0, 0::2].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(sin, torch_sin[0, :, 0, 1::2].numpy(), atol=1e-6, rtol=0)
    assert axis_dims(head_dim) == (44, 42, 42)

    x = np.random.default_rng(0).standard_normal((1, np.prod(grid), 2, head_dim)).astype(np.float32)
    # The original's rope_apply: complex pairs times exp(i * angle), in float64.
    f, h, w = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    d_t, d_h, d_w = axis_dims(head_dim)
    freqs = [1.0 / 10000.0 ** (np.arange(0, d, 2) / d) for d in (d_t, d_h, d_w)]
    angles = np.concatenate([np.outer(pos.reshape(-1), fr) for pos, fr in zip((f, h, w), freqs)], axis=1)
    expected = x.astype(np.float64).reshape(*x.shape[:3], -1, 2)
    expected = (expected[..., 0] + 1j * expected[..., 1]) * np.exp(1j * angles)[None, :, None, :]
    expected = np.stack([expected.real, expected.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), cos, sin), expected, atol=2e-5, rtol=0)


def test_timestep_embedding_matches_diffusers_and_float64_original():
    from diffusers.models.embeddings import Timesteps

    t = np.array([0.0, 1.0, 250.5, 937.0, 999.0], np.float32)
    ours = np.asarray(sinusoidal_embedding(jnp.asarray(t), 256))
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.from_numpy(t)).numpy()
    half = np.arange(128, dtype=np.float64) / 128
    angles = np.outer(t.astype(np.float64), np.power(10000.0, -half))
    original = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    # float32 angles near t = 1000 carry ~6e-5 rad of rounding, in diffusers as in ours.
    np.testing.assert_allclose(ours, original, atol=2e-4, rtol=0)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_time_embedding_and_six_way_modulation_match_diffusers(t2v):
    torch_model, ours = t2v
    t = torch.tensor([937.0, 3.0])
    context = torch.zeros(2, 4, 24)
    with torch.no_grad():
        temb, timestep_proj, _, _ = torch_model.condition_embedder(t, context)
    e = ours._time_embedding(jnp.asarray(t.numpy()))
    e0 = ours.time_projection[1](jax.nn.silu(e)).reshape(2, 6, -1)
    assert relative_error(e, temb.numpy()) <= TOLERANCE
    assert relative_error(e0, timestep_proj.unflatten(1, (6, -1)).numpy()) <= TOLERANCE
    # The block's modulated LayerNorm input: norm1(x) * (1 + scale) + shift, scale/shift from
    # modulation + e0 rows 1 and 0.
    x = np.random.default_rng(0).standard_normal((2, 5, e.shape[-1])).astype(np.float32)
    block = torch_model.blocks[0]
    with torch.no_grad():
        shift, scale = (block.scale_shift_table + timestep_proj.unflatten(1, (6, -1)).float()).chunk(6, dim=1)[:2]
        expected = block.norm1(torch.from_numpy(x)) * (1 + scale) + shift
    mod = ours.blocks[0].modulation[...] + e0
    got = layer_norm(jnp.asarray(x), 1e-6) * (1 + mod[:, 1:2]) + mod[:, 0:1]
    assert relative_error(got, expected.numpy()) <= TOLERANCE


def test_head_modulation_and_projection_match_diffusers(t2v):
    torch_model, ours = t2v
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 7, ours.config.dim)).astype(np.float32)
    e = rng.standard_normal((1, ours.config.dim)).astype(np.float32)
    with torch.no_grad():
        shift, scale = (torch_model.scale_shift_table + torch.from_numpy(e).unsqueeze(1)).chunk(2, dim=1)
        expected = torch_model.proj_out(torch_model.norm_out(torch.from_numpy(x)) * (1 + scale) + shift)
    assert relative_error(ours.head(jnp.asarray(x), jnp.asarray(e)), expected.numpy()) <= TOLERANCE


def _tiny_model_and_inputs(frames: int, height: int = 8, width: int = 8, seed: int = 0):
    model = WanModel(WAN_TINY, rngs=nnx.Rngs(seed))
    keys = jax.random.split(jax.random.key(seed), 2)
    latents = jax.random.normal(keys[0], (1, frames, height, width, WAN_TINY.in_dim), jnp.float32)
    context = jax.random.normal(keys[1], (1, 5, WAN_TINY.text_dim), jnp.float32)
    return model, (latents, jnp.array([500.0], jnp.float32), context)


def test_radial_plan_with_an_all_on_mask_equals_dense():
    # 2 frames x 128 tokens: neighbouring frames are dense (smaller frames lose even those to
    # the reference's "diagonal split" rule), so the radial mask is full.
    model, args = _tiny_model_and_inputs(frames=2, height=16, width=32)
    plan = RadialPlan(block_size=16, implementation="reference")
    assert radial_mask(2, 128, 16, 1.0).all()
    dense = call(model, *args)
    assert relative_error(call(model, *args, plan=plan), dense) <= 1e-5


def test_dense_implementation_equals_reference_with_a_real_mask():
    model, args = _tiny_model_and_inputs(frames=8, width=16)  # 8 frames x 32 tokens, blocks of 16
    mask = radial_mask(8, 32, 16, 1.0)
    assert not mask.all()
    out = call(model, *args, plan=RadialPlan(block_size=16, implementation="dense"))
    assert relative_error(out, call(model, *args, plan=RadialPlan(block_size=16, implementation="reference"))) <= 1e-5
    # ... and the mask matters: dense attention gives another answer.
    assert relative_error(out, call(model, *args)) > 1e-3


def test_dense_steps_and_layers_follow_the_plan():
    plan = RadialPlan(dense_timesteps=2, dense_final_timesteps=1, dense_layers=1)
    assert [plan.is_dense_step(s, 6) for s in range(6)] == [True, True, False, False, False, True]
    assert [plan.is_dense_layer(i) for i in range(3)] == [True, False, False]
    assert RadialPlan(mode="dense").is_dense_step(3, 6)  # the dense mode is dense everywhere
    with pytest.raises(ValueError, match="num_steps"):
        plan.is_dense_step(4, None)

    model, args = _tiny_model_and_inputs(frames=8, width=16)
    plan = RadialPlan(block_size=16, implementation="reference", dense_timesteps=1)
    dense = call(model, *args)
    assert relative_error(call(model, *args, plan=plan, dense=plan.is_dense_step(0, 4)), dense) <= 1e-6
    assert relative_error(call(model, *args, plan=plan, dense=plan.is_dense_step(1, 4)), dense) > 1e-3
    all_layers = dataclasses.replace(plan, dense_layers=WAN_TINY.num_layers)
    assert relative_error(call(model, *args, plan=all_layers), dense) <= 1e-6


def test_jit_with_static_plan_and_dense_compiles_once_per_mode():
    model, args = _tiny_model_and_inputs(frames=2)
    plan = RadialPlan(block_size=16, implementation="reference", dense_timesteps=1)
    graphdef, state = nnx.split(model)
    traces = []

    @functools.partial(jax.jit, static_argnames=("dense",))
    def step(state, latents, timestep, context, *, dense):
        traces.append("dense" if dense else "radial")
        return nnx.merge(graphdef, state)(latents, timestep, context, plan=plan, dense=dense)

    for i in range(4):
        step(state, *args, dense=plan.is_dense_step(i))
    assert sorted(traces) == ["dense", "radial"]


def test_remat_gives_the_same_output_and_gradients():
    model, args = _tiny_model_and_inputs(frames=2)

    def grad(remat: bool):
        def loss(m, latents):
            return jnp.mean(jnp.square(m(latents, *args[1:], remat=remat)))

        return nnx.jit(nnx.grad(loss))(model, args[0])

    graphdef, state = nnx.split(model)
    for remat, blocks in ((False, 0), (True, WAN_TINY.num_layers)):  # one jax.checkpoint (remat) per block
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args, remat=remat))(state)
        assert str(jaxpr).count("remat") == blocks
    g_plain = grad(False)
    g_remat = grad(True)
    plain_kernel = g_plain.blocks[0].self_attn.q.kernel[...]
    assert relative_error(g_remat.blocks[0].self_attn.q.kernel[...], plain_kernel) <= 1e-5
    assert float(jnp.abs(plain_kernel).max()) > 0


def test_old_config_with_attention_and_remat_loads_with_a_warning():
    fields = {**WAN_TINY.to_dict(), "remat": True,
              "attention": {"backend": "radial", "dense_layers": 1, "decay_factor": 0.2}}  # fmt: skip
    with pytest.warns(UserWarning, match="ignoring attention, remat"):
        assert WanConfig.from_dict(fields) == WAN_TINY
    assert "attention" not in WAN_TINY.to_dict() and "remat" not in WAN_TINY.to_dict()


def test_bf16_params_keep_precision_critical_parts_in_f32_and_stay_close():
    config = dataclasses.replace(WAN_TINY, param_dtype="bfloat16", dtype="bfloat16")
    bf16 = WanModel(config, rngs=nnx.Rngs(0))
    f32, args = _tiny_model_and_inputs(frames=2)
    assert bf16.blocks[0].self_attn.q.kernel[...].dtype == jnp.bfloat16
    assert bf16.patch_embedding.kernel[...].dtype == jnp.bfloat16
    for precise in (bf16.blocks[0].modulation, bf16.blocks[0].self_attn.norm_q.scale, bf16.head.head.kernel,
                    bf16.time_embedding[0].kernel, bf16.time_projection[1].kernel):
        assert precise[...].dtype == jnp.float32
    state = jax.tree.map(lambda a, b: a.astype(b.dtype), nnx.state(f32), nnx.state(bf16))
    nnx.update(bf16, state)
    out = call(bf16, *args)
    assert out.dtype == jnp.float32
    assert relative_error(out, call(f32, *args)) <= 5e-2


def test_bad_inputs_raise_clear_errors():
    model, (latents, t, context) = _tiny_model_and_inputs(frames=2)
    with pytest.raises(ValueError, match="in_dim"):
        model(latents[..., :3], t, context)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(latents[:, :, :7], t, context)
    with pytest.raises(ValueError, match="text_len"):
        model(latents, t, jnp.zeros((1, WAN_TINY.text_len + 1, WAN_TINY.text_dim), jnp.float32))
    with pytest.raises(ValueError, match="I2V"):
        model(latents, t, context, clip_fea=jnp.zeros((1, 257, WAN_TINY.img_dim), jnp.float32))
    i2v = WanModel(dataclasses.replace(WAN_TINY, model_type="i2v", in_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="clip_fea"):
        i2v(latents, t, context, y=latents)


def test_presets_have_the_published_sizes():
    from models.wan import WAN_I2V_14B, WAN_T2V_14B, WAN_T2V_1_3B

    assert (WAN_T2V_1_3B.dim, WAN_T2V_1_3B.ffn_dim, WAN_T2V_1_3B.num_heads, WAN_T2V_1_3B.num_layers) == (1536, 8960, 12, 30)
    assert (WAN_T2V_14B.dim, WAN_T2V_14B.ffn_dim, WAN_T2V_14B.num_heads, WAN_T2V_14B.num_layers) == (5120, 13824, 40, 40)
    assert WAN_I2V_14B.in_dim == 36 and WAN_I2V_14B.model_type == "i2v"
    assert WAN_T2V_14B.head_dim == 128
    with pytest.raises(ValueError, match="mode"):
        RadialPlan(mode="sparse")
    with pytest.raises(ValueError, match="implementation"):
        RadialPlan(implementation="flash")
    assert WanConfig.from_dict(WAN_TINY.to_dict()) == WAN_TINY
    params = sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: WanModel(WAN_T2V_1_3B, rngs=nnx.Rngs(0))))))
    assert params > 1.40e9 and params < 1.45e9  # Wan2.1-T2V-1.3B: 1.42 B parameters

