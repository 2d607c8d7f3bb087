"""Synthetic hospitals: the class features are learnable.
Bytes and WFDB format: tests/unit/test_data_synth.py; the generation rate is a benchmark
(`bench/ingest.py`, figures in bench/RESULTS.md), not a timed test on a shared machine."""

from __future__ import annotations

import numpy as np
import pytest

from ml.data.labels import LabelMapping
from ml.data.preprocess import preprocess_signal
from ml.data.synth import (
    SynthConfig,
    synthesize_record,
)


def _features(x: np.ndarray, fs: float = 500.0) -> np.ndarray:
    """Generic rhythm + beat-template features of a preprocessed (12, n) ECG."""
    from scipy.signal import find_peaks

    x = x[:, :5000]
    energy = np.sqrt((np.diff(x, axis=1) ** 2).sum(axis=0))
    peaks, _ = find_peaks(energy, distance=int(0.27 * fs), height=np.quantile(energy, 0.98) * 0.4)
    rr = np.diff(peaks) / fs if len(peaks) > 2 else np.array([1.0, 1.0])
    rr_irregularity = np.abs(np.diff(rr)).mean() / rr.mean() if len(rr) > 1 else 0.0
    lo, hi = int(0.4 * fs), int(0.6 * fs)
    beats = np.stack(
        [x[:, p - lo : p + hi] for p in peaks if p - lo >= 0 and p + hi <= x.shape[1]] or [x[:, : lo + hi]]
    )
    template = np.median(beats, axis=0)
    corr = [np.corrcoef(b.ravel(), template.ravel())[0, 1] for b in beats]
    outliers = np.mean(np.array(corr) < 0.8)
    coarse = template.reshape(12, 50, -1).mean(axis=2).ravel()
    return np.concatenate([[60 / rr.mean(), rr.std() / rr.mean(), rr_irregularity, outliers], coarse])


@pytest.mark.slow  # ~11 s: fits a classifier per class
def test_class_features_are_learnable():
    """A linear model on generic features separates every default class (held-out AUROC)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    config = SynthConfig(records=400, seed=9)
    xs, ys = [], []
    for i in range(config.records):
        rec = synthesize_record(i, config)
        xs.append(_features(preprocess_signal(rec.signal, rec.fs)))
        ys.append([c in rec.labels for c in config.classes])
    X, Y = np.array(xs), np.array(ys)
    train, test = slice(0, 250), slice(250, None)
    aucs = {}
    mapping = LabelMapping.from_csv()
    for j, code in enumerate(config.classes):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(X[train], Y[train, j])
        aucs[mapping.abbreviation(code)] = roc_auc_score(Y[test, j], model.predict_proba(X[test])[:, 1])
    assert min(aucs.values()) > 0.85, aucs
