"""Ours against FlashAttention-4's block-sparse kernel in one process, timed in alternating rounds (GPU machine).

    python benchmarks/versus_fa4.py [--shapes 1.3b-480p-81f,...] [--backward] [--decay F]
                                    [--variants V,...] [--no-fa4] [--rounds 12] [--calls 10] [--out FILE]

benchmarks/attention.py times FA4 in a torch child process and ours after it, seconds apart. The
H200's clock moves with its power and temperature between those moments, and the two medians can
then differ by more than the kernels do (FA4's 480p-81f forward ran 4.03 ms in one such child and
4.50 ms in the next process). Here both run in one process on the same inputs (FA4 reads JAX's
arrays through DLPack, no copy), in rounds: each round times `--calls` calls of one back to back and
blocked on once, then the other, the order rotated every round, so a drift in the clock falls on
both alike. The result is each round's ratio FA4 ms / ours ms (above 1: ours faster), their median
and spread, and each side's median ms. --variants adds ours with other designs as further sides,
each reported as its speed against ours round by round (--no-fa4: those alone, no torch needed).

--dry-run runs the bookkeeping on the CPU: the tiny shape, ours on the Triton twin in interpret
mode, and the masked jnp reference in FA4's place.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
import attention  # noqa: E402
import fa4  # noqa: E402

from radial_jax import attention_flops, computed_token_pairs, radial_block_mask  # noqa: E402
from radial_jax.reference import attention_reference  # noqa: E402


def interleaved_ms(cases: dict, rounds: int, calls: int, settle_s: float) -> dict[str, list[float]]:
    """Returns {name: [ms of one call, a round each]} for cases {name: (call, wait)}: call() starts one
    call and returns what wait(...) blocks on. First settle_s seconds of the cases in turn (each call
    waited on), then `rounds` rounds; round r times the cases in the order rotated by r."""
    names = list(cases)
    start = time.perf_counter()
    while True:
        for call, wait in cases.values():
            wait(call())
        if time.perf_counter() - start >= settle_s:
            break
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            call, wait = cases[name]
            start = time.perf_counter()
            for _ in range(calls - 1):
                call()  # one stream each: waiting on the last call waits for all
            wait(call())
            samples[name].append((time.perf_counter() - start) * 1e3 / calls)
    return samples


def summary(samples: dict[str, list[float]], ours: str = "ours", peer: str = "fa4") -> dict:
    """Each side's median ms; for every other side, each round's its ms / ours ms (above 1: ours
    faster) with their median, min and max (for the peer: `ours_speed_vs_{peer}`, `ratio_min/max`;
    for a variant V of ours: `V_speed_vs_{ours}`, its ms under ours' in each round)."""
    row = {f"{name}_ms": statistics.median(ms) for name, ms in samples.items()}
    for other in [name for name in samples if name != ours]:
        ratios = [p / o for o, p in zip(samples[ours], samples[other])]
        if other == peer:
            row.update({f"{ours}_speed_vs_{peer}": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios)})
        else:
            row.update({f"{other}_speed_vs_{ours}": statistics.median([1 / r for r in ratios]),
                        f"{other}_ratio_min": 1 / max(ratios), f"{other}_ratio_max": 1 / min(ratios)})
    return row | {"rounds_ms": samples}


def torch_view(x):
    """The torch tensor on x's GPU buffer (no copy)."""
    import torch

    return torch.from_dlpack(x)


def fa4_call(q, k, v, mask, backward: bool):
    """(call, wait) of FA4 on JAX's q, k, v [B, L, N, D] (its own gradients' cotangent: ours)."""
    import torch

    q4, k4, v4 = (torch_view(x).detach().requires_grad_(backward) for x in (q, k, v))
    d_out = torch_view(jnp.broadcast_to(attention.cotangent_weights(q), q.shape).astype(q.dtype)) if backward else None
    return fa4.fa4_case(q4, k4, v4, mask, backward, d_out), lambda _: torch.cuda.synchronize()


