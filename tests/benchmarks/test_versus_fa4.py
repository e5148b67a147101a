"""benchmarks/versus_fa4.py: the alternating rounds and their summary on made-up calls, and a CPU dry run."""

import json

import pytest
from benchmark_testing import load_benchmark


def test_rounds_alternate_which_side_goes_first_and_time_each_sides_calls(monkeypatch):
    versus = load_benchmark("versus_fa4")
    now = [0.0]
    monkeypatch.setattr(versus.time, "perf_counter", lambda: now[0])
    log = []

    def side(name, ms):
        def call():
            now[0] += ms / 1e3  # each call takes ms of the host's clock
            log.append(name)
            return name
        return call, lambda result: log.append(f"wait {result}")

    samples = versus.interleaved_ms({"ours": side("ours", 2.0), "fa4": side("fa4", 3.0)}, rounds=3, calls=2,
                                    settle_s=0.0)
    assert samples == {"ours": pytest.approx([2.0] * 3), "fa4": pytest.approx([3.0] * 3)}
    settle, timed = log[:4], log[4:]
    assert settle == ["ours", "wait ours", "fa4", "wait fa4"]  # one waited call each before timing
    turns = [timed[i:i + 3] for i in range(0, len(timed), 3)]  # a turn: two calls, one wait
    assert [t[0] for t in turns] == ["ours", "fa4", "fa4", "ours", "ours", "fa4"]
    assert all(t[1] == t[0] and t[2] == f"wait {t[0]}" for t in turns)


def test_summary_takes_each_rounds_ratio_and_their_median():
    versus = load_benchmark("versus_fa4")
    result = versus.summary({"ours": [2.0, 4.0, 3.0], "fa4": [3.0, 4.0, 2.7]})
    assert result["ours_ms"] == 3.0 and result["fa4_ms"] == 3.0
    assert result["ours_speed_vs_fa4"] == pytest.approx(1.0)  # rounds 1.5, 1.0, 0.9
    assert result["ratio_min"] == pytest.approx(0.9) and result["ratio_max"] == pytest.approx(1.5)


def test_dry_run_times_the_triton_twin_against_the_reference_on_the_cpu(tmp_path):
    versus = load_benchmark("versus_fa4")
    out = tmp_path / "versus.json"
    rows = versus.main(["--dry-run", "--rounds", "2", "--calls", "1", "--settle", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["device"] == "cpu" and "--dry-run" in saved["command"]
    (row,) = rows
    assert row["shape"] == "tiny" and len(row["rounds_ms"]["ours"]) == len(row["rounds_ms"]["fa4"]) == 2
    assert row["ratio_min"] <= row["ours_speed_vs_fa4"] <= row["ratio_max"] and row["ours_tflops"] > 0


def test_a_variant_is_reported_against_ours_round_by_round():
    versus = load_benchmark("versus_fa4")
    result = versus.summary({"ours": [2.0, 4.0], "ours_lazy": [1.0, 5.0]})
    assert "ours_speed_vs_fa4" not in result and result["ours_lazy_ms"] == 3.0
    assert result["ours_lazy_speed_vs_ours"] == pytest.approx((2.0 + 0.8) / 2)  # rounds 2.0x and 0.8x
    assert result["ours_lazy_ratio_min"] == pytest.approx(0.8) and result["ours_lazy_ratio_max"] == pytest.approx(2.0)


def test_dry_run_with_a_variant_and_without_the_peer(tmp_path):
    versus = load_benchmark("versus_fa4")
    (row,) = versus.main(["--dry-run", "--no-fa4", "--variants", "lazy_rescale_fwd", "--rounds", "2", "--calls", "1",
                          "--settle", "0"])
    assert set(row["rounds_ms"]) == {"ours", "ours_lazy_rescale_fwd"} and "fa4_ms" not in row
    assert row["ours_lazy_rescale_fwd_ratio_min"] <= row["ours_lazy_rescale_fwd_speed_vs_ours"]
    with pytest.raises(SystemExit):
        versus.main(["--dry-run", "--variants", "no_such_design"])
