"""Why a kernel's time moves between runs: every call timed alone, beside the chip's clocks and power.

    python benchmarks/steadiness.py [--shape 1.3b-480p-161f] [--seconds 10] [--batch 1] [--fa4]
                                    [--variants V,...] [--matmul] [--out FILE]

Runs ours (radial mask, decay 1.0) back to back for --seconds, idles 5 s, runs it again, then
cuDNN dense (the control: a kernel that is not ours) and ours once more, timing each call alone
(wall clock around a blocking call) while `nvidia-smi` samples the SM clock, power, temperature
and the reasons the clock is held down every 50 ms. If ours slows as power or temperature climb
and cuDNN moves the same way, the spread is the chip's, not the kernel's. With --fa4, FA4's
block-sparse forward on the same mask runs as one more phase (benchmarks/fa4.py --calls-for, in a
child process: FA4 is torch's), so its clock and power at the cap stand beside ours: at the 700 W
cap the kernel that spends fewer joules per call runs at the higher clock. Writes JSON: every call
(phase, start time, ms), every sample, and per-phase medians and quantiles, energy per call and
on-block GFLOP per joule. With --batch N each timing covers N calls issued back to back and blocked
on once (recorded as their mean): the GPU then runs without gaps, and the host's cost of a blocking call
(59 us in JAX against 22 us in torch, benchmarks/call_latency.py) is spread over N calls. --variants
adds a phase for each of ours with another design (attention.py's --variants), last: the ablations
(ablate_*_fwd) price a stage of the forward in joules. --matmul adds a phase of a plain bf16 matmul
(8192^3, XLA's cuBLAS): what the tensor cores do at the cap with nothing else to run (its TFLOP/s
is in the summary as matmul_tflops).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from attention import forward_variants  # noqa: E402
from fa4 import HEAD_DIM, SHAPES  # noqa: E402

from radial_jax import attention_flops, computed_token_pairs, radial_block_mask  # noqa: E402
from radial_jax.kernels import block_sparse_attention  # noqa: E402
SMI_FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
MATMUL_N = 8192  # --matmul: [N, N] @ [N, N] bf16, 1.1 TFLOP a call


def start_sampler(path: str):
    """Starts nvidia-smi writing one CSV line per 50 ms to `path`; returns the process (or None)."""
    try:
        return subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
                                 "-lms", "50"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None


def read_samples(path: str) -> list[dict]:
    samples = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append(dict(t=stamp, sm_mhz=float(parts[1]), power_w=float(parts[2]), temp_c=float(parts[3]),
                                reasons=parts[4]))
        except ValueError:
            continue
    return samples


def timed_calls(fn, seconds: float, phase: str, batch: int = 1) -> list[dict]:
    """fn called for `seconds`, `batch` calls to a timing blocked on once: [{phase, t, ms, batch}], ms the
    mean of the batch's calls, t its start in time.time() (the clock nvidia-smi's samples are read on)."""
    calls, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        wall, start = time.time(), time.perf_counter()
        outs = [fn() for _ in range(batch)]
        jax.block_until_ready(outs)
        calls.append(dict(phase=phase, t=wall, ms=(time.perf_counter() - start) * 1e3 / batch, batch=batch))
    return calls


def fa4_calls(shape: str, seconds: float, batch: int = 1) -> list[dict]:
    """FA4's forward calls in a child process (benchmarks/fa4.py --calls-for), as phase "fa4"; the
    child's compile runs while the GPU idles, as before ours_2_after_idle."""
    fa4 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fa4.py")
    run = subprocess.run([sys.executable, fa4, "--shapes", shape, "--calls-for", str(seconds), "--calls-batch",
                          str(batch)], capture_output=True, text=True, timeout=seconds + 600)  # fmt: skip
    if run.returncode != 0:
        sys.exit(f"benchmarks/steadiness.py: the FA4 phase failed:\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    return [dict(phase="fa4", **call) for call in json.loads(run.stdout.strip().splitlines()[-1])]


def summary(calls: list[dict], samples: list[dict], flops: float | None = None) -> dict:
    """Per phase: call and timing counts, median/p10/p90/min/max ms of a call (a timing's mean with
    --batch), the median SM clock and power while it ran (from its first timing's start to its last's
    end), and from those the energy of a median call and (given the on-block `flops` of one call) GFLOP/J."""
    out = {}
    for phase in dict.fromkeys(c["phase"] for c in calls):
        timings = [c for c in calls if c["phase"] == phase]
        ms = sorted(c["ms"] for c in timings)
        t0 = min(c["t"] for c in timings)
        t1 = max(c["t"] + c.get("batch", 1) * c["ms"] / 1e3 for c in timings)
        inside = [s for s in samples if t0 <= s["t"] <= t1]
        q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]
        row = dict(calls=sum(c.get("batch", 1) for c in timings), timings=len(ms), median_ms=statistics.median(ms),
                   p10_ms=q(0.1), p90_ms=q(0.9), min_ms=ms[0], max_ms=ms[-1])
        if inside:
            row.update(sm_mhz_median=statistics.median(s["sm_mhz"] for s in inside),
                       sm_mhz_min=min(s["sm_mhz"] for s in inside), sm_mhz_max=max(s["sm_mhz"] for s in inside),
                       power_w_median=statistics.median(s["power_w"] for s in inside),
                       temp_c_max=max(s["temp_c"] for s in inside),
                       reasons=sorted({s["reasons"] for s in inside}))
            row["joules_per_call"] = row["power_w_median"] * row["median_ms"] / 1e3
            if flops:
                row["gflop_per_joule"] = flops / row["joules_per_call"] / 1e9
        out[phase] = row
    return out


