"""The gate's statistics: the paired interval holds its level, retries spend it, the power
computation says how many records the gate needs.

Pure numpy (no registry): the interval's weighted counts against the metrics' own definition,
the jackknife-t interval against a leave-one-out loop, the simulated false-promotion rate of
two equally good models (200 frozen test sets of 24 records, 3 challengers each) and the
power formula with its label-based assumption.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import stdtrit

from ml.eval.bootstrap import (
    BOOTSTRAP_METRICS,
    JACKKNIFE_T,
    PERCENTILE,
    BootstrapConfig,
    macro_of_sums,
    metric_interval,
    paired_bootstrap,
    record_terms,
)
from ml.eval.gate_simulation import GateRule, Simulation, false_promotions, predictions
from ml.eval.metrics import thresholded_metrics
from ml.eval.power import (
    SD_FROM_LABELS,
    PowerConfig,
    attempt_alpha,
    detectable_effect,
    label_power_check,
    label_sd,
    required_records,
)


def _models(seed: int = 0, n: int = 40, classes: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < 0.25).astype(np.int64)
    y[:, -1] = 0  # a class without a positive record: left out of the macro mean
    y[0, 1], y[1:, 1] = 1, 0  # a class with one positive record: gone from some resamples
    a, b = ((rng.random(y.shape) < 0.3).astype(np.int64) for _ in range(2))
    return y, a, b


@pytest.mark.parametrize("metric", BOOTSTRAP_METRICS)
def test_weighted_counts_are_the_metrics_definition(metric):
    """Every reweighting (all records, each one left out, bootstrap resamples) gives the metric
    ml.eval.metrics computes on the same rows: the interval rests on the reported metric."""
    y, a, _ = _models()
    terms = record_terms(y, a, metric, 2.0)
    assert macro_of_sums(terms.totals()) == pytest.approx(thresholded_metrics(y, a)[metric], abs=1e-12)
    loo = macro_of_sums(terms.leave_one_out())
    for i in range(len(y)):
        rows = np.delete(np.arange(len(y)), i)
        assert loo[i] == pytest.approx(thresholded_metrics(y[rows], a[rows])[metric], abs=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = rng.integers(0, len(y), size=len(y))
        weights = np.bincount(idx, minlength=len(y)).astype(np.float64)[None, :]
        expected = thresholded_metrics(y[idx], a[idx])[metric]
        assert macro_of_sums(terms.sums(weights))[0] == pytest.approx(expected, abs=1e-12)


def test_the_jackknife_t_interval():
    """estimate -+ t_(n-1) x sqrt((n-1)/n sum (d_(i) - mean)^2), d_(i) the difference without record i."""
    y, a, b = _models(seed=2)
    n = len(y)

    def diff(rows: np.ndarray) -> float:
        return (
            thresholded_metrics(y[rows], a[rows])["macro_f_beta"]
            - thresholded_metrics(y[rows], b[rows])["macro_f_beta"]
        )

    loo = np.array([diff(np.delete(np.arange(n), i)) for i in range(n)])
    se = math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    estimate = diff(np.arange(n))
    interval = metric_interval("macro_f_beta", y, a, b, BootstrapConfig(confidence=0.9))
    half = stdtrit(n - 1, 0.95) * se
    assert interval.method == JACKKNIFE_T and interval.estimate == pytest.approx(estimate)
    assert (interval.ci_low, interval.ci_high) == pytest.approx((estimate - half, estimate + half))
    assert interval.record_sd == pytest.approx(se * math.sqrt(n))
    percentile = metric_interval("macro_f_beta", y, a, b, BootstrapConfig(interval=PERCENTILE))
    assert percentile.n_valid_resamples == 1000 and percentile.ci_low < estimate < percentile.ci_high
    assert percentile.record_sd == interval.record_sd  # the power uses the jackknife either way


def test_identical_models_and_too_few_records():
    y, a, _ = _models()
    same = metric_interval("macro_f_beta", y, a, a, BootstrapConfig())
    assert (same.estimate, same.ci_low, same.ci_high, same.record_sd) == (0.0, 0.0, 0.0, 0.0)
    one = metric_interval("macro_f_beta", y[:1], a[:1], a[:1], BootstrapConfig())
    assert math.isnan(one.ci_low)  # no interval from one record: the gate finds it not comparable
    report = paired_bootstrap(y, a.astype(float), 0.5, a.astype(float), 0.5, list("abcde"))
    assert report.n_resamples == 0 and report.intervals["macro_f_beta"].method == JACKKNIFE_T
    assert {c.name for c in report.per_class} == {"a", "b", "c", "d"}  # "e" has no positive record


def test_retries_spend_alpha():
    assert [attempt_alpha(0.025, k) for k in (1, 2, 3)] == [0.0125, 0.00625, 0.003125]
    assert sum(attempt_alpha(0.025, k) for k in range(1, 30)) < 0.025  # however many attempts
    with pytest.raises(ValueError):
        attempt_alpha(0.025, 0)


def test_two_equally_good_models_are_falsely_promoted_at_most_at_the_nominal_level():
    """200 frozen test sets of 24 records, each tried with 3 challengers exactly as good as the
    champion, the level spent over the attempts: the share of sets on which any challenger was
    promoted stays within the nominal 2.5% plus twice the simulation error. The former gate
    (percentile bootstrap, every retry at 2.5%) breaks that bound on the same sets."""
    sim = Simulation(n_records=24, trials=200, attempts=3, seed=0)
    gate = false_promotions(sim, GateRule())
    bound = gate.nominal + 2 * gate.simulation_error
    assert gate.rate <= bound, (gate.rate, gate.by_attempt)
    former = false_promotions(sim, GateRule(interval=PERCENTILE, spend=False))
    assert former.rate > bound, (former.rate, former.by_attempt)


def test_the_records_the_gate_needs():
    """n >= ((z_(1-alpha) + z_power) sd / effect)^2, and its inverse, the detectable effect."""
    z = 2.241402727604945 + 0.8416212335729143  # z_(1-0.0125) + z_0.8
    assert required_records(0.5, 0.05, 0.0125, 0.8) == math.ceil((z * 0.5 / 0.05) ** 2) == 951
    assert required_records(0.5, 0.05, 0.00625, 0.8) > 951  # a retry needs more
    assert detectable_effect(0.5, 951, 0.0125, 0.8) == pytest.approx(0.05, rel=1e-3)
    labels = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])  # prevalences 1/2 and 1/4
    assert label_sd(labels) == pytest.approx(math.sqrt((2 + 4) / (2 * 2**2)))
    assert math.isnan(label_sd(np.zeros((3, 2))))


def test_a_demo_sized_test_set_is_reported_too_small_before_training():
    rng = np.random.default_rng(0)
    labels = (rng.random((7, 10)) < 0.15).astype(np.int64)
    labels[0] = 1
    check = label_power_check(labels, PowerConfig())
    assert not check.sufficient and check.required > 500 and check.sd_source == SD_FROM_LABELS
    text = check.describe()
    assert text.startswith("7 labelled test records, too few: the gate needs >= ") and "power 0.8" in text
    assert "one-sided alpha 0.0125 (attempt 1)" in text and "detect only an improvement of" in text


def test_the_label_assumption_is_conservative():
    """The per-record SD assumed from the labels is above the one the jackknife measures on
    simulated model pairs (independent errors, the worst case for a paired difference)."""
    for sensitivity, false_positive in ((0.7, 0.15), (0.9, 0.05), (0.5, 0.5)):
        sim = Simulation(sensitivity=sensitivity, false_positive_rate=false_positive)
        rng = np.random.default_rng(3)
        labels = (rng.random((2000, len(sim.prevalence))) < np.asarray(sim.prevalence)).astype(np.int64)
        a, b = predictions(rng, labels, sim), predictions(rng, labels, sim)
        measured = metric_interval("macro_f_beta", labels, a, b, BootstrapConfig()).record_sd
        assert measured < label_sd(labels), (sensitivity, false_positive, measured)


def test_attempts_are_counted_from_signed_comparisons_on_the_same_test_set():
    """Only signed decisions that looked at an interval on this frozen test set (version and
    content) count; a refusal before any statistics, another test set or an unsigned entry do not."""
    from pipeline.registry.audit import AuditEntry
    from pipeline.registry.policy import earlier_attempts

    def entry(action: str, signature: str = "sig", **metrics) -> AuditEntry:
        return AuditEntry(model="m", action=action, versions={}, reason="", metrics=metrics, signature=signature)

    on_v2 = {"ci_low": -0.1, "testset_version": 2, "testset_md5": "abc"}
    log = [
        entry("promote"),  # the first champion: no interval
        entry("refuse", **on_v2),
        entry("insufficient", **on_v2),
        entry("force", **on_v2),
        entry("refuse", basis="not comparable: ..."),
        entry("refuse", **(on_v2 | {"testset_version": 1})),
        entry("refuse", **(on_v2 | {"testset_md5": "other"})),
        entry("refuse", signature="", **on_v2),
        entry("challenger", signature="", **on_v2),
        entry("rollback", **on_v2),
    ]
    assert earlier_attempts(log, 2, "abc") == 3
    assert earlier_attempts(log, 3, "new") == 0  # a refreshed test set starts again


def test_the_exit_code_of_several_decisions():
    from pipeline.cli.registry import promote_exit_code

    assert promote_exit_code(["promoted", "forced"]) == 0
    assert promote_exit_code(["promoted", "insufficient evidence"]) == 7
    assert promote_exit_code(["insufficient evidence", "refused"]) == 1


@pytest.mark.parametrize(
    ("low", "high", "n", "outcome", "words"),
    [
        (-0.25, 0.21, 7, "insufficient evidence", "7 frozen test records, the gate needs >= 1000 to decide"),
        (-0.02, 0.03, 2000, "refused", "2000 records: enough to show an improvement of 0.05 with power 0.8"),
        (-0.30, -0.01, 7, "refused", "the whole 97.5% interval [-0.3000, -0.0100] is at or below the margin 0"),
        (0.01, 0.40, 7, "promoted", "lower bound 0.0100 of the 97.5% interval exceeds the margin 0"),
    ],
)
def test_the_gate_says_insufficient_evidence_only_when_the_records_cannot_decide(low, high, n, outcome, words):
    """Too few records and an interval across the margin: insufficient evidence. An interval at
    or below the margin, or one across it on enough records: refused. A lower bound above it:
    promoted, however few the records."""
    from pipeline.registry.policy import Comparison, GateConfig, PromotionDecision, verdict

    comparison = Comparison(
        metric="macro_f_beta",
        challenger_version="2",
        challenger_value=0.5,
        champion_version="1",
        champion_value=0.5,
        margin=0.0,
        basis="recomputed",
        comparable=True,
        estimate=(low + high) / 2,
        ci_low=low,
        ci_high=high,
        confidence=0.975,
        n_records=n,
        attempt=1,
        alpha=0.0125,
        record_sd=0.5,
        required_records=1000,
        effect=0.05,
        power=0.8,
    )
    passed, why = verdict(comparison, GateConfig(), True, "cessl")
    decision = PromotionDecision(passed, False, why, comparison)
    action = {"insufficient evidence": "insufficient", "refused": "refuse", "promoted": "promote"}[outcome]
    assert (decision.label, decision.action) == (outcome, action)
    assert words in why, why
