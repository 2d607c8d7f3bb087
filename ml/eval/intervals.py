"""The 95% interval of one model's metric over its test records (every table's cells).

A metric over test records (the Challenge score, a macro F-beta2) is a statistic of the whole
set, not a mean of per-record values, so its interval is the **jackknife-t** the promotion gate
uses (:mod:`ml.eval.bootstrap`): the statistic on all n records +- Student's t quantile (n - 1
degrees of freedom) times the jackknife standard error of the n leave-one-out values. It is
deterministic, costs n evaluations of the statistic (a percentile bootstrap costs 1000), and
at small n it is wider than the percentile bootstrap, which undercovers there. Fewer than 2
records, or a statistic undefined on the leave-one-out sets: no interval (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

METHOD = "jackknife-t"
UNIT = (0.0, 1.0)  # what a macro F-beta / G-beta can be
AT_MOST_ONE = (-math.inf, 1.0)  # the Challenge score: 1 at best, no floor


@dataclass(frozen=True)
class Interval:
    """A statistic on ``n`` records and its two-sided interval at ``confidence``."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def text(self, digits: int = 3) -> str:
        """``0.432 [0.210, 0.601]`` (the value alone where there is no interval)."""
        if not math.isfinite(self.value):
            return "nan"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def jackknife_se(loo: np.ndarray) -> float:
    """The jackknife standard error ``sqrt((n-1)/n * sum_i (t_(i) - mean t_(.))^2)`` of the
    leave-one-out values ``t_(i)`` (finite ones, at least 2)."""
    return math.sqrt((len(loo) - 1) / len(loo) * float(((loo - loo.mean()) ** 2).sum()))


def jackknife_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    confidence: float = 0.95,
    support: tuple[float, float] = (-math.inf, math.inf),
) -> Interval:
    """The jackknife-t interval of ``statistic(keep)``, where ``keep`` indexes the records a
    value is computed on (all n, then each leave-one-out set), cut to the values the
    statistic can take (``support``: [0, 1] for an F-beta)."""
    from scipy.special import stdtrit

    everything = np.arange(n)
    value = float(statistic(everything)) if n else math.nan
    if n < 2 or not math.isfinite(value):
        return Interval(value, math.nan, math.nan, n, confidence)
    loo = np.array([statistic(np.delete(everything, i)) for i in range(n)], dtype=np.float64)
    loo = loo[np.isfinite(loo)]
    if len(loo) < 2:
        return Interval(value, math.nan, math.nan, n, confidence)
    se = jackknife_se(loo)
    half = float(stdtrit(n - 1, 1.0 - (1.0 - confidence) / 2)) * se
    low, high = max(value - half, support[0]), min(value + half, support[1])
    return Interval(value, low, high, n, confidence)


INTERVAL_METRICS: tuple[str, ...] = ("macro_f_beta", "macro_g_beta")  # the gate's metrics


def thresholded_intervals(labels: np.ndarray, predicted: np.ndarray, beta: float = 2.0) -> dict[str, Interval]:
    """The interval of each of :data:`INTERVAL_METRICS` of 0/1 predictions over their records."""
    from ml.eval.metrics import thresholded_metrics

    y, pred = np.asarray(labels).astype(np.int64), np.asarray(predicted).astype(np.int64)

    def statistic(metric: str, keep: np.ndarray) -> float:
        return thresholded_metrics(y[keep], pred[keep], beta)[metric]

    return {metric: jackknife_interval(partial(statistic, metric), len(y), support=UNIT) for metric in INTERVAL_METRICS}


def with_intervals(metrics: dict[str, float], intervals: dict[str, Interval]) -> dict[str, float]:
    """``metrics`` plus ``<metric>_low`` / ``<metric>_high`` of each interval."""
    bounds = {f"{name}_{side}": getattr(i, side) for name, i in intervals.items() for side in ("low", "high")}
    return {**metrics, **bounds}