def rate_matmul(row: dict, n: int = MATMUL_N) -> dict:
    """Rewrites the summary row of the --matmul phase ([n, n] @ [n, n]) with its own FLOPs, not the
    attention's: adds matmul_tflops and, where the row has an energy, recomputes gflop_per_joule. Returns row."""
    flops = 2 * n**3
    row["matmul_tflops"] = flops / row["median_ms"] / 1e9
    if "joules_per_call" in row:
        row["gflop_per_joule"] = flops / row["joules_per_call"] / 1e9
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.3b-480p-161f", choices=list(SHAPES))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed phase")
    parser.add_argument("--out", default="steadiness.json")
    parser.add_argument("--fa4", action="store_true", help="add a phase of FA4's forward (needs FA4 installed)")
    parser.add_argument("--batch", type=int, default=1, help="calls to a timing, blocked on once (their mean)")
    parser.add_argument("--variants", default="", help="a phase of ours with each of these forward designs, last")
    parser.add_argument("--matmul", action="store_true", help="a phase of a plain bf16 matmul (8192^3), last")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    designs = forward_variants()
    names = [n for n in args.variants.split(",") if n]
    if unknown := [n for n in names if n not in designs]:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(designs)}")
    if jax.default_backend() != "gpu":
        sys.exit("benchmarks/steadiness.py needs a GPU")
    frames, tokens, heads = SHAPES[args.shape]
    L = frames * tokens
    mask = radial_block_mask(frames, tokens, decay_factor=1.0)
    q, k, v = (jax.random.normal(key, (1, L, heads, HEAD_DIM), jnp.bfloat16)
               for key in jax.random.split(jax.random.key(0), 3))
    ours = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=128))
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    for fn in (ours, cudnn):
        jax.block_until_ready(fn(q, k, v))
    smi_path = args.out + ".smi.csv"
    sampler = start_sampler(smi_path)
    calls = timed_calls(lambda: ours(q, k, v), args.seconds, "ours_1", args.batch)
    time.sleep(5.0)  # idle: does the first call after a pause run faster?
    calls += timed_calls(lambda: ours(q, k, v), args.seconds, "ours_2_after_idle", args.batch)
    calls += timed_calls(lambda: cudnn(q, k, v), args.seconds, "cudnn_dense", args.batch)
    if args.fa4:
        calls += fa4_calls(args.shape, args.seconds, args.batch)
    calls += timed_calls(lambda: ours(q, k, v), args.seconds, "ours_3", args.batch)
    for name in names:
        design = jax.jit(lambda q, k, v, t=designs[name]: block_sparse_attention(q, k, v, mask, block_size=128,
                                                                                 tuning=t))
        jax.block_until_ready(design(q, k, v))  # compiled while the GPU idles, as before ours_2_after_idle
        calls += timed_calls(lambda: design(q, k, v), args.seconds, name, args.batch)
    if args.matmul:
        keys = jax.random.split(jax.random.key(1))
        a, b = (jax.random.normal(key, (MATMUL_N, MATMUL_N), jnp.bfloat16) for key in keys)
        matmul = jax.jit(jnp.matmul)
        jax.block_until_ready(matmul(a, b))
        calls += timed_calls(lambda: matmul(a, b), args.seconds, "matmul_dense", args.batch)
    time.sleep(0.3)
    if sampler:
        sampler.terminate()
        sampler.wait()
    samples = read_samples(smi_path) if sampler else []
    flops = attention_flops(computed_token_pairs(mask, 128, L, L), heads=heads, head_dim=HEAD_DIM)
    phases = summary(calls, samples, flops)
    if args.matmul:
        rate_matmul(phases["matmul_dense"])
    result = dict(device=jax.devices()[0].device_kind, command="python " + " ".join(sys.argv),
                  date=datetime.date.today().isoformat(), shape=args.shape, batch=args.batch, on_block_flops=flops,
                  summary=phases, calls=calls, samples=samples)
    with open(args.out, "w") as f:
        json.dump(result, f)
    for phase, row in result["summary"].items():
        print(phase, json.dumps(row))


if __name__ == "__main__":
    main()
