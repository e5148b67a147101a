"""Sequence-parallel attention against single-device attention, and its collectives in the HLO."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from radial_jax import radial_attention, radial_block_mask
from radial_jax.parallel import (
    sequence_parallel, sequence_parallel_attention, sequence_parallel_cross, sequence_parallel_size,
    token_sharding,
)

BLOCK = 16  # tokens per mask block: small, so that a short sequence has many blocks
HEADS = 6  # not a multiple of 4 or 8: exercises head padding
FRAMES, TOKENS_PER_FRAME = 3, 42  # L = 126: ragged against blocks (7.9) and against 4 or 8 devices


def _mesh(sequence: int, data: int = 1):
    devices = jax.devices()[: sequence * data]
    return jax.make_mesh((data, sequence), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def _qkv(length, batch=2, heads=HEADS, head_dim=16):
    keys = jax.random.split(jax.random.key(length), 4)
    q, k, v, d_out = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32) for key in keys)
    return (q, k, v), d_out


def _attention_and_grads(attend, qkv, d_out):
    """Returns (out, dq, dk, dv) of attend, the gradients of sum(out * d_out)."""
    out, vjp = jax.vjp(jax.jit(attend), *qkv)
    return (out, *vjp(d_out))


CASES = {  # name: (block mask for L = FRAMES * TOKENS_PER_FRAME, implementation)
    "radial": (radial_block_mask(FRAMES, TOKENS_PER_FRAME, block_size=BLOCK), "reference"),
    "dense": (np.ones((8, 8), bool), "dense"),
}


@functools.cache
def _single_device(case):
    """Returns (out, dq, dk, dv) of radial_attention on one device for CASES[case]."""
    mask, implementation = CASES[case]
    kwargs = dict(block_mask=mask, block_size=BLOCK, implementation=implementation)
    return _attention_and_grads(lambda q, k, v: radial_attention(q, k, v, **kwargs), *_qkv(FRAMES * TOKENS_PER_FRAME))


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_equals_single_device_ragged_length(devices, case):
    mask, implementation = CASES[case]
    qkv, d_out = _qkv(FRAMES * TOKENS_PER_FRAME)
    kwargs = dict(block_mask=mask, block_size=BLOCK, implementation=implementation)
    expected = _single_device(case)
    mesh = _mesh(devices)
    got = _attention_and_grads(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, **kwargs), qkv, d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0, err_msg=name)


def test_sequence_parallel_kernel_interpret_equals_single_device():
    mask, _ = CASES["radial"]
    qkv, d_out = _qkv(FRAMES * TOKENS_PER_FRAME, batch=1)
    kwargs = dict(block_mask=mask, block_size=BLOCK, implementation="pallas")
    expected = _attention_and_grads(lambda q, k, v: radial_attention(q, k, v, **kwargs), qkv, d_out)
    mesh = _mesh(4)
    with pytest.warns(UserWarning, match="interpret mode"):
        got = _attention_and_grads(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, **kwargs),
                                   qkv, d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0, err_msg=name)


def test_padded_tokens_are_never_attended():
    """valid_len: keys past it do not change the real rows; their own rows are zero."""
    real_len, padded_len = 120, 128
    mask = radial_block_mask(FRAMES, real_len // FRAMES, block_size=BLOCK)
    (q, k, v), _ = _qkv(padded_len)
    noise = jnp.full((2, padded_len - real_len, HEADS, 16), 1e3, jnp.float32)
    q, k, v = (x.at[:, real_len:].set(noise) for x in (q, k, v))

    def attend(q, k, v):
        return radial_attention(q, k, v, block_mask=mask, block_size=BLOCK, implementation="reference")

    out = jax.jit(sequence_parallel(attend, mesh=_mesh(8), valid_len=real_len))(q, k, v)
    expected = attend(q[:, :real_len], k[:, :real_len], v[:, :real_len])
    np.testing.assert_allclose(out[:, :real_len], expected, atol=2e-6, rtol=0)
    assert (out[:, real_len:] == 0).all()


def test_sequence_parallel_with_data_axis_on_sharded_inputs():
    mesh = _mesh(4, data=2)
    length = 120  # a multiple of 4 devices but not of 16-token blocks: Wan's 75,600 on 8 devices
    mask = radial_block_mask(FRAMES, length // FRAMES, block_size=BLOCK)
    qkv, d_out = _qkv(length)
    sharding = NamedSharding(mesh, PartitionSpec("data", "sequence"))
    sharded = [jax.device_put(x, sharding) for x in qkv]
    kwargs = dict(block_mask=mask, block_size=BLOCK, implementation="reference")
    out = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, **kwargs))(*sharded)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    np.testing.assert_allclose(out, radial_attention(*qkv, **kwargs), atol=2e-6, rtol=0)


def _count(op: str, hlo: str) -> int:
    """Returns how many `op` instructions hlo has (an instruction's name is never followed by "(")."""
    return len(re.findall(rf" {op}(?:-start)?\(", hlo))


@pytest.mark.parametrize("grad", [False, True])
def test_hlo_has_two_all_to_alls_per_direction_and_no_all_gather(grad):
    mesh = _mesh(4, data=2)
    length = 120
    mask = radial_block_mask(FRAMES, length // FRAMES, block_size=BLOCK)
    sharding = NamedSharding(mesh, PartitionSpec("data", "sequence"))
    x = jax.ShapeDtypeStruct((2, length, HEADS, 16), jnp.float32, sharding=sharding)

    def attend(q, k, v):
        return sequence_parallel_attention(q, k, v, block_mask=mask, block_size=BLOCK, implementation="reference",
                                           mesh=mesh)

    fn = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)) if grad else attend
    hlo = jax.jit(fn).lower(x, x, x).compile().as_text()
    # Forward: qkv in (one stacked all-to-all), out back. Backward: d_out in, d_qkv back.
    assert _count("all-to-all", hlo) == (4 if grad else 2)
    assert _count("all-gather", hlo) == 0
    assert _count("all-reduce", hlo) == 0


