"""Preprocessing (resample, band-pass, standardise, fix length) and the dataset store."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps

from ml.data import preprocess as pp
from ml.data.ingest import IngestConfig, ingest, read_manifest
from ml.data.preprocess import (
    PreprocessConfig,
    bandpass,
    fix_length,
    preprocess,
    preprocess_signal,
    resample,
    standardise,
)
from ml.data.records import read_record_file
from ml.data.store import META_FILE, SIGNALS_FILE, ECGStore, StoreDataset, split_codes
from ml.data.synth import SynthConfig, generate, inject_faults


def _tone(freq: float, fs: float = 500.0, seconds: float = 10.0) -> np.ndarray:
    t = np.arange(int(fs * seconds)) / fs
    return np.tile(np.sin(2 * np.pi * freq * t), (12, 1))


def _gain(y: np.ndarray, x: np.ndarray) -> float:
    core = slice(y.shape[-1] // 4, 3 * y.shape[-1] // 4)  # away from the edges
    return float(np.std(y[..., core]) / np.std(x[..., core]))


def test_bandpass_keeps_1_to_47_hz_and_removes_the_rest():
    for freq in (5.0, 10.0, 25.0):
        assert _gain(bandpass(_tone(freq), 500.0), _tone(freq)) == pytest.approx(1.0, abs=0.02)
    assert _gain(bandpass(_tone(0.15), 500.0), _tone(0.15)) < 0.01  # baseline wander
    assert _gain(bandpass(_tone(60.0), 500.0), _tone(60.0)) < 0.3  # mains hum (60 Hz)
    assert _gain(bandpass(_tone(100.0), 500.0), _tone(100.0)) < 0.02
    # zero phase: an in-band tone comes out undelayed
    x = _tone(10.0)
    core = slice(1250, -1250)  # 1 Hz high-pass edge transients last about a second
    np.testing.assert_allclose(bandpass(x, 500.0)[:, core], x[:, core], atol=0.01)


@pytest.mark.parametrize("fs", [250.0, 257.0, 1000.0])
def test_resample_polyphase(fs):
    x = _tone(5.0, fs=fs)
    y = resample(x, fs, 500.0)
    assert y.shape == (12, round(x.shape[1] * 500.0 / fs))
    t = np.arange(y.shape[1]) / 500.0
    core = slice(100, -100)
    np.testing.assert_allclose(y[0, core], np.sin(2 * np.pi * 5.0 * t)[core], atol=0.01)


def test_standardise_and_fix_length():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (12, 4000))
    x[5] = 7.0  # a flat lead
    z = standardise(x)
    np.testing.assert_allclose(z[[0, 11]].mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(z[[0, 11]].std(axis=1), 1.0, atol=1e-9)
    assert np.all(z[5] == 0.0)
    padded = fix_length(z, 6144)
    assert padded.shape == (12, 6144) and np.all(padded[:, 4000:] == 0) and np.array_equal(padded[:, :4000], z)
    assert np.array_equal(fix_length(np.arange(7000.0)[None], 6144)[0], np.arange(6144.0))


def test_preprocess_signal_matches_a_per_lead_scipy_sklearn_baseline(ecg_records_dir):
    from sklearn.preprocessing import StandardScaler

    record = read_record_file(ecg_records_dir / "E07500.hea")
    ours = preprocess_signal(record.signal, record.fs)
    assert ours.shape == (12, 6144) and ours.dtype == np.float32
    b, a = sps.butter(3, [1, 47], btype="bandpass", fs=500)
    base = np.stack([sps.filtfilt(b, a, lead.astype(np.float64)) for lead in record.signal])
    base = StandardScaler().fit_transform(base.T).T
    core = slice(200, 4800)
    np.testing.assert_allclose(ours[:, core], base[:, core], atol=2e-3)
    assert np.all(ours[:, 5000:] == 0)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hosp")
    generate(root / "h", SynthConfig(records=48, seed=5, unlabelled_fraction=0.2), workers=1, progress=False)
    inject_faults(root / "h", seed=5)
    ingest(root / "h", root / "ingest", config=IngestConfig(workers=1), progress=False)
    return root


def test_store_from_manifest(ingested, tmp_path):
    store = preprocess(
        ingested / "ingest", tmp_path / "store", min_count=5, workers=2, chunk_size=8, progress=False, min_parallel=0
    )
    manifest = read_manifest(ingested / "ingest")
    accepted = manifest[manifest["status"] == "accepted"]
    assert len(store) == len(accepted) and store.ids == accepted["id"].tolist()
    assert isinstance(store.signals, np.memmap) and store.signals.shape == (len(accepted), 12, 6144)
    assert store.signals.dtype == np.float32
    assert store.classes and all(split_codes(c) for c in store.classes)
    # every row was written and standardised (10 s at 500 Hz = 5000 samples, then zeros)
    regular = store.rows([i for i in store.ids if i.startswith("S")])
    x = np.asarray(store.signals[regular])
    np.testing.assert_allclose(x[:, :, :5000].mean(axis=2), 0.0, atol=1e-4)
    np.testing.assert_allclose(x[:, :, :5000].std(axis=2), 1.0, atol=1e-3)
    assert np.all(x[:, :, 5000:] == 0)
    row = store.rows(["F_fs_257"])[0]
    assert np.all(store.signals[row, :, 5000:] == 0) and np.any(store.signals[row, :, :4999] != 0)
    # the same as preprocessing the record alone
    one = read_record_file(ingested / "h" / "S00007.hea")
    np.testing.assert_array_equal(store.signals[store.rows(["S00007"])[0]], preprocess_signal(one.signal, one.fs))
    # classes: scored diagnoses with >= min_count labelled records
    labelled = store.table[store.table["labelled"]]
    for code in store.classes:
        assert sum(code in split_codes(v) for v in labelled["labels"]) >= 5
    assert store.meta["preprocess"] == {"fs": 500.0, "low_hz": 1.0, "high_hz": 47.0, "order": 3, "length": 6144}


def test_dataset_contract_and_batches(ingested, tmp_path):
    import torch
    from torch.utils.data import DataLoader

    store = preprocess(ingested / "ingest", tmp_path / "store", min_count=5, workers=1, progress=False)
    ids = store.ids[::3]
    ds = StoreDataset(store, ids, store.classes)
    x, y = ds[0]
    assert x.shape == (12, 1, 6144) and x.dtype == torch.float32
    assert y.shape == (len(store.classes),) and y.dtype == torch.float32
    labels = split_codes(store.table.set_index("id").loc[ids[0], "labels"])
    assert [store.classes[j] for j in np.flatnonzero(y.numpy())] == [c for c in store.classes if c in labels]
    batch = ds.__getitems__([5, 2, 9])
    for i, (bx, by) in zip([5, 2, 9], batch, strict=True):
        ex, ey = ds[i]
        assert torch.equal(bx, ex) and torch.equal(by, ey)
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 12, 1, 6144) and yb.shape == (4, len(store.classes))
    # workers get a handle to the file, not a copy of the array
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000
    clone = pickle.loads(blob)
    assert isinstance(clone.store.signals, np.memmap) and torch.equal(clone[3][0], ds[3][0])
    with pytest.raises(KeyError, match="not in the store"):
        StoreDataset(store, ["nope"], store.classes)


def test_store_write_is_atomic(ingested, tmp_path, monkeypatch):
    target = tmp_path / "store"
    first = preprocess(ingested / "ingest", target, min_count=5, workers=1, progress=False)
    before = np.array(first.signals[:3])
    calls = {"n": 0}
    real = pp.preprocess_signal

    def crash_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "preprocess_signal", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        preprocess(
            ingested / "ingest", target, config=PreprocessConfig(length=5000), min_count=5, workers=1, progress=False
        )
    # the old store is untouched and nothing half-written is left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    again = ECGStore.open(target)
    assert np.array_equal(np.array(again.signals[:3]), before) and again.signals.shape[2] == 6144
    # a folder without store.json is never taken for a store
    (tmp_path / "partial").mkdir()
    np.save(tmp_path / "partial" / SIGNALS_FILE, np.zeros((1, 12, 6144), np.float32))
    with pytest.raises(FileNotFoundError, match=META_FILE):
        ECGStore.open(tmp_path / "partial")


def test_rebuilding_reuses_unchanged_rows(ingested, tmp_path):
    target = tmp_path / "store"
    first = preprocess(ingested / "ingest", target, min_count=5, workers=1, progress=False)
    data = np.array(first.signals)
    second = preprocess(ingested / "ingest", target, min_count=5, workers=1, progress=False)
    assert second.meta["reused_rows"] == len(second)
    assert np.array_equal(np.array(second.signals), data)


def test_preprocess_needs_classes(ingested, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="min_count"):
            preprocess(ingested / "ingest", tmp_path / "s", min_count=10_000, workers=1, progress=False)
    store = preprocess(ingested / "ingest", tmp_path / "s", classes=["AF", "427172004"], workers=1, progress=False)
    assert store.classes == ["164889003", "17338001"]  # abbreviations and equivalent codes resolved
    assert store.meta["class_names"] == ["AF", "PVC"]
