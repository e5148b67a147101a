"""benchmarks/call_latency.py: the median of its timing loop, and a CPU run of the script end to end."""

import json

from benchmark_testing import load_benchmark


def test_median_us_times_the_call_and_its_wait_together(monkeypatch):
    call_latency = load_benchmark("call_latency")
    clock = iter(range(0, 1000, 2))  # each perf_counter() reading 2 s after the last
    monkeypatch.setattr(call_latency.time, "perf_counter", lambda: next(clock))
    waited = []
    us = call_latency.median_us(lambda: 7, waited.append, iters=3, warmup=1)
    assert waited == [7, 7, 7, 7]  # one warmup call and three timed, each result waited on
    assert us == 2e6  # a call and its wait between two readings: 2 s


def test_script_reports_the_jax_call_on_the_cpu(tmp_path):
    call_latency = load_benchmark("call_latency")
    out = tmp_path / "latency.json"
    result = call_latency.main(["--iters", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["jax_device"].startswith("cpu") and 0 < result["jax_tiny_call_us"] < 1e6
    assert "torch_tiny_call_us" not in result  # torch without CUDA: no torch figure
