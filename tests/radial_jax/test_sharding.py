"""radial_jax.sharding: mesh specs, the rules table, and constraints that vanish without a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from radial_jax.sharding import (
    MESH_AXES, RULES, constrain, logical_axes, make_mesh, param, parse_mesh, partition_spec, state_shardings,
    with_axes,
)


def test_default_mesh_is_one_device_with_every_axis():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES and mesh.devices.size == 1 and dict(mesh.shape) == dict.fromkeys(MESH_AXES, 1)


def test_mesh_from_a_spec_uses_the_first_devices_in_order():
    mesh = make_mesh("data=2, fsdp=4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert list(mesh.devices.reshape(-1)) == jax.devices()[:8]
    assert parse_mesh({"sequence": 2}) == {"data": 1, "fsdp": 1, "sequence": 2, "tensor": 1}


@pytest.mark.parametrize("spec,message", [("model=2", "one of"), ("data", "AXIS=SIZE"), ("data=0", ">= 1"),
                                          ("data=4,fsdp=4", "needs 16 devices")])
def test_bad_mesh_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)


def test_rules_map_logical_names_and_drop_axes_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 4, "sequence": 2, "tensor": 2}
    assert partition_spec(("embed", "heads"), (64, 64), mesh_shape) == P("fsdp", "tensor")
    assert partition_spec(("batch", "activation_length", "activation_embed"), (8, 30, 64), mesh_shape) == P(
        ("data", "fsdp"), "sequence", None)
    # batch 2: data divides it, data x fsdp does not; a batch of 1 stays whole; 31 tokens stay whole.
    assert partition_spec(("batch", "activation_length", None), (2, 31, 5), mesh_shape) == P("data", None, None)
    assert partition_spec(("batch",), (1,), mesh_shape) == P(None)
    # fsdp is taken by the first "embed": the second is left whole rather than sharded twice.
    assert partition_spec(("embed", "embed"), (8, 8), mesh_shape) == P("fsdp", None)
    with pytest.raises(ValueError, match="no rule"):
        partition_spec(("embedding",), (8,), mesh_shape)
    assert {name for name, _ in RULES} >= {"batch", "activation_length", "embed", "heads", "mlp", "vocab", "kv"}


def test_constrain_is_the_identity_without_a_mesh_and_a_constraint_with_one():
    x = jnp.ones((8, 16, 4))
    axes = ("batch", "activation_length", "activation_embed")
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda a: constrain(a, axes))(x))
    mesh = make_mesh("data=2,fsdp=2,sequence=2")
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda a: constrain(a, axes))(x))
        out = jax.jit(lambda a: constrain(a * 2, axes))(x)
    assert "sharding_constraint" in jaxpr
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "sequence", None)), 3)
    np.testing.assert_array_equal(out, 2 * np.ones((8, 16, 4)))


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(8, 16, kernel_init=with_axes(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                                bias_init=with_axes(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
        self.scale = param(jnp.ones((8,)), ("embed",))
        self.plain = nnx.Param(jnp.zeros((3,)))


def test_params_carry_names_without_a_mesh_and_state_shardings_place_them():
    model = _Tiny(nnx.Rngs(0))  # no mesh needed to build it: the names are metadata only
    assert logical_axes(model.dense.kernel) == ("embed", "mlp") and logical_axes(model.plain) is None
    with pytest.raises(ValueError, match="dimensions"):
        param(jnp.ones((2, 2)), ("embed",))
    mesh = make_mesh("fsdp=4,tensor=2")
    state = nnx.state(model)
    placed = jax.device_put(state, state_shardings(state, mesh))
    assert placed["dense"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    assert placed["dense"]["bias"].get_value().sharding.spec == P("tensor")
    assert placed["scale"].get_value().sharding.spec == P("fsdp")
    assert placed["plain"].get_value().sharding.spec == P()
    abstract = nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    assert state_shardings(abstract, mesh)["dense"]["kernel"].get_value().spec == P("fsdp", "tensor")
