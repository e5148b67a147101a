"""One LoRA training step, compiled once with explicit shardings over a device mesh.

    mesh = make_mesh("data=2,fsdp=4")
    tx, schedule = make_optimizer(config.optim, config.run.steps)
    graphdef, lora, base = split_model(model)              # LoRA leaves / frozen base weights
    step = TrainStep(graphdef, tx, mesh, config.attention, config.objective, remat=True)
    lora, base, opt_state = step.place(lora, base, tx.init(lora))
    lora, opt_state, metrics = step(lora, opt_state, base, batch, key)

The step takes `accumulate` micro-batches ([A, B, ...] arrays) one after another, averages
their LoRA gradients, clips and applies AdamW once: one compiled program per optimizer step. Only the LoRA leaves are differentiated; the base weights enter as
a frozen input. The base weights are sharded by their logical axis names through the model's
rules table (radial_jax/sharding.py; `embed` over fsdp x sequence, heads/mlp over tensor); the
LoRA factors and Adam moments by `fsdp_spec`, their largest axis divisible by the fsdp x sequence
devices split over them (small arrays replicated); batches are split over (data, fsdp) when the batch divides, else over
data. With a sequence axis the step runs under jax.set_mesh, so the model splits each sample's
tokens over it (sequence-parallel attention, radial_jax/parallel.py).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

from radial_jax import sharding
from radial_jax.plan import RadialPlan
from train.config import OptimSection
from train.objective import FlowMatching, flow_matching_loss

MESH_AXES = sharding.MESH_AXES  # data, fsdp, sequence, tensor
WEIGHT_AXES = ("fsdp", "sequence")  # mesh axes that shard weights and optimizer state (ZeRO-3 style)
WEIGHT_RULES = tuple((name, WEIGHT_AXES) if name == "embed" else (name, axes) for name, axes in sharding.RULES)
MIN_SHARDED_SIZE = 1 << 14  # elements; smaller arrays are replicated (sharding them only adds collectives)


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """Returns {axis: size} for MESH_AXES from "data=2,fsdp=4" (missing axes 1; one axis may be
    -1: the rest of the devices; empty spec: every device on fsdp)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not spec.strip():
        sizes["fsdp"] = num_devices
        return sizes
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: each part must be AXIS=SIZE with AXIS one of {MESH_AXES}")
        sizes[name] = int(value)
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"--mesh {spec!r}: sizes must be positive (at most one -1)")
    if fill:
        rest = math.prod(s for s in sizes.values() if s != -1)
        sizes[fill[0]] = num_devices // rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"--mesh {spec!r} has {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """Returns a Mesh over MESH_AXES using every one of `devices` (default: all devices of all
    processes), built by radial_jax.sharding.make_mesh; an empty spec puts them all on fsdp."""
    devices = jax.devices() if devices is None else list(devices)
    return sharding.make_mesh(parse_mesh(spec, len(devices)), devices)


def fsdp_spec(shape: tuple[int, ...], axes: dict[str, int]) -> P:
    """Returns the PartitionSpec of a parameter-like array over the weight-sharding mesh axes
    {name: size} (fsdp, and sequence: its devices hold replicas otherwise): the largest array
    axis divisible by all of them together is split over them, else over the first alone;
    small arrays and ones nothing divides stay replicated."""
    axes = {name: size for name, size in axes.items() if size > 1}
    if not axes or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    for names in (tuple(axes), tuple(axes)[:1]):
        size = math.prod(axes[n] for n in names)
        candidates = [i for i in np.argsort(shape, kind="stable")[::-1] if shape[i] % size == 0]
        if candidates:
            spec = [None] * len(shape)
            spec[candidates[0]] = names if len(names) > 1 else names[0]
            return P(*spec)
    return P()


def base_shardings(base: nnx.State, mesh: Mesh):
    """Returns the shardings of the frozen base weights from their logical axis names through the
    model's rules table, with `embed` over fsdp x sequence (weights are not replicated over the
    devices that split a sample's tokens)."""
    return sharding.state_shardings(base, mesh, WEIGHT_RULES)