def test_default_batch_axes_keep_what_divides_the_batch_in_mesh_order():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "sequence"), axis_types=(AxisType.Auto,) * 3)
    sharding = token_sharding(mesh)
    assert [sharding.batch_axes_for(b) for b in (4, 2, 1, 6)] == [("data", "fsdp"), ("data",), (), ("data",)]
    assert sharding.spec(4) == PartitionSpec(("data", "fsdp"), "sequence")


def test_given_batch_axes_that_do_not_divide_the_batch_are_refused_with_the_fix():
    mesh = _mesh(4, data=2)
    (q, k, v), _ = _qkv(128, batch=1)
    kwargs = dict(block_mask=np.ones((8, 8), bool), block_size=BLOCK, mesh=mesh, implementation="reference")
    with pytest.raises(ValueError, match=r"batch=1 must be a multiple.*batch_axes=\(\)"):
        sequence_parallel_attention(q, k, v, batch_axes=("data",), **kwargs)
    expected = radial_attention(q, k, v, block_mask=np.ones((8, 8), bool), block_size=BLOCK, implementation="reference")
    np.testing.assert_allclose(sequence_parallel_attention(q, k, v, **kwargs), expected, atol=2e-6, rtol=0)


def test_sequence_parallel_size_reads_the_active_mesh():
    assert sequence_parallel_size() == 1
    with jax.set_mesh(_mesh(4, data=2)):
        assert sequence_parallel_size() == 4
    assert sequence_parallel_size(_mesh(2)) == 2


def test_cross_attention_to_a_replicated_context_equals_single_device_and_sums_context_grads():
    mesh = _mesh(4, data=2)
    (q, _, _), d_out = _qkv(128)
    (k, v, _), _ = _qkv(9)  # 9 context tokens, replicated over `sequence`

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v)

    expected = _attention_and_grads(dense, (q, k, v), d_out)
    got = _attention_and_grads(sequence_parallel_cross(dense, mesh=mesh), (q, k, v), d_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0, err_msg=name)


def test_mosaic_kernel_inside_sequence_parallel_lowers_for_cuda_forward_and_backward():
    """What the GPU runs (the Hopper kernel between the all-to-alls, and its backward) lowers
    through shard_map for CUDA here; the numbers are checked on a GPU (benchmarks/multi_gpu.py)."""
    from radial_jax.kernels import block_sparse_attention

    mesh = _mesh(2)
    mask = radial_block_mask(3, 1000)  # 3,000 tokens: 1,500 a device, ragged 128-token blocks
    sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    x = jax.ShapeDtypeStruct((1, 3000, 4, 128), jnp.bfloat16, sharding=sharding)
    attend = sequence_parallel(lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=128, backend="mosaic"),
                               mesh=mesh)
    grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    for fn, kernels in ((attend, 1), (grad, 3)):  # forward; forward, dq and dk/dv kernels
        text = jax.jit(fn).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
        assert "all_to_all" in text and len(re.findall(r"custom_call @mosaic_gpu", text)) == kernels
