"""The frozen evaluation set of a registered model, and splitting a store around it.

A model is only ever compared with its predecessors on records none of them trained on.
The first registration of a model name freezes the test part of its split as a
:class:`FrozenTestSet`: record ids with the content hash of each record (the sha256 of the
record's files, ``content_hash`` in the manifest and the store table) and the classes.
Every later split for that model (:func:`split_with_frozen_test`):

- puts the frozen records that are still in the store *with the same content hash* in
  ``test``, and nowhere else;
- never puts a frozen record in train / valid / unlabelled: a record whose content changed
  (same id, other hash) is in no part at all (``changed`` in the report), a frozen record
  that is gone is reported (``missing``);
- a frozen record whose id is gone but whose bytes are in the store under another id (the
  record was moved, or the set was frozen before record ids were paths: ``S00001`` is now
  ``batch2/S00001``) is that record: in ``test`` under its new id (``moved``: old -> new);
  no record with a frozen record's content is ever trained on;
- gives every other record (brand-new ones included) to train / valid / unlabelled. New
  records never enter the test set: it changes only by an explicit, recorded refresh
  (``cessl testset refresh``), so the number every version is judged by stays the same.

A refresh (``status == "redraw"``) draws a new stratified test set of the usual size from
the records that no past champion trained on, so the champion is re-scored on records it
never saw: a record is left out by id (``exclude``) and by content (``exclude_hashes``, the
content hashes the champions' splits recorded, plus the hashes of the excluded ids in the
store), so a byte-identical copy of a training record under another id or site is never
drawn. The run that draws it freezes it as the new version.

Plain data, numpy only (``ml.data`` imports no other layer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.data.splits import Splits, ids_hash, make_splits, stratified_cut, trained_hashes
from ml.io import atomic_write_bytes

FROZEN, REDRAW = "frozen", "redraw"


@dataclass
class FrozenTestSet:
    """One version of a model's evaluation set (``records``: id -> content hash)."""

    model: str
    version: int
    records: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    status: str = FROZEN  # FROZEN, or REDRAW: the next run draws this version (refresh)
    exclude: list[str] = field(default_factory=list)  # REDRAW: records a redraw must not pick
    exclude_hashes: list[str] = field(default_factory=list)  # REDRAW: contents a redraw must not pick
    created_at: str = ""
    created_by: str = ""
    reason: str = ""
    source_run: str = ""  # the MLflow run whose split was frozen

    def __post_init__(self) -> None:
        if self.status not in (FROZEN, REDRAW):
            raise ValueError(f"test set status {self.status!r} is not {FROZEN!r} or {REDRAW!r}")
        self.version = int(self.version)
        self.records = {str(k): str(v) for k, v in sorted(self.records.items())}

    @property
    def ids(self) -> list[str]:
        return sorted(self.records)

    @property
    def test_split_hash(self) -> str:
        return ids_hash(self.records)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def canonical_bytes(self) -> bytes:
        """The file's exact bytes (sorted keys, one newline): its md5 is the DVC md5."""
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")

    @property
    def md5(self) -> str:
        return hashlib.md5(self.canonical_bytes()).hexdigest()

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.canonical_bytes())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FrozenTestSet:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def load(cls, path: str | Path) -> FrozenTestSet:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_json(data)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: unreadable frozen test set ({err})") from err


