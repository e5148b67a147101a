"""End-to-end Wan2.1 T2V generation on one GPU: seconds per denoising step and in total, dense vs radial.

    python benchmarks/generate.py [--shapes 1.3b-480p-81f,14b-720p-81f] [--configs dense,radial-0.2,radial-1.0]
                                  [--steps 2] [--radial-impl pallas] [--out FILE] [--log-dir DIR]
    python benchmarks/generate.py --dry-run [--out FILE]   # tiny preset on the CPU, the same code path
    python benchmarks/generate.py --preset lightx2v [...]  # the 4-step fast path end to end (fast_generate.py)

Random weights born on the device (no download, no host copy of the 14B): umT5-XXL (bf16), the
DiT (bf16), the Wan2.1 VAE (float32, as Wan runs it), batch 1, Wan's default negative prompt,
guidance 5 (two DiT passes a step), UniPC with 50 steps. The phases run as `radial-jax generate`
runs them (models/wan/pipeline.py): encode both prompts, drop the text encoder, jitted denoising
steps, VAE decode to uint8. Configs: dense = cuDNN attention everywhere; radial-D = the
reference's 1x setting, dense_layers=1 and dense_timesteps=12 (the first 12 of 50 steps all
dense), radial blocks with decay_factor D, our Pallas kernel (--radial-impl).

To keep a run within minutes, only `--steps` steps of each compiled program (dense; radial) are
timed after one untimed compiling call, and the total is EXTRAPOLATED: encode + 12 x dense step
+ 38 x radial step (50 x dense step for dense) + decode, compile times excluded (reported apart).

One worker process per shape times every config, since weight init, encode and decode (minutes
at 14B) are the same for all: encode (compile, then timed), drop the text encoder, the dense
step program (the same program for every config: a radial config's dense steps run the dense
attention code), decode (compile on 2 latent frames, then the timed full decode), then each
radial config's radial step program on the same weights (the same graphdef, its RadialPlan).
Peak memory (weights included) is the worker's so far when a config's last phase ends: dense's
covers encode, dense steps and decode; a radial config's also its radial program and those of the
radial configs before it, an upper bound on a lone run of it (which also runs all these phases).
The worker prints every row as a RESULT line after each phase (and, with --log-dir, writes them as
a results file), so a run cut off by a time limit keeps the configs it finished; a row it did not
finish lists its missing phases under "pending". Writes benchmarks/results/generate-<device>.json
(device, command, date), merging rows into an existing file of the same device.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from workers import REPO, RESULT_PREFIX, add_worker_flags, cell, out_path, random_state, run_child_rows, write_rows

GIB = 1 << 30
NUM_STEPS = 50  # Wan2.1 T2V sampling steps: the extrapolation's
DENSE_TIMESTEPS = 12  # the reference's 1x setting (with dense_layers=1)
SHAPES = {  # (DiT preset, frames, height, width)
    "1.3b-480p-81f": ("t2v-1.3B", 81, 480, 832),
    "14b-720p-81f": ("t2v-14B", 81, 720, 1280),
    "tiny": ("tiny", 17, 96, 160),  # --dry-run only
}
CONFIGS = {"dense": None, "radial-0.2": 0.2, "radial-1.0": 1.0}  # decay factor of the radial blocks
PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


def random_module(build, seed: int):
    """Returns build(rngs)'s module with random weights created on the default device (workers.random_state)."""
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    return nnx.merge(graphdef, random_state(abstract, seed))


def dit_config(shape: str):
    """Returns the DiT's WanConfig for a shape (bf16; float32 for the tiny CPU preset)."""
    import dataclasses

    from models.wan import PRESETS, pipeline

    preset = SHAPES[shape][0]
    dtype = "float32" if preset == "tiny" else "bfloat16"
    base = pipeline.TINY_T2V if preset == "tiny" else PRESETS[preset]
    return dataclasses.replace(base, param_dtype=dtype, dtype=dtype)


def radial_plan(decay: float, radial_impl: str):
    """Returns a radial config's attention plan: the reference's 1x setting with decay `decay`."""
    from radial_jax import RadialPlan

    return RadialPlan(dense_layers=1, dense_timesteps=DENSE_TIMESTEPS, decay_factor=decay, implementation=radial_impl)


