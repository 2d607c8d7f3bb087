"""The 95% interval every table cell carries (ml/eval/intervals.py): the jackknife-t of a
statistic over the test records, checked where its answer is known in closed form (the mean:
the jackknife standard error is s / sqrt(n), so the interval is Student's t interval), on the
cross-site matrix's cells, and on every test metric of a model (metric_intervals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ml.eval.challenge import load_weights, to_scored_classes
from ml.eval.cross_site import CrossSiteMatrix, score_cell
from ml.eval.intervals import (
    AT_MOST_ONE,
    NO_INTERVAL,
    UNIT,
    Interval,
    jackknife_interval,
    metric_intervals,
    metric_supports,
)
from ml.eval.metrics import (
    binarize,
    challenge_metrics,
    macro_auroc,
    metric_values,
    per_class_auroc,
    per_class_average_precision,
    thresholded_metrics,
)


@pytest.mark.parametrize("n", [2, 7, 100])
def test_the_jackknife_t_of_a_mean_is_students_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, size=n)
    got = jackknife_interval(lambda keep: float(x[keep].mean()), n)
    low, high = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert (got.value, got.n) == (pytest.approx(x.mean()), n)
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


def test_an_interval_stays_within_what_the_statistic_can_be():
    x = np.array([1.0] * 9 + [0.0])  # a mean near its ceiling: Student's interval passes 1
    free = jackknife_interval(lambda keep: float(x[keep].mean()), 10)
    cut = jackknife_interval(lambda keep: float(x[keep].mean()), 10, support=UNIT)
    assert free.high > 1.0 and cut.high == 1.0 and cut.low == pytest.approx(free.low)


def test_no_interval_below_two_records_or_for_an_undefined_statistic():
    assert math.isnan(jackknife_interval(lambda keep: 1.0, 1).low)
    assert math.isnan(jackknife_interval(lambda keep: 1.0, 0).value)
    assert math.isnan(jackknife_interval(lambda keep: math.nan, 5).high)
    assert Interval(0.5, math.nan, math.nan, 1).text() == "0.500"
    assert Interval(0.4321, 0.2, 0.61, 9).text() == "0.432 [0.200, 0.610]"


def test_cross_site_cells_carry_their_intervals_and_sample_size():
    rng = np.random.default_rng(1)
    classes = ["426783006", "164889003", "59118001"]
    labels = rng.integers(0, 2, size=(40, 3))
    scored = to_scored_classes(labels, classes, load_weights())
    noisy = np.where(rng.random(labels.shape) < 0.3, 1 - labels, labels).astype(float)
    cell = score_cell("m", "t", noisy, classes, [0.5] * 3, labels, classes, scored)
    for metric in ("challenge_score", "macro_f_beta"):
        interval = cell.interval(metric)
        assert interval.low < interval.value < interval.high and interval.n == 40
    perfect = score_cell("p", "t", labels.astype(float), classes, [0.5] * 3, labels, classes, scored)
    assert perfect.interval("macro_f_beta").low == pytest.approx(1.0)  # every leave-one-out set is perfect too
    matrix = CrossSiteMatrix((cell, perfect))
    assert "t (n=40)" in matrix.markdown() and f"| m | {cell.interval('challenge_score').text()} |" in matrix.markdown()
    header = matrix.csv().splitlines()[0].split(",")
    assert header[2:5] == ["challenge_score", "challenge_score_low", "challenge_score_high"]
    old = {k: v for k, v in cell.to_dict().items() if not k.endswith(("_low", "_high"))}  # a run logged before
    assert math.isnan(CrossSiteMatrix.from_records([old]).cells[0].macro_f_beta_low)


def scored_records(n: int, seed: int, noise: float = 0.3):
    """``n`` records over three scored classes: labels, their Challenge labels and noisy scores."""
    rng = np.random.default_rng(seed)
    classes = ["426783006", "164889003", "59118001"]
    labels = (rng.random((n, 3)) < [0.5, 0.3, 0.2]).astype(np.int64)
    probs = np.clip(labels * 0.5 + rng.random((n, 3)) * 0.5 + rng.normal(0, noise, (n, 3)), 0, 1)
    return labels, probs, classes, to_scored_classes(labels, classes, load_weights())


def test_every_test_metric_carries_an_interval_around_its_value_within_what_it_can_be():
    labels, probs, classes, scored = scored_records(60, 3)
    intervals = metric_intervals(labels, probs, 0.5, classes, scored)
    values = challenge_metrics(labels, probs, 0.5, classes=classes, scored_labels=scored)
    supports = metric_supports(len(classes))
    assert set(intervals) == set(supports) == set(values) - set(NO_INTERVAL)
    assert {"challenge_score", "macro_auroc", "macro_map", "macro_f_beta", "macro_g_beta"} <= set(intervals)
    for metric, interval in intervals.items():
        low, high = supports[metric]
        assert interval.value == pytest.approx(values[metric]) and interval.n == 60, metric
        assert low <= interval.low < interval.value < interval.high <= high, metric
    assert supports["challenge_score"] == AT_MOST_ONE and supports["coverage"] == (0.0, 3.0)
    # one jackknife for every metric: the same interval as the helper gives one statistic alone
    y, predicted = labels, binarize(probs, 0.5)
    alone = jackknife_interval(
        lambda keep: thresholded_metrics(y[keep], predicted[keep])["macro_f_beta"], 60, support=UNIT
    )
    assert intervals["macro_f_beta"] == alone


def intervals_on(n: int) -> dict[str, Interval]:
    labels, probs, classes, scored = scored_records(n, 4)
    return metric_intervals(labels, probs, 0.5, classes, scored)


def test_metric_intervals_shrink_as_the_test_split_grows():
    small, large = intervals_on(25), intervals_on(200)
    for metric, interval in small.items():
        assert 0 < large[metric].high - large[metric].low < interval.high - interval.low, metric


def test_a_class_with_a_single_positive_is_counted_on_each_leave_one_out_set_as_on_the_whole():
    """Leaving out its only positive leaves the class without one: it counts 0 in macro_map and
    drops out of macro_auroc there, as a class without a positive does on the whole set; the
    statistic stays defined on every leave-one-out set, so every record enters the interval."""
    labels, probs, classes, scored = scored_records(30, 5)
    labels[:, 2] = 0
    labels[7, 2] = 1  # the single positive of class 2
    scored = to_scored_classes(labels, classes, load_weights())
    without = np.delete(np.arange(30), 7)
    loo = metric_values(labels[without], probs[without], 0.5, 2.0, classes, scored[without])
    assert loo["macro_map"] == pytest.approx(per_class_average_precision(labels[without], probs[without])[:2].sum() / 3)
    assert loo["macro_auroc"] == pytest.approx(np.mean(per_class_auroc(labels[without], probs[without])[:2]))
    intervals = metric_intervals(labels, probs, 0.5, classes, scored)
    for metric in ("macro_auroc", "macro_map", "macro_map_positive_classes", "macro_f_beta"):
        assert intervals[metric].low <= intervals[metric].value <= intervals[metric].high, metric
    # the only class with an AUROC has a single positive: undefined on one leave-one-out set,
    # which is left out of the standard error (the others still give an interval)
    alone = labels[:, [2]]
    auroc = jackknife_interval(lambda keep: macro_auroc(alone[keep], probs[keep, 2:]), 30, support=UNIT)
    assert math.isfinite(auroc.low) and auroc.low <= auroc.value <= auroc.high


def test_no_metric_interval_on_a_single_record():
    labels, probs, classes, scored = scored_records(1, 6)
    assert all(math.isnan(i.low) for i in metric_intervals(labels, probs, 0.5, classes, scored).values())
