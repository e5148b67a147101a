"""What the worker-process benchmarks share: their common flags, running a worker child (or one
per shape and implementation), naming the device, filling a model with random weights on the
devices, and writing the JSON."""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "  # a worker prints each row as one line: RESULT {json}, again whenever it grows
WEIGHT_STD = 0.02  # random weights: scale of a trained Wan's linears, keeps activations finite


def add_worker_flags(parser: argparse.ArgumentParser, *, results: str, timeout: int, dry_run: str,
                     iters: int | None = None, timeout_note: str = "") -> None:
    """Adds the flags the worker benchmarks share, in this order: --iters and --warmup (iters None:
    neither), --radial-impl, --timeout, --out (default benchmarks/results/<results>-<device>.json)
    and --dry-run (its help `dry_run`)."""
    if iters is not None:
        parser.add_argument("--iters", type=int, default=iters,
                            help="timed steps (median reported; default %(default)s)")  # fmt: skip
        parser.add_argument("--warmup", type=int, default=1,
                            help="untimed steps after compilation (default %(default)s)")  # fmt: skip
    parser.add_argument("--radial-impl", default="pallas",
                        help="radial_attention implementation (default %(default)s; 'auto' would fall back to the "
                             "slow jnp reference silently)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=timeout,
                        help=f"seconds per worker process{timeout_note} (default %(default)s)")
    parser.add_argument("--out",
                        help=f"JSON path (default benchmarks/results/{results}-<device>.json; --dry-run: none)")
    parser.add_argument("--dry-run", action="store_true", help=dry_run)


def out_path(args: argparse.Namespace, results: str, rows: list[dict]) -> Path | None:
    """Returns where the JSON goes: --out (relative to the repository unless absolute), else
    benchmarks/results/<results>-<device of the rows>.json; None for a dry run without --out."""
    out = args.out or (None if args.dry_run else f"benchmarks/results/{results}-{device_tag(rows)}.json")
    return None if out is None else Path(out) if Path(out).is_absolute() else REPO / out


def run_matrix(script: str, shapes: list[str], impls: list[str], args: argparse.Namespace, *,
               env: dict[str, str] | None = None) -> list[dict]:
    """Returns one row per (shape, impl), shape by shape: each from `script --worker impl --shapes
    shape` in its own process (its peak memory its own; `env` added to its environment) with the
    parent's --iters, --warmup, --radial-impl and --dry-run; an error row where the child failed."""
    rows = []
    for shape in shapes:
        for impl in impls:
            print(f"running {shape} {impl} ...", flush=True)
            cmd = [sys.executable, script, "--worker", impl, "--shapes", shape, "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--radial-impl", args.radial_impl]  # fmt: skip
            cmd += ["--dry-run"] if args.dry_run else []
            row = run_child(cmd, timeout=args.timeout, dry_run=args.dry_run, env=env)
            rows.append(dict(row, shape=shape, impl=impl))
    return rows


