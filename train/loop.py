"""The training loop: cache -> LoRA model -> sharded steps -> checkpoints, logs, the exported LoRA.

    result = train(load_config("tiny", ["data.cache=cache/"]), resume=False)

Order of work, so that bad input fails before anything compiles: the run folder and the cache
are checked (an empty or mismatched cache is one CacheError), the sampler set up when
sample.every > 0 (train/sample.py: settings checked, text encoded, VAE loaded), then the model is built, LoRA
applied, state placed on the mesh, a checkpoint restored when resuming, and only then the first
step compiles. Each optimizer step draws `optim.accumulate` batches of `data.batch_size`; its
PRNG key is fold_in(key(run.seed), step), so the noise of step s is the same whether or not the
run was interrupted before it. A non-finite loss stops the run without saving (the last good
checkpoint stays the newest). The run folder holds checkpoints/, metrics.csv, tensorboard/,
samples/ (with sample.every) and, at the end, lora.safetensors (diffusers names, train/export.py).
"""

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models.wan import WanConfig, WanModel, pipeline
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.data import DataPosition, LatentDataset
from train.export import export_lora
from train.logging import MetricsLog
from train.sample import Sampler, sample_steps
from train.lora import apply_lora
from train.step import TrainStep, batch_axes, get_global, make_mesh, make_optimizer, process_rows, split_model

# Settings a resumed run may change: they do not alter what the remaining steps compute.
RESUMABLE_CHANGES = {("run", "steps"), ("run", "out"), ("run", "save_every"), ("run", "keep"), ("run", "log_every"),
                     ("run", "mesh"), ("data", "prefetch"), ("data", "cache")}  # fmt: skip
RESUMABLE_SECTIONS = {"sample"}  # samples only read the training state
LORA_FILE = "lora.safetensors"


