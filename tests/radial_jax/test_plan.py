"""RadialPlan: per-step/per-layer decisions, the mask cache, and the attend function it returns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax import RadialPlan, dense_attention, radial_attention, radial_block_mask
from radial_jax.plan import radial_mask, self_attention


def _qkv(tokens: int):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, (1, tokens, 2, 16), jnp.float32) for key in keys)


def test_plan_is_hashable_and_equal_plans_are_one_jit_static():
    a = RadialPlan(dense_layers=1, implementation=["triton", "reference"])
    b = RadialPlan(dense_layers=1, implementation=("triton", "reference"))
    assert a == b and hash(a) == hash(b) and a.implementation == ("triton", "reference")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dense_layers = 2


def test_block_mask_is_the_radial_mask_cached_and_read_only():
    plan = RadialPlan(block_size=16, decay_factor=0.5)
    mask = plan.block_mask(6, 40)
    np.testing.assert_array_equal(mask, radial_block_mask(6, 40, block_size=16, decay_factor=0.5))
    assert plan.block_mask(6, 40) is mask and not mask.flags.writeable
    hunyuan = dataclasses.replace(plan, mask_model="hunyuan").block_mask(6, 40)
    np.testing.assert_array_equal(hunyuan, radial_block_mask(6, 40, block_size=16, decay_factor=0.5, model="hunyuan"))
    assert radial_mask.cache_info().maxsize == 32


def test_self_attention_is_dense_without_a_plan_at_dense_steps_and_layers():
    plan = RadialPlan(dense_layers=1, block_size=16, implementation="reference")
    assert self_attention(None, 4, 32, layer=3) is dense_attention
    assert self_attention(plan, 4, 32, layer=3, dense=True) is dense_attention
    assert self_attention(plan, 4, 32, layer=0) is dense_attention
    assert self_attention(RadialPlan(mode="dense"), 4, 32, layer=3) is dense_attention


def test_dense_implementation_runs_dense_steps_and_layers_through_radial_attention_with_every_block():
    plan = RadialPlan(dense_layers=1, block_size=16, implementation="triton", dense_implementation=["reference"])
    assert plan.dense_implementation == ("reference",) and hash(plan) == hash(dataclasses.replace(plan))
    q, k, v = _qkv(8 * 31)  # 248 tokens: 16 blocks of 16, the last holding 8
    for attend in (self_attention(plan, 8, 31, layer=3, dense=True), self_attention(plan, 8, 31, layer=0)):
        assert attend.func is radial_attention and attend.keywords["implementation"] == ("reference",)
        mask = attend.keywords["block_mask"]
        assert mask.shape == (16, 16) and mask.all() and not mask.flags.writeable
        np.testing.assert_allclose(attend(q, k, v), dense_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_self_attention_of_a_radial_layer_applies_the_plans_mask():
    plan = RadialPlan(block_size=16, implementation="reference")
    q, k, v = _qkv(8 * 32)
    attend = self_attention(plan, 8, 32, layer=2)
    mask = radial_block_mask(8, 32, block_size=16)
    assert not mask.all()
    expected = radial_attention(q, k, v, block_mask=mask, block_size=16, implementation="reference")
    np.testing.assert_array_equal(attend(q, k, v), expected)
    assert float(jnp.abs(attend(q, k, v) - dense_attention(q, k, v)).max()) > 1e-3


def test_bad_plans_are_refused_with_the_field_named():
    for fields, name in (({"mode": "sparse"}, "mode"), ({"dense_layers": -1}, "dense_layers"),
                         ({"implementation": "flash"}, "implementation"), ({"mask_model": "cogvideo"}, "mask_model"),
                         ({"dense_implementation": "cudnn"}, "dense_implementation")):
        with pytest.raises(ValueError, match=name):
            RadialPlan(**fields)