def tree_shardings(tree, mesh: Mesh):
    """Returns the NamedShardings of every array of `tree` by fsdp_spec over (fsdp, sequence)."""
    axes = {name: mesh.shape[name] for name in WEIGHT_AXES}
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), axes)), tree)


def put_global(tree, shardings, *, per_shard: bool | None = None):
    """Returns `tree`'s arrays placed on `shardings` (a matching tree). Every process holds the whole
    arrays (loaded or drawn from the same seed); with several processes each one contributes its
    own devices' shards (make_array_from_callback), as device_put cannot reach other hosts' devices.
    per_shard: force that path (None: only with several processes)."""
    if not (jax.process_count() > 1 if per_shard is None else per_shard):
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), tree, shardings)


def get_global(tree):
    """Returns `tree`'s arrays as numpy, whole on every process (the inverse of put_global): every
    process must call it, as arrays sharded over several hosts are gathered from all of them."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def batch_axes(mesh: Mesh, batch_size: int) -> tuple[str, ...]:
    """Returns the mesh axes a global batch of `batch_size` is split over: (data, fsdp) if it
    divides, else (data,), which must divide it."""
    if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
        return ("data", "fsdp")
    if batch_size % mesh.shape["data"]:
        raise ValueError(f"data.batch_size={batch_size} must be a multiple of the mesh's data axis "
                         f"({mesh.shape['data']}); change --mesh or data.batch_size")  # fmt: skip
    return ("data",)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Returns the sharding of a batch array [accumulate, batch, ...] over `mesh` (batch_axes)."""
    return NamedSharding(mesh, P(None, batch_axes(mesh, batch_size)))


def process_rows(sharding: NamedSharding, batch_size: int, *, process_index: int | None = None,
                 process_of: Callable = lambda device: device.process_index) -> slice:  # fmt: skip
    """Returns the rows of a global batch [accumulate, batch_size, ...] placed by `sharding` that
    the devices of process `process_index` (default this one) hold: what that process must read.
    Disjoint between processes when the batch is split over them; the whole batch when it is
    replicated (e.g. 2 rows on fsdp=8 over two hosts). process_of: a device's process (tests map
    one process's CPU devices to pretend hosts)."""
    process_index = jax.process_index() if process_index is None else process_index
    held = sorted({s[1].indices(batch_size)[:2] for d, s in sharding.devices_indices_map((1, batch_size)).items()
                   if process_of(d) == process_index})  # fmt: skip
    if not held:
        raise ValueError(f"process {process_index} has no device in the mesh; every process needs devices in it")
    start, stop = held[0][0], max(hi for _, hi in held)
    covered = start
    for lo, hi in held:  # contiguous: make_array_from_process_local_data takes one block per process
        if lo > covered:
            raise ValueError(f"process {process_index} holds rows {held} of the batch, not one contiguous block; "
                             "order the mesh's devices by process (jax.devices() does)")  # fmt: skip
        covered = max(covered, hi)
    return slice(start, stop)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Returns (graphdef, LoRA state, frozen base state) of a model with LoRA layers."""
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA leaves; apply_lora before training")
    return graphdef, lora, base


def make_optimizer(optim: OptimSection, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (clip + AdamW, its learning-rate schedule): linear warmup, cosine to min_lr_ratio."""
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=optim.learning_rate * optim.min_lr_ratio,
    )  # fmt: skip
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw) if optim.grad_clip > 0 else adamw
    return tx, schedule


def micro_keys(key: Array, accumulate: int) -> Array:
    """Returns the PRNG keys [accumulate] of a step's micro-batches (noise and sigma of each)."""
    return jax.random.split(key, accumulate)


