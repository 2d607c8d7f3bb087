"""Label-free drift checks of one site: do recent records still look like the champion's reference?

Nothing here needs a label of a recent record. The inputs are, for the reference records (what
the champion was trained and validated on) and for the recent records, the champion's outputs
(:class:`Observations`): the backbone's pooled embeddings (``ECGTransformer.pooled``, what its
classifier reads), the sigmoid probabilities, the thresholded diagnoses, and how many records
were unreadable (:func:`ml.data.quality.check_signal` failed, or the file could not be read).

Four checks, each a test with a p-value (and an interval where one is meaningful):

1. **Embedding drift**: the squared maximum mean discrepancy (MMD², unbiased estimator; Gretton
   et al., "A kernel two-sample test", JMLR 13:723, 2012) between reference and recent
   embeddings with a Gaussian (RBF) kernel whose bandwidth is the median heuristic (the median
   pairwise squared distance of the pooled, standardised sample), and a permutation p-value
   (:attr:`DriftConfig.permutations` seeded relabellings of the pooled sample, vectorised;
   ``(1 + #{null >= observed}) / (1 + permutations)``, exact at any sample size). The
   standardisation and the bandwidth are symmetric functions of the pooled sample, so the
   permutation test keeps its level.
2. **Prediction-prevalence shift** per class: the recent predicted-positive rate against the
   reference's, Fisher's exact test (valid at any count), Holm's correction over the classes,
   and Newcombe's hybrid-score interval (method 10) of the difference.
3. **Signal quality**: the rate of unreadable recent records, one-sided exact binomial test
   against ``max(reference rate, DriftConfig.quality_baseline)`` and its Wilson interval.
4. **Performance without labels**: the *difference of average confidence* (DoC; Guillory et
   al., "Predicting with confidence on unseen distributions", ICCV 2021), per class the
   confidence ``max(p, 1 - p)`` averaged over classes and records; DoC estimates the change in
   accuracy as the change in average confidence. One-sided Welch test of a drop larger than
   :attr:`DriftConfig.confidence_tolerance`. Known limits, stated honestly: it is an estimate,
   not a measurement; a model that stays confidently wrong on shifted data (over-confidence under
   covariate shift, the usual failure of softmax/sigmoid confidences) shows no drop; it says
   nothing under pure label shift (the prevalence check covers that); Garg et al. ("Leveraging
   unlabeled data to predict out-of-distribution performance", ICLR 2022) prove no label-free
   estimate can be right under every shift. Their ATC (average thresholded confidence) needs
   labelled held-out reference records to place its threshold; :func:`atc_accuracy` computes it
   when the reference records carry labels, reported beside DoC, never decided on.

The decision (:func:`drift_report`): the four checks share the false-alarm level
:attr:`DriftConfig.alpha` (Bonferroni: each at ``alpha / 4``; the classes of check 2 Holm
within its share), so an unshifted site raises a false alarm in at most ``alpha`` of the
reports. ``drift`` when any check rejects; else ``insufficient evidence`` when a check could
not run (fewer readable recent records than :attr:`DriftConfig.min_recent`, or reference records
than :attr:`DriftConfig.min_reference`); else ``no drift``. ``no drift`` is not proof of no
drift: :attr:`DriftReport.records_needed` says how many recent records a prevalence change of
:attr:`DriftConfig.prevalence_effect` needs to be found with :attr:`DriftConfig.power`.

Pure numpy / scipy: no torch, no MLflow (the command is :mod:`pipeline.cli.monitor`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

DRIFT, NO_DRIFT, INSUFFICIENT = "drift", "no drift", "insufficient evidence"
N_CHECKS = 4  # embedding, prevalence, quality, confidence: the Bonferroni split of alpha


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds of the drift checks (each one's reason in its comment)."""

    # False-alarm level of one report over all four checks (Bonferroni: alpha / 4 each). 5%:
    # a weekly monitor of an unshifted site then raises about 2.6 false alarms a year.
    alpha: float = 0.05
    # Permutations of the MMD test: the smallest p-value is 1 / (permutations + 1) (0.0033 at
    # 300, below alpha / 4 = 0.0125 with room); the p-value's Monte-Carlo error at p = 0.0125
    # is sqrt(p (1 - p) / 300) = 0.0064.
    permutations: int = 300
    seed: int = 0
    # Readable recent records below which no embedding, prevalence or confidence decision is
    # made ("insufficient evidence"). 30: the MMD test has little power below it (in
    # bench/monitor.py a 1.5x gain change is found in ~40% of 30-record batches against
    # ~100% of 100-record ones), Fisher's test of a 10-point prevalence change needs hundreds,
    # and the normal approximation of the confidence test needs ~30 per side.
    min_recent: int = 30
    min_reference: int = 30
    # Records per side the MMD kernel uses (a seeded subsample beyond): its cost is
    # (m + n)^2 x permutations; 500 + 500 records take about a second.
    max_records: int = 500
    # Unreadable rate tolerated before the quality check counts it as drift, when the
    # reference's own rate is lower (the champion's training records passed ingest's quality
    # check, so theirs is 0): 2% of records failing is the order of real collections (the
    # PhysioNet/CinC 2011 set-a: ~25% unacceptable, curated databases: well under 2%).
    quality_baseline: float = 0.02
    # Drop of average confidence tolerated (DoC, fraction of accuracy): a 2-point estimated
    # accuracy drop is within what a retraining would be asked to recover.
    confidence_tolerance: float = 0.02
    # The prevalence change (absolute) and power :attr:`DriftReport.records_needed` reports for.
    prevalence_effect: float = 0.10
    power: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.power < 1:
            raise ValueError(f"DriftConfig: alpha and power must be within (0, 1), got {self.alpha}, {self.power}")
        if self.permutations < 1 or self.min_recent < 2 or self.min_reference < 2 or self.max_records < 2:
            raise ValueError("DriftConfig: permutations >= 1, min_recent, min_reference and max_records >= 2")
        if not 0 <= self.quality_baseline < 1 or not 0 < self.prevalence_effect < 1 or self.confidence_tolerance < 0:
            raise ValueError(
                "DriftConfig: quality_baseline in [0, 1), prevalence_effect in (0, 1), confidence_tolerance >= 0"
            )

    @property
    def level(self) -> float:
        """The level of each of the four checks."""
        return self.alpha / N_CHECKS


