"""The steps' view of the dataset store and the split file.

A *store* is the folder the preprocess step writes (``ml.data.store.ECGStore``: memory-
mapped signals ``(N, 12, 6144)``, a table with one row per record, the class list). A
*split file* is the JSON the split step writes (``ml.data.splits.Splits``): record ids per
part, so a split can be audited and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from components.common import StepError


def open_store(store_dir: Path):
    """The ``ml.data.store.ECGStore`` in ``store_dir``."""
    from ml.data.store import ECGStore

    store_dir = Path(store_dir)
    if not store_dir.exists():
        raise StepError(f"{store_dir}: dataset store not found")
    return ECGStore.open(store_dir)


def store_classes(store) -> list[str]:
    return [str(c) for c in store.classes]


def scored_labels(store, ids: Sequence[str]):
    """(n, 26) labels of the records ``ids`` over every class the Challenge 2021 scores
    (``ml.eval.challenge.scored_codes``): what the official Challenge score is computed on."""
    from ml.eval.challenge import scored_codes

    return store.label_matrix(scored_codes(), list(ids))


def dataset(store, ids: Sequence[str], classes: Sequence[str] | None = None):
    """A torch dataset of ``(x (12, 1, 6144), y (C,))`` for the records ``ids``."""
    from ml.data.store import StoreDataset

    return StoreDataset(store, list(ids), list(classes) if classes is not None else store_classes(store))