def reference_call(q, k, v, mask, backward: bool):
    """(call, wait) of the masked jnp reference: FA4's stand-in for --dry-run."""
    attend = lambda q, k, v: attention_reference(q, k, v, mask, block_size=128)[0]
    fn = attention._jitted(attend, backward)
    return (lambda: fn(q, k, v)), jax.block_until_ready


def run_shape(name: str, args) -> dict:
    frames, tokens, heads = attention.SHAPES[name]
    L = frames * tokens
    mask = radial_block_mask(frames, tokens, decay_factor=args.decay)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, L, heads, attention.HEAD_DIM), jnp.bfloat16) for key in keys)
    backend = "interpret" if args.dry_run else "mosaic"
    cases = {"ours": (attention.jax_case(q, k, v, mask, args.backward, backend), jax.block_until_ready)}
    for variant in args.variants:  # ours with another KernelTuning (attention.py's --variants)
        tuning = attention.variants(args.backward)[variant]
        cases[f"ours_{variant}"] = attention.jax_case(q, k, v, mask, args.backward, backend, tuning), jax.block_until_ready
    if not args.no_fa4:
        cases["fa4"] = (reference_call if args.dry_run else fa4_call)(q, k, v, mask, args.backward)
    for call, wait in cases.values():  # compile both before anything is timed
        wait(call())
    row = dict(shape=name, seq=L, heads=heads, decay=args.decay, backward=args.backward,
               **summary(interleaved_ms(cases, args.rounds, args.calls, args.settle)))
    flops = attention_flops(computed_token_pairs(mask, 128, L, L), heads=heads, head_dim=attention.HEAD_DIM)
    flops *= attention.BWD_FLOP_FACTOR if args.backward else 1.0
    for side in cases:
        row[f"{side}_tflops"] = flops / (row[f"{side}_ms"] * 1e-3) / 1e12
    return row


def print_row(r: dict, peer_label: str) -> None:
    line = f"{r['shape']:16} {'fwd+bwd' if r['backward'] else 'fwd':7} ours {r['ours_ms']:8.2f} ms {r['ours_tflops']:4.0f} TF"
    if "fa4_ms" in r:
        line += (f" | {peer_label} {r['fa4_ms']:8.2f} ms {r['fa4_tflops']:4.0f} TF | ours/{peer_label} speed "
                 f"{r['ours_speed_vs_fa4']:.3f}x (rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
    print(line)
    for key in [k for k in r if k.endswith("_speed_vs_ours")]:
        side = key[: -len("_speed_vs_ours")]
        print(f"  {side:36} {r[side + '_ms']:8.2f} ms  {r[key]:.3f}x ours (rounds {r[side + '_ratio_min']:.3f}-"
              f"{r[side + '_ratio_max']:.3f})", flush=True)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=attention.FWD_SHAPES, help=f"of {', '.join(fa4.SHAPES)}")
    parser.add_argument("--backward", action="store_true", help="forward and gradients wrt q, k, v")
    parser.add_argument("--decay", type=float, default=1.0, help="radial mask decay factor")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds (the ratio is their median)")
    parser.add_argument("--calls", type=int, default=10, help="calls back to back in each side's turn of a round")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of alternating calls before timing")
    parser.add_argument("--variants", default="", help="ours with these designs too (attention.py's --variants)")
    parser.add_argument("--no-fa4", action="store_true", help="ours and its variants only")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the tiny shape, the reference as the peer")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in args.variants if v not in attention.variants(args.backward)]:
        parser.error(f"unknown --variants {unknown} (with --backward: {args.backward})")
    names = ["tiny"] if args.dry_run else [s for s in args.shapes.split(",") if s]
    if not (args.dry_run or args.no_fa4) and (reason := fa4.unavailable()):
        parser.error(f"FA4 cannot run: {reason}")
    rows = []
    for name in names:
        rows.append(run_shape(name, args))
        print_row(rows[-1], "reference" if args.dry_run else "FA4")
    if args.out:
        command = "python benchmarks/versus_fa4.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, command=command, date=str(datetime.date.today()),
                           jax=jax.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
