"""benchmarks/workers.py: a worker child's rows are read back, the last print of each winning,
including those printed before the child was killed."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("benchmark_workers", REPO / "benchmarks" / "workers.py")
workers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workers)

CHILD = """
import json, time
for row in ({"config": "a", "v": 1}, {"config": "b", "v": 1}, {"config": "a", "v": 2}):
    print("RESULT " + json.dumps(row), flush=True)
time.sleep({sleep})
"""


def child(sleep: float) -> list[str]:
    return [sys.executable, "-c", CHILD.replace("{sleep}", str(sleep))]


def test_run_child_rows_keeps_last_row_per_key_in_first_print_order():
    rows, failure = workers.run_child_rows(child(0), timeout=60, dry_run=True, key="config")
    assert rows == [{"config": "a", "v": 2}, {"config": "b", "v": 1}] and failure is None


def test_run_child_rows_keeps_rows_printed_before_a_timeout():
    rows, failure = workers.run_child_rows(child(60), timeout=3, dry_run=True, key="config")
    assert rows == [{"config": "a", "v": 2}, {"config": "b", "v": 1}] and "timed out" in failure


def test_run_child_returns_the_one_row_or_an_error_row():
    assert workers.run_child(child(0), timeout=60, dry_run=True) == {"config": "a", "v": 2}
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    assert "timed out" in workers.run_child(silent, timeout=3, dry_run=True)["error"]
