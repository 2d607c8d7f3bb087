"""Step: deterministic multi-label stratified split of the store into id lists.

10% test; of the rest a labelled fraction (``labelled_ratio``) keeps its labels and is
split 80/20 into train / valid; the remainder is the unlabelled part. Same store and seed,
same split. Written as ids (``ml.data.splits.Splits``) so it can be audited.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from components.common import StepError, sha256_json
from components.data_access import open_store, store_classes
from ml.data.splits import Splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitConfig:
    labelled_ratio: float = 0.05
    seed: int = 0
    test_ratio: float = 0.1
    valid_ratio: float = 0.2  # of the labelled part

    def __post_init__(self) -> None:
        for name in ("labelled_ratio", "test_ratio", "valid_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")


@dataclass(frozen=True)
class SplitResult:
    sizes: dict[str, int]
    test_split_hash: str
    fingerprint: str


def split_step(store_dir: Path, out_path: Path, config: SplitConfig) -> SplitResult:
    """Split the store in ``store_dir``; write the id lists to ``out_path`` (JSON)."""
    from ml.data.splits import split_store

    store = open_store(store_dir)
    splits = split_store(
        store,
        test_size=config.test_ratio,
        labelled_ratio=config.labelled_ratio,
        valid_size=config.valid_ratio,
        seed=config.seed,
    )
    ids = Splits(
        test=[str(i) for i in splits.test],
        train=[str(i) for i in splits.train],
        valid=[str(i) for i in splits.valid],
        unlabelled=[str(i) for i in splits.unlabelled],
        classes=store_classes(store),
        params=asdict(config),
    )
    if not ids.train or not ids.valid or not ids.test:
        raise StepError(
            f"{store_dir}: split {ids.sizes()} leaves an empty labelled train, valid or test part "
            f"(labelled_ratio {config.labelled_ratio} of {len(store.table)} records is too small)"
        )
    ids.save(out_path)
    log.info("split %s: %s (test split %s)", store_dir, ids.sizes(), ids.test_split_hash[:12])
    return SplitResult(sizes=ids.sizes(), test_split_hash=ids.test_split_hash, fingerprint=sha256_json(ids.to_dict()))
