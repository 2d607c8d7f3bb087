"""A dataset store of random signals and labels (``ml.data.store``), for the pre-training tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def write_random_store(
    path: Path, n: int, classes: Sequence[str], *, seed: int = 1, unlabelled_last: bool = False, chunk: int = 32
) -> None:
    """``n`` records of N(0, 1) signals (12 x 6144, written ``chunk`` rows at a time: a large
    store never sits in memory) with random subsets of ``classes`` as labels; ids ``R000``...
    ``unlabelled_last``: the last record is unlabelled (pre-training must leave it out)."""
    from ml.data.store import StoreWriter, join_codes, write_rows

    rng = np.random.default_rng(seed)
    labels = [[c for c in classes if rng.random() < 0.4] for _ in range(n)]
    with StoreWriter(path, n, 6144) as writer:
        for first in range(0, n, chunk):
            rows = rng.standard_normal((min(chunk, n - first), 12, 6144), dtype=np.float32)
            write_rows(writer.signals_path, writer.data_offset, first, rows)
        table = pd.DataFrame(
            {
                "id": [f"R{i:03d}" for i in range(n)],
                "labels": [join_codes(c) for c in labels],
                "labelled": [not (unlabelled_last and i == n - 1) for i in range(n)],
                "content_hash": [f"h{i}" for i in range(n)],
            }
        )
        writer.commit(table, {"classes": list(classes)})
