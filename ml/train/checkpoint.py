"""Training-state checkpoints (pre-training and fine-tuning): one atomic save, one safe load.

A checkpoint is a dict of tensors and plain Python values (numbers, strings, lists,
tuples, dicts): model and optimizer state, RNG states, positions in the data. It is
written to a temporary file next to the target, flushed and fsynced, then renamed over
it, so a reader (or a resumed run) sees the previous complete checkpoint or the new one,
never half of one. It is read with ``torch.load(weights_only=True)``: a pickle holding any
other object is refused (CheckpointError) and nothing in it runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ml.io import atomic_path
from ml.model.adapter import CheckpointError, torch_load_checked


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: temporary file, flush, fsync, rename.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, on the CPU (tensors and plain types only)."""
    state = torch_load_checked(path, "a training checkpoint of tensors and plain types")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(state).__name__}, not a dict)")
    return state
