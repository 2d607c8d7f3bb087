"""The 95% interval every table cell carries (ml/eval/intervals.py): the jackknife-t of a
statistic over the test records, checked where its answer is known in closed form (the mean:
the jackknife standard error is s / sqrt(n), so the interval is Student's t interval), and on
the cross-site matrix's cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ml.eval.challenge import load_weights, to_scored_classes
from ml.eval.cross_site import CrossSiteMatrix, score_cell
from ml.eval.intervals import UNIT, Interval, jackknife_interval


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
