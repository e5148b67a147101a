"""A Wan 14B DiT step with its tokens split over 1, 2, ... GPUs (sequence parallel, Ulysses).

    python benchmarks/multi_gpu.py [--gpus 1,2] [--shapes 14b-720p-81f,14b-720p-161f] [--iters 2]
                                   [--warmup 1] [--out FILE]
    python benchmarks/multi_gpu.py --train [--shapes 14b-720p-81f] ...   # a LoRA training step instead
    python benchmarks/multi_gpu.py --dry-run [--gpus 1,2,4,8] [--train] [--out FILE]   # tiny model, fake CPU devices

One worker process per GPU count (its peak memory is its own), each timing every shape: random
weights built on the devices (replicated, no host copy), bf16, batch 1, 512 text tokens, radial
attention at decay 1.0 with the first layer dense (benchmarks/dit_step.py's setting), the Pallas
kernel. The mesh is `sequence=P` over the first P devices. Reports s/step (median), scaling
efficiency t_1 / (P t_P), peak memory per GPU, the time of one all-to-all of a layer's stacked
q, k, v alone (and its bandwidth), and how far the P-GPU output is from the 1-GPU output (the
same weights and inputs: the P-GPU step must compute the same function). Writes
benchmarks/results/multi-gpu-<device>.json (device, command, date; after each GPU count),
merging rows of the same device from earlier calls (split the shapes over calls if one call
would run too long).
NCCL: NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless set otherwise).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import REPO, RESULT_PREFIX, add_worker_flags, out_path, random_state, run_child_rows

GIB = 1 << 30
SHAPES = {  # name: (preset, latent frames, latent height, latent width)
    "14b-720p-81f": ("t2v-14B", 21, 90, 160),  # 21 x 45 x 80 = 75,600 tokens
    "14b-720p-161f": ("t2v-14B", 41, 90, 160),  # 147,600 tokens
    "14b-720p-321f": ("t2v-14B", 81, 90, 160),  # 291,600 tokens (4+ GPUs)
    "tiny": ("tiny", 5, 6, 10),  # --dry-run: 75 tokens, ragged against 2, 4 and 8 devices
}
TIMESTEP = 500.0
OUTPUT_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-5}  # relative L2, P GPUs vs 1 (see check_outputs)
DRY_RUN_GPUS = "1,2,4,8"


def timed(fn, iters: int, warmup: int) -> tuple[list[float], object]:
    """Returns (per-call seconds of fn() after `warmup` untimed calls, the last call's result)."""
    import jax

    result = None
    for _ in range(warmup):
        result = jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times, result


# ---------------------------------------------------------------- worker (one GPU count)


def worker(gpus: int, shapes: list[str], args) -> None:
    """Times every shape on a `sequence=gpus` mesh; prints one RESULT row per shape as it goes."""
    import jax

    if args.dry_run:
        jax.config.update("jax_num_cpu_devices", 8)
    if len(jax.devices()) < gpus:
        raise SystemExit(f"--gpus asks for {gpus} devices; this machine has {len(jax.devices())}")
    (train_worker if args.train else forward_worker)(gpus, shapes, args)


def forward_worker(gpus: int, shapes: list[str], args) -> None:
    """The DiT forward step (a sampling step's one pass) of every shape on `gpus` devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((gpus,), ("sequence",), axis_types=(AxisType.Auto,), devices=jax.devices()[:gpus])
    replicated = NamedSharding(mesh, PartitionSpec())
    dtype = "float32" if args.dry_run else "bfloat16"
    start = time.perf_counter()
    config, graphdef, state = random_model(SHAPES[shapes[0]][0], dtype, replicated)
    init_s = time.perf_counter() - start
    plan = radial_plan(args)
    step = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs, plan=plan, dense=False))
    for shape in shapes:
        _, frames, height, width = SHAPES[shape]
        keys = jax.random.split(jax.random.key(1), 2)
        make = jax.jit(lambda key, shape_: jax.random.normal(key, shape_, dtype), static_argnums=1,
                       out_shardings=replicated)
        latents = make(keys[0], (1, frames, height, width, config.in_dim))
        context = make(keys[1], (1, config.text_len, config.text_dim))
        timestep = jax.device_put(jnp.full((1,), TIMESTEP, jnp.float32), replicated)
        inputs = (state, latents, timestep, context)
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            compiled = step.lower(*inputs).compile()
            compile_s = time.perf_counter() - start
            times, output = timed(lambda: compiled(*inputs), args.iters, args.warmup)
        output = np.asarray(jax.device_get(output), np.float32)
        np.save(Path(args.save_dir) / f"{shape}-forward-{gpus}.npy", output)
        tokens = frames * (height // 2) * (width // 2)
        row = dict(shape=shape, mode="forward", gpus=gpus, tokens=tokens, dtype=dtype,
                   device=jax.devices()[0].device_kind,
                   jax=jax.__version__, init_s=round(init_s, 1), compile_s=round(compile_s, 1), times_s=times,
                   peak_gib_per_gpu=peak_memory(mesh.devices.flat), radial=radial_setting(plan, frames, height, width))
        if gpus > 1:
            row.update(all_to_all(mesh, tokens, config, dtype, args))
        print(RESULT_PREFIX + json.dumps(row), flush=True)


def train_worker(gpus: int, shapes: list[str], args) -> None:
    """One LoRA training step of every shape on `gpus` devices: train/step.py's TrainStep (remat,
    LoRA rank 32 on self-attention, AdamW) on a sequence=gpus mesh, the base weights sharded over
    it as the training shards them. The "output" compared is the LoRA's change over all steps,
    and each step's gradient norm."""
    import dataclasses

    import jax
    import numpy as np
    from train_step import training_setup  # benchmarks/train_step.py: the training's own setup
    from models.wan import PRESETS
    from train.step import make_mesh

    dtype = "float32" if args.dry_run else "bfloat16"
    plan = radial_plan(args)
    for shape in shapes:
        preset, frames, height, width = SHAPES[shape]
        config = dataclasses.replace(PRESETS[preset], param_dtype=dtype, dtype=dtype)
        mesh = make_mesh(f"sequence={gpus}", jax.devices()[:gpus])
        step, lora, base, opt_state, batch = training_setup(config, plan, mesh, (frames, height, width))
        start = time.perf_counter()
        compiled = step.lower(lora, opt_state, base, batch, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start
        def flat(tree):
            return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])

        initial = flat(lora)
        state, times, losses, grad_norms = [lora, opt_state], [], [], []
        for i in range(args.warmup + args.iters):
            begin = time.perf_counter()
            state[0], state[1], metrics = compiled(state[0], state[1], base, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))  # waits for the step
            grad_norms.append(float(metrics["grad_norm"]))
            if i >= args.warmup:
                times.append(time.perf_counter() - begin)
        # What training changed (the LoRA's own random init would swamp it in a comparison).
        np.save(Path(args.save_dir) / f"{shape}-train-{gpus}.npy", flat(state[0]) - initial)
        row = dict(shape=shape, mode="train", gpus=gpus, tokens=frames * (height // 2) * (width // 2), dtype=dtype,
                   device=jax.devices()[0].device_kind, jax=jax.__version__, compile_s=round(compile_s, 1),
                   times_s=times, losses=losses, grad_norms=grad_norms, peak_gib_per_gpu=peak_memory(mesh.devices.flat),
                   radial=radial_setting(plan, frames, height, width))
        print(RESULT_PREFIX + json.dumps(row), flush=True)


def radial_plan(args):
    """Returns the plan timed: radial at decay 1.0 with the first layer dense (dit_step.py's)."""
    from radial_jax import RadialPlan

    if args.dry_run:  # the tiny model's 75 tokens: 16-token blocks give a mask that is not all on
        return RadialPlan(decay_factor=1.0, dense_layers=1, implementation="reference", block_size=16)
    return RadialPlan(decay_factor=1.0, dense_layers=1, implementation=args.radial_impl)


def random_model(preset: str, dtype: str, sharding):
    """Returns (config, graphdef, state): the preset with random `dtype` weights made on the
    devices of `sharding` (norm scales 1, biases 0)."""
    import dataclasses

    from flax import nnx

    from models.wan import PRESETS, WanModel

    config = dataclasses.replace(PRESETS[preset], param_dtype=dtype, dtype=dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))

    return config, graphdef, random_state(abstract, seed=0, sharding=sharding)


