"""benchmarks/ncu_report.py on the CPU: its choice of metrics, its reading of ncu's CSV and its plan;
the profiling itself needs a GPU and Nsight Compute."""

import json

import pytest

from benchmark_testing import load_benchmark

QUERY = """Device GH100 (GH100)
------------------------------------------------------------
Metric Name                                         Metric Description
gpu__time_duration                                  total duration in nanoseconds
sm__pipe_tensor_op_gmma_cycles_active               # of cycles where the GMMA pipe was active
smsp__warp_issue_stalled_barrier_per_warp_active    proportion of warps per cycle, waiting for sibling warps
"""

# `ncu --csv --metrics ...` as it prints two launches of one kernel, after the program's own output.
CSV = '''==PROF== Connected to process 7 (/usr/bin/python3.12)
some line the program printed
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","4,093,120"
"0","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","%","81.25"
"0","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","smsp__warp_issue_stalled_barrier_per_warp_active.pct","%","12.5"
"0","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","smsp__warp_issue_stalled_wait_per_warp_active.pct","%","30.0"
"0","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","smsp__warp_issue_stalled_selected_per_warp_active.pct","%","3.0"
"1","7","python3.12","127.0.0.1","kernel_mosaic_gpu_kernel","1","14","(384, 1, 1)","(12, 256, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","8,250,000"
==PROF== Disconnected from process 7
'''


def test_metrics_are_split_by_what_this_ncu_knows():
    ncu = load_benchmark("ncu_report")
    wished = ["gpu__time_duration.sum", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
              "smsp__warp_issue_stalled_barrier_per_warp_active.pct", "lts__t_sectors_op_red.sum"]
    have, missing = ncu.available(wished, QUERY)
    assert have == wished[:3] and missing == ["lts__t_sectors_op_red.sum"]


def test_csv_is_read_per_launch_with_numbers_unformatted():
    kernels = load_benchmark("ncu_report").parse_csv(CSV)
    assert [k["metrics"]["gpu__time_duration.sum"] for k in kernels] == [4093120.0, 8250000.0]
    first = kernels[0]
    assert first["name"] == "kernel_mosaic_gpu_kernel" and first["grid"] == "(12, 256, 1)"
    assert first["metrics"]["sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"] == 81.25
    line = load_benchmark("ncu_report").summary_line(first)
    assert "tensor pipe 81.25%" in line and line.endswith("stalls wait 30.0%, barrier 12.5%, selected 3.0%")


def test_output_without_a_csv_reads_as_no_kernels():
    assert load_benchmark("ncu_report").parse_csv("==ERROR== the program failed\n") == []


def test_dry_run_plans_one_ncu_command_per_design(capsys):
    load_benchmark("ncu_report").main(["--dry-run", "--variants", "default_bwd,fused_bwd"])
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in plan] == ["default_bwd", "fused_bwd"]
    assert all("--clock-control none" in line and "regex:mosaic" in line for line in plan)
    assert plan[1].endswith("--compile fused_bwd --shape 1.3b-480p-81f")


def test_fa4_designs_profile_fa4s_run_unfiltered_and_count_only_its_kernels(capsys):
    ncu = load_benchmark("ncu_report")
    ncu.main(["--dry-run", "--variants", "fa4,fa4_bwd", "--shape", "14b-720p-81f"])
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].endswith("fa4.py --once --shapes 14b-720p-81f") and "regex:mosaic" not in plan[0]
    assert plan[1].endswith("fa4.py --once --shapes 14b-720p-81f --backward")
    kernels = [{"name": n} for n in ("vectorized_elementwise_kernel", "kernel_cutlass_flash_fwd_sm90",
                                     "distribution_elementwise_grid_stride_kernel")]  # fmt: skip
    assert ncu.designs_kernels("fa4", kernels) == [kernels[1]]
    assert ncu.designs_kernels("default", kernels) == kernels  # ours: ncu already kept only Mosaic's


