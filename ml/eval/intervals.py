"""The 95% interval of one model's metric over its test records (every table's cells).

A metric over test records (the Challenge score, a macro F-beta2) is a statistic of the whole
set, not a mean of per-record values, so its interval is the **jackknife-t** the promotion gate
uses (:mod:`ml.eval.bootstrap`): the statistic on all n records +- Student's t quantile (n - 1
degrees of freedom) times the jackknife standard error of the n leave-one-out values. It is
deterministic, costs n evaluations of the statistic (a percentile bootstrap costs 1000), and
at small n it is wider than the percentile bootstrap, which undercovers there. Fewer than 2
records, or a statistic undefined on the leave-one-out sets: no interval (NaN).

Every test metric of a model carries one (:func:`metric_intervals`: the Challenge scores,
macro AUROC, mAP, F-beta2, G-beta2 and the others of ``ml.eval.metrics``; all of them from
one evaluation per leave-one-out set, :func:`jackknife_intervals`), but the count of classes
without a positive test record, which describes the split rather than the model. Each
leave-one-out set is scored with the whole set's definitions, class conventions included
(:func:`metric_intervals` says how a class with a single positive record is counted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHOD = "jackknife-t"
UNIT = (0.0, 1.0)  # what a macro F-beta / G-beta can be
AT_MOST_ONE = (-math.inf, 1.0)  # the Challenge score: 1 at best, no floor
FREE = (-math.inf, math.inf)


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


def _interval(value: float, loo: np.ndarray, n: int, confidence: float, support: tuple[float, float]) -> Interval:
    """``value`` +- the t quantile times the jackknife standard error of its finite
    leave-one-out values ``loo``, cut to ``support`` (no interval: fewer than 2 of them)."""
    from scipy.special import stdtrit

    loo = loo[np.isfinite(loo)]
    if n < 2 or not math.isfinite(value) or len(loo) < 2:
        return Interval(value, math.nan, math.nan, n, confidence)
    half = float(stdtrit(n - 1, 1.0 - (1.0 - confidence) / 2)) * jackknife_se(loo)
    return Interval(value, max(value - half, support[0]), min(value + half, support[1]), n, confidence)


def jackknife_intervals(
    statistics: Callable[[np.ndarray], Mapping[str, float]],
    n: int,
    supports: Mapping[str, tuple[float, float]],
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """The jackknife-t interval of each value ``supports`` names of ``statistics(keep)``, where
    ``keep`` indexes the records the values are computed on (all n, then each leave-one-out
    set: n + 1 calls for all of them), each cut to what it can be (its ``supports`` entry).
    A value the statistics leave out or undefined (NaN) on a leave-one-out set does not enter
    that value's standard error."""
    everything = np.arange(n)
    full = statistics(everything) if n else {}
    values = {name: float(full.get(name, math.nan)) for name in supports}
    wanted = n >= 2 and any(math.isfinite(v) for v in values.values())
    loo = [statistics(np.delete(everything, i)) for i in range(n)] if wanted else []
    return {
        name: _interval(
            values[name],
            np.array([float(s.get(name, math.nan)) for s in loo], dtype=np.float64),
            n,
            confidence,
            support,
        )
        for name, support in supports.items()
    }


def jackknife_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    confidence: float = 0.95,
    support: tuple[float, float] = FREE,
) -> Interval:
    """The jackknife-t interval of ``statistic(keep)``, where ``keep`` indexes the records a
    value is computed on (all n, then each leave-one-out set), cut to the values the
    statistic can take (``support``: [0, 1] for an F-beta)."""
    return jackknife_intervals(lambda keep: {"value": statistic(keep)}, n, {"value": support}, confidence)["value"]


# A test metric that is a count of the split, the same for every model scored on it: no interval.
NO_INTERVAL: tuple[str, ...] = ("n_classes_without_positives",)
AT_MOST_ONE_METRICS: tuple[str, ...] = ("challenge_score", "challenge_score_restricted")


def metric_supports(n_classes: int) -> dict[str, tuple[float, float]]:
    """What each test metric with an interval (:data:`ml.eval.metrics.METRIC_NAMES` but
    :data:`NO_INTERVAL`) can be with ``n_classes`` classes: the Challenge scores at most 1,
    the coverage error in [0, n_classes], every other one in [0, 1]."""
    from ml.eval.metrics import METRIC_NAMES

    special = {"coverage": (0.0, float(n_classes)), **dict.fromkeys(AT_MOST_ONE_METRICS, AT_MOST_ONE)}
    return {name: special.get(name, UNIT) for name in METRIC_NAMES if name not in NO_INTERVAL}


def metric_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | Sequence[float] | float,
    classes: Sequence[str] | None = None,
    scored_labels: np.ndarray | None = None,
    beta: float = 2.0,
) -> dict[str, Interval]:
    """The 95% interval of every test metric of :func:`ml.eval.metrics.challenge_metrics` (but
    :data:`NO_INTERVAL`) over the records: each leave-one-out set is scored by the same
    definition as the whole set (:func:`ml.eval.metrics.metric_values`), so a class follows
    the macro means' rule on each set. A class with a single positive record has no positive
    on the set that leaves it out: it counts 0 there in ``macro_map`` / ``macro_f_beta`` /
    ``macro_g_beta`` and is left out of ``macro_auroc`` and the ``*_positive_classes`` means,
    as a class without a positive test record is on the whole set (``macro_auroc``: likewise
    a class with a single negative record). A leave-one-out value that is undefined (no class
    left with an AUROC) does not enter the standard error."""
    from ml.eval.metrics import metric_values

    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    scored = None if scored_labels is None else np.asarray(scored_labels)

    def statistics(keep: np.ndarray) -> dict[str, float]:
        return metric_values(y[keep], p[keep], thresholds, beta, classes, None if scored is None else scored[keep])

    return jackknife_intervals(statistics, len(y), metric_supports(y.shape[1] if y.ndim == 2 else 0))


BOUNDS: tuple[str, ...] = ("_low", "_high")  # the suffixes of a metric's interval bounds


def with_intervals(metrics: dict[str, float], intervals: dict[str, Interval]) -> dict[str, float]:
    """``metrics`` plus ``<metric>_low`` / ``<metric>_high`` of each interval."""
    bounds = {f"{name}{side}": getattr(i, side[1:]) for name, i in intervals.items() for side in BOUNDS}
    return {**metrics, **bounds}


def interval_text(metrics: Mapping[str, float], name: str, digits: int = 4) -> str:
    """``0.4321 [0.2100, 0.6000]``: metric ``name`` of ``metrics`` with its interval where
    ``metrics`` holds its ``_low`` / ``_high`` (a :func:`with_intervals` dict), else the value alone."""
    low, high = (float(metrics.get(f"{name}{side}", math.nan)) for side in BOUNDS)
    return Interval(float(metrics[name]), low, high, 0).text(digits)
