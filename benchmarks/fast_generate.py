"""The step-distilled fast path end to end on one GPU (`radial-jax generate --preset lightx2v`), radial vs dense.

    python benchmarks/generate.py --preset lightx2v [--shapes 14b-720p-81f] [--configs dense,radial]
                                  [--repeats 2] [--radial-impl pallas] [--out FILE] [--log-dir DIR]
    python benchmarks/generate.py --preset lightx2v --dry-run [--out FILE]   # tiny preset on the CPU

What the preset runs (benchmarks/NOTES.md says where each setting comes from): T2V, 4 steps of flow
Euler at LightX2V's distillation timesteps [1000, 750, 500, 250] with shift 5, guidance 1 (one DiT
pass a step, no negative prompt), the VAE decode in float32 (bf16 timed too). Configs: dense = dense
attention in every step (cuDNN); radial = the reference's Lightx2v plan: dense_layers=1,
dense_timesteps=1 (step 0 dense, steps 1-3 radial), decay_factor 0.2, our Pallas kernel (--radial-
impl), the dense step and layer through our Mosaic kernel with every block on (the preset's --dense-
implementation mosaic; cuDNN where it cannot run). Random weights born on the device (a LoRA merged
at load changes values, not cost): umT5-XXL bf16, the DiT bf16, the Wan2.1 VAE in bf16 and in
float32 (the same weights, f32 cast to bf16).

Every phase is timed for real, after its compiling call (no extrapolation): encode the prompt
(encode_s); the 4 steps, one untimed warm-up run compiling both programs (denoise_compile_s: its
time minus a timed run's), then --repeats timed runs from fresh noise (denoise_s: the median, with
each run's per-step seconds); the VAE decode of those latents in bf16 (decode_s) and in float32
(decode_f32_s), each after a compiling decode of 2 latent frames, and the difference of the two
uint8 videos (random weights: a bound on the bf16 error only for this random VAE). total_s =
encode_s + denoise_s + decode_s (bf16); total_f32_vae_s with decode_f32_s (the preset's). One worker
process per shape times both configs on the same weights; rows are printed (and, with --log-dir,
written) after each phase, so a killed run keeps what it finished. Writes benchmarks/results/
generate-fast-<device>.json (device, command, date).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from generate import build_components, config_rows, finish_phase, peak_gib, random_module, time_encode, write_results
from workers import REPO, RESULT_PREFIX, cell, out_path, run_child_rows

if str(REPO) not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
from radial_jax.cli.generate import DENSE_IMPLEMENTATIONS, PRESETS  # noqa: E402

PRESET = "lightx2v"
# The values `radial-jax generate --preset lightx2v` runs with (one source, radial_jax/cli/generate.py).
_VALUES = PRESETS[PRESET]
TIMESTEPS = tuple(int(t) for t in _VALUES["timesteps"].split(","))  # LightX2V's denoising_step_list
SHIFT = _VALUES["shift"]
DENSE_LAYERS, DENSE_TIMESTEPS, DECAY = _VALUES["dense_layers"], _VALUES["dense_timesteps"], _VALUES["decay_factor"]
DENSE_IMPLEMENTATION = DENSE_IMPLEMENTATIONS[_VALUES["dense_implementation"]]  # our kernel, cuDNN where it cannot run
CONFIGS = ("dense", "radial")
SHAPES = ("14b-720p-81f", "1.3b-480p-81f", "tiny")  # generate.SHAPES keys; tiny: --dry-run only


def attention_plan(config: str, radial_impl: str):
    """Returns the RadialPlan of a config name (None for "dense": dense everywhere)."""
    from radial_jax import RadialPlan

    if config == "dense":
        return None
    return RadialPlan(dense_layers=DENSE_LAYERS, dense_timesteps=DENSE_TIMESTEPS, decay_factor=DECAY,
                      implementation=radial_impl, dense_implementation=DENSE_IMPLEMENTATION)  # fmt: skip


def timed_denoise(dit, plan, sampler, latents_shape, context, seed: int) -> tuple[float, list[float], object]:
    """Returns (seconds, per-step seconds, final latents) of one 4-step run from seeded noise
    under the attention plan `plan` (None: dense)."""
    import jax

    from models.wan import pipeline
    from models.wan import sampler as sampler_lib

    noise = jax.block_until_ready(sampler_lib.initial_noise(seed, latents_shape))
    marks = [time.perf_counter()]
    latents = pipeline.denoise(dit, sampler, noise, context, None, 1.0, plan=plan,
                               on_step=lambda *_: marks.append(time.perf_counter()))  # fmt: skip
    latents = jax.block_until_ready(latents)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return time.perf_counter() - marks[0], steps, latents


def timed_decode(vae, latents) -> tuple[float, float, object]:
    """Returns (compile seconds: a 2-latent-frame decode, seconds of the full decode, uint8 video)."""
    import jax

    from models.wan import pipeline

    start = time.perf_counter()
    jax.block_until_ready(pipeline.decode_video(vae, latents[:, :2]))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    video = pipeline.decode_video(vae, latents)
    return compile_s, time.perf_counter() - start, video


def worker(shape: str, configs: list[str], args, emit) -> None:
    """Times both configs of one shape in this process; calls emit(rows) after each phase."""
    import jax
    import numpy as np

    from models.wan import pipeline
    from models.wan import sampler as sampler_lib
    from models.wan import vae as vae_lib

    rows = {c: dict(shape=shape, config=c, preset=PRESET, device=jax.devices()[0].device_kind, jax=jax.__version__,
                    pending=["init", "encode", "denoise", "decode"]) for c in configs}  # fmt: skip
    start = time.perf_counter()
    components, frames, height, width = build_components(shape)
    vae_config = components.vae.config
    vae_bf16 = random_module(lambda rngs: vae_lib.WanVAE(dataclasses.replace(vae_config, dtype="bfloat16"),
                                                         rngs=rngs), 2)  # the same seed: the f32 weights, cast
    finish_phase(rows, configs, "init", dict(frames=frames, height=height, width=width, timesteps=list(TIMESTEPS),
                                             shift=SHIFT, guidance=1.0, weights_init_s=time.perf_counter() - start))
    emit(rows)

    encode, context = time_encode(components, prompts_only=True)
    components.text_encoder = None
    finish_phase(rows, configs, "encode", encode)
    emit(rows)

    sampler = sampler_lib.distilled_sampler(TIMESTEPS, SHIFT)
    latents_shape = pipeline.latent_shape(frames, height, width, components.dit.config.out_dim)
    dit = components.dit
    latents = None
    for config in configs:
        plan = attention_plan(config, args.radial_impl)
        warm_s, _, _ = timed_denoise(dit, plan, sampler, latents_shape, context, seed=0)
        runs = [timed_denoise(dit, plan, sampler, latents_shape, context, seed=1 + i) for i in range(args.repeats)]
        denoise_s = statistics.median(run[0] for run in runs)
        latents = runs[-1][2]
        finish_phase(rows, [config], "denoise", dict(
            denoise_s=denoise_s, denoise_runs_s=[run[0] for run in runs], step_times_s=[run[1] for run in runs],
            denoise_compile_s=warm_s - denoise_s, dense_steps=_dense_steps(plan),
            peak_gib=peak_gib(), peak_note="worker peak so far (weights of umT5 until dropped, DiT, two VAEs)"))  # fmt: skip
        emit(rows)

    compile_bf16, decode_bf16, video_bf16 = timed_decode(vae_bf16, latents)
    compile_f32, decode_f32, video_f32 = timed_decode(components.vae, latents)
    diff = np.abs(video_bf16.astype(np.int16) - video_f32.astype(np.int16))
    finish_phase(rows, configs, "decode", dict(
        decode_s=decode_bf16, decode_compile_s=compile_bf16, decode_f32_s=decode_f32, decode_f32_compile_s=compile_f32,
        vae_bf16_vs_f32_uint8=dict(max=int(diff.max()), mean=float(diff.mean())), peak_gib=peak_gib()))  # fmt: skip
    emit(rows)


def _dense_steps(plan) -> list[int]:
    return [i for i in range(len(TIMESTEPS)) if plan is None or plan.is_dense_step(i, len(TIMESTEPS))]


def totals(row: dict) -> dict:
    """Adds total_s (encode + 4 steps + bf16 decode) and total_f32_vae_s; compile apart."""
    if "pending" not in row and "error" not in row:
        row["total_s"] = row["encode_s"] + row["denoise_s"] + row["decode_s"]
        row["total_f32_vae_s"] = row["encode_s"] + row["denoise_s"] + row["decode_f32_s"]
    return row


def emit_rows(rows: dict, log_dir: str | None) -> None:
    """Prints each row as a RESULT line and, with log_dir, writes them to log_dir/generate-fast-<shape>.json."""
    for row in rows.values():
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    if log_dir:
        done = [totals(dict(row)) for row in rows.values()]
        write_results(done, Path(log_dir) / f"generate-fast-{done[0]['shape']}.json", note=NOTE)


NOTE = ("random weights, batch 1, T2V, the lightx2v preset (4 steps, guidance 1); every phase timed after its "
        "compiling call; total_s = encode_s + denoise_s + decode_s (bf16 VAE), compile times apart")


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':15} {'config':7} {'encode s':>8} {'4 steps s':>9} {'decode bf16':>11} {'decode f32':>10} "
          f"{'total s':>8} {'compile s':>9} {'peak GiB':>8}")  # fmt: skip
    for r in rows:
        compile_s = sum(r.get(k) or 0 for k in ("encode_compile_s", "denoise_compile_s", "decode_compile_s"))
        print(f"{r['shape']:15} {r['config']:7} {cell(r, 'encode_s'):>8} {cell(r, 'denoise_s'):>9} "
              f"{cell(r, 'decode_s'):>11} {cell(r, 'decode_f32_s'):>10} {cell(r, 'total_s'):>8} "
              f"{compile_s:>9.1f} {cell(r, 'peak_gib', '.1f'):>8}" + (f"  {r['error'][:200]}" if "error" in r else ""))


def run_worker(shape: str, configs: list[str], args) -> list[dict]:
    """Runs one shape's worker in a child process; returns a row per config (an error where it stopped)."""
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("generate.py")), "--preset", PRESET, "--worker",
           "--shapes", shape, "--configs", ",".join(configs), "--repeats", str(args.repeats),
           "--radial-impl", args.radial_impl] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
    cmd += ["--log-dir", str(Path(args.log_dir).resolve())] if args.log_dir else []
    printed, failure = run_child_rows(cmd, timeout=args.timeout, dry_run=args.dry_run, key="config")
    return [totals(row) for row in config_rows(printed, failure, shape, configs)]


def main(args: argparse.Namespace) -> int:
    """The --preset lightx2v run of benchmarks/generate.py (its parser): parent or --worker."""
    if args.dry_run:
        args.shapes, args.radial_impl = "tiny", "reference"
    shapes = (args.shapes or SHAPES[0]).split(",")
    configs = list(dict.fromkeys((args.configs or ",".join(CONFIGS)).split(",")))
    if args.worker:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        worker(shapes[0], configs, args, lambda rows: emit_rows(rows, args.log_dir))
        return 0
    unknown = [s for s in shapes if s not in SHAPES] + [c for c in configs if c not in CONFIGS]
    if unknown or args.repeats < 1:
        sys.exit(f"--preset {PRESET}: unknown shapes/configs {unknown} or --repeats {args.repeats} < 1; "
                 f"shapes: {list(SHAPES)}, configs: {list(CONFIGS)}")  # fmt: skip
    rows = []
    for shape in shapes:
        print(f"running {shape} ({PRESET}): {', '.join(configs)} ...", flush=True)
        rows += run_worker(shape, configs, args)
    print_table(rows)
    if out := out_path(args, "generate-fast", rows):
        write_results(rows, out, note=NOTE)
    return 0 if all("error" not in r for r in rows) else 1
