"""Training metrics: one CSV row and one TensorBoard scalar per term and log interval."""

from __future__ import annotations

import csv
import os
from pathlib import Path


class MetricsWriter:
    """Appends rows to ``metrics.csv`` and mirrors them to TensorBoard (rank 0 only).

    On resume, rows logged after the checkpoint being resumed are dropped first, so the file
    describes exactly one trajectory.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] | None = None
        if self.path.exists():
            self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is a dependency, but metrics must never stop a run
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            return
        self.columns = list(rows[0].keys())
        kept = [row for row in rows if int(float(row["step"])) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # a kill while rewriting loses nothing
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(row.keys())
            with open(self.path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.columns).writeheader()
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: row.get(k, "") for k in self.columns})
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