def build_components(shape: str):
    """Returns (Components with random weights and a dense-attention DiT, frames, height, width)."""
    from models import t5
    from models.wan import WanModel, pipeline
    from models.wan import vae as vae_lib

    preset, frames, height, width = SHAPES[shape]
    tiny = preset == "tiny"
    config = dit_config(shape)
    t5_config = t5.UMT5_TINY if tiny else t5.UMT5_XXL
    vae_config = vae_lib.VAE_TINY if tiny else vae_lib.WAN21_VAE
    components = pipeline.Components(
        dit=random_module(lambda rngs: WanModel(config, rngs=rngs), 1),
        vae=random_module(lambda rngs: vae_lib.WanVAE(vae_config, rngs=rngs), 2),
        text_encoder=random_module(lambda rngs: t5.UMT5Encoder(t5_config, rngs=rngs), 3),
        tokenizer=pipeline.byte_tokenizer(config.text_len),  # any ids do for timing
    )  # fmt: skip
    return components, frames, height, width


def timed_steps(step, state, count: int) -> tuple[float, list[float], object]:
    """Returns (seconds of the first, compiling call, seconds of `count` more calls, last state)."""
    import jax

    times = []
    for _ in range(count + 1):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - start)
    return times[0], times[1:], state


def time_program(graphdef, params, sampler, state, context, steps: int, *, plan=None,
                 dense: bool) -> tuple[dict, object]:  # fmt: skip
    """Returns ({name}_compile_s, {name}_step_times_s and their median {name}_step_s; the last state)
    of one step program, name "dense" or "radial"; context: [2, T, C], the prompt then the negative;
    plan: the radial config's RadialPlan (None: dense)."""
    import jax.numpy as jnp

    from models.wan import pipeline

    def step(s):
        return pipeline.denoise_step(graphdef, params, sampler, s, context[:1], context[1:], jnp.float32(5.0),
                                     None, None, plan=plan, dense=dense)  # fmt: skip

    name = "dense" if dense else "radial"
    compile_s, times, state = timed_steps(step, state, steps)
    return {f"{name}_compile_s": compile_s, f"{name}_step_times_s": times,
            f"{name}_step_s": statistics.median(times)}, state  # fmt: skip


def time_encode(components, *, prompts_only: bool = False) -> tuple[dict, object]:
    """Returns ({encode_compile_s, encode_s}, the umT5 context [2, T, C] of the prompt and Wan's
    negative prompt; [1, T, C], the prompt alone, with prompts_only: guidance 1 needs no negative);
    the first, compiling call is timed apart."""
    import jax

    from models.wan import pipeline

    prompts = [PROMPT] if prompts_only else [PROMPT, pipeline.WAN_NEGATIVE_PROMPT]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        context = jax.block_until_ready(pipeline.encode_prompts(components.text_encoder, components.tokenizer, prompts))
        times.append(time.perf_counter() - start)
    return dict(encode_compile_s=times[0], encode_s=times[1]), context


def time_decode(vae, latents, video_shape: tuple[int, ...]) -> dict:
    """Returns {decode_compile_s: a decode of the first 2 latent frames, which compiles both chunk
    programs; decode_s: the full decode to uint8}; checks the video is video_shape."""
    import jax

    from models.wan import pipeline

    start = time.perf_counter()
    jax.block_until_ready(pipeline.decode_video(vae, latents[:, :2]))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    video = pipeline.decode_video(vae, latents)
    decode_s = time.perf_counter() - start
    if video.shape != video_shape:
        raise ValueError(f"decoded video {video.shape}, expected {video_shape}")
    return dict(decode_compile_s=compile_s, decode_s=decode_s)


