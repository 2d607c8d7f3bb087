"""Label-free drift checks (ml/eval/drift.py) on synthetic embeddings and predictions: the
level of each test and of a whole report on unshifted data, power against real shifts, the
insufficient-evidence rule and the decision's reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ml.eval.drift import (
    DRIFT,
    INSUFFICIENT,
    NO_DRIFT,
    DriftConfig,
    Observations,
    atc_accuracy,
    confidence_shift,
    drift_report,
    embedding_drift,
    holm,
    mmd2_statistics,
    newcombe_interval,
    prevalence_shift,
    quality_shift,
    records_needed,
)

FAST = DriftConfig(permutations=99)
LABELS = ["a", "b", "c"]
W = np.random.default_rng(99).normal(size=(8, len(LABELS)))  # a fixed "classifier" of the embeddings


def sample(n: int, rng: np.random.Generator, shift: float = 0.0, unreadable: int = 0) -> Observations:
    """n records: 8-d Gaussian embeddings (mean ``shift``), sigmoid probabilities of a fixed
    linear classifier of them, thresholded at 0.5."""
    emb = rng.normal(loc=shift, size=(n, 8))
    probs = 1.0 / (1.0 + np.exp(-(emb @ W) / 2.0))
    return Observations(emb, probs, probs >= 0.5, unreadable)


def test_mmd_statistic_matches_the_direct_unbiased_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 3))
    kernel = np.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / 2)
    mask = np.array([[True] * 4 + [False] * 5])
    x, y = kernel[:4, :4], kernel[4:, 4:]
    direct = (x.sum() - np.trace(x)) / (4 * 3) + (y.sum() - np.trace(y)) / (5 * 4) - 2 * kernel[:4, 4:].sum() / (4 * 5)
    assert mmd2_statistics(kernel, mask)[0] == pytest.approx(direct)


def test_no_drift_p_values_are_uniform_and_false_alarms_stay_at_the_level():
    """100 unshifted pairs of samples: the permutation p-values are uniform (KS) and the rate of
    p <= 0.05 is at most 5% + 3 simulation errors."""
    p = np.array(
        [
            embedding_drift(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)), FAST).p_value
            for rng in map(np.random.default_rng, range(100))
        ]
    )
    assert stats.kstest(p, "uniform").pvalue > 0.001, p
    assert (p <= 0.05).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)


def test_a_mean_shift_is_detected():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        result = embedding_drift(rng.normal(size=(60, 8)), rng.normal(loc=0.6, size=(40, 8)), FAST)
        assert result.p_value <= FAST.level and result.statistic > np.quantile(result.null, 0.99)
        assert result.n_reference == 60 and result.n_recent == 40 and result.null.size == 99


def test_prevalence_shift_finds_the_changed_class_only():
    rng = np.random.default_rng(1)
    ref = np.column_stack([rng.random(400) < 0.2, rng.random(400) < 0.3])
    rec = np.column_stack([rng.random(150) < 0.5, rng.random(150) < 0.3])
    changed, same = prevalence_shift(ref, rec, ["x", "y"])
    assert changed.p_adjusted <= DriftConfig().level and changed.ci_low > 0.1 and changed.ci_high < 0.5
    assert changed.ci_low < changed.difference < changed.ci_high
    assert same.p_adjusted > 0.05


def test_holm_and_newcombe_against_known_values():
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> 95% CI of the difference 0.0524 to 0.3339
    low, high = newcombe_interval(48, 80, 56, 70, 0.05)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=5e-4)


def test_records_needed_is_the_textbook_sample_size():
    assert records_needed(0.5, 0.1, 0.05, 0.8) == 388  # Fleiss, no continuity correction
    assert records_needed(0.1, 0.1, 0.05, 0.8) < records_needed(0.5, 0.1, 0.05, 0.8)


def test_quality_shift_tests_the_unreadable_rate_against_the_baseline():
    assert quality_shift(10, 100, 0.02).p_value < 0.001
    assert quality_shift(2, 100, 0.02).p_value > 0.3
    q = quality_shift(10, 100, 0.02)
    assert q.rate == 0.1 and q.ci_low < 0.1 < q.ci_high


def test_confidence_drop_is_detected_and_atc_estimates_accuracy():
    rng = np.random.default_rng(2)
    ref, rec = sample(300, rng), sample(300, rng)
    flattened = Observations(rec.embeddings, 0.5 + (rec.probs - 0.5) * 0.3, rec.positive)
    assert confidence_shift(ref, rec, FAST).p_value > FAST.level
    drop = confidence_shift(ref, flattened, FAST)
    assert drop.change < -0.05 and drop.p_value <= FAST.level and drop.ci_high < 0
    labels = ref.positive.copy()
    labels[:30] = ~labels[:30]  # 10% wrong on the reference
    accuracy, estimate = atc_accuracy(ref.probs, ref.positive, labels, ref.probs)
    assert accuracy == pytest.approx(0.9) and estimate == pytest.approx(0.9, abs=0.02)
    assert atc_accuracy(ref.probs, ref.positive, labels, flattened.probs)[1] < 0.8


def test_a_whole_report_raises_false_alarms_at_most_at_alpha():
    """40 unshifted sites (four checks each): false alarms at most alpha + 3 simulation errors."""
    alarms = [
        drift_report(sample(100, rng), sample(50, rng), LABELS, FAST).decision == DRIFT
        for rng in map(np.random.default_rng, range(100, 140))
    ]
    assert np.mean(alarms) <= FAST.alpha + 3 * math.sqrt(FAST.alpha * (1 - FAST.alpha) / 40)


def test_report_decides_drift_with_reasons_and_no_drift_otherwise():
    rng = np.random.default_rng(3)
    reference = sample(150, rng)
    shifted = drift_report(reference, sample(60, rng, shift=0.7), LABELS, FAST)
    assert shifted.decision == DRIFT and any(r.startswith("embedding drift") for r in shifted.reasons)
    calm = drift_report(reference, sample(60, np.random.default_rng(4)), LABELS, FAST)
    assert calm.decision == NO_DRIFT and "records to be found" in calm.reasons[0]
    doc = calm.to_dict()
    assert doc["n_recent"] == 60 and doc["embedding"]["permutations"] == 99 and len(doc["prevalence"]) == 3
    assert {"mmd2", "mmd2_p_value", "unreadable_rate", "confidence_change"} <= calm.metrics().keys()


def test_too_few_recent_records_is_insufficient_evidence_unless_quality_already_failed():
    rng = np.random.default_rng(5)
    reference = sample(100, rng)
    few = drift_report(reference, sample(12, rng), LABELS, FAST)
    assert few.decision == INSUFFICIENT and few.embedding is None and not few.prevalence
    assert "need >= 30" in few.reasons[0] and "12 readable" in few.reasons[0]
    broken = drift_report(reference, sample(12, rng, unreadable=18), LABELS, FAST)
    assert broken.decision == DRIFT and broken.reasons[0].startswith("signal quality: 18 of 30")


def test_config_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        DriftConfig(alpha=1.5)
    with pytest.raises(ValueError, match="permutations"):
        DriftConfig(permutations=0)
