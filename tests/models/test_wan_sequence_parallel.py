"""The Wan DiT with its token axis split over a `sequence` mesh axis equals the unsharded model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType

from models.wan import WAN_TINY, WanModel
from radial_jax import RadialPlan

# 5 x 3 x 5 = 75 tokens after 2x2 patching: not a multiple of 4 devices nor of 16-token blocks.
LATENT = (5, 6, 10)
PLAN = RadialPlan(block_size=16, implementation="reference", dense_layers=1)  # layer 0 dense, layer 1 radial


def _model_and_inputs():
    config = WAN_TINY
    model = WanModel(config, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(0), 2)
    latents = jax.random.normal(keys[0], (2, *LATENT, config.in_dim), jnp.float32)
    context = jax.random.normal(keys[1], (2, 7, config.text_dim), jnp.float32)
    graphdef, state = nnx.split(model)

    def forward(state, latents, timestep, context):
        return nnx.merge(graphdef, state)(latents, timestep, context, plan=PLAN, dense=False)

    return forward, (state, latents, jnp.array([500.0, 20.0], jnp.float32), context)


def _loss_and_grads(forward, args):
    loss = lambda *a: jnp.mean(jnp.square(forward(*a)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(*args)


def _mesh(data: int, sequence: int):
    return jax.make_mesh((data, sequence), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[: data * sequence])


def test_sequence_parallel_dit_equals_unsharded_output_and_gradients():
    forward, args = _model_and_inputs()
    expected = jax.jit(forward)(*args)
    expected_loss, expected_grads = _loss_and_grads(forward, args)
    with jax.set_mesh(_mesh(data=2, sequence=4)):
        out = jax.jit(forward)(*args)
        loss, grads = _loss_and_grads(forward, args)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(out, expected, atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    expected_leaves = jax.tree.leaves(expected_grads)
    for (path, got), want in zip(jax.tree.leaves_with_path(grads), expected_leaves, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    assert all(float(jnp.abs(g).max()) > 0 for g in expected_leaves)


def test_sequence_parallel_dit_hlo_gathers_only_the_head_output():
    """Per block one all-to-all in and one out (dense layers too); the residual stream is never
    gathered: the one all-gather is the head's patch pixels, for the unpatchify."""
    forward, args = _model_and_inputs()
    with jax.set_mesh(_mesh(data=1, sequence=4)):
        hlo = jax.jit(forward).lower(*args).compile().as_text()
    assert len(re.findall(r" all-to-all(?:-start)?\(", hlo)) == 2 * WAN_TINY.num_layers
    gathered_shapes = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)
    patch_pixels = 4 * WAN_TINY.out_dim  # (1, 2, 2) patches
    assert [shape.split(",")[-1] for shape in gathered_shapes] == [str(patch_pixels)], gathered_shapes
