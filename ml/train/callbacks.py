"""Trainer callbacks that record a run (see :class:`ml.train.trainer.Callback`).

:class:`CurveRecorder` appends every step's and every validation's metrics to a JSONL
file as they happen, so the curves of a run survive its process. A run resumed from a
checkpoint at step s replays the steps after s: the recorder first drops the rows past s
(:func:`truncate_curves`), so the file ends up as an uninterrupted run's would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml.train.trainer import TrainResult

# Validation records carry these too; they are the training side's, not validation metrics.
_NOT_VALIDATION = ("step", "train_loss", "lr")


def read_curves(path: Path) -> list[dict[str, float]]:
    """The rows of a curves file (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_curves(path: Path, keep_until: int) -> None:
    """Drop rows logged after ``keep_until`` (they are replayed after a resume)."""
    rows = [r for r in read_curves(path) if r["step"] <= keep_until]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


class CurveRecorder:
    """Appends ``{"step", "train_*"}`` per step and ``{"step", "valid_*"}`` per validation."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = Path(path)
        truncate_curves(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, float]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"step": step, **{f"train_{k}": float(v) for k, v in metrics.items()}})

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        valid = {f"valid_{k}": float(v) for k, v in metrics.items() if k not in _NOT_VALIDATION}
        self._write({"step": step, **valid})

    def on_end(self, result: TrainResult) -> None:
        self._file.close()
