"""Worker processes and progress bars for the data steps (ingest, preprocess, synth)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm.auto import tqdm


def default_workers() -> int:
    """Both cores of a small machine; at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def progress_bar(total: int, desc: str, enabled: bool | None) -> tqdm:
    """A per-record progress bar; ``enabled=None``: shown when stderr is a terminal."""
    disable = not (sys.stderr.isatty() if enabled is None else enabled)
    return tqdm(total=total, desc=desc, unit="rec", disable=disable, leave=False)


def _init_worker(env: dict[str, str], initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    # Workers fork from the forkserver, which kept the environment of the moment it
    # started: take the caller's current one (S3 endpoint and credentials, ...).
    os.environ.clear()
    os.environ.update(env)
    if initializer is not None:
        initializer(*initargs)


def process_pool(
    workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A pool of fresh processes ("forkserver": safe when the parent runs threads, e.g.
    torch or boto3), with the data modules preloaded and the caller's environment."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ml.data.ingest", "ml.data.preprocess", "ml.data.synth"])
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(dict(os.environ), initializer, initargs),
    )