def peak_gib() -> float | None:
    """Returns the device's peak memory in use so far, GiB (None where unreported, e.g. the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def finish_phase(rows: dict, configs: list[str], phase: str, values: dict) -> None:
    """Adds a phase's measurements to the configs' rows and takes the phase off their "pending"."""
    for config in configs:
        row = rows[config]
        row.update(values)
        row["pending"] = [p for p in row["pending"] if p != phase]
        if not row["pending"]:
            del row["pending"]


def worker(shape: str, configs: list[str], args, emit) -> None:
    """Times all configs of one shape in this process; calls emit(rows) after each phase."""
    import jax

    from models import static_graph
    from models.wan import pipeline
    from models.wan import sampler as sampler_lib

    radial = [c for c in configs if CONFIGS[c] is not None]
    rows = {c: dict(shape=shape, config=c, device=jax.devices()[0].device_kind, jax=jax.__version__,
                    pending=["init", "encode", "dense steps", "decode"] + (["radial steps"] if c in radial else []))
            for c in configs}  # fmt: skip
    start = time.perf_counter()
    components, frames, height, width = build_components(shape)
    init = dict(frames=frames, height=height, width=width, weights_init_s=time.perf_counter() - start)
    finish_phase(rows, configs, "init", init)
    emit(rows)

    encode, context = time_encode(components)
    components.text_encoder = None  # as `radial-jax generate` does before denoising
    finish_phase(rows, configs, "encode", encode)
    emit(rows)

    graphdef, params = static_graph.split(components.dit)
    sampler = pipeline.make_sampler("unipc", NUM_STEPS, sampler_lib.default_shift(height, width))
    latents_shape = pipeline.latent_shape(frames, height, width, components.dit.config.out_dim)

    def fresh_state():  # each program starts at step 0 (the state is donated), so steps stay in range
        return sampler.init(sampler_lib.initial_noise(0, latents_shape))

    dense_times, state = time_program(graphdef, params, sampler, fresh_state(), context, args.steps, dense=True)
    finish_phase(rows, configs, "dense steps", dense_times)
    emit(rows)

    decode = time_decode(components.vae, state.sample, (frames, height, width, 3))
    decode.update(peak_gib=peak_gib(), peak_note="worker peak over encode, dense steps and decode, weights included")
    finish_phase(rows, configs, "decode", decode)
    emit(rows)

    for i, config in enumerate(radial):
        plan = radial_plan(CONFIGS[config], args.radial_impl)
        timed, _ = time_program(graphdef, params, sampler, fresh_state(), context, args.steps, plan=plan, dense=False)
        note = f"worker peak over encode, dense steps, decode and the radial programs of {', '.join(radial[: i + 1])}"
        finish_phase(rows, [config], "radial steps", dict(timed, peak_gib=peak_gib(), peak_note=note))
        emit(rows)


def emit_rows(rows: dict, log_dir: str | None) -> None:
    """Prints each row as a RESULT line (the parent keeps each config's last) and, with log_dir,
    writes them extrapolated to log_dir/generate-<shape>.json, which outlives a killed parent."""
    for row in rows.values():
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    if log_dir:
        finished = summarise([extrapolate(dict(row)) for row in rows.values()])
        write_results(finished, Path(log_dir) / f"generate-{finished[0]['shape']}.json")


def extrapolate(row: dict) -> dict:
    """Adds the 50-step totals: denoise_s and total_s (encode + steps + decode, no compile)."""
    if "pending" in row or "error" in row:
        return row
    dense_steps = NUM_STEPS if CONFIGS[row["config"]] is None else DENSE_TIMESTEPS
    radial_steps = NUM_STEPS - dense_steps
    row["denoise_s"] = dense_steps * row["dense_step_s"] + radial_steps * row.get("radial_step_s", 0.0)
    row["total_s"] = row["encode_s"] + row["denoise_s"] + row["decode_s"]
    row["extrapolation"] = (f"total_s = encode_s + {dense_steps} x dense_step_s + {radial_steps} x radial_step_s "
                            f"+ decode_s; {NUM_STEPS} UniPC steps, each 2 DiT passes (guidance 5); compile excluded")
    return row


def run_worker(shape: str, configs: list[str], args) -> list[dict]:
    """Runs one shape's worker for all configs in a child process; returns a row per config, with
    an error where the worker stopped before finishing it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shapes", shape, "--configs", ",".join(configs),
           "--steps", str(args.steps), "--radial-impl", args.radial_impl] + (["--dry-run"] if args.dry_run else [])
    cmd += ["--log-dir", str(Path(args.log_dir).resolve())] if args.log_dir else []
    return config_rows(*run_child_rows(cmd, timeout=args.timeout, dry_run=args.dry_run, key="config"), shape, configs)


