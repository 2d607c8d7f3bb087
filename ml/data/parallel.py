"""Worker processes for the data steps (ingest, preprocess, synth)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def default_workers() -> int:
    """Both cores of a small machine; at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def process_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of fresh processes ("forkserver": safe when the parent runs threads, e.g.
    torch or boto3), with the data modules preloaded."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ml.data.ingest", "ml.data.preprocess", "ml.data.synth"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer, initargs=initargs)
