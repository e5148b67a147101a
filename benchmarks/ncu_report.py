"""Hardware counters of the Mosaic kernels of one or more designs, and of FlashAttention-4's, read by
Nsight Compute on a GPU.

    python benchmarks/ncu_report.py [--variants default_bwd,split_bwd] [--shape 1.3b-480p-81f] [--band K]
                                    [--source] [--out DIR] [--dry-run]

Each design (a name ptxas_report.py knows: `default`, `default_bwd`, attention.py's forward and
backward variants; or `fa4` / `fa4_bwd`, FA4's block-sparse kernels on the same mask through
benchmarks/fa4.py, which needs FA4 installed) runs once, zeros in bf16, in a child process under
`ncu --clock-control none` (the card's own clocks, as every timing here), which profiles our Mosaic
kernels only, or every kernel of FA4's run. What is read per kernel: its duration and SM clock, how
busy the tensor pipe was (the wgmma's), the shared memory pipe and its bank conflicts, L2 throughput
and reductions (the fused backward's dQ), DRAM, the instructions issued and the issue slots, and why
warps stalled (per active warp: barrier, long/short scoreboard, MIO throttle, math pipe throttle,
wait...). Metric names differ between Nsight Compute versions, so the wish list is first checked
against `ncu --query-metrics`, and a metric this ncu lacks is reported as missing rather than failing
the run. Writes DIR/report.json: {command, date, shape, ncu (its version), missing_metrics,
designs: {name: {status, kernels: [{name, grid, block, metrics}]}}} and the raw CSV per design. `kernels` are
in launch order (a backward design's forward kernel first); metric values are in ncu's base units (ns, Hz,
%, counts), which is what --csv prints. A design whose run fails or shows none of its own kernels fails
the command, after the report is written. With --source each design is profiled a second time for ncu's
source page (per-instruction executions and warp stall samples, SourceCounters and WarpStateStats, SASS),
its own kernels only (FA4's by the name of its forward or backward), gzipped to DIR/<name>-source.csv.gz;
`python benchmarks/sass_report.py --ncu-source FILE` reads it loop by loop (the compute warpgroups' key loop
and the memory warpgroup's are separate bodies there).
"""

import argparse
import csv
import datetime
import gzip
import io
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
import ptxas_report  # noqa: E402

# FlashAttention-4's block-sparse kernels on the same masks (benchmarks/fa4.py --once, zeros in bf16 as
# ours): the forward, and forward and backward. Profiled unfiltered (their kernel names are CuTe DSL's),
# so torch's small fill and random kernels show up beside them.
FA4_DESIGNS = {"fa4": [], "fa4_bwd": ["--backward"]}
TORCH_KERNELS = ("elementwise", "fill", "distribution", "randn")  # not FA4's: torch.zeros, randn_like
# Which kernels the source page keeps: ours (Mosaic GPU's) and FA4's forward or backward (CuTe DSL names).
SOURCE_KERNELS = {"fa4": "regex:flash_fwd", "fa4_bwd": "regex:flash_bwd"}

RUN_TIMEOUT_S = 400  # compile, then each kernel replayed once per metric pass
STALLS = ("barrier", "long_scoreboard", "short_scoreboard", "mio_throttle", "math_pipe_throttle", "wait",
          "membar", "sleeping", "branch_resolving", "dispatch_stall", "lg_throttle", "no_instruction",
          "selected", "not_selected", "tex_throttle", "drain")  # fmt: skip
WISHED = (
    "gpu__time_duration.sum",
    "sm__cycles_elapsed.avg.per_second",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "lts__t_sectors_op_red.sum",
    "lts__t_sector_hit_rate.pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",  # L2: each step streams 64 KiB of K/V per CTA
    "lts__t_bytes.sum.per_second",
    "smsp__inst_executed.sum",  # instructions beside the matmuls: issue slots, and power at the cap
    *(f"smsp__warp_issue_stalled_{s}_per_warp_active.pct" for s in STALLS),
)


