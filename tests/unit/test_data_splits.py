"""Splits: deterministic, disjoint, paper-sized, and well stratified."""

from __future__ import annotations

import numpy as np
import pytest

from ml.data.splits import Splits, make_splits, split_store, stratification_error
from ml.data.synth import SUPPORTED_CLASSES, draw_labels


@pytest.fixture(scope="module")
def population():
    """3000 label sets drawn like the synthetic hospitals (realistic co-occurrence), 10% without Dx."""
    rng = np.random.default_rng(123)
    classes = list(SUPPORTED_CLASSES)
    y = np.zeros((3000, len(classes)), np.int8)
    for i in range(len(y)):
        for code in draw_labels(rng, classes):
            y[i, classes.index(code)] = 1
    ids = [f"R{i:05d}" for i in range(len(y))]
    labelled = rng.random(len(y)) > 0.1
    return ids, y, labelled, classes


def test_parts_are_disjoint_complete_and_sized(population):
    ids, y, labelled, _ = population
    s = make_splits(ids, y, labelled=labelled, seed=0)
    parts = [s.test, s.train, s.valid, s.unlabelled]
    assert sum(map(len, parts)) == len(ids) and set().union(*map(set, parts)) == set(ids)
    n_lab = int(labelled.sum())
    assert len(s.test) == pytest.approx(0.1 * n_lab, abs=2)
    assert len(s.train) + len(s.valid) == pytest.approx(0.05 * (n_lab - len(s.test)), abs=2)
    assert len(s.valid) == pytest.approx(0.2 * (len(s.train) + len(s.valid)), abs=2)
    no_dx = {i for i, lab in zip(ids, labelled, strict=True) if not lab}
    assert no_dx <= set(s.unlabelled) and not no_dx & set(s.test + s.train + s.valid)


def test_deterministic_for_a_seed_and_independent_of_input_order(population):
    ids, y, labelled, _ = population
    a = make_splits(ids, y, labelled=labelled, seed=7)
    b = make_splits(ids[::-1], y[::-1], labelled=labelled[::-1], seed=7)
    c = make_splits(ids, y, labelled=labelled, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.test != c.test


def test_stratification_beats_random_splits(population):
    ids, y, labelled, _ = population
    s = make_splits(ids, y, labelled=labelled, labelled_ratio=0.2, seed=1)
    row = {r: i for i, r in enumerate(ids)}
    pool = y[labelled]
    rng = np.random.default_rng(0)
    for part, size in (("test", len(s.test)), ("train", len(s.train))):
        ours = stratification_error(pool, y[[row[i] for i in getattr(s, part)]])
        random = np.mean(
            [stratification_error(pool, pool[rng.choice(len(pool), size, replace=False)]) for _ in range(20)]
        )
        assert ours < 0.5 * random, (part, ours, random)
    # every class with at least 10 labelled records reaches the test set
    test_y = y[[row[i] for i in s.test]]
    assert np.all(test_y.sum(axis=0)[pool.sum(axis=0) >= 10] > 0)


def test_small_and_edge_cases(tmp_path):
    ids = [f"r{i}" for i in range(30)]
    y = np.zeros((30, 1), np.int8)
    y[::3] = 1
    s = make_splits(ids, y, seed=0)  # one class, 5% of 27 -> at least 2 labelled
    assert len(s.train) >= 1 and len(s.valid) >= 1 and len(s.test) == 3
    all_lab = make_splits(ids, y, labelled_ratio=1.0, seed=0)
    assert not all_lab.unlabelled
    with pytest.raises(ValueError, match="unique"):
        make_splits(["a", "a"], np.zeros((2, 1)))
    with pytest.raises(ValueError, match="test_size"):
        make_splits(ids, y, test_size=1.5)
    path = s.save(tmp_path / "splits.json")
    assert Splits.load(path) == s


def test_split_store(tmp_path):
    from ml.data.ingest import IngestConfig, ingest
    from ml.data.preprocess import preprocess
    from ml.data.synth import SynthConfig, generate

    generate(tmp_path / "h", SynthConfig(records=60, seed=2, unlabelled_fraction=0.2), workers=1, progress=False)
    ingest(tmp_path / "h", tmp_path / "i", config=IngestConfig(workers=1), progress=False)
    store = preprocess(tmp_path / "i", tmp_path / "s", min_count=8, workers=1, progress=False)
    s = split_store(store, labelled_ratio=0.5, seed=3)
    assert s.classes == store.classes
    assert set(s.unlabelled) >= set(store.table.loc[~store.table["labelled"], "id"])
    assert split_store(store, labelled_ratio=0.5, seed=3) == s