@dataclass(frozen=True)
class Observations:
    """The champion's outputs on one set of records: ``embeddings`` (n, d), ``probs`` (n, C)
    and ``positive`` (n, C, thresholded) of the readable records, ``n_unreadable`` records
    left out, and optionally ``labels`` (n, C; reference records with a Dx line, for ATC)."""

    embeddings: np.ndarray
    probs: np.ndarray
    positive: np.ndarray
    n_unreadable: int = 0
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.embeddings)
        if self.embeddings.ndim != 2 or self.probs.ndim != 2 or self.positive.shape != self.probs.shape:
            raise ValueError("Observations: embeddings (n, d), probs and positive (n, C) of the same shape")
        if len(self.probs) != n or (self.labels is not None and self.labels.shape != self.probs.shape):
            raise ValueError("Observations: one row per readable record in every array")

    @property
    def n(self) -> int:
        return len(self.embeddings)

    @property
    def n_total(self) -> int:
        return self.n + self.n_unreadable


# --------------------------------------------------------------------------- 1. embeddings


@dataclass(frozen=True)
class EmbeddingDrift:
    """MMD² of the embeddings, its permutation p-value and null sample, the kernel's bandwidth."""

    statistic: float
    p_value: float
    null: np.ndarray = field(repr=False)
    bandwidth: float = 0.0  # sigma² of exp(-|x - y|² / (2 sigma²)) in standardised units
    n_reference: int = 0
    n_recent: int = 0

    def to_dict(self) -> dict[str, Any]:
        q = np.quantile(self.null, [0.5, 0.95, 0.99]) if self.null.size else [math.nan] * 3
        return {
            "statistic": self.statistic,
            "p_value": self.p_value,
            "bandwidth": self.bandwidth,
            "n_reference": self.n_reference,
            "n_recent": self.n_recent,
            "permutations": int(self.null.size),
            "null_median": float(q[0]),
            "null_q95": float(q[1]),
            "null_q99": float(q[2]),
        }


def subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` rows of ``x``, drawn without replacement (all of them, in order, when fewer)."""
    if len(x) <= limit:
        return x
    return x[np.sort(rng.choice(len(x), size=limit, replace=False))]


def standardise(pooled: np.ndarray) -> np.ndarray:
    """Each feature of ``pooled`` to mean 0 and standard deviation 1 (a constant feature to 0)."""
    sd = pooled.std(axis=0)
    return (pooled - pooled.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def squared_distances(z: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (N, N) of the rows of ``z``."""
    sq = np.einsum("ij,ij->i", z, z)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)


def median_bandwidth(d2: np.ndarray) -> float:
    """The median heuristic: sigma² = median of the positive pairwise squared distances / 2
    (the kernel is then exp(-d² / median)); 1 when every point coincides."""
    upper = d2[np.triu_indices(len(d2), k=1)]
    positive = upper[upper > 0]
    return float(np.median(positive)) / 2.0 if positive.size else 1.0


def mmd2_statistics(kernel: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each row of ``masks`` (P, N; True = first sample) over the pooled
    ``kernel`` (N, N): one matrix product for every labelling at once."""
    k0 = kernel - np.diag(np.diag(kernel))
    a = masks.astype(np.float64)
    m = a.sum(axis=1)
    n = kernel.shape[0] - m
    ka = k0 @ a.T  # (N, P)
    s_xx = np.einsum("pn,np->p", a, ka)
    s_xy = a @ k0.sum(axis=1) - s_xx
    s_yy = k0.sum() - s_xx - 2.0 * s_xy
    return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2.0 * s_xy / (m * n)


def embedding_drift(reference: np.ndarray, recent: np.ndarray, config: DriftConfig = DriftConfig()) -> EmbeddingDrift:
    """MMD² (RBF kernel, median-heuristic bandwidth) of ``reference`` (m, d) against
    ``recent`` (n, d) with its permutation p-value (see the module doc)."""
    rng = np.random.default_rng(config.seed)
    x = subsample(np.asarray(reference, dtype=np.float64), config.max_records, rng)
    y = subsample(np.asarray(recent, dtype=np.float64), config.max_records, rng)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"embedding_drift: need >= 2 records per side, got {len(x)} and {len(y)}")
    z = standardise(np.vstack([x, y]))
    d2 = squared_distances(z)
    sigma2 = median_bandwidth(d2)
    kernel = np.exp(-d2 / (2.0 * sigma2))
    observed = np.zeros((1, len(z)), dtype=bool)
    observed[0, : len(x)] = True
    statistic = float(mmd2_statistics(kernel, observed)[0])
    masks = np.zeros((config.permutations, len(z)), dtype=bool)
    for row in masks:
        row[rng.permutation(len(z))[: len(x)]] = True
    null = mmd2_statistics(kernel, masks)
    p_value = float((1 + np.count_nonzero(null >= statistic - 1e-12)) / (1 + config.permutations))
    return EmbeddingDrift(statistic, p_value, null, sigma2, len(x), len(y))


# --------------------------------------------------------------------------- 2. prevalence


@dataclass(frozen=True)
class PrevalenceShift:
    """One class's predicted-positive rate, reference against recent."""

    label: str
    reference_rate: float
    recent_rate: float
    ci_low: float  # Newcombe interval of recent - reference at 1 - DriftConfig.level
    ci_high: float
    p_value: float  # Fisher's exact test, two-sided
    p_adjusted: float  # Holm over the classes

    @property
    def difference(self) -> float:
        return self.recent_rate - self.reference_rate


def wilson_interval(k: int, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n at confidence ``1 - level``."""
    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(1 - level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, level: float) -> tuple[float, float]:
    """Newcombe's hybrid-score interval (method 10) of p2 - p1 at confidence ``1 - level``."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, level)
    l2, u2 = wilson_interval(k2, n2, level)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def prevalence_shift(
    reference: np.ndarray, recent: np.ndarray, labels: Sequence[str], config: DriftConfig = DriftConfig()
) -> list[PrevalenceShift]:
    """Per class, the predicted-positive rates of ``reference`` (m, C) and ``recent`` (n, C)
    (booleans), Fisher's test, Holm's correction and Newcombe's interval."""
    ref, rec = np.asarray(reference, dtype=bool), np.asarray(recent, dtype=bool)
    m, n = len(ref), len(rec)
    k_ref, k_rec = ref.sum(axis=0).astype(int), rec.sum(axis=0).astype(int)
    p_values = [float(stats.fisher_exact([[a, m - a], [b, n - b]]).pvalue) for a, b in zip(k_ref, k_rec, strict=True)]
    adjusted = holm(p_values)
    shifts = []
    for i, label in enumerate(labels):
        low, high = newcombe_interval(int(k_ref[i]), m, int(k_rec[i]), n, config.level)
        shifts.append(
            PrevalenceShift(str(label), k_ref[i] / m, k_rec[i] / n, low, high, p_values[i], float(adjusted[i]))
        )
    return shifts


def records_needed(p0: float, effect: float, alpha: float, power: float) -> int:
    """Records per group a two-sided two-proportion test at ``alpha`` needs to find a change
    of ``effect`` from ``p0`` with ``power`` (normal approximation; Fleiss, Statistical
    Methods for Rates and Proportions, 3rd ed., eq. 4.14, without continuity correction)."""
    p1 = min(max(p0, 1e-6), 1 - 1e-6)
    p2 = min(max(p1 + effect if p1 + effect <= 1 else p1 - effect, 1e-6), 1 - 1e-6)
    bar = (p1 + p2) / 2
    za, zb = float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))
    root = za * math.sqrt(2 * bar * (1 - bar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root**2 / (p2 - p1) ** 2)


# --------------------------------------------------------------------------- 3. signal quality


@dataclass(frozen=True)
class QualityShift:
    """The unreadable rate of the recent records against the tolerated baseline."""

    unreadable: int
    n_records: int
    baseline: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided exact binomial, rate > baseline

    @property
    def rate(self) -> float:
        return self.unreadable / self.n_records if self.n_records else math.nan


def quality_shift(
    unreadable: int, n_records: int, baseline: float, config: DriftConfig = DriftConfig()
) -> QualityShift:
    """One-sided exact binomial test of ``unreadable`` of ``n_records`` above ``baseline``."""
    if n_records == 0:
        return QualityShift(0, 0, baseline, 0.0, 1.0, 1.0)
    low, high = wilson_interval(unreadable, n_records, config.level)
    if baseline > 0:
        p = float(stats.binomtest(unreadable, n_records, baseline, alternative="greater").pvalue)
    else:  # nothing tolerated: any unreadable record rejects
        p = 0.0 if unreadable else 1.0
    return QualityShift(unreadable, n_records, baseline, low, high, p)


# --------------------------------------------------------------------------- 4. confidence


@dataclass(frozen=True)
class ConfidenceShift:
    """Difference of average confidence (DoC): recent - reference, its interval and test."""

    reference_mean: float
    recent_mean: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided Welch test of a drop larger than the tolerance
    tolerance: float
    atc_reference: float | None = None  # ATC's accuracy on the reference (labelled) records
    atc_recent: float | None = None  # ATC's estimated accuracy on the recent records

    @property
    def change(self) -> float:
        return self.recent_mean - self.reference_mean


def confidence(probs: np.ndarray) -> np.ndarray:
    """Per record, the mean over classes of the binary confidence max(p, 1 - p)."""
    p = np.asarray(probs, dtype=np.float64)
    return np.maximum(p, 1.0 - p).mean(axis=1)


def atc_accuracy(
    ref_probs: np.ndarray, ref_positive: np.ndarray, ref_labels: np.ndarray, recent_probs: np.ndarray
) -> tuple[float, float]:
    """ATC (Garg et al. 2022) per class, averaged: the threshold t_c on the confidence
    max(p, 1 - p) under which as many reference records fall as the class's reference errors;
    the estimated accuracy is the share of recent records at or above t_c. Returns (reference
    accuracy, estimated recent accuracy), both means over classes."""
    ref_conf = np.maximum(ref_probs, 1.0 - ref_probs)
    rec_conf = np.maximum(recent_probs, 1.0 - recent_probs)
    accuracy = (np.asarray(ref_positive, dtype=bool) == np.asarray(ref_labels, dtype=bool)).mean(axis=0)
    estimates = []
    for c in range(ref_conf.shape[1]):
        t = float(np.quantile(ref_conf[:, c], 1.0 - accuracy[c])) if accuracy[c] < 1 else -np.inf
        estimates.append(float((rec_conf[:, c] >= t).mean()))
    return float(accuracy.mean()), float(np.mean(estimates))


def confidence_shift(
    reference: Observations, recent: Observations, config: DriftConfig = DriftConfig()
) -> ConfidenceShift:
    """DoC of ``recent`` against ``reference`` (and ATC when the reference has labels)."""
    a, b = confidence(reference.probs), confidence(recent.probs)
    diff = float(b.mean() - a.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    z = float(stats.norm.ppf(1 - config.level / 2))
    # H0: the drop is within the tolerance (diff >= -tolerance); small p: a larger drop
    p = (
        float(stats.norm.cdf((diff + config.confidence_tolerance) / se))
        if se > 0
        else float(diff < -config.confidence_tolerance)
    )
    atc: tuple[float | None, float | None] = (None, None)
    if reference.labels is not None and len(reference.labels):
        atc = atc_accuracy(reference.probs, reference.positive, reference.labels, recent.probs)
    return ConfidenceShift(
        float(a.mean()), float(b.mean()), diff - z * se, diff + z * se, p, config.confidence_tolerance, *atc
    )


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class DriftReport:
    """Every check's statistic, p-value and interval, the record counts and the decision."""

    decision: str  # DRIFT | NO_DRIFT | INSUFFICIENT
    reasons: tuple[str, ...]
    n_reference: int
    n_recent: int  # readable recent records
    n_recent_unreadable: int
    alpha: float
    min_recent: int
    records_needed: int  # recent records a prevalence change of config.prevalence_effect needs
    embedding: EmbeddingDrift | None
    prevalence: tuple[PrevalenceShift, ...]
    quality: QualityShift
    confidence: ConfidenceShift | None
    config: DriftConfig = DriftConfig()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the numbers, the decision and its reasons, the configuration."""
        return {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "n_reference": self.n_reference,
            "n_recent": self.n_recent,
            "n_recent_unreadable": self.n_recent_unreadable,
            "alpha": self.alpha,
            "level_per_check": self.config.level,
            "min_recent": self.min_recent,
            "records_needed": self.records_needed,
            "embedding": self.embedding.to_dict() if self.embedding else None,
            "prevalence": [asdict(s) | {"difference": s.difference} for s in self.prevalence],
            "quality": asdict(self.quality) | {"rate": self.quality.rate},
            "confidence": asdict(self.confidence) | {"change": self.confidence.change} if self.confidence else None,
            "config": asdict(self.config),
        }

    def metrics(self) -> dict[str, float]:
        """The numbers as flat MLflow metrics (finite values only)."""
        out: dict[str, float] = {
            "n_reference": self.n_reference,
            "n_recent": self.n_recent,
            "n_recent_unreadable": self.n_recent_unreadable,
            "unreadable_rate": self.quality.rate,
            "unreadable_p_value": self.quality.p_value,
            "drift": float(self.decision == DRIFT),
        }
        if self.embedding:
            out |= {"mmd2": self.embedding.statistic, "mmd2_p_value": self.embedding.p_value}
        if self.confidence:
            out |= {
                "confidence_change": self.confidence.change,
                "confidence_p_value": self.confidence.p_value,
            }
            if self.confidence.atc_recent is not None:
                out |= {
                    "atc_reference": float(self.confidence.atc_reference or 0),
                    "atc_recent": self.confidence.atc_recent,
                }
        for s in self.prevalence:
            out |= {f"prevalence_change_{s.label}": s.difference, f"prevalence_p_{s.label}": s.p_adjusted}
        return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def _checks(
    reference: Observations, recent: Observations, labels: Sequence[str], config: DriftConfig
) -> tuple[EmbeddingDrift | None, list[PrevalenceShift], ConfidenceShift | None]:
    """The checks that need readable records on both sides (None / [] when too few)."""
    if recent.n < config.min_recent or reference.n < config.min_reference:
        return None, [], None
    return (
        embedding_drift(reference.embeddings, recent.embeddings, config),
        prevalence_shift(reference.positive, recent.positive, labels, config),
        confidence_shift(reference, recent, config),
    )


def _reasons(
    embedding: EmbeddingDrift | None,
    prevalence: Sequence[PrevalenceShift],
    quality: QualityShift,
    conf: ConfidenceShift | None,
    level: float,
) -> list[str]:
    """One line per check that rejects at ``level``."""
    reasons = []
    if embedding is not None and embedding.p_value <= level:
        reasons.append(f"embedding drift: MMD² {embedding.statistic:.4g}, permutation p = {embedding.p_value:.4f}")
    for s in prevalence:
        if s.p_adjusted <= level:
            reasons.append(
                f"prevalence of {s.label}: {s.reference_rate:.1%} -> {s.recent_rate:.1%} predicted positive "
                f"(Holm p = {s.p_adjusted:.4f})"
            )
    if quality.n_records and quality.p_value <= level:
        reasons.append(
            f"signal quality: {quality.unreadable} of {quality.n_records} records unreadable ({quality.rate:.1%} > "
            f"{quality.baseline:.1%} tolerated, p = {quality.p_value:.4f})"
        )
    if conf is not None and conf.p_value <= level:
        reasons.append(
            f"confidence: average {conf.reference_mean:.3f} -> {conf.recent_mean:.3f} (estimated accuracy drop "
            f"{-conf.change:.3f} > {conf.tolerance:.3f}, p = {conf.p_value:.4f})"
        )
    return reasons


def drift_report(
    reference: Observations, recent: Observations, labels: Sequence[str], config: DriftConfig = DriftConfig()
) -> DriftReport:
    """Run the four checks and decide (see the module doc). ``labels``: the class names, in
    the column order of ``probs`` / ``positive``."""
    if reference.probs.shape[1] != len(labels) or recent.probs.shape[1] != len(labels):
        raise ValueError(f"drift_report: {len(labels)} labels for {reference.probs.shape[1]} classes")
    embedding, prevalence, conf = _checks(reference, recent, labels, config)
    ref_rate = reference.n_unreadable / reference.n_total if reference.n_total else 0.0
    quality = quality_shift(recent.n_unreadable, recent.n_total, max(ref_rate, config.quality_baseline), config)
    level = config.level
    reasons = _reasons(embedding, prevalence, quality, conf, level)
    rates = reference.positive.mean(axis=0) if reference.n else np.full(len(labels), 0.5)
    hardest = float(rates[np.argmin(np.abs(rates - 0.5))]) if len(rates) else 0.5  # the largest variance
    needed = records_needed(hardest, config.prevalence_effect, level / max(len(labels), 1), config.power)
    if reasons:
        decision = DRIFT
    elif embedding is None:
        decision = INSUFFICIENT
        reasons = [
            f"{recent.n} readable recent records (of {recent.n_total}) and {reference.n} reference records: "
            f"need >= {config.min_recent} and >= {config.min_reference}"
        ]
    else:
        decision = NO_DRIFT
        reasons = [
            f"no check rejects at {level:.4f} each (alpha {config.alpha} over {N_CHECKS} checks); a "
            f"{config.prevalence_effect:.0%} prevalence change needs ~{needed} recent records to be found with "
            f"power {config.power:.0%}"
        ]
    return DriftReport(
        decision,
        tuple(reasons),
        reference.n,
        recent.n,
        recent.n_unreadable,
        config.alpha,
        config.min_recent,
        needed,
        embedding,
        tuple(prevalence),
        quality,
        conf,
        config,
    )
