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


def test_a_softmax_longer_than_the_wgmmas_that_hide_it_shows_even_without_latency():
    # The default loop hides one warpgroup's softmax behind the other's two wgmmas (2 x 512 cycles),
    # the overlapped order also behind its own P V (3 x 512): a 1,500-cycle softmax shows in the
    # first only, a 2,000-cycle one in both.
    model = load_benchmark("schedule_model")
    assert model.busy_fraction("default", softmax=1000, latency=0) > 0.99
    assert model.busy_fraction("default", softmax=1500, latency=0) < 0.75 < 0.95 < model.busy_fraction(
        "overlap", softmax=1500, latency=0)  # fmt: skip
    assert model.busy_fraction("overlap", softmax=2000, latency=0) < 0.8


def test_main_prints_one_row_per_latency(capsys):
    rows = load_benchmark("schedule_model").main(["--latencies", "50,150"])
    assert [r["latency"] for r in rows] == [50.0, 150.0] and len(capsys.readouterr().out.splitlines()) == 2
