"""benchmarks/train_step.py end to end on the CPU (--dry-run): the same worker processes, random
LoRA model built without a host copy, the training's own step, timing and JSON writing as the
GPU run, on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_times_radial_and_dense_training_steps_and_writes_json(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--dry-run", "--iters", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "rows"} <= set(record)
    rows = {row["impl"]: row for row in record["rows"]}
    assert set(rows) == {"radial", "dense"}
    for row in rows.values():
        assert row["shape"] == "tiny" and row["s_per_step"] > 0 and len(row["times_s"]) == 2, row
        assert row["tokens"] == 320 and row["lora_params"] == 2 * 4 * 2 * 64 * 32  # 2 blocks x q,k,v,o x (A + B)
        assert row["loss"] > 0
    assert 0 < rows["radial"]["mask_density"] < 1 and rows["radial"]["plan"]["dense_layers"] == 1
    assert rows["dense"]["plan"]["mode"] == "dense" and rows["radial"]["speedup_vs_dense"] > 0
    assert "s/step" in proc.stdout
