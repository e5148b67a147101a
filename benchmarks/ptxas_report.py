"""ptxas's report (registers, spills, wgmma serialization) and the PTX of Mosaic designs, on a GPU or off it.

    python benchmarks/ptxas_report.py [--variants default,overlap_fwd,...] [--shape 1.3b-480p-81f]
                                      [--out DIR] [--deviceless] [--dry-run]

--deviceless compiles ahead of time for an H200 described by a GPU target config (DEVICELESS_TARGET below)
instead of running on a GPU: XLA's CUDA plugin compiles without one, Mosaic GPU and ptxas included, so
the same PTX, ptxas report and (with benchmarks/sass_report.py --ptx DIR) SASS come out on a CPU-only
machine. It needs jax's CUDA plugin at jax's own version (`pip install jax-cuda13-plugin==V
jax-cuda13-pjrt==V`); the CUDA libraries' version check is skipped (JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1),
as nothing is run. Checked on jax 0.11.2: the default forward's PTX and ptxas report match the H200's.

Each design (`default`, `default_bwd` or a name from attention.py's forward_variants or backward_variants;
a backward design compiles the forward and backward of value_and_grad) compiles in a process of its
own with MOSAIC_GPU_DUMP_PTXAS=1 and MOSAIC_GPU_DUMP_PTX=1, under which Mosaic GPU prints the PTX it
hands to ptxas and ptxas's verbose report. The compile's output is kept as DIR/<name>.log: the PTX
shows where ptxas's C7513 ("wgmma.mma_async instructions are serialized") comes from, and can be fed
to ptxas again off the GPU (`ptxas -arch=sm_90a -v`). ptxas's lines are printed as each design
finishes and written to DIR/report.json: {command, date, shape, designs: {name: {tuning, backward, status, ptxas,
registers, spill_bytes, serialized, injected_arrives, ptx_wgmma, kernels: [{name, registers, spill_bytes,
serialized, injected_arrives}]}}}, `kernels` in ptxas's order (a backward design's forward first). --dry-run
prints the plan and runs nothing.
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
import attention  # noqa: E402

# An H200 as XLA's GpuTargetConfigProto (text format): what a deviceless compile targets.
DEVICELESS_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H200"
"""
COMPILE_TIMEOUT_S = 240  # one design's trace, lowering and ptxas: ~5-30 s on the H200 host


def designs() -> dict:
    """{name: KernelTuning}: the defaults and attention.py's forward and backward variants."""
    return {"default": attention.KernelTuning(), "default_bwd": attention.KernelTuning(),
            **attention.forward_variants(), **attention.backward_variants()}


def is_backward(name: str) -> bool:
    """Whether design `name` is timed through its backward (its log then also holds the forward's ptxas)."""
    return name == "default_bwd" or name in attention.backward_variants()


def tuning_of(name: str):
    """The half of design `name`'s KernelTuning that it is about: the Mosaic backward's or forward's."""
    return designs()[name].mosaic_bwd if is_backward(name) else designs()[name].mosaic_fwd


def summarize(stdout: str) -> dict:
    """Returns ptxas's lines of a compile's stdout and what they say: registers, spill bytes, serialized,
    over the whole compile and per kernel (a backward design compiles several: each ptxas run ends
    with its "Used N registers" line)."""
    is_ptxas = lambda line: line.startswith("ptxas") or "bytes stack frame" in line  # the spill line is indented
    lines = [line.strip() for line in stdout.splitlines() if is_ptxas(line)]
    ptx = [line for line in stdout.splitlines() if not is_ptxas(line)]
    kernels, current = [], []
    for line in lines:
        current.append(line)
        if re.search(r"Used \d+ registers", line):
            entry = re.search(r"Compiling entry function '([^']+)'", "\n".join(current))
            kernels.append({"name": entry.group(1) if entry else None, **_read(current)})
            current = []
    return {"ptxas": lines, **_read(lines), "kernels": kernels,
            "ptx_wgmma": sum("wgmma.mma_async" in line for line in ptx)}