def split_with_frozen_test(
    ids: Sequence[str],
    content_hashes: Sequence[str],
    y: np.ndarray,
    frozen: FrozenTestSet,
    *,
    labelled: Sequence[bool] | np.ndarray | None = None,
    test_size: float = 0.1,
    labelled_ratio: float = 0.05,
    valid_size: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] = (),
) -> Splits:
    """Split records around ``frozen`` (see the module docstring).

    ``FROZEN``: test = the frozen records present with the same hash; every record outside the
    frozen set goes to :func:`make_splits` with no test part. ``REDRAW``: a stratified test
    set of ``round(test_size * labelled records)`` is drawn from the labelled records whose id
    is not in ``frozen.exclude`` and whose content is neither in ``frozen.exclude_hashes`` nor
    that of an excluded id (fewer when there are not enough: ``short_by`` in the report;
    ``n_excluded_by_content``: records left out for their bytes alone).
    The result's ``testset`` field reports what happened; ``test_hashes`` holds the content
    hash of every test record.
    """
    ids = [str(i) for i in ids]
    hashes = [str(h) for h in content_hashes]
    if len(hashes) != len(ids):
        raise ValueError(f"{len(ids)} record ids but {len(hashes)} content hashes")
    y = np.asarray(y, dtype=np.int8).reshape(len(ids), -1)
    lab = np.ones(len(ids), bool) if labelled is None else np.asarray(labelled, dtype=bool)
    hash_of = dict(zip(ids, hashes, strict=True))
    report: dict[str, Any] = {
        "model": frozen.model,
        "version": frozen.version,
        "status": frozen.status,
        "frozen_classes": list(frozen.classes),
        "classes_changed": bool(frozen.classes) and list(frozen.classes) != list(classes),
    }
    if frozen.status == FROZEN:
        present = [i for i, h in frozen.records.items() if hash_of.get(i) == h]
        changed = sorted(i for i, h in frozen.records.items() if i in hash_of and hash_of[i] != h)
        moved = _moved(frozen.records, ids, hashes)
        missing = sorted(i for i in frozen.records if i not in hash_of and i not in moved)
        test = sorted([*present, *moved.values()])
        # never trained on, whatever their state; nor is their content under any other id
        frozen_hashes = set(frozen.records.values())
        held_out = set(frozen.records) | {i for i, h in zip(ids, hashes, strict=True) if h in frozen_hashes}
        report |= {"n_frozen": len(frozen.records), "changed": changed, "missing": missing, "moved": moved}
    else:
        excluded = set(frozen.exclude)
        contents = {h for h in frozen.exclude_hashes if h} | {hash_of[i] for i in excluded if hash_of.get(i)}
        by_content = np.array([i not in excluded and h in contents for i, h in zip(ids, hashes, strict=True)], bool)
        by_id = np.array([i in excluded for i in ids], dtype=bool)
        eligible = np.flatnonzero(lab & ~by_id & ~by_content)
        eligible = eligible[np.argsort(np.array([ids[i] for i in eligible], dtype=object), kind="stable")]
        n_test = round(test_size * int(lab.sum()))
        seeds = np.random.SeedSequence(seed).generate_state(1)
        _, picked = stratified_cut(y[eligible], min(n_test, len(eligible)), int(seeds[0]))
        test = sorted(ids[i] for i in eligible[picked])
        held_out = set(test)
        report |= {
            "n_eligible": len(eligible),
            "n_excluded_by_content": int((lab & by_content).sum()),
            "short_by": max(0, n_test - len(eligible)),
            "changed": [],
            "missing": [],
        }
    rest = [k for k, i in enumerate(ids) if i not in held_out]
    others = make_splits(
        [ids[k] for k in rest],
        y[rest],
        labelled=lab[rest],
        test_size=0.0,
        labelled_ratio=labelled_ratio,
        valid_size=valid_size,
        seed=seed,
        classes=classes,
    )
    return Splits(
        test=test,
        train=others.train,
        valid=others.valid,
        unlabelled=others.unlabelled,
        classes=list(classes),
        params={**others.params, "test_size": test_size},
        test_hashes={i: hash_of[i] for i in test},
        trained_hashes=trained_hashes(others, hash_of),
        testset=report,
    )


def _moved(records: Mapping[str, str], ids: Sequence[str], hashes: Sequence[str]) -> dict[str, str]:
    """Frozen records gone from their id but present, byte-identical, under another id that
    is not frozen itself: old id -> new id. A record's id is its path (and site), so a
    record moved to another folder, or a set frozen before ids were paths
    (``S00001`` -> ``batch2/S00001``), still finds its records."""
    present = set(ids)
    id_of_hash: dict[str, str] = {}
    for i, h in sorted(zip(ids, hashes, strict=True)):
        if h and i not in records:
            id_of_hash.setdefault(h, i)
    return {old: id_of_hash[h] for old, h in sorted(records.items()) if old not in present and h in id_of_hash}


def split_store_frozen(
    store: Any, frozen: FrozenTestSet, *, classes: Sequence[str] | None = None, **kwargs: Any
) -> Splits:
    """:func:`split_with_frozen_test` over every record of an :class:`~ml.data.store.ECGStore`."""
    classes = list(store.classes if classes is None else classes)
    return split_with_frozen_test(
        store.ids,
        content_hashes_of(store),
        store.label_matrix(classes),
        frozen,
        labelled=store.labelled_mask(),
        classes=classes,
        **kwargs,
    )


def content_hashes_of(store: Any) -> list[str]:
    """The per-record content hash column of a store's table (ValueError when it has none)."""
    if "content_hash" not in store.table.columns:
        raise ValueError(f"{store.path}: the store has no content_hash column; rebuild it (preprocess)")
    return store.table["content_hash"].astype(str).tolist()


def freeze(
    splits: Splits,
    model: str,
    version: int,
    *,
    created_at: str = "",
    created_by: str = "",
    reason: str = "",
    source_run: str = "",
) -> FrozenTestSet:
    """The test part of ``splits`` as version ``version`` of ``model``'s frozen test set."""
    missing = [i for i in splits.test if i not in splits.test_hashes]
    if missing:
        raise ValueError(f"the split has no content hash for test records {missing[:5]}: cannot freeze it")
    return FrozenTestSet(
        model=model,
        version=version,
        records={i: splits.test_hashes[i] for i in splits.test},
        classes=list(splits.classes),
        created_at=created_at,
        created_by=created_by,
        reason=reason,
        source_run=source_run,
    )
