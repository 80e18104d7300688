"""The per-step CSV log of a run: appended row by row and flushed, so a killed run keeps what it logged, and a
resumed run continues the same file (rows past the checkpoint it resumes from are dropped first, since those
steps run again): every step appears exactly once."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from fabric_quant.checkpoint import atomic_write_bytes

COLUMNS = ("step", "train_loss", "lr", "val_loss", "val_accuracy", "val_perplexity")


class StepLog:
    def __init__(self, path: Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        kept = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= resume_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (kept open for the run)
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")

    def log(self, step: int, **values: float) -> None:
        self._writer.writerow({"step": step, **values})
        self._file.flush()

    def sync(self) -> None:
        """Make what was logged durable (called with each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
