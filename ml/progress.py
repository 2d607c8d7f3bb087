"""Lines a pipeline task shows on the terminal of ``cessl run``.

A task's output goes to the run's log file; ``cessl run`` (``pipeline.dags.finetune``) forwards
the lines that start with :data:`PROGRESS_PREFIX` to the terminal: the fine-tune's progress
(:class:`ml.train.callbacks.ProgressLine`) and what a step must say loudly (:func:`announce`).
No torch here: any step may import it.
"""

from __future__ import annotations

import sys
from typing import TextIO

PROGRESS_PREFIX = "cessl-progress "


def announce(text: str, stream: TextIO | None = None) -> None:
    """``text`` as one forwarded line (flushed: a task's output is a pipe); a reader that is
    gone is no reason to fail."""
    stream = stream or sys.stdout
    try:
        stream.write(PROGRESS_PREFIX + text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass
