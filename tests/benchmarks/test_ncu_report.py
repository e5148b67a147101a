"""benchmarks/ncu_report.py on the CPU: its choice of metrics, its reading of ncu's CSV and its plan;
the profiling itself needs a GPU and Nsight Compute."""

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


def test_unknown_design_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("ncu_report").main(["--dry-run", "--variants", "fused_typo"])
    assert "fused_typo" in capsys.readouterr().err


def test_a_missing_ncu_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="pass --ncu PATH"):
        load_benchmark("ncu_report").main(["--ncu", str(tmp_path / "no-ncu"), "--out", str(tmp_path / "out")])
