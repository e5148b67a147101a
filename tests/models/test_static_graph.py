"""models/static_graph.py: one GraphDef hash per split, interned across splits, and what jit sees."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from models import static_graph
from models.wan import pipeline
from models.wan import sampler as sampler_lib


class _Two(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.a = nnx.Linear(width, width, rngs=rngs)
        self.b = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def test_equal_graphs_share_one_static_graph_and_unequal_ones_differ():
    one, state_one = static_graph.split(_Two(4, nnx.Rngs(0)))
    two, state_two = static_graph.split(_Two(4, nnx.Rngs(1)))  # other weights, same graph
    other, _ = static_graph.split(_Two(5, nnx.Rngs(0)))
    assert one is two and hash(one) == hash(one.graphdef)
    assert other != one and hash(other) != hash(one)
    x = jnp.ones((2, 4))
    model = nnx.merge(two.graphdef, state_two)
    assert jnp.array_equal(model(x), _Two(4, nnx.Rngs(1))(x))


def test_filters_pass_through_to_nnx_split():
    module = _Two(4, nnx.Rngs(0))
    graphdef, params, rest = static_graph.split(module, nnx.Param, ...)
    assert set(jax.tree.leaves(jax.tree.map(jnp.shape, params))) >= {4, 3}
    assert not jax.tree.leaves(rest)
    assert graphdef.graphdef == nnx.split(module, nnx.Param, ...)[0]


def test_a_denoise_hashes_the_dit_graph_once_not_once_a_step(monkeypatch):
    """jit hashes static arguments on every call; a 40-block GraphDef takes tens of ms to hash."""
    tiny = pipeline.tiny_components(seed=0)
    euler = pipeline.make_sampler("euler", 4, 3.0)
    shape = pipeline.latent_shape(5, 32, 48, 16)
    context = pipeline.encode_prompts(tiny.text_encoder, tiny.tokenizer, ["a cat"])
    run = lambda: pipeline.denoise(tiny.dit, euler, sampler_lib.initial_noise(0, shape), context, None, 1.0)
    expected = run()  # compiles
    graph_type = type(nnx.split(tiny.dit)[0])
    real_hash, calls = graph_type.__hash__, []

    def counting_hash(self):
        calls.append(1)
        return real_hash(self)

    monkeypatch.setattr(graph_type, "__hash__", counting_hash)
    static_graph._interned.cache_clear()
    assert jnp.array_equal(run(), expected)
    assert len(calls) == 1, f"{len(calls)} GraphDef hashes for one 4-step denoise"
    calls.clear()
    assert jnp.array_equal(run(), expected)
    assert len(calls) == 1


def test_a_static_graph_is_not_equal_to_a_bare_graphdef():
    graphdef, _ = static_graph.split(_Two(4, nnx.Rngs(0)))
    assert graphdef != graphdef.graphdef
    with pytest.raises(dataclasses.FrozenInstanceError):
        graphdef.digest = 0
