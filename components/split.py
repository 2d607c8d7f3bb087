"""Step: deterministic multi-label stratified split of the store into id lists.

10% test; of the rest a labelled fraction (``labelled_ratio``) keeps its labels and is
split 80/20 into train / valid; the remainder is the unlabelled part. Same store and seed,
same split. Written as ids (``ml.data.splits.Splits``) so it can be audited.

Given a model's frozen test set (a ``ml.data.testset.FrozenTestSet`` file; the pipeline
fetches it from the registry), the test part is that set instead: its records still in the
store with the same content hash, never a new record; frozen records are never put in
train / valid / unlabelled; changed and missing ones are reported (``Splits.testset``).

Before any training, the split says whether the champion gate can decide on its test part
(:func:`gate_power`, :mod:`ml.eval.power`): how many labelled test records the default gate
(margin 0, one-sided alpha 2.5% spent over the attempts, power 0.8 to detect an improvement
of 0.05 of macro F-beta2, per-record SD assumed from the test labels) needs. Too few is a
loud warning (the log, a line on ``cessl run``'s terminal, the step's metadata and the run's
tag), not a failure: the run still trains and registers, and ``cessl promote`` will answer
"insufficient evidence" unless the interval clears the margin anyway.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import StepError, sha256_json
from components.data_access import open_store, store_classes
from ml.data.splits import Splits
from ml.eval.power import PowerCheck, PowerConfig, label_power_check
from ml.progress import announce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitConfig:
    labelled_ratio: float = 0.05
    seed: int = 0
    test_ratio: float = 0.1
    valid_ratio: float = 0.2  # of the labelled part
    test_seed: int | None = None  # the test cut's own seed (None: from ``seed``); a comparison's cells share it

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
    testset: dict = field(default_factory=dict)  # the frozen test set's report (empty: none used)
    gate_power: dict = field(default_factory=dict)  # PowerCheck.to_json() of the test part


def split_step(store_dir: Path, out_path: Path, config: SplitConfig, frozen_path: Path | None = None) -> SplitResult:
    """Split the store in ``store_dir``; write the id lists to ``out_path`` (JSON).

    ``frozen_path``: a frozen test set (``ml.data.testset.FrozenTestSet`` JSON) whose records
    are the test part (or, for a pending refresh, the records a new test set must avoid)."""
    from ml.data.splits import split_store
    from ml.data.testset import FrozenTestSet, split_store_frozen

    store = open_store(store_dir)
    kwargs: dict[str, Any] = dict(
        test_size=config.test_ratio,
        labelled_ratio=config.labelled_ratio,
        valid_size=config.valid_ratio,
        seed=config.seed,
    )
    if frozen_path is None:
        splits = split_store(store, test_seed=config.test_seed, **kwargs)
    else:
        try:
            frozen = FrozenTestSet.load(frozen_path)
            splits = split_store_frozen(store, frozen, **kwargs)
        except ValueError as err:
            raise StepError(str(err)) from err
    ids = Splits(
        test=[str(i) for i in splits.test],
        train=[str(i) for i in splits.train],
        valid=[str(i) for i in splits.valid],
        unlabelled=[str(i) for i in splits.unlabelled],
        classes=store_classes(store),
        params=asdict(config),
        test_hashes=dict(splits.test_hashes),
        trained_hashes=list(splits.trained_hashes),
        testset=dict(splits.testset),
    )
    _report_testset(ids.testset)
    if not ids.test and ids.testset:
        raise StepError(
            f"{store_dir}: none of the {ids.testset.get('n_frozen', 0)} records of {ids.testset['model']}'s frozen "
            f"test set v{ids.testset['version']} is in the store unchanged; refresh it "
            f"(cessl testset refresh {ids.testset['model']} --reason ...)"
        )
    if not ids.train or not ids.valid or not ids.test:
        raise StepError(
            f"{store_dir}: split {ids.sizes()} leaves an empty labelled train, valid or test part "
            f"(labelled_ratio {config.labelled_ratio} of {len(store.table)} records is too small)"
        )
    ids.save(out_path)
    log.info("split %s: %s (test split %s)", store_dir, ids.sizes(), ids.test_split_hash[:12])
    power = gate_power(store, ids.test, ids.classes)
    _report_power(power)
    return SplitResult(
        sizes=ids.sizes(),
        test_split_hash=ids.test_split_hash,
        fingerprint=sha256_json(ids.to_dict()),
        testset=ids.testset,
        gate_power=power.to_json(),
    )


def gate_power(store, test_ids: list[str], classes: list[str], config: PowerConfig = PowerConfig()) -> PowerCheck:
    """Whether the champion gate can decide on the test records ``test_ids``: the labelled
    records the default gate needs (:func:`ml.eval.power.label_power_check`, its first attempt)."""
    return label_power_check(store.label_matrix(classes, test_ids), config)


def _report_power(check: PowerCheck) -> None:
    """An info line when the test part suffices; else a warning, also on ``cessl run``'s terminal."""
    if check.sufficient:
        log.info("champion gate: %s", check.describe())
        return
    text = (
        f"the champion gate cannot decide on this test set: {check.describe()}; `cessl promote` will answer "
        "insufficient evidence unless the interval clears the margin anyway"
    )
    log.warning(text)
    announce(f"split: WARNING {text}")


def _report_testset(report: dict) -> None:
    """Log what the frozen test set looked like against this store."""
    if not report:
        return
    name = f"{report['model']} test set v{report['version']}"
    if report["status"] == "redraw":
        log.info("%s: drawn anew from %d eligible records (refresh)", name, report["n_eligible"])
        if report.get("short_by"):
            log.warning("%s: %d test records short of the usual size", name, report["short_by"])
    if report.get("changed"):
        log.warning(
            "%s: %d frozen records changed content (in no part of the split): %s",
            name,
            len(report["changed"]),
            ", ".join(report["changed"][:20]),
        )
    if report.get("moved"):
        log.info(
            "%s: %d frozen records found under a new id (moved, or ids are now paths): %s",
            name,
            len(report["moved"]),
            ", ".join(f"{old} -> {new}" for old, new in list(report["moved"].items())[:20]),
        )
    if report.get("missing"):
        log.warning(
            "%s: %d frozen records are no longer in the data: %s",
            name,
            len(report["missing"]),
            ", ".join(report["missing"][:20]),
        )
    if report.get("classes_changed"):
        log.warning(
            "%s: the data's classes differ from the frozen ones %s: the champion cannot be compared; "
            "refresh the test set (cessl testset refresh)",
            name,
            report["frozen_classes"],
        )
