"""benchmarks/generate.py end to end on the CPU (--dry-run): the same worker process, random
components, pipeline phases, extrapolation and JSON writing that the GPU run uses, on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = ("weights_init_s", "encode_s", "dense_step_s", "dense_compile_s", "decode_s")  # one measurement per worker


def test_dry_run_one_worker_times_all_configs_and_writes_extrapolated_json(tmp_path):
    out, log_dir = tmp_path / "generate.json", tmp_path / "log"
    cmd = [sys.executable, "benchmarks/generate.py", "--dry-run", "--out", str(out), "--log-dir", str(log_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert {"device", "command", "date", "note", "rows"} <= set(record) and "extrapolated" in record["note"]
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == {"dense", "radial-0.2", "radial-1.0"}
    for row in rows.values():
        assert "error" not in row and "pending" not in row and row["shape"] == "tiny" and row["frames"] == 17, row
        assert row["dense_step_s"] > 0 and row["encode_s"] > 0 and row["decode_s"] > 0, row
        assert len(row["dense_step_times_s"]) == 2
        assert all(row[key] == rows["dense"][key] for key in SHARED), "configs not timed by one worker"
    assert "radial_step_s" not in rows["dense"] and rows["radial-0.2"]["radial_step_s"] > 0
    assert rows["radial-0.2"]["radial_step_times_s"] != rows["radial-1.0"]["radial_step_times_s"]
    radial = rows["radial-0.2"]
    expected = radial["encode_s"] + 12 * radial["dense_step_s"] + 38 * radial["radial_step_s"] + radial["decode_s"]
    assert abs(radial["total_s"] - expected) < 1e-9
    assert "12 x dense_step_s + 38 x radial_step_s" in radial["extrapolation"]
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and "radial s/step" in proc.stdout
    logged = {row["config"]: row for row in json.loads((log_dir / "generate-tiny.json").read_text())["rows"]}
    assert logged["radial-1.0"]["total_s"] == rows["radial-1.0"]["total_s"]


def test_preset_lightx2v_dry_run_times_four_real_steps_and_both_vae_dtypes(tmp_path):
    out = tmp_path / "fast.json"
    cmd = [sys.executable, "benchmarks/generate.py", "--preset", "lightx2v", "--dry-run", "--repeats", "1",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert "lightx2v preset" in record["note"] and "extrapolat" not in record["note"]
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == {"dense", "radial"}
    assert rows["dense"]["dense_steps"] == [0, 1, 2, 3] and rows["radial"]["dense_steps"] == [0]
    for row in rows.values():
        assert "error" not in row and "pending" not in row and row["timesteps"] == [1000, 750, 500, 250], row
        assert row["guidance"] == 1.0 and len(row["step_times_s"]) == 1 and len(row["step_times_s"][0]) == 4
        assert row["total_s"] == row["encode_s"] + row["denoise_s"] + row["decode_s"]
        assert row["total_f32_vae_s"] == row["encode_s"] + row["denoise_s"] + row["decode_f32_s"]
        assert row["decode_s"] > 0 and row["decode_f32_s"] > 0 and row["denoise_compile_s"] > 0
        assert 0 <= row["vae_bf16_vs_f32_uint8"]["mean"] <= row["vae_bf16_vs_f32_uint8"]["max"] <= 255
    assert rows["dense"]["denoise_runs_s"] != rows["radial"]["denoise_runs_s"]
    assert rows["dense"]["decode_s"] == rows["radial"]["decode_s"]  # one decode per worker
    assert "4 steps s" in proc.stdout
