"""How many test records the promotion gate needs, and what each attempt may spend.

The gate (``pipeline.registry.policy``) promotes a challenger when the lower bound of the
paired interval of ``challenger - champion`` (:mod:`ml.eval.bootstrap`) exceeds the margin
``m``: a one-sided test of "better by more than m" at level ``alpha_k``.

**Alpha spending** (:func:`attempt_alpha`). Every look at one frozen test set is a chance of a
false promotion, so attempt ``k`` (1, 2, ...) on the same set is tested at
``alpha_k = alpha / 2^k``; over any number of attempts the levels add up to at most
``alpha`` (2.5% by default: the one-sided level of the former 95% interval). A new
frozen test set (``cessl testset refresh``) starts again at attempt 1.

**Power** (:func:`required_records`). With n records and a per-record standard deviation
``sigma`` of the paired difference (its standard error is sigma / sqrt(n)), a challenger truly
better by ``m + delta`` passes attempt k with probability ``power`` when (normal approximation)

    n >= ((z_(1 - alpha_k) + z_power) * sigma / delta)^2

Assumptions, stated with every figure (:meth:`PowerCheck.describe`): the effect to detect is
``delta`` (:attr:`PowerConfig.effect`, default 0.05 of macro F-beta2) above the margin; alpha_k
and the power (default 0.8) as configured; and sigma

- *estimated from the data* at the gate: the jackknife standard error of the two models'
  difference times sqrt(n) (:attr:`ml.eval.bootstrap.MetricInterval.record_sd`);
- *assumed from the labels* before any model exists (:func:`label_sd`): F-beta2 weighs recall
  four times precision, so a class's score moves like its recall, a mean over its positive
  records; the paired difference of two models' outcomes on one record has a variance of at
  most 1/2 (two independent outcomes at a rate of one half), a class with prevalence p_k has
  n p_k positive records, and the macro mean of K classes (errors independent across classes)
  gives ``sigma^2 = 1/(2 K^2) * sum_k 1/p_k``. On simulated model pairs (3, 10 and 26
  classes; ``tests/unit/test_gate_statistics.py`` checks the demo's 10) it is above the sigma
  the jackknife measures (conservative): real challengers and champions share a backbone and
  agree on most records, which makes the paired difference smaller still.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and scipy are imported where used: the gate's config is on the command line's start-up path
    import numpy as np

SD_FROM_LABELS = "assumed from the test labels (two independent models, a variance of 1/2 per positive record)"
SD_FROM_DATA = "estimated from the two models' predictions (jackknife)"


@dataclass(frozen=True)
class PowerConfig:
    """The gate's error rates: ``alpha`` one-sided over all attempts on one frozen test set,
    the ``power`` to detect a challenger better by ``effect`` above the margin."""

    alpha: float = 0.025
    power: float = 0.8
    effect: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0.5 <= self.power < 1.0:
            raise ValueError(f"power must be in [0.5, 1), got {self.power}")
        if not (math.isfinite(self.effect) and self.effect > 0):
            raise ValueError(f"effect must be a finite number > 0, got {self.effect}")


def attempt_alpha(alpha: float, attempt: int) -> float:
    """The one-sided level of attempt ``attempt`` (1-based) on one frozen test set: alpha / 2^k."""
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    return alpha / 2.0**attempt


def _z(p: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(p))


def required_records(sd: float, effect: float, alpha: float, power: float) -> int:
    """The fewest records with which a one-sided test at ``alpha`` detects a true difference of
    ``effect`` beyond the margin with probability ``power``: ``((z_(1-alpha) + z_power) sd / effect)^2``."""
    return max(2, math.ceil(((_z(1.0 - alpha) + _z(power)) * sd / effect) ** 2))


def detectable_effect(sd: float, n: int, alpha: float, power: float) -> float:
    """The smallest improvement above the margin that ``n`` records detect with ``power``."""
    return (_z(1.0 - alpha) + _z(power)) * sd / math.sqrt(max(n, 1))


def label_sd(labels: np.ndarray) -> float:
    """The per-record SD of the macro difference assumed from the labels (n, C) alone:
    ``sqrt(sum_k 1/p_k / (2 K^2))`` over the K classes with a positive record (NaN: none)."""
    import numpy as np

    prevalence = np.asarray(labels, dtype=np.float64).mean(axis=0) if len(labels) else np.zeros(0)
    scored = prevalence[prevalence > 0]
    if not len(scored):
        return math.nan
    return math.sqrt(float((1.0 / scored).sum()) / (2.0 * len(scored) ** 2))


@dataclass(frozen=True)
class PowerCheck:
    """Whether ``n_records`` suffice for the gate to detect ``effect`` above ``margin``."""

    n_records: int
    required: int
    sd: float
    sd_source: str  # SD_FROM_LABELS or SD_FROM_DATA
    margin: float
    effect: float
    alpha: float  # the attempt's one-sided level
    power: float
    attempt: int
    metric: str = "macro_f_beta"

    @property
    def sufficient(self) -> bool:
        """Enough records (never when no class has a positive record: nothing to score)."""
        return math.isfinite(self.sd) and self.n_records >= self.required

    @property
    def detectable(self) -> float:
        """The improvement above the margin these records detect with the configured power."""
        return detectable_effect(self.sd, self.n_records, self.alpha, self.power)

    def assumptions(self) -> str:
        return (
            f"power {self.power:g} to detect an improvement of {self.effect:g} in {self.metric} above the margin "
            f"{self.margin:g}, one-sided alpha {self.alpha:.4g} (attempt {self.attempt}), per-record SD "
            f"{self.sd:.3f} of the paired difference {self.sd_source}"
        )

    def describe(self) -> str:
        """One line: the records there are, the records needed, and the assumptions."""
        if not math.isfinite(self.sd):
            return f"{self.n_records} test records, none positive for any class: the gate has nothing to compare"
        verdict, only = ("enough", "") if self.sufficient else ("too few", "only ")
        return (
            f"{self.n_records} labelled test records, {verdict}: the gate needs >= {self.required} "
            f"({self.assumptions()}); {self.n_records} records detect {only}an improvement of "
            f">= {self.detectable:.3f}"
        )

    def to_json(self) -> dict[str, object]:
        return asdict(self) | {"sufficient": self.sufficient}

    @classmethod
    def from_json(cls, data: dict) -> PowerCheck:
        """The check :meth:`to_json` wrote (``sufficient`` is recomputed)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def power_check(
    n_records: int,
    sd: float,
    sd_source: str,
    config: PowerConfig = PowerConfig(),
    margin: float = 0.0,
    attempt: int = 1,
    metric: str = "macro_f_beta",
) -> PowerCheck:
    """The :class:`PowerCheck` of attempt ``attempt`` on ``n_records`` records with per-record SD ``sd``."""
    alpha = attempt_alpha(config.alpha, attempt)
    required = required_records(sd, config.effect, alpha, config.power) if math.isfinite(sd) else 0
    return PowerCheck(n_records, required, sd, sd_source, margin, config.effect, alpha, config.power, attempt, metric)


def label_power_check(labels: np.ndarray, config: PowerConfig = PowerConfig(), margin: float = 0.0) -> PowerCheck:
    """Before training: the first attempt on the test records whose labels are ``labels`` (n, C),
    sigma assumed from the labels (:func:`label_sd`)."""
    return power_check(len(labels), label_sd(labels), SD_FROM_LABELS, config, margin)
