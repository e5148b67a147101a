"""benchmarks/multi_gpu.py end to end on the CPU (--dry-run): the worker per device count,
sharded random weights, timing, the all-to-all probe, the output comparison and the JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_on_1_and_8_devices_matches_and_writes_json(tmp_path):
    out = tmp_path / "multi.json"
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--dry-run", "--gpus", "1,8", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "rows"} <= set(record)
    one, eight = sorted(record["rows"], key=lambda row: row["gpus"])
    assert (one["gpus"], eight["gpus"]) == (1, 8) and one["shape"] == eight["shape"] == "tiny"
    assert one["mode"] == eight["mode"] == "forward"
    assert one["s_per_step"] > 0 and eight["s_per_step"] > 0 and len(eight["peak_gib_per_gpu"]) == 8
    assert eight["radial"]["mask_density"] < 1 and eight["radial"]["dense_layers"] == 1
    # f32: the 8-device step is the 1-device function up to float32 rounding.
    assert eight["output_matches_1_gpu"] and eight["output_rel_l2"] <= 1e-5
    assert eight["efficiency"] > 0 and eight["all_to_all_qkv_bytes_sent_per_gpu"] > 0
    assert "s/step" in proc.stdout


def test_dry_run_training_step_on_2_devices_matches_one_device(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--dry-run", "--train", "--gpus", "1,2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = sorted(json.loads(out.read_text())["rows"], key=lambda row: row["gpus"])
    assert one["mode"] == two["mode"] == "train" and len(two["grad_norms"]) == 3  # warmup 1 + 2 timed steps
    assert min(one["grad_norms"]) > 0 and two["grad_norm_max_rel_diff"] <= 1e-5 and two["output_rel_l2"] <= 1e-5
    assert two["output_matches_1_gpu"] and two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)


def test_gpu_counts_must_start_with_the_one_gpu_baseline():
    proc = subprocess.run([sys.executable, "benchmarks/multi_gpu.py", "--dry-run", "--gpus", "2,4"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "must start with 1" in proc.stderr
