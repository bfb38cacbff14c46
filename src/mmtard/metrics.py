"""Training metrics: one CSV row and one TensorBoard scalar per term and log interval."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from pathlib import Path

from mmtard.checkpoint import atomic_write_text, unused_name

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends rows to ``metrics.csv`` and mirrors them to TensorBoard (rank 0 only).

    On resume, rows logged after the checkpoint being resumed are dropped first, so the file
    describes exactly one trajectory; a term first logged later widens the header rather than
    being dropped.
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
        rows: list[dict] = []
        # bytes that are not UTF-8 (a damaged sector) read as U+FFFD, which no number parses: the
        # damaged-row path below handles them as any other damage
        with open(self.path, newline="", encoding="utf-8", errors="replace") as handle:
            try:
                rows.extend(csv.DictReader(handle))
            except csv.Error:  # unreadable from here on: an empty row marks where
                rows.append({})
        kept, last_step = [], None
        for line, row in enumerate(rows, start=2):
            try:  # a row cut short by a crash of the machine lacks fields, or has a cut step number
                if None in row or None in row.values():
                    raise ValueError("wrong number of fields")
                if any("\ufffd" in value for value in row.values()):
                    raise ValueError("bytes that are not UTF-8")
                row_step = int(float(row["step"]))
                if last_step is not None and row_step <= last_step:
                    raise ValueError("step out of order")
                last_step = row_step
            except (KeyError, TypeError, ValueError):
                damaged = unused_name(self.path.with_name(f"{self.path.name}.damaged"))
                shutil.copyfile(self.path, damaged)
                log.warning("%s: line %d is damaged; it and the lines after it are dropped (the file as it "
                            "was is kept in %s)", self.path, line, damaged)
                break
            if row_step <= step:
                kept.append(row)
        if not kept:  # nothing of this trajectory: the next row writes a fresh header
            self.path.unlink()
            return
        self._rewrite(list(rows[0].keys()), kept)

    def _rewrite(self, columns: list[str], rows: list[dict]) -> None:
        """The file as ``columns`` and ``rows``, written atomically: a kill loses nothing."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(text.getvalue(), self.path)
        self.columns = columns

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if self.columns is None:
            self._rewrite(list(row.keys()), [])
        new = [k for k in row if k not in self.columns]
        if new:  # a term this run did not log before (e.g. resumed by a newer version): widen the file
            with open(self.path, newline="", encoding="utf-8") as handle:
                self._rewrite(self.columns + new, list(csv.DictReader(handle)))
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({k: row.get(k, "") for k in self.columns})
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)

    def flush(self) -> None:
        """Make the rows written so far durable (the CSV fsynced, TensorBoard's events flushed):
        called before each checkpoint, since a resumed run never writes the rows up to it again."""
        if self.path.exists():
            with open(self.path, "rb+") as handle:
                os.fsync(handle.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
