"""Paired bootstrap of a metric difference between two models scored on the same records.

The promotion gate asks "is the challenger better than the champion on these records, beyond
sampling noise?". Both models' per-record predictions on the *same* test records are
resampled together (one index vector per resample, drawn with replacement over records), the
metric of each model is recomputed on the resample with the function the evaluation reports
(:func:`ml.eval.metrics.thresholded_metrics`, each model at its own thresholds), and the
difference ``challenger - champion`` is collected. The percentile interval of those
differences is the confidence interval; the gate promotes only when its lower bound exceeds
the margin. Per-class F-beta of both models on all records (point estimates) backs the
per-class non-inferiority check.

numpy only; deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ml.eval.metrics import beta_measures, binarize, thresholded_metrics

BOOTSTRAP_METRICS: tuple[str, ...] = ("macro_f_beta", "macro_g_beta")


@dataclass(frozen=True)
class BootstrapConfig:
    """How many resamples, which seed, which confidence level."""

    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    beta: float = 2.0

    def __post_init__(self) -> None:
        if self.n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {self.n_resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class ClassComparison:
    """One scored class (>= 1 positive record): both models' F-beta and the challenger's drop."""

    name: str
    n_positive: int
    challenger: float
    champion: float

    @property
    def drop(self) -> float:
        """How much lower the challenger's F-beta is (negative: it is higher)."""
        return self.champion - self.challenger


@dataclass
class MetricInterval:
    """The paired difference ``challenger - champion`` of one metric."""

    metric: str
    challenger: float
    champion: float
    estimate: float  # on all records
    ci_low: float
    ci_high: float
    n_valid_resamples: int


@dataclass
class PairedBootstrap:
    """The gate's evidence: intervals per metric and per-class F-beta of both models."""

    n_records: int
    n_resamples: int
    seed: int
    confidence: float
    intervals: dict[str, MetricInterval] = field(default_factory=dict)
    per_class: list[ClassComparison] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_class"] = [asdict(c) | {"drop": c.drop} for c in self.per_class]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairedBootstrap:
        return cls(
            n_records=int(data["n_records"]),
            n_resamples=int(data["n_resamples"]),
            seed=int(data["seed"]),
            confidence=float(data["confidence"]),
            intervals={k: MetricInterval(**v) for k, v in data["intervals"].items()},
            per_class=[
                ClassComparison(c["name"], int(c["n_positive"]), float(c["challenger"]), float(c["champion"]))
                for c in data["per_class"]
            ],
        )


def paired_bootstrap(
    labels: np.ndarray,
    challenger_probs: np.ndarray,
    challenger_thresholds: np.ndarray,
    champion_probs: np.ndarray,
    champion_thresholds: np.ndarray,
    classes: list[str],
    config: BootstrapConfig = BootstrapConfig(),
) -> PairedBootstrap:
    """Resample records (rows) with replacement, the same rows for both models; the
    difference of each metric of :data:`BOOTSTRAP_METRICS` per resample.

    The caller guarantees that row i of both models is the same record (same id, same labels).
    """
    y = np.asarray(labels).astype(np.int64)
    pred_a = binarize(challenger_probs, challenger_thresholds)
    pred_b = binarize(champion_probs, champion_thresholds)
    if not (y.shape == pred_a.shape == pred_b.shape):
        raise ValueError(f"shapes differ: labels {y.shape}, challenger {pred_a.shape}, champion {pred_b.shape}")
    n = len(y)
    if n == 0:
        raise ValueError("no test records to compare on")
    rng = np.random.default_rng(config.seed)
    diffs: dict[str, list[float]] = {m: [] for m in BOOTSTRAP_METRICS}
    for _ in range(config.n_resamples):
        idx = rng.integers(0, n, size=n)
        a = thresholded_metrics(y[idx], pred_a[idx], config.beta)
        b = thresholded_metrics(y[idx], pred_b[idx], config.beta)
        for metric in BOOTSTRAP_METRICS:
            diffs[metric].append(a[metric] - b[metric])
    full_a, full_b = thresholded_metrics(y, pred_a, config.beta), thresholded_metrics(y, pred_b, config.beta)
    alpha = (1.0 - config.confidence) / 2.0
    intervals = {}
    for metric in BOOTSTRAP_METRICS:
        values = np.asarray(diffs[metric], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = (math.nan, math.nan)
        if len(values):
            low, high = float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
        intervals[metric] = MetricInterval(
            metric,
            float(full_a[metric]),
            float(full_b[metric]),
            float(full_a[metric] - full_b[metric]),
            low,
            high,
            len(values),
        )
    f_a, _ = beta_measures(y, pred_a, config.beta)
    f_b, _ = beta_measures(y, pred_b, config.beta)
    positives = y.sum(axis=0)
    per_class = [
        ClassComparison(str(classes[k]), int(positives[k]), float(f_a[k]), float(f_b[k]))
        for k in range(y.shape[1])
        if positives[k] > 0
    ]
    return PairedBootstrap(
        n_records=n,
        n_resamples=config.n_resamples,
        seed=config.seed,
        confidence=config.confidence,
        intervals=intervals,
        per_class=per_class,
    )