def matrix_parser(description: str, *, shapes: Collection[str], default_shapes: str, impls: Sequence[str],
                  results: str) -> argparse.ArgumentParser:
    """Returns the parser of a shape x implementation benchmark (dit_step, train_step): --shapes,
    --impls, the worker flags (3 timed steps, 1500 s a worker, --dry-run on the tiny model) and
    the hidden --worker IMPL a child runs with."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=default_shapes, help=f"comma list of {list(shapes)}")
    parser.add_argument("--impls", default=",".join(impls), help=f"comma list of {tuple(impls)}")
    add_worker_flags(parser, results=results, timeout=1500, iters=3,
                     dry_run="tiny model on the CPU: checks the path in seconds")  # fmt: skip
    parser.add_argument("--worker", choices=impls, help=argparse.SUPPRESS)
    return parser


def matrix_main(args: argparse.Namespace, *, script: str, shapes: Collection[str], impls: Sequence[str],
                worker: Callable[[str, str], dict], summarise: Callable[[list[dict]], list[dict]],
                print_table: Callable[[list[dict]], None], results: str, env: dict[str, str] | None = None) -> int:
    """Runs a shape x implementation benchmark from its matrix_parser `args`; returns the exit
    status. As --worker: prints the RESULT row of worker(shape, impl). Else: refuses unknown
    names, runs every pair in its own process (run_matrix), prints the summarised rows and writes
    them (merged by shape and impl, out_path); 1 where a pair failed."""
    names = ["tiny"] if args.dry_run else args.shapes.split(",")
    if args.worker:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        row = worker(names[0], args.worker)
        print(RESULT_PREFIX + json.dumps(dict(row, shape=names[0], impl=args.worker)), flush=True)
        return 0
    unknown = [s for s in names if s not in shapes] + [i for i in args.impls.split(",") if i not in impls]
    if unknown:
        sys.exit(f"unknown shapes/impls {unknown}; shapes: {list(shapes)}, impls: {tuple(impls)}")
    rows = summarise(run_matrix(script, names, args.impls.split(","), args, env=env))
    print_table(rows)
    if out := out_path(args, results, rows):
        write_rows(rows, out, case=lambda r: (r["shape"], r["impl"]))
    return 0 if all("error" not in r for r in rows) else 1


def run_child_rows(cmd: list[str], *, timeout: float, dry_run: bool, key: str | None,
                   env: dict[str, str] | None = None) -> tuple[list[dict], str | None]:
    """Returns (the last RESULT row the child printed for each value of row[key] (key None: one
    row), in order of first print; None if the child exited 0, else why it failed: exit status and
    stderr tail, or the timeout).

    Rows printed before a crash or a timeout are kept, so a worker that prints as it goes loses only
    the phases it did not reach. The child does not preallocate GPU memory (its peak is its own, and
    JAX and torch can share one GPU) unless `env` (variables set for the child) says otherwise; a
    dry run pins it to the CPU.
    """
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": f"{REPO}{os.pathsep}" + os.environ.get("PYTHONPATH", ""), **(env or {})}
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        stdout, failure = proc.stdout, (f"exit {proc.returncode}: {proc.stderr[-3000:]}" if proc.returncode else None)
    except subprocess.TimeoutExpired as expired:  # its output so far comes as bytes (or None)
        stdout = (expired.stdout or b"").decode(errors="replace")
        stderr = (expired.stderr or b"").decode(errors="replace")[-3000:]
        failure = f"timed out after {timeout} s" + (f": {stderr}" if stderr else "")
    rows = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                row = json.loads(line[len(RESULT_PREFIX) :])
            except json.JSONDecodeError:  # the last line of a killed child may be cut short
                continue
            rows[row.get(key) if key else None] = row
    return list(rows.values()), failure


def run_child(cmd: list[str], *, timeout: float, dry_run: bool, env: dict[str, str] | None = None) -> dict:
    """Returns the result row of a worker that prints one (its last RESULT line), or an error row."""
    rows, failure = run_child_rows(cmd, timeout=timeout, dry_run=dry_run, key=None, env=env)
    return rows[-1] if rows else dict(error=failure or "exit 0 without a RESULT line")


def device_tag(rows: list[dict]) -> str:
    """Returns a short file-name tag of the device the rows ran on (h100, h200, ...)."""
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    return next((tag.lower() for tag in ("H200", "H100", "A100", "L40S") if tag in device),
                device.replace(" ", "_").lower())  # fmt: skip


def cell(row: dict, key: str, fmt: str = ".2f") -> str:
    """Returns row[key] formatted for a printed table, or "-" where the row has no value."""
    return format(row[key], fmt) if row.get(key) is not None else "-"


def random_state(abstract, seed: int, sharding=None):
    """Returns the nnx.State `abstract` (shapes and dtypes only, e.g. from nnx.eval_shape) filled
    on the devices: norm scales 1, biases 0, every other leaf normal * WEIGHT_STD.

    One small program per leaf shape and dtype (compiled once, reused by the 40 blocks), placed by
    `sharding` (default: the default device); the weights never exist on the host. One program for
    the whole model instead took over 280 s to compile at 14B on the H200.
    """
    from flax import nnx

    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        value = var.get_value()
        kind = "ones" if path[-1] in ("scale", "gamma") else "zeros" if path[-1] == "bias" else "normal"
        leaves.append((path, var.replace(_draw(kind, value.shape, str(value.dtype), sharding)(seed * 100_003 + i))))
    return nnx.from_flat_state(leaves)


@functools.lru_cache(maxsize=None)
def _draw(kind: str, shape: tuple[int, ...], dtype: str, sharding):
    import jax
    import jax.numpy as jnp

    def draw(seed):
        if kind != "normal":
            return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
        # rbg: XLA's RngBitGenerator compiles ~3x faster than threefry.
        key = jax.random.key(seed, impl="rbg")
        return (jax.random.normal(key, shape, jnp.float32) * WEIGHT_STD).astype(dtype)

    return jax.jit(draw, out_shardings=sharding)


def write_rows(rows: list[dict], out: Path, *, case: Callable[[dict], tuple], **fields) -> None:
    """Writes the rows with device, command, date (and `fields`) to `out` as JSON.

    An existing file of the same device keeps its rows of other cases (`case(row)`: e.g. shape and
    implementation), so runs split across calls land in one file; the file is written whole under
    a temporary name and renamed, so a killed run leaves no half file.
    """
    device = next((r["device"] for r in rows if "device" in r and r["device"] != "cpu"), "cpu")
    record = dict(device=device, command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(),
                  **fields, rows=rows)  # fmt: skip
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("device") == device:
            new = {case(r) for r in rows}
            record["rows"] = [r for r in old.get("rows", []) if case(r) not in new] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(out)
    print(f"wrote {out}")


def timed(fn, sync, iters: int, warmup: int) -> list[float]:
    """Returns per-call seconds of fn() after `warmup` untimed calls; sync() waits for the device."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return times