class TrainingError(RuntimeError):
    """The run cannot continue (a non-finite loss, a resume that does not fit); the message says
    what to do."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # the last step taken
    losses: dict[int, float]  # of the steps this call ran
    lora_path: Path | None  # the exported LoRA (None when stopped early by stop_at)


def model_config(config: TrainConfig) -> WanConfig:
    """Returns the DiT architecture the run trains (from the checkpoint, or the tiny preset)."""
    if config.model.ckpt:
        from convert import read_config

        return read_config(config.model.ckpt)[1]
    return dataclasses.replace(pipeline.TINY_T2V, param_dtype=config.model.dtype, dtype=config.model.dtype)


def build_model(config: TrainConfig) -> WanModel:
    """Returns the base DiT with LoRA layers applied (LoRA init from run.seed)."""
    if config.model.ckpt:
        from convert import load_wan

        model = load_wan(config.model.ckpt, dtype=config.model.dtype)
    else:  # the same seeded weights as `radial-jax generate` without --ckpt
        arch = model_config(config)
        model = pipeline.random_weights(lambda rngs: WanModel(arch, rngs=rngs), config.model.seed)
    return apply_lora(model, config.lora, rngs=nnx.Rngs(config.run.seed))


def open_dataset(config: TrainConfig, arch: WanConfig) -> LatentDataset:
    """Returns the cache, checked against the video size and the model (CacheError otherwise)."""
    if not config.data.cache:
        raise ValueError("data.cache is empty: make a cache (radial-jax prepare ... --out CACHE) and pass "
                         "--set data.cache=CACHE")  # fmt: skip
    pipeline.check_video_size(config.data.frames, config.data.height, config.data.width, arch.patch_size)
    dataset = LatentDataset(config.data.cache)
    latent = pipeline.latent_shape(config.data.frames, config.data.height, config.data.width, arch.in_dim)[1:]
    dataset.check(latent_shape=latent, context_dim=arch.text_dim, text_len=arch.text_len)
    return dataset


def train(config: TrainConfig, *, resume: bool = False, stop_at: int | None = None, progress: bool = True,
          devices=None) -> TrainResult:  # fmt: skip
    """Runs (or resumes) the training `config` describes; returns what it did.

    resume: continue from the newest checkpoint in run.out (same step, LR schedule, data order
    and noise as an uninterrupted run); without it, a run folder that has checkpoints is an
    error. stop_at: stop after this step with a checkpoint (a job's share of a longer run).
    devices: of the mesh (default all devices of all processes).
    """
    # Closed on every way out: an open orbax manager left to interpreter exit prints a thread's traceback
    # under the one-line error of a bad cache or config.
    with Checkpoints(Path(config.run.out) / "checkpoints", keep=config.run.keep) as checkpoints:
        return _train(config, checkpoints, resume=resume, stop_at=stop_at, progress=progress, devices=devices)


def _train(config: TrainConfig, checkpoints: Checkpoints, *, resume: bool, stop_at: int | None, progress: bool,
           devices) -> TrainResult:  # fmt: skip
    out = Path(config.run.out)
    if checkpoints.latest_step() is not None and not resume:
        raise TrainingError(f"{out} already holds checkpoints (newest step {checkpoints.latest_step()}); pass "
                            "--resume to continue it, or set run.out to a new folder")  # fmt: skip
    arch = model_config(config)
    dataset = open_dataset(config, arch)
    mesh = make_mesh(config.run.mesh, devices)
    batch_axes(mesh, config.data.batch_size)  # a batch that cannot be split: an error before compiling
    # Before the DiT is built: a real run's umT5 comes and goes before the DiT takes the memory.
    sampler = Sampler(config, arch, dataset, mesh) if config.sample.every else None

    graphdef, lora, base = split_model(build_model(config))  # no model kept: the placed base is the only copy
    tx, schedule = make_optimizer(config.optim, config.run.steps)
    step_fn = TrainStep(graphdef, tx, mesh, config.attention, config.objective, remat=config.run.remat)
    lora, base, opt_state = step_fn.place(lora, base, tx.init(lora))
    state = {"lora": lora, "opt_state": opt_state, "step": np.int64(0),
             "rng": np.asarray(jax.random.key_data(jax.random.key(config.run.seed))),
             "data": _position(DataPosition())}  # fmt: skip
    if resume and checkpoints.latest_step() is not None:
        state = _restore(checkpoints, state, config)
    start = int(state["step"])
    last = min(config.run.steps, stop_at if stop_at is not None else config.run.steps)
    losses = _run(config, step_fn, state, base, dataset, arch, schedule, checkpoints, start, last, progress, sampler)
    lora_path = None
    if last == config.run.steps:
        lora_host = get_global(state["lora"])  # every process joins the gather; one writes
        if jax.process_index() == 0:
            trained = nnx.merge(graphdef, lora_host, base)
            lora_path = export_lora(trained, out / LORA_FILE, metadata={"step": str(last)})
    return TrainResult(step=last, losses=losses, lora_path=lora_path)


def _restore(checkpoints: Checkpoints, template: dict, config: TrainConfig) -> dict:
    saved = checkpoints.saved_config()  # compared before any array is read: a changed shape would fail there
    current, defaults = config.to_dict(), TrainConfig().to_dict()
    # A key the checkpoint lacks was added to the config since it was saved: that run used its default.
    was = lambda section, key: saved.get(section, {}).get(key, defaults[section][key])  # noqa: E731
    changed = sorted(change for section, values in current.items() for key, value in values.items()
                     if section not in RESUMABLE_SECTIONS and (section, key) not in RESUMABLE_CHANGES
                     for change in _differences(f"{section}.{key}", was(section, key), value))  # fmt: skip
    if changed:
        raise TrainingError(f"--resume: the config differs from the checkpoint's in {', '.join(changed)}; "
                            "resume with the original settings or start a new run.out")  # fmt: skip
    restored, _ = checkpoints.restore(template)
    return dict(restored, data={k: np.int64(v) for k, v in restored["data"].items()})


def _differences(key: str, was, now):
    """Yields "key (was -> now)" for each value that changed, naming a nested table's leaves
    (attention.tuning.mosaic_bwd.fused) rather than printing the tables."""
    if isinstance(was, dict) and isinstance(now, dict):
        for name in sorted(set(was) | set(now)):
            yield from _differences(f"{key}.{name}", was.get(name), now.get(name))
    elif was != now:
        short = lambda value: "{...}" if isinstance(value, dict) else repr(value)  # noqa: E731
        yield f"{key} ({short(was)} -> {short(now)})"


def _run(config, step_fn, state, base, dataset, arch, schedule, checkpoints, start, last, progress,
         sampler) -> dict[int, float]:  # fmt: skip
    """Runs steps start+1 .. last, updating `state` in place; returns {step: loss}."""
    sampling = set(sample_steps(config.sample.every, start, last))
    data, run = config.data, config.run
    sharding = step_fn.batch_sharding(data.batch_size)
    stream = dataset.batches(data.batch_size, seed=data.seed, start=DataPosition.from_dict(state["data"]),
                             text_len=arch.text_len, rows=process_rows(sharding, data.batch_size),
                             prefetch=data.prefetch)  # fmt: skip
    tokens = data.batch_size * config.optim.accumulate * math.prod(
        n // p for n, p in zip(dataset.latent_shape[:3], arch.patch_size))  # fmt: skip
    base_key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
    losses, timer = {}, time.perf_counter()
    bar = tqdm(total=last, initial=start, desc="train", unit="step", disable=not progress or jax.process_index() != 0)
    with MetricsLog(run.out, purge_from=start + 1, enabled=jax.process_index() == 0) as log:
        if start == 0:
            log.text("config", str(config.to_dict()))
        for step in range(start + 1, last + 1):
            micro = [next(stream) for _ in range(config.optim.accumulate)]
            batch = _global_batch([b for b, _ in micro], sharding, data.batch_size)
            lora, opt_state, metrics = step_fn(state["lora"], state["opt_state"], base, batch,
                                               jax.random.fold_in(base_key, step))  # fmt: skip
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                bar.close()
                raise TrainingError(f"loss is {loss} at step {step}: stopped without saving; the last good "
                                    f"checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory}. "
                                    "Lower optim.learning_rate or check the cache, then --resume")  # fmt: skip
            state.update(lora=lora, opt_state=opt_state, step=np.int64(step), data=_position(micro[-1][1]))
            seconds, timer = time.perf_counter() - timer, time.perf_counter()
            losses[step] = loss
            stats = {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(step - 1)),
                     "s_per_step": seconds, "tokens_per_s": tokens / seconds, **_memory()}  # fmt: skip
            if step % run.log_every == 0 or step == last:
                log.scalars(step, stats)
            bar.set_postfix(loss=f"{loss:.4f}", s_step=f"{seconds:.2f}", tok_s=f"{tokens / seconds:.0f}",
                            **({"mem_GiB": f"{stats['peak_GiB']:.1f}"} if "peak_GiB" in stats else {}))  # fmt: skip
            bar.update(1)
            if step % run.save_every == 0 or step == last:
                checkpoints.save(step, state, config.to_dict())
            if step in sampling:  # after the save: a sample that fails loses no training
                _sample(sampler, step, step_fn.graphdef, state["lora"], base, bar)
                timer = time.perf_counter()  # the next step's s/step is its own
    bar.close()
    return losses


def _sample(sampler: Sampler, step: int, graphdef, lora, base, bar) -> None:
    """Generates the sample of `step`, showing its progress in the training bar's postfix."""
    start = time.perf_counter()
    show = lambda i, n, dense: bar.set_postfix_str(f"sample {i + 1}/{n}")  # noqa: E731
    path = sampler(step, graphdef, lora, base, on_step=show)
    if path is not None:
        bar.write(f"step {step}: sample {path} ({time.perf_counter() - start:.1f} s)")


def _position(position: DataPosition) -> dict[str, np.int64]:
    return {k: np.int64(v) for k, v in position.to_dict().items()}


def _global_batch(batches: list[dict[str, np.ndarray]], sharding, batch_size: int) -> dict[str, jax.Array]:
    """Returns {name: global array [accumulate, batch_size, ...]} from this process's rows
    (process_rows) of each micro-batch."""
    out = {}
    for name in batches[0]:
        local = np.stack([b[name] for b in batches])  # [A, rows, ...]
        global_shape = (local.shape[0], batch_size, *local.shape[2:])
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def _memory() -> dict[str, float]:
    """Returns {"peak_GiB": ...} of the first local device where the backend reports it (GPUs)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_GiB": peak / 2**30} if peak else {}
