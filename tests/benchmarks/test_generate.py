"""benchmarks/generate.py end to end on the CPU (--dry-run): the same worker processes, random
components, pipeline phases, extrapolation and JSON writing that the GPU run uses, on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_dense_and_radial_and_writes_extrapolated_json(tmp_path):
    out = tmp_path / "generate.json"
    proc = subprocess.run([sys.executable, "benchmarks/generate.py", "--dry-run", "--configs", "dense,radial-0.2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "note", "rows"} <= set(record) and "extrapolated" in record["note"]
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == {"dense", "radial-0.2"}
    for row in rows.values():
        assert "error" not in row and row["shape"] == "tiny" and row["frames"] == 17, row
        assert row["dense_step_s"] > 0 and row["encode_s"] > 0 and row["decode_s"] > 0 and len(row["dense_step_times_s"]) == 2
    assert "radial_step_s" not in rows["dense"] and rows["radial-0.2"]["radial_step_s"] > 0
    radial = rows["radial-0.2"]
    expected = radial["encode_s"] + 12 * radial["dense_step_s"] + 38 * radial["radial_step_s"] + radial["decode_s"]
    assert abs(radial["total_s"] - expected) < 1e-9 and "12 x dense_step_s + 38 x radial_step_s" in radial["extrapolation"]
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and "radial s/step" in proc.stdout
