"""benchmarks/dit_step.py end to end on the CPU (--dry-run): the same worker processes, model
building, timing and JSON writing that the GPU run uses, on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_all_three_implementations_and_writes_json(tmp_path):
    out = tmp_path / "dit.json"
    proc = subprocess.run([sys.executable, "benchmarks/dit_step.py", "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "rows"} <= set(record)
    rows = {row["impl"]: row for row in record["rows"]}
    assert set(rows) == {"ours-dense", "ours-radial", "diffusers"}
    for row in rows.values():
        assert row["shape"] == "tiny" and row["ms_per_step"] > 0 and "error" not in row, row
    assert rows["diffusers"]["speedup_vs_diffusers"] == 1.0
    assert 0 < rows["ours-radial"]["mask_density"] < 1 and rows["ours-radial"]["dense_layers"] == 1
    assert "ms/step" in proc.stdout