def available(wished, query_output: str) -> tuple[list[str], list[str]]:
    """Splits `wished` into (metrics this ncu knows, missing ones), by base name: `ncu --query-metrics`
    lists each metric once without its rollup (.sum, .avg.pct_of_...) or ratio (.pct) suffix."""
    known = {line.split()[0] for line in query_output.splitlines() if line.strip()}
    have = [m for m in wished if m.split(".")[0] in known]
    return have, [m for m in wished if m not in have]


def parse_csv(text: str) -> list[dict]:
    """Returns one dict per profiled kernel launch ({name, grid, block, metrics}) of `ncu --csv` output;
    lines before the CSV header (ncu's ==PROF== notes, the program's own output) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not row.get("ID", "").isdigit():
            continue
        kernel = kernels.setdefault(row["ID"], {"name": row["Kernel Name"], "grid": row["Grid Size"],
                                                "block": row["Block Size"], "metrics": {}})  # fmt: skip
        value = row["Metric Value"]
        try:
            kernel["metrics"][row["Metric Name"]] = float(value.replace(",", ""))  # ncu prints 4,093,120
        except ValueError:
            kernel["metrics"][row["Metric Name"]] = value
    return [kernels[i] for i in sorted(kernels, key=int)]


def designs() -> list[str]:
    """The names --variants takes: ours (ptxas_report's designs) and FA4's."""
    return [*ptxas_report.designs(), *FA4_DESIGNS]


def ncu_command(ncu: str, metrics: list[str], name: str, shape: str, band: int | None = None) -> list[str]:
    """The ncu command line that profiles design `name`'s kernels at `shape` (on the radial mask, or on
    the band mask of `band` key blocks a row): ours' Mosaic kernels only, or every kernel of FA4's run."""
    if name in FA4_DESIGNS:
        fa4 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fa4.py")
        child, only = [sys.executable, fa4, "--once", "--shapes", shape, *FA4_DESIGNS[name]], []
    else:
        child = [sys.executable, os.path.abspath(ptxas_report.__file__), "--compile", name, "--shape", shape]
        only = ["--kernel-name", "regex:mosaic"]
    child += [] if band is None else ["--band", str(band)]
    return [ncu, "--clock-control", "none", *only, "--csv", "--metrics", ",".join(metrics), *child]


def source_command(ncu: str, name: str, shape: str, band: int | None = None) -> list[str]:
    """ncu_command's run for the source page instead of the metrics: the design's own kernels only."""
    command = ncu_command(ncu, [], name, shape, band)
    child = command[command.index("--metrics") + 2:]
    return [ncu, "--clock-control", "none", "--kernel-name", SOURCE_KERNELS.get(name, "regex:mosaic"), "--section",
            "SourceCounters", "--section", "WarpStateStats", "--page", "source", "--csv", "--print-source", "sass",
            *child]  # fmt: skip


def designs_kernels(name: str, kernels: list[dict]) -> list[dict]:
    """The kernels of `kernels` that are design `name`'s own (FA4's run also launches torch's)."""
    if name not in FA4_DESIGNS:
        return kernels
    return [k for k in kernels if not any(word in k["name"].lower() for word in TORCH_KERNELS)]


