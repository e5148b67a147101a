"""Where the fast path's GPU time goes: a jax.profiler trace of each phase, kernel time summed by kind.

    python benchmarks/profile_fast.py [--shape 14b-720p-81f] [--phases denoise,decode] [--out FILE]
    python benchmarks/profile_fast.py --dry-run      # the tiny preset on the CPU: checks the path

The phases of `radial-jax generate --preset lightx2v` (benchmarks/fast_generate.py times them end to
end): denoise, the 4 steps (step 0 dense through our kernel with every block on, steps 1-3 radial);
decode, the f32 VAE decode (the device's work, then the same decode with the move to a uint8 host
array, timed apart); decode_bf16, the same in bf16. Each phase is run once to compile, once timed
without the profiler, and once inside `jax.profiler.trace` (perfetto JSON). From the trace: every
device kernel's time summed by kind (attention, matmul, conv, copy/transpose, reduction, other
fusion) and by name, and the device's busy time (the union of its kernels' intervals) against the
traced wall time, i.e. where it idled.
Random weights (cost does not depend on values). Writes JSON (device, command, date) to --out
(default benchmarks/results/profile-fast-<device>.json); --trace-dir keeps the raw traces.
"""

import argparse
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHASES = ("denoise", "decode", "decode_bf16")
# First match wins; names are lowercased kernel names as the profiler reports them.
KINDS = [
    ("attention", re.compile(r"mosaic|radial|flash|fmha|sdpa|attention|pallas|^kernel$")),
    ("conv", re.compile(r"conv(?!ert)|fprop|dgrad|wgrad|implicit")),  # not loop_convert_fusion
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|dot|matmul")),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|dynamic.update.slice|pad")),
    ("reduction", re.compile(r"reduce|reduction")),
]


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(lower)), "other fusion")


def device_events(trace: dict) -> tuple[list[dict], list[str]]:
    """Returns (the complete ('X') events of device processes, those processes' names)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    device = {pid for pid, name in names.items() if re.search(r"gpu|/device:(?!cpu)", name.lower())}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device], sorted(names[p] for p in device)


def busy_us(events: list[dict]) -> float:
    """The union of the events' [ts, ts + dur) intervals, microseconds."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise_trace(trace: dict, wall_s: float, top: int = 25) -> dict:
    """Kernel time by kind and by name (seconds), device busy time and the traced wall time."""
    events, processes = device_events(trace)
    kernels = [e for e in events if not e["name"].startswith("$")]
    by_kind, by_name, counts = {}, {}, {}
    for e in kernels:
        by_kind[kind_of(e["name"])] = by_kind.get(kind_of(e["name"]), 0.0) + e["dur"] * 1e-6
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"] * 1e-6
        counts[e["name"]] = counts.get(e["name"], 0) + 1
    names = sorted(by_name, key=by_name.get, reverse=True)[:top]
    return dict(device_processes=processes, kernels=len(kernels), kernel_s=sum(by_name.values()),
                busy_s=busy_us(kernels) * 1e-6, traced_wall_s=wall_s,
                by_kind_s=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                top_kernels=[dict(name=n[:160], kind=kind_of(n), s=by_name[n], calls=counts[n]) for n in names])  # fmt: skip


def traced(fn, trace_dir: Path, label: str) -> tuple[float, dict]:
    """Runs fn() inside a profiler trace; returns (its wall seconds, the perfetto trace)."""
    import jax

    log_dir = trace_dir / label
    log_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        wall = time.perf_counter() - start
    path = sorted(glob.glob(str(log_dir / "**" / "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        return wall, json.load(f)


def timed(fn) -> float:
    """Returns the wall seconds of fn() until its result is ready."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def phases(shape: str, which: list[str], dry_run: bool):
    """Yields (phase name, fn, {extra timings}) with random weights; fn already compiled."""
    import jax

    import fast_generate
    from generate import build_components, random_module
    from models.wan import pipeline
    from models.wan import sampler as sampler_lib
    from models.wan import vae as vae_lib

    components, frames, height, width = build_components(shape)
    dit = components.dit
    shape_latents = pipeline.latent_shape(frames, height, width, dit.config.out_dim)
    if "denoise" in which:
        context = jax.random.normal(jax.random.key(4), (1, dit.config.text_len, dit.config.text_dim), dit.config.dtype)
        plan = fast_generate.attention_plan("radial", "reference" if dry_run else "pallas")
        sampler = sampler_lib.distilled_sampler(fast_generate.TIMESTEPS, fast_generate.SHIFT)

        def denoise():
            noise = sampler_lib.initial_noise(0, shape_latents)
            return pipeline.denoise(dit, sampler, noise, context, None, 1.0, plan=plan)

        jax.block_until_ready(denoise())  # compiles; waited for, or the next timing would include its run
        yield "denoise", denoise, {}
    latents = jax.random.normal(jax.random.key(5), shape_latents, "float32")
    for phase in [p for p in which if p.startswith("decode")]:
        vae = components.vae
        if phase == "decode_bf16":  # the same weights, cast (as fast_generate.py builds it)
            vae = random_module(lambda rngs: vae_lib.WanVAE(dataclasses.replace(vae.config, dtype="bfloat16"),
                                                            rngs=rngs), 2)  # fmt: skip
        decode = functools.partial(vae_lib.decode, vae, latents)
        jax.block_until_ready(decode())
        pipeline.decode_video(vae, latents[:, :2])  # compiles the uint8 conversion's programs
        start = time.perf_counter()
        pipeline.decode_video(vae, latents)
        yield phase, decode, dict(decode_video_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="14b-720p-81f", help="a benchmarks/generate.py shape (default %(default)s)")
    parser.add_argument("--phases", default="denoise,decode", help="comma-separated: denoise, decode, decode_bf16")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/profile-fast-<device>.json)")
    parser.add_argument("--trace-dir", type=Path, help="keep the raw traces here (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU; writes nothing by default")
    args = parser.parse_args(argv)
    import jax

    which = args.phases.split(",")
    if unknown := set(which) - set(PHASES):
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    shape = "tiny" if args.dry_run else args.shape
    trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="profile-fast-"))
    rows = []
    for name, fn, extra in phases(shape, which, args.dry_run):
        untraced = timed(fn)
        wall, trace = traced(fn, trace_dir, name)
        row = dict(phase=name, shape=shape, untraced_s=untraced, **extra, **summarise_trace(trace, wall))
        rows.append(row)
        print(f"{name}: untraced {untraced:.3f} s, traced {wall:.3f} s, device busy {row['busy_s']:.3f} s, "
              f"kernels {row['kernel_s']:.3f} s in {row['kernels']}" + "".join(f", {k} {v:.3f}" for k, v in extra.items()))  # fmt: skip
        for kind, seconds in row["by_kind_s"].items():
            print(f"    {kind:16} {seconds:8.3f} s")
        for k in row["top_kernels"][:12]:
            print(f"    {k['s']:8.3f} s {k['calls']:6d}x  {k['kind']:14} {k['name'][:100]}")
    device = jax.devices()[0].device_kind
    out = args.out or (None if args.dry_run else
                       REPO / "benchmarks" / "results" / f"profile-fast-{device.lower().replace(' ', '-')}.json")  # fmt: skip
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(device=device, jax=jax.__version__, command=" ".join(sys.argv),
                                       date=datetime.date.today().isoformat(), rows=rows), indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
