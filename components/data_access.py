"""The steps' view of the dataset store and the split file.

A *store* is the folder the preprocess step writes (``ml.data.store.ECGStore``: memory-
mapped signals ``(N, 12, 6144)``, a table with one row per record, the class list). A
*split file* is the JSON the split step writes: record ids per part, so a split can be
audited and reused::

    {"test": [...], "train": [...], "valid": [...], "unlabelled": [...],
     "classes": [...], "config": {...}, "test_split_hash": "..."}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.common import StepError, ids_hash, read_json, write_json

PARTS: tuple[str, ...] = ("test", "train", "valid", "unlabelled")


@dataclass(frozen=True)
class SplitIds:
    """Record ids of each part of a split."""

    test: list[str]
    train: list[str]
    valid: list[str]
    unlabelled: list[str]
    classes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def test_split_hash(self) -> str:
        return ids_hash(self.test)

    def sizes(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in PARTS}

    def to_json(self) -> dict[str, Any]:
        return {**{part: list(getattr(self, part)) for part in PARTS}, "classes": list(self.classes),
                "config": dict(self.config), "test_split_hash": self.test_split_hash, "sizes": self.sizes()}

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> SplitIds:
        data = read_json(path, "split file")
        missing = [part for part in PARTS if part not in data]
        if missing:
            raise StepError(f"{path}: split file lacks the parts {missing}")
        return cls(**{part: [str(i) for i in data[part]] for part in PARTS},
                   classes=list(data.get("classes", [])), config=dict(data.get("config", {})))


def open_store(store_dir: Path):
    """The ``ml.data.store.ECGStore`` in ``store_dir``."""
    from ml.data.store import ECGStore

    store_dir = Path(store_dir)
    if not store_dir.exists():
        raise StepError(f"{store_dir}: dataset store not found")
    return ECGStore.open(store_dir)


def store_classes(store) -> list[str]:
    return [str(c) for c in store.classes]


def dataset(store, ids: Sequence[str], classes: Sequence[str] | None = None):
    """A torch dataset of ``(x (12, 1, 6144), y (C,))`` for the records ``ids``."""
    from ml.data.store import StoreDataset

    return StoreDataset(store, list(ids), list(classes) if classes is not None else store_classes(store))


def signals_and_labels(store, ids: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Signals ``(N, 12, 6144)`` float32 and labels ``(N, C)`` of the records ``ids``."""
    if not ids:
        raise StepError(f"{store.path}: no records to read (empty id list)")
    return store.read(store.rows(list(ids))), store.label_matrix(list(classes), list(ids))