class TrainStep:
    """The compiled step of one model structure, optimizer and mesh (see the module docstring).
    plan: the self-attention plan (None: dense); its dense_layers apply here as in generation."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mesh: Mesh,
                 plan: RadialPlan | None, objective: FlowMatching, *, remat: bool = True):  # fmt: skip
        self.graphdef, self.tx, self.mesh = graphdef, tx, mesh
        self.plan, self.objective, self.remat = plan, objective, remat
        self._programs: dict[int, Callable] = {}  # jitted step per global batch size

    def place(self, lora: nnx.State, base: nnx.State, opt_state) -> tuple:
        """Returns (lora, base, opt_state) on their shardings; lora and opt_state are always copies
        (the step donates them, and the caller's model must keep its own)."""
        # jnp.copy first: device_put(may_alias=False) still aliases a replicated copy's first shard.
        copy = lambda tree: put_global(jax.tree.map(jnp.copy, tree), tree_shardings(tree, self.mesh))  # noqa: E731
        return copy(lora), put_global(base, base_shardings(base, self.mesh)), copy(opt_state)

    def batch_sharding(self, batch_size: int) -> NamedSharding:
        """Sharding of a batch array [accumulate, batch, ...]."""
        return batch_sharding(self.mesh, batch_size)

    def __call__(self, lora, opt_state, base, batch: dict[str, Array], key: Array):
        """Returns (lora, opt_state, {"loss", "grad_norm"}) after one optimizer step.

        batch: {"latents": [A, B, F, H, W, C], "context": [A, B, T, D]} global arrays sharded by
        batch_sharding; key: the step's PRNG key. lora and opt_state are donated.
        """
        # The active mesh tells the model to run sequence-parallel when the mesh has a sequence axis.
        with jax.set_mesh(self.mesh):
            return self._compiled(lora, opt_state, base, batch)(lora, opt_state, base, batch, key)

    def lower(self, lora, opt_state, base, batch, key):
        """Returns the lowered step (for cost and memory analysis) without running it."""
        with jax.set_mesh(self.mesh):
            return self._compiled(lora, opt_state, base, batch).lower(lora, opt_state, base, batch, key)

    def _compiled(self, lora, opt_state, base, batch) -> Callable:
        batch_size = jax.tree.leaves(batch)[0].shape[1]
        if batch_size not in self._programs:
            replicated = NamedSharding(self.mesh, P())
            lora_sh, opt_sh = tree_shardings(lora, self.mesh), tree_shardings(opt_state, self.mesh)
            batch_sh = jax.tree.map(lambda _: self.batch_sharding(batch_size), batch)
            self._programs[batch_size] = jax.jit(
                self._step,
                in_shardings=(lora_sh, opt_sh, base_shardings(base, self.mesh), batch_sh, replicated),
                out_shardings=(lora_sh, opt_sh, replicated),
                donate_argnums=(0, 1),
            )
        return self._programs[batch_size]

    def _loss(self, model: nnx.Module, latents, context, key):
        def predict(x_t: Float[Array, "B F H W C"], timestep: Float[Array, "B"]) -> Array:
            return model(x_t, timestep, context, plan=self.plan, remat=self.remat)

        return flow_matching_loss(predict, latents, key, self.objective)

    def _step(self, lora, opt_state, base, batch, key):
        latents, context = batch["latents"], batch["context"]
        accumulate = latents.shape[0]
        keys = micro_keys(key, accumulate)
        # nnx.grad over the merged model differentiates the LoRA leaves only and keeps nnx.remat's
        # state bookkeeping in one trace. Micro-batches are a Python loop, not lax.scan: inside a
        # scan body the base weights are tracers of the outer trace, which nnx refuses to merge.
        grad_fn = nnx.value_and_grad(self._loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
        model = nnx.merge(self.graphdef, lora, base)
        grads, losses = None, []
        for i in range(accumulate):
            (loss, _), micro_grads = grad_fn(model, latents[i], context[i], keys[i])
            grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
            losses.append(loss)
        grads = jax.tree.map(lambda g: g / accumulate, grads)
        # optax's Adam bias correction raises a float to its int32 count, which strict dtype
        # promotion (the test suite's setting) refuses; the optimizer's math is all float32.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = self.tx.update(grads, opt_state, lora)
            lora = optax.apply_updates(lora, updates)
        return lora, opt_state, {"loss": jnp.mean(jnp.stack(losses)), "grad_norm": _global_norm(grads)}


def _global_norm(tree) -> Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
