"""Trainer callbacks that record a run (see :class:`ml.train.trainer.Callback`).

:class:`CurveRecorder` appends every step's and every validation's metrics to a JSONL
file as they happen, so the curves of a run survive its process. A run resumed from a
checkpoint at step s replays the steps after s: the recorder first drops the rows past s
(:func:`truncate_curves`), so the file ends up as an uninterrupted run's would.

:class:`StepProfiler` measures what a method costs per training step, validations left
out: the mean wall time of a step (augment, forward, backward, optimizer) and the peak
memory over the steps. CUDA: ``torch.cuda.max_memory_allocated`` (the whole footprint:
weights, batches, gradients, optimizer state, activations; peak statistics reset after
each validation). CPU: the growth of the process's peak RSS (``VmHWM``, reset after each
validation where the kernel allows it) over its RSS when training started - an
approximation (the allocator's caches blur it), named as such by :attr:`memory_measure`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ml.progress import PROGRESS_PREFIX  # `cessl run` forwards these lines of a task's output to the terminal

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


# What StepProfiler.peak_memory_mb measured, by device type.
CUDA_MEMORY = "cuda max_memory_allocated"
CPU_MEMORY = "cpu peak RSS growth"


def _proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (None where there is no procfs)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class StepProfiler:
    """Mean milliseconds per training step and peak memory (MB) over the steps.

    The trainer calls ``on_step`` every ``log_every`` steps, after it has read the window's
    losses back (so the CUDA steps have finished); an interval from the previous call (or
    validation) to this one is divided among the steps it covers. The intervals that contain
    a validation are not counted, nor those holding any of the first ``warmup`` steps (lazy
    initialisation, allocator growth). Peak memory counts every step.
    """

    def __init__(self, device: torch.device | str, warmup: int = 1) -> None:
        self.device = torch.device(device)
        self.memory_measure = CUDA_MEMORY if self.device.type == "cuda" else CPU_MEMORY
        self.warmup = warmup
        self._seen = 0  # steps observed, warm-up included
        self.steps = 0  # steps timed
        self.step_seconds = 0.0
        self._last: float | None = None
        self._last_step: int | None = None
        self._peak_bytes = 0
        self._base_kb: int | None = None

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.step_seconds / self.steps if self.steps else float("nan")

    @property
    def peak_memory_mb(self) -> float:
        return self._peak_bytes / 2**20 if self._seen else float("nan")

    def _restart(self) -> None:
        """Start a new measured stretch (after a validation, or at the start)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
            if self._base_kb is None:
                self._base_kb = _proc_status_kb("VmRSS")
        self._last = time.perf_counter()

    def _sample_memory(self) -> None:
        if self.device.type == "cuda":
            self._peak_bytes = max(self._peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        peak = _proc_status_kb("VmHWM")
        if peak is not None and self._base_kb is not None:
            self._peak_bytes = max(self._peak_bytes, (peak - self._base_kb) * 1024)

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if self._last is None:  # a run resumed without a validation first
            self._restart()
            self._last_step = step
            return
        covered = max(1, step - self._last_step) if self._last_step is not None else 1
        self._seen += covered
        if self._seen - covered >= self.warmup:
            self.steps += covered
            self.step_seconds += now - self._last
        self._sample_memory()
        self._last_step = step
        self._last = time.perf_counter()

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        self._restart()
        self._last_step = step

    def on_end(self, result: TrainResult) -> None:
        self._last = self._last_step = None

    def summary(self) -> dict[str, float | str]:
        """``ms_per_step``, ``peak_memory_mb`` (NaN before any step) and ``memory_measure``."""
        return {
            "ms_per_step": self.ms_per_step,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_measure": self.memory_measure,
        }


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLine:
    """One progress line (step, loss, last validation mAP, ETA) on ``stream``, after every
    validation and at most every ``interval`` seconds between them, each starting with
    :data:`PROGRESS_PREFIX` and flushed (a pipeline task's output is a pipe)."""

    def __init__(
        self,
        total_steps: int,
        stream=None,
        interval: float = 10.0,
        label: str = "fine-tune",
        clock=time.monotonic,
    ) -> None:
        self.total, self.stream, self.interval, self.label, self.clock = total_steps, stream, interval, label, clock
        self._start: float | None = None
        self._start_step = 0
        self._last = float("-inf")
        self._loss: float | None = None
        self._map: float | None = None

    def line(self, step: int) -> str:
        parts = [f"{self.label}: step {step}/{self.total}"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._map is not None:
            parts.append(f"valid mAP {self._map:.4f}")
        if self._start is not None and step > self._start_step:
            per_step = (self.clock() - self._start) / (step - self._start_step)
            parts.append(f"ETA {_duration(per_step * max(self.total - step, 0))}")
        return PROGRESS_PREFIX + " | ".join(parts)

    def _emit(self, step: int) -> None:
        import sys

        stream = self.stream or sys.stdout
        try:
            stream.write(self.line(step) + "\n")
            stream.flush()
        except (OSError, ValueError):  # the reader is gone: progress is not worth failing for
            pass
        self._last = self.clock()

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._start is None:  # the ETA counts from the end of this process's first step
            self._start, self._start_step = self.clock(), step
        if "loss" in metrics:
            self._loss = float(metrics["loss"])
        if self.clock() - self._last >= self.interval:
            self._emit(step)

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        if "macro_map" in metrics:
            self._map = float(metrics["macro_map"])
        self._emit(step)

    def on_end(self, result: TrainResult) -> None:
        pass
