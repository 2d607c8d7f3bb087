"""Test / labelled-train / labelled-valid / unlabelled splits (multi-label stratified).

The paper's protocol: of the labelled records, 10% go to the test set; of the rest a
small labelled fraction (5% by default) keeps its labels and the remainder is treated as
unlabelled; the labelled part is split 80/20 into train and validation. Every cut uses
multi-label iterative stratification (Sechidis et al. 2011, the maintained
``iterative-stratification`` package), so rare diagnoses appear in every part in
proportion. Records without a ``# Dx`` line can only be unlabelled.

Deterministic for a seed, independent of the order the records come in (ids are sorted
first). Saved as JSON lists of ids, so a split can be audited and reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.io import atomic_write_text

PARTS: tuple[str, ...] = ("test", "train", "valid", "unlabelled")


def ids_hash(ids: Iterable[str]) -> str:
    """Order-independent hash of a set of record ids (e.g. the test split)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


@dataclass
class Splits:
    """Record ids of each part of a split, the classes, and the parameters that made it."""

    test: list[str]
    train: list[str]
    valid: list[str]
    unlabelled: list[str]
    classes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    test_hashes: dict[str, str] = field(default_factory=dict)  # test id -> content hash (empty: unknown)
    # the content hashes of the records trained on (train, valid, unlabelled; sorted, unique;
    # empty: unknown): a test-set redraw avoids their bytes under any id (ml.data.testset)
    trained_hashes: list[str] = field(default_factory=list)
    testset: dict[str, Any] = field(default_factory=dict)  # the frozen test set used (ml.data.testset), if any

    @property
    def test_split_hash(self) -> str:
        """Identifies the test set: models are only compared on the same one."""
        return ids_hash(self.test)

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in PARTS}

    def to_dict(self) -> dict[str, Any]:
        """The id lists, classes and params, plus the derived test-split hash and sizes."""
        return {**asdict(self), "test_split_hash": self.test_split_hash, "sizes": self.sizes()}

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable split file ({err})") from err
        missing = [part for part in PARTS if part not in data]
        if missing:
            raise ValueError(f"{path}: split file lacks the parts {missing}")
        return cls(
            **{part: [str(i) for i in data[part]] for part in PARTS},
            classes=list(data.get("classes", [])),
            params=dict(data.get("params", {})),
            test_hashes={str(k): str(v) for k, v in data.get("test_hashes", {}).items()},
            trained_hashes=[str(h) for h in data.get("trained_hashes", [])],
            testset=dict(data.get("testset", {})),
        )


def stratified_cut(y: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with ``n_second`` rows in the second part, stratified on y."""
    n = len(y)
    if n_second <= 0:
        return np.arange(n), np.array([], dtype=np.int64)
    if n_second >= n:
        return np.array([], dtype=np.int64), np.arange(n)
    if y.shape[1] == 0 or not y.any():
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[n_second:]), np.sort(perm[:n_second])
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if y.shape[1] == 1:  # the library wants a multi-label matrix: add the complement
        y = np.hstack([y, 1 - y])

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_second, random_state=seed)
    first, second = next(splitter.split(np.zeros((n, 1)), y))
    return np.sort(first), np.sort(second)


def make_splits(
    ids: Sequence[str],
    y: np.ndarray,
    *,
    labelled: Sequence[bool] | np.ndarray | None = None,
    test_size: float = 0.1,
    labelled_ratio: float = 0.05,
    valid_size: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] = (),
    test_seed: int | None = None,
) -> Splits:
    """Split records into test / train / valid / unlabelled id lists.

    ``y`` is the (N, C) multi-hot label matrix of ``ids``; ``labelled[i]`` is False for
    records without diagnoses (they go to ``unlabelled``). Sizes are rounded to whole
    records: test = round(test_size * labelled records), labelled = round(labelled_ratio *
    the rest) (at least 2 when any: one to train on, one to validate), valid =
    round(valid_size * labelled) (at least 1).

    ``test_seed``: the seed of the test cut alone (None: drawn from ``seed``, as before), so
    that runs with different seeds (a comparison's) share one test part: the test cut
    depends only on the labelled records, ``test_size`` and this seed.
    """
    ids = [str(i) for i in ids]
    y = np.asarray(y, dtype=np.int8).reshape(len(ids), -1)
    if len(set(ids)) != len(ids):
        raise ValueError("record ids must be unique to split them")
    for name, value in (("test_size", test_size), ("labelled_ratio", labelled_ratio), ("valid_size", valid_size)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    lab = np.ones(len(ids), bool) if labelled is None else np.asarray(labelled, dtype=bool)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")  # independent of input order
    ids_sorted = [ids[i] for i in order]
    y, lab = y[order], lab[order]

    pool = np.flatnonzero(lab)
    never_labelled = [ids_sorted[i] for i in np.flatnonzero(~lab)]
    seeds = np.random.SeedSequence(seed).generate_state(3)

    n_test = round(test_size * len(pool))
    test_state = seeds[0] if test_seed is None else np.random.SeedSequence(test_seed).generate_state(3)[0]
    rest_local, test_local = stratified_cut(y[pool], n_test, int(test_state))
    rest = pool[rest_local]
    n_lab = round(labelled_ratio * len(rest))
    if labelled_ratio > 0 and len(rest) >= 2:
        n_lab = max(n_lab, 2)
    unl_local, lab_local = stratified_cut(y[rest], n_lab, int(seeds[1]))
    labelled_part = rest[lab_local]
    n_valid = round(valid_size * len(labelled_part))
    if valid_size > 0 and len(labelled_part) >= 2:
        n_valid = max(n_valid, 1)
    train_local, valid_local = stratified_cut(y[labelled_part], n_valid, int(seeds[2]))

    def pick(index: np.ndarray) -> list[str]:
        return [ids_sorted[i] for i in index]

    return Splits(
        test=pick(pool[test_local]),
        train=pick(labelled_part[train_local]),
        valid=pick(labelled_part[valid_local]),
        unlabelled=sorted(pick(rest[unl_local]) + never_labelled),
        classes=list(classes),
        params={"test_size": test_size, "labelled_ratio": labelled_ratio, "valid_size": valid_size, "seed": seed}
        | ({} if test_seed is None or test_seed == seed else {"test_seed": test_seed}),
    )


def split_store(store, *, classes: Sequence[str] | None = None, **kwargs: Any) -> Splits:
    """:func:`make_splits` over every record of an :class:`~ml.data.store.ECGStore`."""
    classes = list(store.classes if classes is None else classes)
    splits = make_splits(
        store.ids, store.label_matrix(classes), labelled=store.labelled_mask(), classes=classes, **kwargs
    )
    if "content_hash" in store.table.columns:
        hash_of = dict(zip(store.ids, store.table["content_hash"].astype(str), strict=True))
        splits.test_hashes = {i: hash_of[i] for i in splits.test}
        splits.trained_hashes = trained_hashes(splits, hash_of)
    return splits


def trained_hashes(splits: Splits, hash_of: dict[str, str]) -> list[str]:
    """The content hashes of ``splits``' train, valid and unlabelled records (sorted, unique)."""
    return sorted(
        {hash_of[i] for part in ("train", "valid", "unlabelled") for i in getattr(splits, part) if hash_of.get(i)}
    )


def label_proportions(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    return y.mean(axis=0) if len(y) else np.zeros(y.shape[1])


def stratification_error(y_all: np.ndarray, y_part: np.ndarray) -> float:
    """Mean absolute difference of per-class prevalence between a part and the whole."""
    return float(np.abs(label_proportions(y_all) - label_proportions(y_part)).mean())
