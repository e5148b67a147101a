"""benchmarks/schedule_model.py: the latency model of the forward's two key-loop schedules."""

import pytest

from benchmark_testing import load_benchmark


def test_without_latency_both_schedules_keep_the_tensor_pipe_busy():
    model = load_benchmark("schedule_model")
    assert model.busy_fraction("default", latency=0) == pytest.approx(1.0, abs=0.01)
    assert model.busy_fraction("overlap", latency=0) == pytest.approx(1.0, abs=0.01)


def test_the_default_loop_loses_to_latency_where_the_overlapped_order_does_not():
    # Five sync points a step sit on the default loop's critical path; in FA3's order the other
    # warpgroup's two queued wgmmas cover them up to ~200 cycles each.
    model = load_benchmark("schedule_model")
    default = [model.busy_fraction("default", latency=lat) for lat in (30, 100, 200, 300)]
    overlap = [model.busy_fraction("overlap", latency=lat) for lat in (30, 100, 200, 300)]
    assert default == sorted(default, reverse=True) and default[2] < 0.75 < 0.9 < default[0]
    assert min(overlap[:3]) > 0.99 and overlap[3] < 0.9


def test_softmaxes_sharing_the_sm_bound_the_step_when_they_outlast_the_matmuls():
    # With one softmax at a time (shared_alu), two warpgroups' steps need at least 2 softmaxes of
    # time besides their 4 wgmmas: at 1,500 cycles a softmax no schedule keeps the pipe more than
    # 4 x 512 / 3,000 busy. Computing at once (shared_alu=False), the overlapped order hides it behind
    # its own P V and the other warpgroup's wgmmas; the default loop cannot (2 wgmmas, 1,024 cycles).
    model = load_benchmark("schedule_model")
    for program in ("default", "overlap"):
        assert model.busy_fraction(program, softmax=1500, latency=0) <= 4 * 512 / 3000 + 0.01, program
    assert model.busy_fraction("overlap", softmax=1500, latency=0, shared_alu=False) > 0.95
    assert model.busy_fraction("default", softmax=1500, latency=0, shared_alu=False) < 0.75


def test_main_prints_one_row_per_latency(capsys):
    rows = load_benchmark("schedule_model").main(["--latencies", "50,150"])
    assert [r["latency"] for r in rows] == [50.0, 150.0] and len(capsys.readouterr().out.splitlines()) == 2