def config_rows(printed: list[dict], failure: str | None, shape: str, configs: list[str]) -> list[dict]:
    """Returns one row per config from a worker's printed rows, with an error where the worker
    stopped before finishing it (a row still listing `pending` phases, or none at all)."""
    by_config = {row["config"]: row for row in printed}
    rows = []
    for config in configs:
        row = by_config.get(config, dict(shape=shape, config=config, pending=["any phase"]))
        if "pending" in row:
            row["error"] = f"worker stopped before {', '.join(row['pending'])}: {failure or 'exit 0'}"
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':15} {'config':11} {'dense s/step':>12} {'radial s/step':>13} {'encode s':>8} {'decode s':>8} "
          f"{'total s':>8} {'speedup':>7} {'peak GiB':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['shape']:15} {r['config']:11} {cell(r, 'dense_step_s', '.3f'):>12} "
              f"{cell(r, 'radial_step_s', '.3f'):>13} {cell(r, 'encode_s'):>8} {cell(r, 'decode_s'):>8} "
              f"{cell(r, 'total_s', '.1f'):>8} {cell(r, 'speedup_vs_dense'):>7} {cell(r, 'peak_gib', '.1f'):>8}"
              + (f"  {r['error'][:200]}" if "error" in r else ""))  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Adds speedup_vs_dense (the dense row's total_s / the row's, same shape) where both totals
    exist; returns the rows."""
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["config"] == "dense"), {})
        if "total_s" in row and "total_s" in base:
            row["speedup_vs_dense"] = base["total_s"] / row["total_s"]
    return rows


NOTE = ("random weights, batch 1, T2V; total_s is extrapolated from the timed steps (see each row's extrapolation); "
        "compile times are reported apart and not in total_s")


def write_results(rows: list[dict], out: Path, *, note: str = NOTE) -> None:
    write_rows(rows, out, case=lambda r: (r["shape"], r["config"]), note=note)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"comma list of {list(SHAPES)} (default 1.3b-480p-81f,14b-720p-81f; "
                                         "--preset lightx2v: 14b-720p-81f)")  # fmt: skip
    parser.add_argument("--configs", help=f"comma list of {list(CONFIGS)} (default all; --preset lightx2v: dense,radial)")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed steps per compiled program, after one compiling call (default %(default)s)")
    parser.add_argument("--preset", choices=("lightx2v",),
                        help="time `radial-jax generate --preset lightx2v` end to end instead: 4 distilled steps, "
                             "guidance 1, bf16 and f32 VAE decode, no extrapolation (see benchmarks/fast_generate.py)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="--preset: timed runs of the 4 steps after the compiling one (default %(default)s)")
    add_worker_flags(parser, results="generate", timeout=1800, timeout_note=", one per shape",
                     dry_run="tiny preset on the CPU: checks the path in seconds")  # fmt: skip
    parser.add_argument("--log-dir", help="each worker also writes its rows so far to DIR/generate-<shape>.json "
                                           "after every phase: results that outlive a killed run")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preset:
        from fast_generate import main as fast_main

        return fast_main(args)
    if args.dry_run:
        args.shapes, args.radial_impl = "tiny", "reference"
    shapes = (args.shapes or "1.3b-480p-81f,14b-720p-81f").split(",")
    configs = list(dict.fromkeys((args.configs or ",".join(CONFIGS)).split(",")))
    if args.worker:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        worker(shapes[0], configs, args, lambda rows: emit_rows(rows, args.log_dir))
        return 0
    unknown = [s for s in shapes if s not in SHAPES] + [c for c in configs if c not in CONFIGS]
    if unknown or not 1 <= args.steps < NUM_STEPS:
        sys.exit(f"unknown shapes/configs {unknown} or --steps {args.steps} not in [1, {NUM_STEPS - 1}]; "
                 f"shapes: {list(SHAPES)}, configs: {list(CONFIGS)}")  # fmt: skip
    rows = []
    for shape in shapes:
        print(f"running {shape}: {', '.join(configs)} ...", flush=True)
        rows += [extrapolate(row) for row in run_worker(shape, configs, args)]
    print_table(summarise(rows))
    if out := out_path(args, "generate", rows):
        write_results(rows, out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
