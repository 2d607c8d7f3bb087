"""Calibrated answers: a split-conformal "refer to a cardiologist" band per critical class.

A model's per-class thresholds are fitted on a few validation records and are not, by
themselves, a statement about how often the model misses a disease. This module turns a
**calibration split** (records not used to train the model nor to fit its thresholds: their
probabilities and labels) into three answers per critical class instead of two:

- ``absent`` when ``p < t_low``,
- ``present`` when ``p >= t_high``,
- ``refer`` (to a cardiologist) in between.

**The lower threshold (split conformal).** For a critical class with ``k`` positive
calibration records and target miss rate ``alpha``, let ``m = floor(alpha (k + 1))`` and
``t_low`` the ``m``-th smallest probability of those positives. This is the split-conformal
quantile of the nonconformity score ``1 - p`` over the positives: its
``ceil((k + 1)(1 - alpha))``-th smallest value, i.e. the ``ceil((k+1)(1-alpha))/k`` empirical
quantile with the finite-sample correction. A new positive record is *missed* (answered
``absent``) when its probability is below ``t_low``. If the calibration positives and the new
positive record are **exchangeable** (drawn from the same distribution, e.g. the same site and
case mix, in no particular order), its rank among the ``k + 1`` is uniform, so

    P(miss) = P(p_new < t_low | positive) <= m / (k + 1) <= alpha

(equality to ``m / (k + 1)`` for continuous scores without ties): :attr:`Calibration.miss_rate_bound`.

What the guarantee **is**: marginal, per class — averaged over the draw of the calibration
split *and* over new positive records of that class. What it **is not**: conditional on a
record (a given patient's answer may be wrong more often than ``alpha``), conditional on a
subgroup (site, age, another disease), a joint statement over classes (with several critical
classes, the chance of missing at least one can reach their sum), nor anything at all when the
new records are not exchangeable with the calibration split (another hospital, a shift in
case mix, a new device: re-calibrate there). It bounds misses only: it says nothing about how
many records are referred (the refer rate is the price, and it is reported, not controlled).

Given the calibration split, the miss rate of the fixed ``t_low`` is itself random,
``Beta(m, k - m + 1)``; its ``confidence`` quantile, :attr:`Calibration.miss_rate_upper`, is
the one-sided **Clopper-Pearson** upper bound of the ``m - 1`` calibration positives below
``t_low`` out of ``k`` (the two coincide), so with probability ``confidence`` over the
calibration draw the class's miss rate is at most that value.

**Too few positives.** ``m >= 1`` needs ``k >= ceil(1 / alpha) - 1`` positives (19 at
``alpha = 0.05``). With fewer, no ``t_low`` reaches the target: the class gets **no absent
decision at all**, only ``present`` / ``refer``, and its :attr:`Calibration.note` says
``insufficient calibration positives (k < needed)``.

**The upper threshold** ``t_high`` is the model's fitted threshold (what decided ``present``
before calibration), raised to ``t_low`` when it is below it (then there is no refer band:
the conformal ``t_low`` alone decides). Calibration therefore never diagnoses more than the
fitted thresholds do; it only stops answering ``absent`` where a miss is not bounded.

**Non-critical classes** keep ``present`` / ``absent`` by the fitted threshold; their
:attr:`Calibration.miss_rate_upper` is the Clopper-Pearson upper bound of their calibration
misses at that threshold (a description, not a guarantee the threshold was chosen for).

Critical classes are named by code or Challenge abbreviation (:data:`DEFAULT_CRITICAL`: AF,
stroke risk and anticoagulation; LBBB, which masks ischaemia and, new, is treated as a STEMI
equivalent; STach, the class whose fitted threshold of 0.011 prompted this). The result is
saved as ``calibration.json`` (:data:`SCHEMA_VERSION`) and given to
:class:`ml.eval.predictor.Predictor` (``calibration``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
FILENAME = "calibration.json"
PRESENT, ABSENT, REFER = "present", "absent", "refer"
DEFAULT_CRITICAL = ("AF", "LBBB", "STach")


@dataclass(frozen=True)
class CalibrationConfig:
    """What to calibrate for: the target miss rate of the critical classes (by code or
    abbreviation) and the confidence of :attr:`Calibration.miss_rate_upper`."""

    target_miss_rate: float = 0.05
    critical: tuple[str, ...] = DEFAULT_CRITICAL
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.target_miss_rate < 1.0:
            raise ValueError(f"target_miss_rate must be in (0, 1), got {self.target_miss_rate}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        object.__setattr__(self, "critical", tuple(str(c) for c in self.critical))

    @property
    def positives_needed(self) -> int:
        """The fewest calibration positives with ``floor(alpha (k + 1)) >= 1``."""
        return needed_positives(self.target_miss_rate)

    def critical_codes(self) -> set[str]:
        """The critical classes as canonical SNOMED codes (a name the mapping lacks stays as given)."""
        try:
            from ml.data.labels import LabelMapping

            mapping = LabelMapping.from_csv()
        except (ValueError, KeyError, OSError):
            return set(self.critical)
        codes = set()
        for name in self.critical:
            try:
                codes.add(mapping.code_for(name))
            except ValueError:
                codes.add(name)
        return codes


@dataclass(frozen=True)
class Calibration:
    """One class's calibrated decision: ``absent`` below ``t_low``, ``present`` from ``t_high``,
    ``refer`` in between (``t_low`` is ``None`` when the class has no absent decision)."""

    code: str
    critical: bool
    t_low: float | None
    t_high: float
    n_calibration: int
    n_positives: int
    miss_rate_bound: float | None  # conformal m / (k + 1) (critical classes with enough positives)
    miss_rate_upper: float | None  # Clopper-Pearson upper bound at the config's confidence
    note: str = ""

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """``present`` / ``absent`` / ``refer`` of each probability (``""`` for NaN)."""
        p = np.asarray(probs, dtype=np.float64)
        out = np.full(p.shape, REFER, dtype=object)
        out[p >= self.t_high] = PRESENT
        if self.t_low is not None:
            out[p < self.t_low] = ABSENT
        out[np.isnan(p)] = ""
        return out


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration of every class of a model, in the model's class order."""

    config: CalibrationConfig
    classes: tuple[Calibration, ...]
    schema_version: int = field(default=SCHEMA_VERSION)

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.classes]

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Decisions ``(N, C)`` of probabilities ``(N, C)`` in :attr:`codes` order."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.classes):
            raise ValueError(f"expected probabilities (N, {len(self.classes)}), got {p.shape}")
        if not len(p):
            return np.zeros((0, len(self.classes)), dtype=object)
        return np.stack([c.decide(p[:, j]) for j, c in enumerate(self.classes)], axis=1)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": self.schema_version,
                "config": {**asdict(self.config), "critical": list(self.config.critical)},
                "classes": [asdict(c) for c in self.classes],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> CalibrationSet:
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"calibration schema version {version!r} is not {SCHEMA_VERSION} (re-calibrate)")
        config = CalibrationConfig(**{**data["config"], "critical": tuple(data["config"]["critical"])})
        return cls(config=config, classes=tuple(Calibration(**c) for c in data["classes"]))

    def save(self, path: str | Path) -> Path:
        """Write ``calibration.json`` (``path`` a folder) or ``path`` itself."""
        target = Path(path)
        if target.is_dir():
            target = target / FILENAME
        target.write_text(self.to_json() + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        source = Path(path)
        if source.is_dir():
            source = source / FILENAME
        return cls.from_json(source.read_text(encoding="utf-8"))


def needed_positives(alpha: float) -> int:
    """Smallest ``k`` with ``floor(alpha (k + 1)) >= 1``."""
    return max(math.ceil(1.0 / alpha - 1e-9) - 1, 1)


def conformal_rank(alpha: float, k: int) -> int:
    """``m = floor(alpha (k + 1))``: ``t_low`` is the ``m``-th smallest positive score (0: none)."""
    return math.floor(alpha * (k + 1) + 1e-9)


def clopper_pearson_upper(misses: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of a binomial proportion (1 when ``n`` is 0)."""
    from scipy.stats import beta

    if n <= 0 or misses >= n:
        return 1.0
    return float(beta.ppf(confidence, misses + 1, n - misses))


def calibrate_class(
    code: str,
    probs: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    critical: bool,
    config: CalibrationConfig,
) -> Calibration:
    """One class's :class:`Calibration` from its calibration probabilities and 0/1 labels."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    keep = ~np.isnan(p)
    p, y = p[keep], y[keep]
    positives = np.sort(p[y])
    k = len(positives)
    threshold = float(threshold)
    if not critical:
        misses = int(np.sum(positives < threshold))
        return Calibration(
            code=code,
            critical=False,
            t_low=threshold,
            t_high=threshold,
            n_calibration=len(p),
            n_positives=k,
            miss_rate_bound=None,
            miss_rate_upper=clopper_pearson_upper(misses, k, config.confidence) if k else None,
        )
    alpha = config.target_miss_rate
    m = conformal_rank(alpha, k)
    if m < 1:
        needed = config.positives_needed
        return Calibration(
            code=code,
            critical=True,
            t_low=None,
            t_high=threshold,
            n_calibration=len(p),
            n_positives=k,
            miss_rate_bound=None,
            miss_rate_upper=None,
            note=f"insufficient calibration positives ({k} < {needed}): no absent decision, only present/refer",
        )
    t_low = float(positives[m - 1])
    return Calibration(
        code=code,
        critical=True,
        t_low=t_low,
        t_high=max(threshold, t_low),
        n_calibration=len(p),
        n_positives=k,
        miss_rate_bound=m / (k + 1),
        miss_rate_upper=clopper_pearson_upper(m - 1, k, config.confidence),
    )


def calibrate(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float] | np.ndarray,
    config: CalibrationConfig | None = None,
) -> CalibrationSet:
    """The :class:`CalibrationSet` of a model from a calibration split: probabilities and 0/1
    labels ``(N, C)`` in ``classes`` order (SNOMED codes) and the model's fitted thresholds."""
    config = config or CalibrationConfig()
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    t = np.asarray(thresholds, dtype=np.float64)
    if p.ndim != 2 or p.shape != y.shape or p.shape[1] != len(classes) or t.shape != (len(classes),):
        raise ValueError(
            f"probabilities {p.shape}, labels {y.shape} and thresholds {t.shape} do not match {len(classes)} classes"
        )
    from ml.data.labels import canonical_code

    critical = config.critical_codes()
    return CalibrationSet(
        config=config,
        classes=tuple(
            calibrate_class(str(c), p[:, j], y[:, j], float(t[j]), canonical_code(str(c)) in critical, config)
            for j, c in enumerate(classes)
        ),
    )
