"""benchmarks/profile_fast.py's trace bookkeeping on a made-up trace, and its dry run on the CPU."""

import json
import sys

from benchmark_testing import load_benchmark


def _trace():
    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
            dict(ph="M", name="process_name", pid=7, args=dict(name="/device:GPU:0"))]
    kernel = lambda name, ts, dur, pid=7: dict(ph="X", pid=pid, tid=1, name=name, ts=ts, dur=dur)
    return dict(traceEvents=meta + [
        kernel("nvjet_hsh_256x128_2cta", 0.0, 100.0),
        kernel("loop_multiply_fusion_3", 50.0, 100.0),  # overlaps the gemm by 50 us (another stream)
        kernel("mosaic_gpu_kernel_radial", 300.0, 200.0),
        kernel("sm90_xmma_fprop_implicit_gemm_bf16", 600.0, 40.0),
        kernel("input_transpose_fusion", 700.0, 10.0),
        kernel("loop_convert_fusion_2", 800.0, 5.0),  # a dtype cast, not a conv
        kernel("nvjet_hsh_256x128_2cta", 1000.0, 100.0),
        kernel("PjitFunction(step)", 0.0, 5000.0, pid=1),  # host: not device time
    ])  # fmt: skip


def test_trace_summary_sums_device_kernels_by_kind_and_name_and_measures_idle_time():
    profile = load_benchmark("profile_fast")
    row = profile.summarise_trace(_trace(), wall_s=0.002)
    assert row["device_processes"] == ["/device:GPU:0"] and row["kernels"] == 7
    assert abs(row["kernel_s"] - 555e-6) < 1e-12
    assert abs(row["busy_s"] - 505e-6) < 1e-12  # 0-150, 300-500, 600-640, 700-710, 800-805, 1000-1100
    kinds = row["by_kind_s"]
    assert abs(kinds["matmul"] - 200e-6) < 1e-12 and abs(kinds["attention"] - 200e-6) < 1e-12
    assert abs(kinds["conv"] - 40e-6) < 1e-12 and abs(kinds["copy/transpose"] - 10e-6) < 1e-12
    assert abs(kinds["other fusion"] - 105e-6) < 1e-12
    top = row["top_kernels"][0]
    assert top["name"].startswith("nvjet") and top["calls"] == 2 and top["kind"] == "matmul"


def test_dry_run_profiles_every_phase_of_the_tiny_preset(tmp_path, monkeypatch):
    profile = load_benchmark("profile_fast")
    monkeypatch.setattr(sys, "argv", ["profile_fast.py", "--dry-run"])
    out = tmp_path / "profile.json"
    assert profile.main(["--dry-run", "--phases", "denoise,decode,decode_bf16", "--out", str(out),
                         "--trace-dir", str(tmp_path / "traces")]) == 0
    result = json.loads(out.read_text())
    assert [row["phase"] for row in result["rows"]] == ["denoise", "decode", "decode_bf16"]
    assert all(row["untraced_s"] > 0 and row["traced_wall_s"] > 0 for row in result["rows"])
    assert all(row["decode_video_s"] > 0 for row in result["rows"][1:]) and result["date"] and result["command"]
    assert list((tmp_path / "traces").glob("decode/**/perfetto_trace.json.gz"))