def _read(lines: list[str]) -> dict:
    """Registers (the most), spill bytes (the sum) and serialization (any) of ptxas's lines."""
    registers = [int(n) for line in lines for n in re.findall(r"Used (\d+) registers", line)]
    # The function-properties line only: ptxas repeats the counts in a warning when it spills.
    spills = [int(n) for line in lines if "bytes stack frame" in line
              for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", line)]
    return {"registers": max(registers, default=None), "spill_bytes": sum(spills),
            "serialized": any("C7513" in line or "serialized" in line for line in lines),
            "injected_arrives": sum("C7519" in line for line in lines)}  # fmt: skip


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def compile_one(name: str, shape: str, deviceless: bool = False, band: int | None = None) -> None:
    """Compiles (and runs once) the Mosaic forward, or forward and backward (value_and_grad), of
    design `name` at `shape`, zeros in bf16, on the radial mask or (band) fa4.profiled_mask's band mask;
    deviceless: compiles only, for DEVICELESS_TARGET."""
    import jax
    import jax.numpy as jnp

    frames, tokens, heads = attention.SHAPES[shape]
    mask = attention.fa4.profiled_mask(frames, tokens, band=band)
    x_shape = (1, frames * tokens, heads, attention.HEAD_DIM)
    if deviceless:
        import numpy as np
        from jax.experimental import topologies

        topology = topologies.get_topology_desc(platform="cuda", topology_name="h200", target_config=DEVICELESS_TARGET,
                                                topology="1x1x1")  # fmt: skip
        mesh = jax.sharding.Mesh(np.array(topology.devices), ("x",))
        x = jax.ShapeDtypeStruct(x_shape, jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        attention.jax_fn(mask, is_backward(name), "mosaic", designs()[name]).lower(x, x, x).compile()
        return
    x = jnp.zeros(x_shape, jnp.bfloat16)
    call = attention.jax_case(x, x, x, mask, is_backward(name), "mosaic", designs()[name])
    jax.block_until_ready(call())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default,overlap_fwd",
                        help=f"comma list of {list(designs())} (default %(default)s)")  # fmt: skip
    parser.add_argument("--shape", default="1.3b-480p-81f", help=f"one of {list(attention.fa4.SHAPES)}")
    parser.add_argument("--out", default="ptxas-report", help="directory for <name>.log and report.json")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--deviceless", action="store_true",
                        help="compile ahead of time for an H200 without one (needs jax's CUDA plugin)")
    parser.add_argument("--compile", help=argparse.SUPPRESS)  # the child process: one design
    parser.add_argument("--band", type=int, help=argparse.SUPPRESS)  # its band mask (ncu_report.py --band)
    args = parser.parse_args(argv)
    if args.shape not in attention.fa4.SHAPES:
        parser.error(f"--shape {args.shape} is not one of {list(attention.fa4.SHAPES)}")
    if args.compile:
        return compile_one(args.compile, args.shape, args.deviceless, args.band)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in designs()]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(designs())}")
    env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_PTX": "1",
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # fmt: skip
    env.pop("MOSAIC_GPU_DUMP_TO", None)  # it would send the dumps to files instead of stdout
    if args.deviceless:
        env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # no CUDA libraries needed: nothing runs
    if args.dry_run:
        for name in names:
            print(f"{name}: {tuning_of(name)} at {args.shape} -> {args.out}/{name}.log")
        return None
    os.makedirs(args.out, exist_ok=True)
    report, failed = {}, []
    for i, name in enumerate(names):
        command = [sys.executable, os.path.abspath(__file__), "--compile", name, "--shape", args.shape,
                   *(["--deviceless"] if args.deviceless else [])]
        try:
            # stderr joins stdout: whichever stream this jaxlib prints ptxas's report on, the log has it
            run = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=COMPILE_TIMEOUT_S)  # fmt: skip
            stdout, status = run.stdout, run.returncode
        except subprocess.TimeoutExpired as timeout:
            stdout, status = _text(timeout.stdout), "timeout"
        with open(os.path.join(args.out, f"{name}.log"), "w") as f:
            f.write(stdout)
        entry = {"tuning": dataclasses.asdict(tuning_of(name)), "backward": is_backward(name), "status": status,
                 **summarize(stdout)}
        report[name] = entry
        print(f"[{i + 1}/{len(names)}] {name}: status {status}, {entry['registers']} registers, "
              f"{entry['spill_bytes']} spill bytes, serialized {entry['serialized']}", flush=True)  # fmt: skip
        for line in entry["ptxas"]:
            print("   ", line)
        if status != 0:
            failed.append(name)
            print("    log tail:", stdout[-2000:], flush=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "shape": args.shape, "designs": report}, f, indent=1)  # fmt: skip
    if failed:
        raise SystemExit(f"ptxas_report: {failed} did not compile; see their logs in {args.out}")
    return report


if __name__ == "__main__":
    main()
