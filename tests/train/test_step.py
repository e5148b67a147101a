"""train/step.py: the compiled LoRA step lowers the loss, gives the same result on an
8-device (data=2, fsdp=4) mesh as on one device, and the mesh/sharding rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.wan import WanModel, pipeline
from radial_jax.plan import RadialPlan
from train.config import OptimSection
from train.lora import LoraConfig, apply_lora
from train.objective import FlowMatching, flow_matching_loss
from train.step import (
    TrainStep, batch_axes, batch_sharding, fsdp_spec, make_mesh, make_optimizer, micro_keys, parse_mesh, process_rows,
    put_global, split_model, tree_shardings,
)

ARCH = pipeline.TINY_T2V
PLAN = RadialPlan(dense_layers=1, block_size=16, implementation="reference")  # layer 1 radial over 3 frames
LATENT = (3, 8, 8, ARCH.in_dim)  # 48 tokens, 16 a frame: one mask block per frame


def _state(devices, lr=1e-2, warmup=0):
    model = pipeline.random_weights(lambda rngs: WanModel(ARCH, rngs=rngs), 0)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    graphdef, lora, base = split_model(model)
    tx, _ = make_optimizer(OptimSection(learning_rate=lr, warmup_steps=warmup, grad_clip=1.0), steps=20)
    step = TrainStep(graphdef, tx, make_mesh("", devices), PLAN, FlowMatching(shift=3.0), remat=True)
    return (step, *step.place(lora, base, tx.init(lora)))


def _batch(step: TrainStep, batch_size: int, accumulate: int = 1, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 2)
    batch = {"latents": jax.random.normal(keys[0], (accumulate, batch_size, *LATENT), jnp.float32),
             "context": jax.random.normal(keys[1], (accumulate, batch_size, 7, ARCH.text_dim), jnp.float32)}
    return jax.device_put(batch, step.batch_sharding(batch_size))


def test_steps_lower_the_loss_on_a_fixed_batch():
    step, lora, base, opt_state = _state(jax.devices()[:1])
    batch, key = _batch(step, 2), jax.random.key(7)  # same batch, noise and sigma every step
    losses = []
    for _ in range(6):
        lora, opt_state, metrics = step(lora, opt_state, base, batch, key)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "fsdp=2,sequence=4"])
def test_mesh_step_equals_the_single_device_step(spec):
    """8 CPU devices against one: data=2 x fsdp=4 (weights, LoRA and Adam state sharded, batch split
    8 ways), and fsdp=2 x sequence=4 (each sample's tokens split 4 ways, sequence-parallel
    attention): the same loss and LoRA after two steps, to float32 reduction-order noise."""
    results = []
    for devices, mesh_spec in ((jax.devices()[:1], ""), (jax.devices()[:8], spec)):
        model_step, lora, base, opt_state = _state(devices)
        step = TrainStep(model_step.graphdef, model_step.tx, make_mesh(mesh_spec, devices), PLAN,
                         FlowMatching(shift=3.0))  # fmt: skip
        lora, base, opt_state = step.place(lora, base, opt_state)
        losses = []
        for i in range(2):
            lora, opt_state, metrics = step(lora, opt_state, base, _batch(step, 8, seed=i), jax.random.key(i))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.tree.map(np.asarray, lora)))
    sharded = [x for x in jax.tree.leaves(base) if x.sharding.spec != P()]
    assert sharded, "no base weight was sharded over fsdp"
    if "sequence" in spec:  # Ulysses attention: its all-to-alls are in the step
        assert "all-to-all" in step.lower(lora, opt_state, base, _batch(step, 8), jax.random.key(0)).compile().as_text()
    (losses_1, lora_1), (losses_8, lora_8) = results
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
    moved = max(float(np.abs(b).max()) for b in jax.tree.leaves(lora_1))
    assert moved > 1e-3  # the LoRA did train (lora_b starts at zero)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * moved), lora_8, lora_1)


def test_accumulation_averages_the_micro_batch_gradients():
    """With plain SGD the step over 2 micro-batches must move the LoRA by lr times the mean of the
    two micro-batches' gradients, here computed without remat or the step's machinery."""
    model_step, lora, base, _ = _state(jax.devices()[:1])
    tx, lr = optax.sgd(0.5), 0.5
    step = TrainStep(model_step.graphdef, tx, model_step.mesh, PLAN, FlowMatching(shift=3.0))
    batch, key = _batch(step, 2, accumulate=2), jax.random.key(3)
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # nonzero B: gradients reach A too
    start = jax.tree.map(np.asarray, lora)
    updated, _, metrics = step(jax.tree.map(jnp.copy, lora), tx.init(lora), base, batch, key)

    model = nnx.merge(step.graphdef, lora, base)
    grads, losses = [], []
    for i, micro_key in enumerate(micro_keys(key, 2)):
        def loss(m, i=i, micro_key=micro_key):
            predict = lambda x, t: m(x, t, batch["context"][i], plan=PLAN)  # noqa: E731
            return flow_matching_loss(predict, batch["latents"][i], micro_key, FlowMatching(shift=3.0))[0]
        value, grad = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        grads.append(jax.tree.map(np.asarray, grad))
        losses.append(float(value))
    want = jax.tree.map(lambda p, g0, g1: p - lr * (g0 + g1) / 2, start, *grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), updated, want)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]))) > 1e-4


@pytest.mark.parametrize("spec, sizes", [
    ("", {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}),
    ("data=2,fsdp=4", {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}),
    ("data=2,fsdp=-1", {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}),
    ("data=8", {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}),
    ("fsdp=2,sequence=2,tensor=2", {"data": 1, "fsdp": 2, "sequence": 2, "tensor": 2}),
])
def test_parse_mesh(spec, sizes):
    assert parse_mesh(spec, 8) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data=3", "has 3 devices but 8 are present"),
    ("model=8", "AXIS one of"),
    ("data=-1,fsdp=-1", "at most one -1"),
])
def test_bad_mesh_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec, 8)


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert fsdp_spec((5120, 13824), {"fsdp": 8, "sequence": 1}) == P(None, "fsdp")
    assert fsdp_spec((13824, 5120), {"fsdp": 8, "sequence": 1}) == P("fsdp", None)
    assert fsdp_spec((1, 6, 5120), {"fsdp": 8, "sequence": 1}) == P(None, None, "fsdp")
    assert fsdp_spec((5120, 13824), {"fsdp": 2, "sequence": 4}) == P(None, ("fsdp", "sequence"))
    assert fsdp_spec((6, 40000), {"fsdp": 2, "sequence": 3}) == P(("fsdp", "sequence"), None)
    assert fsdp_spec((40000, 4), {"fsdp": 4, "sequence": 3}) == P("fsdp", None)  # 12 does not divide 40000
    assert fsdp_spec((5120,), {"fsdp": 1, "sequence": 1}) == P()
    assert fsdp_spec((64,), {"fsdp": 8, "sequence": 1}) == P()  # small: replicated
    assert fsdp_spec((3, 40000), {"fsdp": 7, "sequence": 1}) == P()  # nothing divides


def test_per_shard_placement_equals_device_put():
    """The several-hosts path (each process builds its own shards) on one host: same arrays, same shardings."""
    mesh = make_mesh("data=2,fsdp=4", jax.devices()[:8])
    tree = {"w": jnp.arange(64 * 512, dtype=jnp.float32).reshape(64, 512), "b": jnp.ones((3,), jnp.float32)}
    shardings = tree_shardings(tree, mesh)
    placed = put_global(tree, shardings, per_shard=True)
    assert placed["w"].sharding.spec == P(None, "fsdp") and placed["b"].sharding.spec == P()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, tree)


def test_batch_axes_fall_back_to_data_then_refuse():
    mesh = make_mesh("data=2,fsdp=4", jax.devices()[:8])
    assert batch_axes(mesh, 16) == ("data", "fsdp")
    assert batch_axes(mesh, 2) == ("data",)
    with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
        batch_axes(mesh, 3)


@pytest.mark.parametrize("spec, batch_size, rows", [
    ("data=2,fsdp=4", 8, [(0, 4), (4, 8)]),  # split over (data, fsdp): 4 rows a host
    ("data=2,fsdp=4", 2, [(0, 1), (1, 2)]),  # split over data alone: one row a host
    ("fsdp=8", 2, [(0, 2), (0, 2)]),  # replicated over both hosts: each reads the whole batch
])
def test_process_rows_are_what_each_host_holds(spec, batch_size, rows):
    """8 CPU devices as two pretend hosts of 4 (device id // 4), as jax.devices() orders them."""
    sharding = batch_sharding(make_mesh(spec), batch_size)
    held = [process_rows(sharding, batch_size, process_index=p, process_of=lambda d: d.id // 4) for p in (0, 1)]
    assert [(s.start, s.stop) for s in held] == rows


def test_process_rows_refuse_a_mesh_that_interleaves_hosts():
    devices = jax.devices()[:8]
    mesh = make_mesh("fsdp=8", devices[0::2] + devices[1::2])  # ids 0 2 4 6 1 3 5 7: hosts alternate
    sharding = batch_sharding(mesh, 8)
    with pytest.raises(ValueError, match=r"holds rows .* not one contiguous block; order the mesh's devices"):
        process_rows(sharding, 8, process_index=0, process_of=lambda d: d.id // 4)


def test_warmup_then_cosine_schedule():
    _, schedule = make_optimizer(OptimSection(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1), steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)


def test_a_model_without_lora_is_refused():
    model = pipeline.random_weights(lambda rngs: WanModel(dataclasses.replace(ARCH, num_layers=1), rngs=rngs), 0)
    with pytest.raises(ValueError, match="apply_lora before training"):
        split_model(model)
