"""benchmarks/steadiness.py's bookkeeping on made-up calls and nvidia-smi lines (the probe itself needs a GPU)."""

from benchmark_testing import load_benchmark


def test_summary_pairs_each_phase_with_the_samples_taken_while_it_ran(tmp_path):
    steadiness = load_benchmark("steadiness")
    smi = tmp_path / "smi.csv"
    smi.write_text("2026/11/29 21:00:00.000, 1980, 150.5, 50, 0x0000000000000000\n"
                   "garbage line\n"
                   "2026/11/29 21:00:01.000, 1650, 690.0, 60, 0x0000000000000004\n"
                   "2026/11/29 21:00:02.000, 1700, 688.0, 61, 0x0000000000000004\n")
    samples = steadiness.read_samples(str(smi))
    assert [s["sm_mhz"] for s in samples] == [1980, 1650, 1700] and samples[1]["power_w"] == 690.0
    t0 = samples[0]["t"]
    calls = [dict(phase="fast", t=t0 - 0.01, ms=11.0), dict(phase="fast", t=t0 + 0.01, ms=12.0),
             dict(phase="capped", t=t0 + 1.0, ms=13.0), dict(phase="capped", t=t0 + 2.0, ms=14.0),
             dict(phase="capped", t=t0 + 2.0, ms=13.5)]
    result = steadiness.summary(calls, samples, flops=2e12)
    assert list(result) == ["fast", "capped"]
    assert result["fast"]["calls"] == 2 and result["fast"]["median_ms"] == 11.5
    assert result["fast"]["sm_mhz_median"] == 1980 and result["fast"]["reasons"] == ["0x0000000000000000"]
    capped = result["capped"]
    assert capped["median_ms"] == 13.5 and capped["min_ms"] == 13.0 and capped["max_ms"] == 14.0
    assert capped["sm_mhz_min"] == 1650 and capped["sm_mhz_max"] == 1700 and capped["temp_c_max"] == 61
    # energy of a median call at the median power: 689 W x 13.5 ms; 2 TFLOP of on-block work a call
    assert abs(capped["joules_per_call"] - 689.0 * 13.5e-3) < 1e-9
    assert abs(capped["gflop_per_joule"] - 2e12 / (689.0 * 13.5e-3) / 1e9) < 1e-6


def test_timed_calls_block_once_a_batch_and_record_the_mean():
    import jax.numpy as jnp

    steadiness = load_benchmark("steadiness")
    made = []

    def fn():
        made.append(1)
        return jnp.full((4,), len(made))

    calls = steadiness.timed_calls(fn, 0.05, "p", batch=3)
    assert calls and len(made) == 3 * len(calls)
    assert all(c["phase"] == "p" and c["batch"] == 3 and c["ms"] > 0 for c in calls)
    assert [c["t"] for c in calls] == sorted(c["t"] for c in calls)


def test_summary_counts_the_calls_of_batched_timings_and_waits_for_the_last_one(tmp_path):
    steadiness = load_benchmark("steadiness")
    smi = tmp_path / "smi.csv"
    smi.write_text("2026/11/29 21:00:00.000, 1700, 690.0, 60, 0x0000000000000004\n"
                   "2026/11/29 21:00:00.040, 1600, 695.0, 61, 0x0000000000000004\n")
    samples = steadiness.read_samples(str(smi))
    t0 = samples[0]["t"]
    # two timings of 10 calls of 5 ms: the second starts at t0 + 0.01 and ends at t0 + 0.06
    calls = [dict(phase="p", t=t0 - 0.04, ms=5.0, batch=10), dict(phase="p", t=t0 + 0.01, ms=5.0, batch=10)]
    row = steadiness.summary(calls, samples)["p"]
    assert row["calls"] == 20 and row["timings"] == 2 and row["median_ms"] == 5.0
    assert row["sm_mhz_min"] == 1600 and row["sm_mhz_max"] == 1700  # the sample at t0 + 0.04 counts


def test_matmul_phase_is_rated_on_its_own_flops():
    steadiness = load_benchmark("steadiness")
    row = {"median_ms": 2.0, "joules_per_call": 1.5, "gflop_per_joule": 1.0}  # the attention's figure, replaced
    steadiness.rate_matmul(row, n=1024)
    assert abs(row["matmul_tflops"] - 2 * 1024**3 / 2.0e-3 / 1e12) < 1e-9
    assert abs(row["gflop_per_joule"] - 2 * 1024**3 / 1.5 / 1e9) < 1e-9
    bare = steadiness.rate_matmul({"median_ms": 1.0}, n=8)  # no power samples: no energy figure
    assert "gflop_per_joule" not in bare and bare["matmul_tflops"] == 2 * 8**3 / 1e-3 / 1e12


def test_variants_are_checked_before_any_gpu_work(capsys):
    import pytest

    steadiness = load_benchmark("steadiness")
    with pytest.raises(SystemExit) as exit_info:
        steadiness.main(["--variants", "default_fwd_typo"])
    assert exit_info.value.code == 2
    assert "unknown --variants default_fwd_typo" in capsys.readouterr().err
