"""train/logging.py: the CSV and the TensorBoard event files read back (by tensorboard's own
EventAccumulator), a metric first seen late, and a resume that purges the re-run steps."""

import numpy as np
import pytest

from train.logging import CSV_NAME, TENSORBOARD_DIR, MetricsLog, read_csv


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD_DIR))  # purges orphaned events as TensorBoard shows them
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_read_back_from_csv_and_tensorboard(tmp_path):
    losses = [0.9, 0.7, 0.55, 0.5]
    with MetricsLog(tmp_path) as log:
        log.text("config", "rank = 32")
        for step, loss in enumerate(losses, 1):
            log.scalars(step, {"loss": np.float32(loss), "lr": 1e-4 * step})
    rows = read_csv(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-7)  # float32 inputs
    assert [r["lr"] for r in rows] == [1e-4 * s for s in range(1, 5)]  # exact: repr round-trips
    scalars = _tensorboard_scalars(tmp_path)
    assert sorted(scalars) == ["loss", "lr"]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], losses, rtol=1e-6)


def test_a_metric_first_logged_later_widens_the_table(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.scalars(1, {"loss": 1.0})
        log.scalars(2, {"loss": 0.5, "sample_seconds": 3.0})
        log.scalars(3, {"loss": 0.25})
    header = (tmp_path / CSV_NAME).read_text().splitlines()[0]
    assert header == "step,wall_time,loss,sample_seconds"
    rows = read_csv(tmp_path)
    assert [r.get("sample_seconds") for r in rows] == [None, 3.0, None]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 0.25]


def test_resume_purges_the_steps_that_run_again(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in range(1, 7):  # the first run got to step 6; its checkpoint is from step 3
            log.scalars(step, {"loss": float(step)})
    with MetricsLog(tmp_path, purge_from=4) as log:
        for step in range(4, 8):
            log.scalars(step, {"loss": 10.0 * step})
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]
    assert [(int(r["step"]), r["loss"]) for r in read_csv(tmp_path)] == want
    assert _tensorboard_scalars(tmp_path)["loss"] == want


def test_a_disabled_log_writes_nothing(tmp_path):
    with MetricsLog(tmp_path / "run", enabled=False) as log:
        log.scalars(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_a_foreign_csv_is_refused(tmp_path):
    (tmp_path / CSV_NAME).write_text("epoch,acc\n1,0.5\n")
    with pytest.raises(ValueError, match="not a metrics table of ours"):
        MetricsLog(tmp_path, tensorboard=False)
