"""What one CTA of the Mosaic forward costs besides its key steps: the start (Q and the first K/V
loads), the end (the last P V, normalising, storing O) and the launch, measured on one GPU.

    python benchmarks/cta_cost.py [--shape 1.3b-480p-81f] [--steps 1,2,4,8,16,32] [--variants ...] [--fa4] [--out FILE]

Times the forward on band masks whose every query block sees exactly k key blocks (its own and the
next k - 1, wrapping), so every CTA runs k steps, for several k, at a shape's token count and heads
(bf16, head_dim 128, Wan's ragged length). With C CTAs on S SMs (one CTA an SM), a call takes about
(C / S) * (c0 + k * step), so a straight-line fit of time against k gives the per-CTA fixed cost c0
(intercept) and one step (slope), per SM. Then the radial mask's own time is set beside the
prediction (C / S) * (c0 + mean count * step): c0 / (c0 + mean count * step) is the share a
persistent kernel, which overlaps one tile's end with the next one's start, could win at most; a
radial time well above the prediction means the steps themselves run slower there (L2, DRAM, power)
than on the band. With --fa4, FA4's block-sparse forward is fitted on the same masks (a torch child
process), so its fixed cost and step stand beside ours: whether a gap is per CTA or per step. Timing
as benchmarks/attention.py (settled, median of --iters). Writes JSON.
"""

import argparse
import datetime
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
import attention  # noqa: E402

from radial_jax import radial_block_mask  # noqa: E402
from radial_jax.kernels import block_sparse_attention  # noqa: E402

BLOCK = 128


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def per_cta(intercept_ms: float, slope_ms: float, ctas: int, sms: int) -> dict:
    """The fit read per SM: fixed cost and step time of one CTA in microseconds."""
    waves = ctas / sms
    return {"waves": waves, "cta_fixed_us": intercept_ms * 1e3 / waves, "step_us": slope_ms * 1e3 / waves}


def masks(shape: str, steps: list[int]) -> dict[str, np.ndarray]:
    """{"band k": the band mask of k blocks a row, for each k that fits, and "radial": the radial mask}."""
    frames, tokens, _ = attention.SHAPES[shape]
    blocks = -(-frames * tokens // BLOCK)
    named = {f"band {n}": attention.fa4.band_mask(blocks, n) for n in steps if n <= blocks}
    return {**named, "radial": radial_block_mask(frames, tokens, decay_factor=1.0)}


def read_fit(shape: str, times_ms: dict[str, float], sms: int) -> dict:
    """The fit of `times_ms` ({masks()'s names: ms}) read per CTA, and the radial time beside its prediction."""
    frames, tokens, heads = attention.SHAPES[shape]
    length = frames * tokens
    ctas = -(-length // BLOCK) * heads
    band = {name.split()[1]: ms for name, ms in times_ms.items() if name.startswith("band ")}  # JSON keys: strings
    intercept, slope = fit_line([int(n) for n in band], list(band.values()))
    mean_count = float(masks(shape, [])["radial"].sum(axis=1).mean())
    row = {"shape": shape, "seq": length, "heads": heads, "ctas": ctas, "sms": sms, "band_ms": band,
           "fit_intercept_ms": intercept, "fit_slope_ms_per_step": slope, **per_cta(intercept, slope, ctas, sms),
           "radial_mean_count": mean_count, "radial_ms": times_ms["radial"]}  # fmt: skip
    row["radial_predicted_ms"] = intercept + slope * mean_count
    row["fixed_share_at_radial"] = intercept / row["radial_predicted_ms"]
    return row


def time_ours(shape: str, steps: list[int], iters: int, settle: float, backend: str | None, tuning) -> dict:
    """{mask name: ms} of our forward on masks(shape, steps), random bf16."""
    frames, tokens, heads = attention.SHAPES[shape]
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, frames * tokens, heads, attention.HEAD_DIM), jnp.bfloat16) for key in keys)
    times = {}
    for name, mask in masks(shape, steps).items():
        call = jax.jit(lambda q, k, v, mask=mask: block_sparse_attention(q, k, v, mask, block_size=BLOCK,
                                                                         backend=backend, tuning=tuning))  # fmt: skip
        jax.block_until_ready(call(q, k, v))
        times[name] = attention.median_seconds(lambda: call(q, k, v), iters, settle) * 1e3
    return times


def time_fa4(shape: str, steps: list[int], iters: int, settle: float) -> dict:
    """{mask name: ms} of FA4's block-sparse forward on the same masks (benchmarks/fa4.py), random bf16."""
    q, k, v = attention.fa4.inputs(shape)
    return {name: attention.fa4.median_ms(attention.fa4.fa4_case(q, k, v, mask, backward=False), iters, settle)
            for name, mask in masks(shape, steps).items()}  # fmt: skip


def fa4_in_child(shape: str, steps: list[int], iters: int, settle: float) -> dict:
    """time_fa4 in a child process (FA4 is torch's; the parent holds JAX's GPU memory)."""
    import subprocess

    command = [sys.executable, os.path.abspath(__file__), "--fa4-child", "--shape", shape, "--steps",
               ",".join(map(str, steps)), "--iters", str(iters), "--settle", str(settle)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        sys.exit(f"benchmarks/cta_cost.py: the FA4 child failed:\n{run.stdout[-1500:]}{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.3b-480p-81f", choices=list(attention.SHAPES))
    parser.add_argument("--steps", default="1,2,4,8,16,32", help="key blocks per query block of the band masks")
    parser.add_argument("--variants", default="", help="comma list of attention.py forward variants to fit too")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--settle", type=float, default=attention.fa4.SETTLE_S)
    parser.add_argument("--fa4", action="store_true", help="fit FA4's forward on the same masks too (needs FA4)")
    parser.add_argument("--fa4-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="cta-cost.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the Triton twin in interpret mode at the tiny shape, 1-2 steps (checks the plumbing)")
    args = parser.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",") if s})
    if len(steps) < 2:
        parser.error("--steps needs at least two counts to fit a line")
    names = [n for n in args.variants.split(",") if n]
    if unknown := [n for n in names if n not in attention.forward_variants()]:
        parser.error(f"unknown --variants {unknown}; choose from {list(attention.forward_variants())}")
    if args.fa4_child:
        return print(json.dumps(time_fa4(args.shape, steps, args.iters, args.settle)))
    if args.dry_run:
        shape, steps, backend, iters, settle, sms = "tiny", [1, 2], "interpret", 1, 0.0, 1
    elif jax.default_backend() != "gpu":
        sys.exit("benchmarks/cta_cost.py needs a GPU (or --dry-run)")
    else:
        shape, backend, iters, settle = args.shape, None, args.iters, args.settle
        sms = getattr(jax.devices()[0], "core_count", None) or 132
    designs = {"default": None, **{n: attention.forward_variants()[n] for n in names}}
    if args.fa4 and (args.dry_run or (reason := attention.fa4.unavailable())):
        sys.exit(f"benchmarks/cta_cost.py --fa4: {'no GPU in --dry-run' if args.dry_run else reason}")
    times = {name: time_ours(shape, steps, iters, settle, backend, tuning) for name, tuning in designs.items()}
    if args.fa4:
        times["fa4"] = fa4_in_child(shape, steps, iters, settle)
    rows = {}
    for name, measured in times.items():
        rows[name] = read_fit(shape, measured, sms)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "band_ms"}), flush=True)
    record = {"device": jax.devices()[0].device_kind, "command": "python " + " ".join(sys.argv),
              "date": datetime.date.today().isoformat(), "designs": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
