"""What the one-process-per-run benchmarks share: running a worker child and naming the device."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "  # a worker prints its row as one line: RESULT {json}


def run_child(cmd: list[str], *, timeout: float, dry_run: bool) -> dict:
    """Runs a worker command in a child process; returns its result row, or an error row.

    A child per run keeps each run's peak memory its own and JAX and torch off one GPU; the
    child does not preallocate, and a dry run pins it to the CPU.
    """
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=f"{REPO}{os.pathsep}" + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return dict(error=f"exit {proc.returncode}: {proc.stderr[-3000:]}")


def device_tag(rows: list[dict]) -> str:
    """Returns a short file-name tag of the device the rows ran on (h100, h200, ...)."""
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    return next((tag.lower() for tag in ("H200", "H100", "A100", "L40S") if tag in device),
                device.replace(" ", "_").lower())  # fmt: skip
