"""End-to-end Wan2.1 T2V generation on one GPU: seconds per denoising step and in total, dense vs radial.

    python benchmarks/generate.py [--shapes 1.3b-480p-81f,14b-720p-81f] [--configs dense,radial-0.2,radial-1.0]
                                  [--steps 2] [--radial-impl pallas] [--out FILE]
    python benchmarks/generate.py --dry-run [--out FILE]   # tiny preset on the CPU, the same code path

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
Each (shape, config) runs in its own process, so peak memory (all phases, weights included) is
that run's. Writes benchmarks/results/generate-<device>.json (device, command, date), merging
rows into an existing file of the same device.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from workers import REPO, RESULT_PREFIX, device_tag, run_child

GIB = 1 << 30
NUM_STEPS = 50  # Wan2.1 T2V sampling steps: the extrapolation's
DENSE_TIMESTEPS = 12  # the reference's 1x setting (with dense_layers=1)
SHAPES = {  # (DiT preset, frames, height, width)
    "1.3b-480p-81f": ("t2v-1.3B", 81, 480, 832),
    "14b-720p-81f": ("t2v-14B", 81, 720, 1280),
    "tiny": ("tiny", 17, 96, 160),  # --dry-run only
}
CONFIGS = {"dense": None, "radial-0.2": 0.2, "radial-1.0": 1.0}  # decay factor of the radial blocks
WEIGHT_STD = 0.02  # random weights: a trained Wan's linear scale; keeps activations finite
PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


def random_module(build, seed: int):
    """Returns build(rngs)'s module with random weights created on the default device, one leaf at
    a time (norm scales 1, biases 0, others normal * WEIGHT_STD): no host copy of the weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if path[-1] in ("scale", "gamma"):
            value = jnp.ones(shape, dtype)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, dtype)
        else:
            # rbg: XLA's RngBitGenerator compiles ~3x faster than threefry, one program per shape.
            key = jax.random.key(seed * 100_003 + i, impl="rbg")
            value = (jax.random.normal(key, shape, jnp.float32) * WEIGHT_STD).astype(dtype)
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def build_components(shape: str, decay: float | None, radial_impl: str):
    """Returns (Components with random weights, frames, height, width) for one run."""
    import dataclasses

    from models import t5
    from models.wan import PRESETS, AttentionConfig, WanModel, pipeline
    from models.wan import vae as vae_lib

    preset, frames, height, width = SHAPES[shape]
    tiny = preset == "tiny"
    if decay is None:
        attention = AttentionConfig(backend="dense")
    else:
        attention = AttentionConfig(backend="radial", dense_layers=1, dense_timesteps=DENSE_TIMESTEPS,
                                    decay_factor=decay, implementation=radial_impl)  # fmt: skip
    dtype = "float32" if tiny else "bfloat16"
    dit_config = dataclasses.replace(pipeline.TINY_T2V if tiny else PRESETS[preset], param_dtype=dtype, dtype=dtype,
                                     attention=attention)  # fmt: skip
    t5_config = t5.UMT5_TINY if tiny else t5.UMT5_XXL
    vae_config = vae_lib.VAE_TINY if tiny else vae_lib.WAN21_VAE
    components = pipeline.Components(
        dit=random_module(lambda rngs: WanModel(dit_config, rngs=rngs), 1),
        vae=random_module(lambda rngs: vae_lib.WanVAE(vae_config, rngs=rngs), 2),
        text_encoder=random_module(lambda rngs: t5.UMT5Encoder(t5_config, rngs=rngs), 3),
        tokenizer=pipeline.byte_tokenizer(dit_config.text_len),  # any ids do for timing
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


def worker(shape: str, config: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.wan import pipeline
    from models.wan import sampler as sampler_lib

    start = time.perf_counter()
    components, frames, height, width = build_components(shape, CONFIGS[config], args.radial_impl)
    row = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, frames=frames, height=height, width=width,
               weights_init_s=time.perf_counter() - start)  # fmt: skip
    prompts = [PROMPT, pipeline.WAN_NEGATIVE_PROMPT]
    jax.block_until_ready(pipeline.encode_prompts(components.text_encoder, components.tokenizer, prompts))  # compile
    start = time.perf_counter()
    context = jax.block_until_ready(pipeline.encode_prompts(components.text_encoder, components.tokenizer, prompts))
    row["encode_s"] = time.perf_counter() - start
    components.text_encoder = None  # as `radial-jax generate` does before denoising

    dit = components.dit
    sampler = pipeline.make_sampler("unipc", NUM_STEPS, sampler_lib.default_shift(height, width))
    graphdef, params = nnx.split(dit)
    guidance = jnp.float32(5.0)
    state = sampler.init(sampler_lib.initial_noise(0, pipeline.latent_shape(frames, height, width, dit.config.out_dim)))
    programs = [True] if CONFIGS[config] is None else [True, False]  # dense steps; radial steps
    for dense in programs:
        step = lambda s, dense=dense: pipeline.denoise_step(  # noqa: E731
            graphdef, params, sampler, s, context[:1], context[1:], guidance, None, None, dense=dense)
        name = "dense" if dense else "radial"
        row[f"{name}_compile_s"], row[f"{name}_step_times_s"], state = timed_steps(step, state, args.steps)
        row[f"{name}_step_s"] = statistics.median(row[f"{name}_step_times_s"])

    latents = state.sample
    jax.block_until_ready(pipeline.decode_video(components.vae, latents[:, :2]))  # compiles both chunk programs
    start = time.perf_counter()
    video = pipeline.decode_video(components.vae, latents)
    row["decode_s"] = time.perf_counter() - start
    assert video.shape == (frames, height, width, 3), video.shape
    stats = jax.devices()[0].memory_stats() or {}
    row["peak_gib"] = stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None
    return row


def extrapolate(row: dict, config: str) -> dict:
    """Adds the 50-step totals: denoise_s and total_s (encode + steps + decode, no compile)."""
    if "dense_step_s" not in row:
        return row
    dense_steps = NUM_STEPS if CONFIGS[config] is None else DENSE_TIMESTEPS
    radial_steps = NUM_STEPS - dense_steps
    row["denoise_s"] = dense_steps * row["dense_step_s"] + radial_steps * row.get("radial_step_s", 0.0)
    row["total_s"] = row["encode_s"] + row["denoise_s"] + row["decode_s"]
    row["extrapolation"] = (f"total_s = encode_s + {dense_steps} x dense_step_s + {radial_steps} x radial_step_s "
                            f"+ decode_s; {NUM_STEPS} UniPC steps, each 2 DiT passes (guidance 5); compile excluded")
    return row


def run_worker(shape: str, config: str, args) -> dict:
    """Runs one (shape, config) in a child process; returns its result row (or an error row)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--shapes", shape,
           "--steps", str(args.steps), "--radial-impl", args.radial_impl] + (["--dry-run"] if args.dry_run else [])
    return run_child(cmd, timeout=args.timeout, dry_run=args.dry_run)


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':15} {'config':11} {'dense s/step':>12} {'radial s/step':>13} {'encode s':>8} {'decode s':>8} "
          f"{'total s':>8} {'speedup':>7} {'peak GiB':>8}")  # fmt: skip
    for r in rows:
        def f(key, fmt=".2f"):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(f"{r['shape']:15} {r['config']:11} {f('dense_step_s'):>12} {f('radial_step_s'):>13} {f('encode_s'):>8} "
              f"{f('decode_s'):>8} {f('total_s', '.0f'):>8} {f('speedup_vs_dense'):>7} {f('peak_gib', '.1f'):>8}"
              + (f"  {r['error'][:200]}" if "error" in r else ""))  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["config"] == "dense"), {})
        if "total_s" in row and "total_s" in base:
            row["speedup_vs_dense"] = base["total_s"] / row["total_s"]
    return rows


def write_results(rows: list[dict], out: Path) -> None:
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    record = dict(device=device, command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(),
                  note="random weights, batch 1, T2V; total_s is extrapolated from the timed steps (see each row's "
                       "extrapolation); compile times are reported apart and not in total_s", rows=rows)  # fmt: skip
    if out.is_file():  # merge: runs split across calls land in one file
        old = json.loads(out.read_text())
        if old.get("device") == device:
            new = {(r["shape"], r["config"]) for r in rows}
            record["rows"] = [r for r in old.get("rows", []) if (r["shape"], r["config"]) not in new] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1.3b-480p-81f,14b-720p-81f", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed steps per compiled program, after one compiling call (default %(default)s)")
    parser.add_argument("--radial-impl", default="pallas",
                        help="radial_attention implementation (default %(default)s; 'auto' may fall back to the "
                             "slow jnp reference silently)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker process (default %(default)s)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/generate-<device>.json; --dry-run: none)")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU: checks the path in seconds")
    parser.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        args.shapes, args.radial_impl = "tiny", "reference"
    shapes, configs = args.shapes.split(","), args.configs.split(",")
    if args.worker:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        row = worker(shapes[0], args.worker, args)
        print(RESULT_PREFIX + json.dumps(dict(row, shape=shapes[0], config=args.worker)), flush=True)
        return 0
    unknown = [s for s in shapes if s not in SHAPES] + [c for c in configs if c not in CONFIGS]
    if unknown or args.steps < 1:
        sys.exit(f"unknown shapes/configs {unknown} or --steps {args.steps} < 1; shapes: {list(SHAPES)}, "
                 f"configs: {list(CONFIGS)}")  # fmt: skip
    rows = []
    for shape in shapes:
        for config in configs:
            print(f"running {shape} {config} ...", flush=True)
            rows.append(extrapolate(dict(run_worker(shape, config, args), shape=shape, config=config), config))
    print_table(summarise(rows))
    out = args.out or (None if args.dry_run else f"benchmarks/results/generate-{device_tag(rows)}.json")
    if out:
        write_results(rows, Path(out) if Path(out).is_absolute() else REPO / out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