def test_band_profiles_ours_and_fa4_on_the_same_band_mask(capsys):
    load_benchmark("ncu_report").main(["--dry-run", "--variants", "default,fa4", "--band", "32"])
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].endswith("--compile default --shape 1.3b-480p-81f --band 32")
    assert plan[1].endswith("fa4.py --once --shapes 1.3b-480p-81f --band 32")
    fa4 = load_benchmark("fa4")
    mask = fa4.profiled_mask(21, 1560, band=32)
    assert mask.shape == (256, 256) and (mask.sum(1) == 32).all()  # 32,760 tokens: 256 blocks
    radial = fa4.profiled_mask(21, 1560)
    assert radial.shape == (256, 256) and not (radial.sum(1) == 32).all()


def test_unknown_design_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("ncu_report").main(["--dry-run", "--variants", "fused_typo"])
    assert "fused_typo" in capsys.readouterr().err


def test_a_missing_ncu_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="pass --ncu PATH"):
        load_benchmark("ncu_report").main(["--ncu", str(tmp_path / "no-ncu"), "--out", str(tmp_path / "out")])


def _stand_in_ncu(tmp_path, profile_exit: int):
    """An `ncu` that answers --query-metrics with QUERY, --version with a version and a profile with CSV."""
    (tmp_path / "query.txt").write_text(QUERY)
    (tmp_path / "profile.csv").write_text(CSV if profile_exit == 0 else "==ERROR== the program failed\n")
    ncu = tmp_path / "ncu"
    ncu.write_text(f"""#!/bin/sh
case "$1" in
  --query-metrics) cat {tmp_path / "query.txt"} ;;
  --version) printf 'NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.3.1.0 (build 1)\\n' ;;
  *) cat {tmp_path / "profile.csv"}; exit {profile_exit} ;;
esac
""")
    ncu.chmod(0o755)
    return str(ncu)


def test_a_run_writes_each_designs_kernels_and_the_metrics_this_ncu_lacks(tmp_path):
    ncu_report = load_benchmark("ncu_report")
    out = tmp_path / "out"
    ncu_report.main(["--ncu", _stand_in_ncu(tmp_path, 0), "--variants", "default_bwd", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["ncu"] == ["Version 2025.3.1.0 (build 1)"] and report["shape"] == "1.3b-480p-81f"
    # QUERY knows three of the wished metrics: every other one is reported missing, none silently dropped.
    known = {"gpu__time_duration", "sm__pipe_tensor_op_gmma_cycles_active",
             "smsp__warp_issue_stalled_barrier_per_warp_active"}
    assert report["missing_metrics"] == [m for m in ncu_report.WISHED if m.split(".")[0] not in known]
    design = report["designs"]["default_bwd"]
    assert design["status"] == 0 and [k["metrics"]["gpu__time_duration.sum"] for k in design["kernels"]] == [
        4093120.0, 8250000.0]
    assert (out / "default_bwd.csv").read_text() == CSV


def test_a_design_without_kernels_fails_the_run_after_the_report(tmp_path):
    ncu_report = load_benchmark("ncu_report")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"\['fused_bwd'\] gave no counters of their own kernels"):
        ncu_report.main(["--ncu", _stand_in_ncu(tmp_path, 1), "--variants", "fused_bwd", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["designs"]["fused_bwd"] == {"status": 1, "kernels": []}


def test_source_plans_a_second_run_for_each_designs_own_kernels(capsys):
    load_benchmark("ncu_report").main(["--dry-run", "--source", "--variants", "default,fa4", "--band", "32"])
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in plan] == ["default", "default source", "fa4", "fa4 source"]
    for line, kernels in ((plan[1], "regex:mosaic"), (plan[3], "regex:flash_fwd")):
        assert f"--kernel-name {kernels} --section SourceCounters --section WarpStateStats --page source" in line
        assert "--clock-control none" in line and "--print-source sass" in line and "--metrics" not in line
    assert plan[1].endswith("--compile default --shape 1.3b-480p-81f --band 32")
    assert plan[3].endswith("fa4.py --once --shapes 1.3b-480p-81f --band 32")
