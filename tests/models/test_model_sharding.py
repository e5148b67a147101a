"""Logical axis names on every parameter of the Wan DiT, umT5 and CLIP, and a sharded tiny DiT
that computes what the unsharded one does (8 CPU devices, tests/conftest.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import clip, t5
from models.wan import WAN_TINY, WanModel
from radial_jax import RadialPlan
from radial_jax.sharding import RULES, logical_axes, make_mesh, state_shardings

MODELS = {
    "wan-t2v": lambda: WanModel(WAN_TINY, rngs=nnx.Rngs(0)),
    "wan-i2v": lambda: WanModel(dataclasses.replace(WAN_TINY, model_type="i2v", in_dim=8), rngs=nnx.Rngs(0)),
    "umt5": lambda: t5.UMT5Encoder(t5.UMT5_TINY, rngs=nnx.Rngs(0)),
    "clip": lambda: clip.CLIPVisionEncoder(clip.CLIP_TINY, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_carries_one_known_logical_name_per_dimension(name):
    state = nnx.state(nnx.eval_shape(MODELS[name]), nnx.Param)
    known = {rule for rule, _ in RULES}
    for path, var in nnx.to_flat_state(state):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
        assert set(axes) - {None} <= known, (path, axes)


def test_dit_parameters_get_the_expected_partition_specs():
    abstract = nnx.state(nnx.eval_shape(MODELS["wan-t2v"]))
    shardings = state_shardings(abstract, make_mesh("fsdp=4,tensor=2"))
    block = shardings["blocks"][0]
    expected = {
        "self_attn.q.kernel": P("fsdp", "tensor"), "self_attn.q.bias": P("tensor"),
        "self_attn.o.kernel": P("tensor", "fsdp"), "self_attn.norm_q.scale": P("tensor"),
        "cross_attn.k.kernel": P("fsdp", "tensor"), "ffn.0.kernel": P("fsdp", "tensor"),
        "ffn.2.kernel": P("tensor", "fsdp"), "modulation": P(None, None, "fsdp"), "norm3.scale": P("fsdp"),
    }  # fmt: skip
    for path, spec in expected.items():
        node = block
        for part in path.split("."):
            node = node[int(part) if part.isdigit() else part]
        assert node.get_value().spec == spec, path
    # The patch embedding's in_dim (4) is whole; its out dim (64) is fsdp-sharded.
    assert shardings["patch_embedding"]["kernel"].get_value().spec == P(None, None, None, None, "fsdp")
    umt5 = state_shardings(nnx.state(nnx.eval_shape(MODELS["umt5"])), make_mesh("fsdp=4,tensor=2"))
    assert umt5["token_embedding"]["embedding"].get_value().spec == P("tensor", "fsdp")


def _inputs(batch: int):
    keys = jax.random.split(jax.random.key(1), 2)
    latents = jax.random.normal(keys[0], (batch, 4, 8, 8, WAN_TINY.in_dim), jnp.float32)
    context = jax.random.normal(keys[1], (batch, 5, WAN_TINY.text_dim), jnp.float32)
    return latents, jnp.array([500.0, 20.0][:batch], jnp.float32), context


@pytest.mark.parametrize("mesh_spec", ["fsdp=4", "data=2,fsdp=2,tensor=2", "sequence=2,fsdp=2"])
def test_sharded_tiny_dit_matches_the_unsharded_one(mesh_spec):
    model = MODELS["wan-t2v"]()
    graphdef, state = nnx.split(model)
    args = _inputs(batch=2)
    plan = RadialPlan(block_size=16, implementation="reference")

    def forward(state, latents, timestep, context):
        return nnx.merge(graphdef, state)(latents, timestep, context, plan=plan)

    expected = jax.jit(forward)(state, *args)
    mesh = make_mesh(mesh_spec)
    sharded = jax.device_put(state, state_shardings(state, mesh))
    assert sharded["blocks"][0]["ffn"][0]["kernel"].get_value().sharding.spec[0] == "fsdp"
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(forward)(sharded, *args))
        out = jax.jit(forward)(sharded, *args)
    assert jaxpr.count("sharding_constraint") >= 2 * WAN_TINY.num_layers
    # Sharded matmuls sum in another order: f32 rounding, ~1e-6 of the output scale.
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * float(jnp.abs(expected).max()))


def test_without_a_mesh_the_dit_traces_no_sharding_constraint():
    model = MODELS["wan-t2v"]()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *_inputs(batch=1))
    assert "sharding_constraint" not in str(jaxpr)
