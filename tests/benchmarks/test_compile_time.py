"""benchmarks/compile_time.py --dry-run: the tiny preset's three programs compile and are timed."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_the_unrolled_model_and_both_block_stacks(tmp_path):
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "benchmarks/compile_time.py", "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["unit"] == "process CPU seconds"
    assert "--dry-run" in result["command"] and result["date"]
    (row,) = result["rows"]
    assert row["layers"] == 2
    assert all(row[key] > 0 for key in ("model_unrolled_s", "blocks_unrolled_s", "blocks_scanned_s"))
    assert json.loads(proc.stdout) == result