def summary_line(kernel: dict) -> str:
    """One line per kernel: duration, clock, tensor pipe, shared-memory pipe and the top three stalls."""
    m = kernel["metrics"]
    tensor = m.get("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                   m.get("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"))  # fmt: skip
    stalls = sorted(((v, k.split("stalled_")[1].split("_per_warp")[0]) for k, v in m.items()
                     if "stalled_" in k and isinstance(v, float)), reverse=True)[:3]  # fmt: skip
    duration = m.get("gpu__time_duration.sum")
    return (f"{kernel['grid']}: {duration} ns, tensor pipe {tensor}%, smem pipe "
            f"{m.get('l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed')}%, "
            f"stalls {', '.join(f'{name} {v:.1f}%' for v, name in stalls)}")


def profile_source(args, name: str, env: dict) -> dict:
    """Runs source_command for design `name`; writes its CSV gzipped to args.out; returns {status, file,
    characters}."""
    path = os.path.join(args.out, f"{name}-source.csv.gz")
    try:
        run = subprocess.run(source_command(args.ncu, name, args.shape, args.band), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
        text, status = run.stdout, run.returncode
    except subprocess.TimeoutExpired as timeout:
        text, status = ptxas_report._text(timeout.stdout), "timeout"
    with gzip.open(path, "wt") as f:
        f.write(text)
    print(f"    source page: status {status}, {len(text)} characters -> {path}", flush=True)
    return {"status": status, "file": os.path.basename(path), "characters": len(text)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default_bwd,split_bwd",
                        help=f"comma list of {designs()} (default %(default)s)")  # fmt: skip
    parser.add_argument("--shape", default="1.3b-480p-81f", help="a shape of benchmarks/attention.py")
    parser.add_argument("--band", type=int, help="profile on the band mask of this many key blocks a query block "
                        "(benchmarks/cta_cost.py's masks) instead of the radial mask")
    parser.add_argument("--source", action="store_true", help="also profile each design's source page "
                        "(per-instruction stall samples) into DIR/<name>-source.csv.gz")
    parser.add_argument("--ncu", default="ncu", help="the Nsight Compute command (default %(default)s)")
    parser.add_argument("--out", default="ncu-report", help="directory for report.json and <name>.csv")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in designs()]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {designs()}")
    if args.shape not in ptxas_report.attention.SHAPES:
        parser.error(f"--shape {args.shape} is not one of {list(ptxas_report.attention.SHAPES)}")
    if args.dry_run:
        for name in names:
            print(f"{name}: {' '.join(ncu_command(args.ncu, list(WISHED), name, args.shape, args.band))}")
            if args.source:
                print(f"{name} source: {' '.join(source_command(args.ncu, name, args.shape, args.band))}")
        return None
    try:  # the H100 and the H200 are both GH100
        query = subprocess.run([args.ncu, "--query-metrics", "--chip", "gh100"], capture_output=True, text=True,
                               timeout=120, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        sys.exit(f"ncu_report: cannot run `{args.ncu} --query-metrics` ({error}); pass --ncu PATH")
    version = subprocess.run([args.ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    metrics, missing = available(WISHED, query.stdout)
    print(f"{len(metrics)} metrics; missing from this ncu: {missing or 'none'}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    report, failed = {}, []
    for name in names:
        try:
            run = subprocess.run(ncu_command(args.ncu, metrics, name, args.shape, args.band), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
            text, status = run.stdout, run.returncode
        except subprocess.TimeoutExpired as timeout:
            text, status = ptxas_report._text(timeout.stdout), "timeout"
        with open(os.path.join(args.out, f"{name}.csv"), "w") as f:
            f.write(text)
        kernels = parse_csv(text)
        report[name] = {"status": status, "kernels": kernels}
        print(f"{name}: status {status}, {len(kernels)} kernels", flush=True)
        for kernel in kernels:
            print("   ", kernel["name"][:80], summary_line(kernel), flush=True)
        if status != 0 or not designs_kernels(name, kernels):
            failed.append(name)
            print("    output tail:", text[-1500:], flush=True)
        elif args.source:
            report[name]["source"] = profile_source(args, name, env)
            if report[name]["source"]["status"] != 0:
                failed.append(f"{name} (source page)")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "shape": args.shape, "band": args.band, "ncu": version.strip().splitlines()[-1:], "missing_metrics": missing,
                   "designs": report}, f, indent=1)  # fmt: skip
    if failed:
        raise SystemExit(f"ncu_report: {failed} gave no counters of their own kernels; see their CSV in {args.out}")
    return report


if __name__ == "__main__":
    main()
