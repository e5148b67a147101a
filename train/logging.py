"""Training metrics as a CSV table and TensorBoard event files (written by tensorboardX).

    with MetricsLog("runs/tiny", purge_from=restored_step + 1) as log:   # purge_from=None on a fresh run
        log.text("config", toml_text)
        log.scalars(step, {"loss": 0.41, "lr": 1e-4, "s_per_step": 0.8})

Folder layout: metrics.csv (columns step, wall_time, then every metric name in first-seen order;
a metric first seen later widens the table, earlier rows left empty) and tensorboard/ (event
files; `tensorboard --logdir runs/`). Resuming: purge_from=S drops the CSV rows with step >= S
and makes TensorBoard discard the earlier run's events from step S on (tensorboardX's
purge_step), so the steps that run again after a restore appear once, with the resumed values.
Only one process writes: pass enabled=(jax.process_index() == 0) on several hosts.
"""

import csv
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from jax.typing import ArrayLike

CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
FIXED_COLUMNS = ("step", "wall_time")


class MetricsLog:
    """Appends scalar metrics per step to metrics.csv and TensorBoard; a context manager."""

    def __init__(self, folder: str | Path, *, purge_from: int | None = None, tensorboard: bool = True,
                 enabled: bool = True):  # fmt: skip
        self.folder = Path(folder)
        self.enabled = enabled
        self.columns: list[str] = list(FIXED_COLUMNS)
        self._writer = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._csv_path = self.folder / CSV_NAME
        rows = self._read_rows(purge_from)
        self._rewrite(rows)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ValueError("TensorBoard logging needs tensorboardX: pip install -e \".[train]\" "
                                 "(or log with tensorboard=False)") from None  # fmt: skip
            # tensorboardX names event files by the second; a run resumed within it would overwrite
            # the earlier file. The nanosecond suffix keeps both, sorted in the order written.
            self._writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=purge_from, flush_secs=10,
                                         filename_suffix=f".{time.time_ns()}")  # fmt: skip

    def scalars(self, step: int, metrics: Mapping[str, ArrayLike], *, wall_time: float | None = None) -> None:
        """Logs `metrics` (numbers: Python, numpy or 0-d jax arrays) at `step`."""
        if not self.enabled:
            return
        wall_time = time.time() if wall_time is None else wall_time
        values = {name: float(value) for name, value in metrics.items()}
        new = [name for name in values if name not in self.columns]
        if new:  # rare (a metric logged every K steps): rewrite the table once, wider
            self._rewrite(self._read_rows(None), extra=new)
        with self._csv_path.open("a", newline="") as f:
            row = {"step": step, "wall_time": f"{wall_time:.3f}", **{k: _format(v) for k, v in values.items()}}
            csv.DictWriter(f, self.columns).writerow(row)
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step, walltime=wall_time)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Logs a text (e.g. the run's config) to TensorBoard's text tab."""
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_rows(self, purge_from: int | None) -> list[dict[str, str]]:
        """Returns the CSV's rows (step < purge_from when given) and takes its columns."""
        if not self._csv_path.is_file():
            return []
        with self._csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or list(reader.fieldnames[:2]) != list(FIXED_COLUMNS):
                raise ValueError(f"{self._csv_path} is not a metrics table of ours (columns {reader.fieldnames}); "
                                 "give another log folder")  # fmt: skip
            self.columns = list(reader.fieldnames)
            rows = list(reader)
        return [r for r in rows if purge_from is None or int(r["step"]) < purge_from]

    def _rewrite(self, rows: list[dict[str, str]], extra: list[str] = ()) -> None:
        """Writes header + rows through a temporary file renamed into place."""
        self.columns += [name for name in extra if name not in self.columns]
        tmp = self._csv_path.with_name(f".{CSV_NAME}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self._csv_path)


def _format(value: float) -> str:
    """Shortest text that reads back to the same float; nan/inf spelled as Python reads them."""
    return repr(value) if math.isfinite(value) else str(value)


def read_csv(folder: str | Path) -> list[dict[str, float]]:
    """Returns metrics.csv's rows as {column: float} (empty cells left out)."""
    with (Path(folder) / CSV_NAME).open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