def radial_setting(plan, frames: int, height: int, width: int) -> dict:
    mask = plan.block_mask(frames, (height // 2) * (width // 2))
    return dict(decay_factor=plan.decay_factor, dense_layers=plan.dense_layers, implementation=plan.implementation,
                mask_density=round(float(mask.mean()), 4))


def peak_memory(devices) -> list[float | None]:
    """Returns each device's peak bytes in use, GiB (None where the backend does not say)."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() or {}
        peaks.append(stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None)
    return peaks


def all_to_all(mesh, tokens: int, config, dtype: str, args) -> dict:
    """Returns the time of one all-to-all of a layer's stacked q, k, v alone and its bandwidth:
    each device sends (P-1)/P of its 3 x L/P x dim values."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    gpus = mesh.shape["sequence"]
    tokens = -(-tokens // gpus) * gpus
    heads = -(-config.num_heads // gpus) * gpus
    spec = PartitionSpec(None, None, "sequence")
    qkv = jax.jit(lambda: jnp.ones((3, 1, tokens, heads, config.head_dim), dtype),
                  out_shardings=NamedSharding(mesh, spec))()
    regroup = jax.jit(jax.shard_map(
        lambda x: jax.lax.all_to_all(x, "sequence", split_axis=3, concat_axis=2, tiled=True),
        mesh=mesh, in_specs=spec, out_specs=spec))
    seconds = statistics.median(timed(lambda: regroup(qkv), max(args.iters, 5), 1)[0])
    sent = qkv.nbytes // gpus * (gpus - 1) // gpus
    return dict(all_to_all_qkv_ms=1e3 * seconds, all_to_all_qkv_bytes_sent_per_gpu=sent,
                all_to_all_gb_per_s=sent / seconds / 1e9)


# ---------------------------------------------------------------- orchestration


def run_gpus(gpus: int, shapes: list[str], args) -> list[dict]:
    """Runs the worker for one GPU count in a child process; returns its rows (error rows for the rest)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(gpus), "--shapes", ",".join(shapes),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--radial-impl", args.radial_impl,
           "--save-dir", args.save_dir]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--train"] if args.train else []
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (the children inherit it)
    rows, failure = run_child_rows(cmd, timeout=args.timeout, dry_run=args.dry_run, key="shape")
    done = {row["shape"] for row in rows}
    mode = "train" if args.train else "forward"
    return rows + [dict(shape=s, mode=mode, gpus=gpus, error=failure or "no result") for s in shapes if s not in done]


def check_outputs(rows: list[dict], save_dir: Path) -> None:
    """Adds s_per_step, efficiency vs 1 GPU and the output's distance from the 1-GPU output.

    The P-GPU step computes the same function; in bf16 its matmuls over L/P rows may pick other
    GEMM tilings than over L rows, so outputs agree to bf16 rounding, not bit for bit. A wrong
    head or token regrouping, or a padded key attended, gives an O(1) relative error.
    """
    import numpy as np

    for row in rows:
        if "times_s" in row:
            row["s_per_step"] = statistics.median(row["times_s"])
    for row in rows:
        one = next((r for r in rows if (r["shape"], r["mode"], r["gpus"]) == (row["shape"], row["mode"], 1)
                    and "s_per_step" in r), None)  # fmt: skip
        if one is None or "s_per_step" not in row or row["gpus"] == 1:
            continue
        row["efficiency"] = one["s_per_step"] / (row["gpus"] * row["s_per_step"])
        ours = np.load(save_dir / f"{row['shape']}-{row['mode']}-{row['gpus']}.npy").astype(np.float64)
        base = np.load(save_dir / f"{row['shape']}-{row['mode']}-1.npy").astype(np.float64)
        row["output_max_abs_diff"] = float(np.abs(ours - base).max())
        row["output_rel_l2"] = float(np.linalg.norm(ours - base) / np.linalg.norm(base))
        row["output_bitwise_equal"] = bool(np.array_equal(ours, base))
        tolerance = OUTPUT_TOLERANCE[row["dtype"]]
        row["output_matches_1_gpu"] = row["output_rel_l2"] <= tolerance
        if row["mode"] == "train":  # a gradient summed once too often shows in its norm, not in AdamW's update
            row["grad_norm_max_rel_diff"] = max(abs(a - b) / b for a, b in zip(row["grad_norms"], one["grad_norms"]))
            row["output_matches_1_gpu"] &= row["grad_norm_max_rel_diff"] <= tolerance


def print_table(rows: list[dict]) -> None:
    widths = (15, 7, 4, 8, 6, 13, 7, 12)
    header = ("shape", "mode", "gpus", "s/step", "eff", "peak GiB/GPU", "a2a ms", "rel L2 vs 1")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>15} {r['mode']:>7} {r['gpus']:>4}  error: {r['error'][:200]}")
            continue
        peak = max((p for p in r["peak_gib_per_gpu"] if p is not None), default=None)
        cells = [r["shape"], r["mode"], str(r["gpus"]), f"{r['s_per_step']:.3f}",
                 f"{r['efficiency']:.1%}" if "efficiency" in r else "-", f"{peak:.1f}" if peak is not None else "-",
                 f"{r['all_to_all_qkv_ms']:.2f}" if "all_to_all_qkv_ms" in r else "-",
                 f"{r['output_rel_l2']:.1e}" if "output_rel_l2" in r else "-"]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def write_results(rows: list[dict], out: Path, old: dict | None) -> None:
    """Writes the rows to `out`, merged into `old` (the file as it was before this call) when
    it holds the same device: shapes split over calls land in one file."""
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    record = dict(device=device, command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(),
                  rows=rows)
    if old is not None:
        if old.get("device") == device:
            def case(row):
                return row["shape"], row.get("mode", "forward"), row["gpus"]

            new = {case(r) for r in rows}
            record["rows"] = [r for r in old.get("rows", []) if case(r) not in new] + rows
            record["command"] = [*([old["command"]] if isinstance(old["command"], str) else old["command"]),
                                 record["command"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", help=f"comma list of GPU counts, 1 first (default 1,2; --dry-run {DRY_RUN_GPUS})")
    parser.add_argument("--shapes", help=f"comma list of {list(SHAPES)} (default 14b-720p-81f,14b-720p-161f; "
                                          "--train 14b-720p-81f)")
    add_worker_flags(parser, results="multi-gpu", timeout=900, iters=2,
                     dry_run="tiny f32 model on fake CPU devices (up to 8)")  # fmt: skip
    parser.add_argument("--train", action="store_true",
                        help="time a LoRA training step (train/step.py) instead of the forward step")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_shapes = "14b-720p-81f" if args.train else "14b-720p-81f,14b-720p-161f"
    shapes = ["tiny"] if args.dry_run else (args.shapes or default_shapes).split(",")
    if args.worker:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        worker(args.worker, shapes, args)
        return 0
    gpus = [int(g) for g in (args.gpus or (DRY_RUN_GPUS if args.dry_run else "1,2")).split(",")]
    unknown = [s for s in shapes if s not in SHAPES or (s == "tiny") != args.dry_run]
    if unknown:
        sys.exit(f"unknown --shapes {unknown}; choose from {[s for s in SHAPES if s != 'tiny']}")
    if gpus[0] != 1 or any(g < 2 for g in gpus[1:]):
        sys.exit(f"--gpus {args.gpus} must start with 1 (the baseline the others are compared with)")
    out, old = None, None
    with tempfile.TemporaryDirectory() as save_dir:
        args.save_dir = save_dir
        rows = []
        for count in gpus:  # written after each GPU count: a run cut short keeps what finished
            print(f"running {count} GPU(s): {', '.join(shapes)} ...", flush=True)
            rows += run_gpus(count, shapes, args)
            check_outputs(rows, Path(save_dir))
            if out is None and (out := out_path(args, "multi-gpu", rows)):  # the device is known after the first worker
                old = json.loads(out.read_text()) if out.is_file() else None
            if out is not None:
                write_results(rows, out, old)
    print_table(rows)
    ok = all("error" not in r and r.get("output_matches_1_gpu", True) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
