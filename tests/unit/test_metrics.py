"""Test metrics against hand-computed cases and a literal restatement of the Challenge 2020 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.eval.challenge import load_weights, to_scored_classes
from ml.eval.metrics import (
    DEFAULT_THRESHOLD,
    METRIC_DEFINITIONS,
    METRIC_NAMES,
    beta_measures,
    binarize,
    challenge_metrics,
    classes_without_positives,
    confusion_counts,
    confusion_markdown,
    coverage,
    fit_thresholds,
    macro_auroc,
    macro_average_precision,
    per_class_auroc,
    per_class_average_precision,
    per_class_table,
    ranking_loss,
)


def official_beta_measures(labels: np.ndarray, outputs: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The Challenge 2020 ``compute_beta_measures`` restated loop by loop (normalize=True)."""
    n, c = labels.shape
    a = np.zeros((c, 2, 2))
    for i in range(n):
        norm = float(max(labels[i].sum(), 1))
        for j in range(c):
            a[j, int(outputs[i, j]), int(labels[i, j])] += 1.0 / norm
    f, g = np.zeros(c), np.zeros(c)
    for k in range(c):
        tp, fp, fn = a[k, 1, 1], a[k, 1, 0], a[k, 0, 1]
        den_f = (1 + beta**2) * tp + fp + beta**2 * fn
        den_g = tp + fp + beta * fn
        f[k] = (1 + beta**2) * tp / den_f if den_f else np.nan
        g[k] = tp / den_g if den_g else np.nan
    return f, g


def test_auroc_and_average_precision_hand_computed() -> None:
    y = np.array([[0], [0], [1], [1]])
    p = np.array([[0.1], [0.4], [0.35], [0.8]])
    # AUROC: of the 4 (pos, neg) pairs only (0.35, 0.4) is misordered -> 3/4.
    assert macro_auroc(y, p) == pytest.approx(0.75)
    # AP: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2.
    assert macro_average_precision(y, p) == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_ranking_metrics_are_scikit_learns_ties_included(seed: int) -> None:
    """AUROC, average precision and ranking loss are computed for every class (record) at once,
    as the jackknife recomputes them on every leave-one-out set: they are scikit-learn's
    numbers, on scores with many ties and on classes with one label value."""
    from sklearn.metrics import average_precision_score, label_ranking_loss, roc_auc_score

    rng = np.random.default_rng(seed)
    y = (rng.random((40, 6)) < [0.5, 0.2, 0.05, 0.0, 1.0, 0.3]).astype(int)
    p = np.round(rng.random((40, 6)), 1)  # ties
    auroc, ap = per_class_auroc(y, p), per_class_average_precision(y, p)
    for k in range(6):
        both = 0 < y[:, k].sum() < len(y)
        assert auroc[k] == pytest.approx(roc_auc_score(y[:, k], p[:, k])) if both else math.isnan(auroc[k])
        assert ap[k] == pytest.approx(average_precision_score(y[:, k], p[:, k])) if y[:, k].any() else math.isnan(ap[k])
    assert ranking_loss(y, p) == pytest.approx(label_ranking_loss(y, p))


def test_ranking_loss_and_coverage_hand_computed() -> None:
    y = np.array([[1, 0, 0], [0, 1, 1]])
    p = np.array([[0.2, 0.5, 0.1], [0.9, 0.8, 0.3]])
    # record 0: positive 0 (0.2) is below negative 1 (0.5): 1 of 2 pairs wrong -> 0.5
    # record 1: negative 0 (0.9) is above both positives: 2 of 2 pairs wrong -> 1.0
    assert ranking_loss(y, p) == pytest.approx(0.75)
    # coverage (1-based): record 0 needs rank 2; record 1 needs rank 3 -> mean 2.5
    assert coverage(y, p) == pytest.approx(2.5)


def test_beta_measures_hand_computed_with_challenge_normalisation() -> None:
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    pred = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    # weights per record: 1, 1/2, 1, 1
    # class 0: TP = 1 (rec 0), FN = 1/2 (rec 1), FP = 1 (rec 2)
    # class 1: TP = 1/2 (rec 1), FN = 1 (rec 3), FP = 1 (rec 0)
    tp, fp, fn, _ = confusion_counts(y, pred, normalize=True)
    np.testing.assert_allclose(tp, [1.0, 0.5])
    np.testing.assert_allclose(fp, [1.0, 1.0])
    np.testing.assert_allclose(fn, [0.5, 1.0])
    f, g = beta_measures(y, pred, beta=2, normalize=True)
    np.testing.assert_allclose(f, [5 * 1 / (5 * 1 + 4 * 0.5 + 1), 5 * 0.5 / (5 * 0.5 + 4 * 1 + 1)])
    np.testing.assert_allclose(g, [1 / (1 + 1 + 2 * 0.5), 0.5 / (0.5 + 1 + 2 * 1)])


def test_beta_measures_default_counts_every_record_once_as_the_reference() -> None:
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    pred = np.array([[1, 1], [0, 1], [1, 0], [0, 0]])
    # class 0: TP 1, FN 1, FP 1; class 1: TP 1, FN 1, FP 1 (record 1 weighs 1, not 1/2)
    tp, fp, fn, tn = confusion_counts(y, pred)
    np.testing.assert_allclose(tp, [1, 1])
    np.testing.assert_allclose(fp, [1, 1])
    np.testing.assert_allclose(fn, [1, 1])
    np.testing.assert_allclose(tn, [1, 1])
    f, g = beta_measures(y, pred, beta=2)
    np.testing.assert_allclose(f, [5 / (5 + 4 + 1)] * 2)
    np.testing.assert_allclose(g, [1 / (1 + 1 + 2)] * 2)
    # challenge_metrics reports these as macro_f_beta / macro_g_beta, the 2020 ones apart
    p = pred * 0.8 + 0.1
    metrics = challenge_metrics(y, p, thresholds=0.5)
    assert metrics["macro_f_beta"] == pytest.approx(0.5)
    assert metrics["macro_g_beta"] == pytest.approx(0.25)
    f_2020, g_2020 = beta_measures(y, pred, beta=2, normalize=True)
    assert metrics["macro_f_beta_challenge2020"] == pytest.approx(f_2020.mean())
    assert metrics["macro_g_beta_challenge2020"] == pytest.approx(g_2020.mean())


def test_beta_measures_match_official_loops_on_random_data() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 7)) < 0.25).astype(int)
    pred = (rng.random((200, 7)) < 0.3).astype(int)
    y[:, 6] = 0
    pred[:, 6] = 0  # a class with nothing at all: undefined
    f, g = beta_measures(y, pred, beta=2, normalize=True)
    f_ref, g_ref = official_beta_measures(y, pred, beta=2)
    np.testing.assert_allclose(f, f_ref, equal_nan=True)
    np.testing.assert_allclose(g, g_ref, equal_nan=True)
    assert math.isnan(f[6]) and math.isnan(g[6])


def test_classes_without_positives_count_0_in_the_macro_means_and_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    p = np.array([[0.9, 0.2], [0.1, 0.7], [0.8, 0.1], [0.3, 0.4]])
    assert math.isnan(per_class_auroc(y, p)[1])
    assert math.isnan(per_class_average_precision(y, p)[1])
    assert classes_without_positives(y) == [1]
    with caplog.at_level("WARNING"):
        metrics = challenge_metrics(y, p, thresholds=[0.5, 0.5], classes=["164889003", "426783006"])
    assert "no positive test record" in caplog.text and "426783006" in caplog.text
    assert metrics["n_classes_without_positives"] == 1.0
    assert metrics["macro_auroc"] == pytest.approx(1.0)  # undefined for class 1: class 0 alone
    # class 1 is predicted positive once with no positive record: F = 0, as the reference counts it
    assert beta_measures(y, binarize(p, 0.5))[0][1] == 0.0
    # the reference's macro means are over both classes, class 1 counting 0 (AP and F-beta alike)
    assert metrics["macro_map"] == pytest.approx(0.5) and metrics["macro_map_positive_classes"] == pytest.approx(1.0)
    assert metrics["macro_f_beta"] == pytest.approx(0.5) and metrics["macro_g_beta"] == pytest.approx(0.5)
    assert metrics["macro_f_beta_positive_classes"] == pytest.approx(1.0)
    assert metrics["macro_g_beta_positive_classes"] == pytest.approx(1.0)
    # the Challenge 2020 variant keeps the official nanmean (F = 0 is defined there)
    assert metrics["macro_f_beta_challenge2020"] == pytest.approx(0.5)
    thresholds = fit_thresholds(y, p)
    assert thresholds[1] == DEFAULT_THRESHOLD


def test_a_class_with_neither_positive_nor_prediction_counts_0_too() -> None:
    y = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.1]])
    assert math.isnan(beta_measures(y, binarize(p, 0.5))[0][1])  # 0 / 0: undefined per class
    metrics = challenge_metrics(y, p, thresholds=0.5)
    assert metrics["macro_f_beta"] == pytest.approx(0.5) and metrics["macro_f_beta_positive_classes"] == 1.0
    assert metrics["macro_f_beta_challenge2020"] == pytest.approx(1.0)  # its nanmean leaves the class out


def test_all_metrics_present_and_perfect_predictions() -> None:
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    p = y * 0.9 + 0.05
    classes = ["164889003", "426783006", "59118001"]
    scored = to_scored_classes(y, classes, load_weights())  # the records have no other diagnosis
    metrics = challenge_metrics(y, p, thresholds=0.5, classes=classes, scored_labels=scored)
    assert set(metrics) == set(METRIC_NAMES) == set(METRIC_DEFINITIONS)
    assert metrics["challenge_score"] == 1.0 and metrics["challenge_score_restricted"] == 1.0
    assert metrics["n_classes_without_positives"] == 0.0
    assert metrics["ranking_loss"] == 0.0
    assert metrics["macro_auroc"] == 1.0 and metrics["macro_map"] == 1.0
    assert metrics["macro_f_beta"] == 1.0 and metrics["macro_g_beta"] == 1.0
    assert metrics["coverage"] == pytest.approx(y.sum(axis=1).mean())


def test_the_official_challenge_score_needs_the_scored_labels(caplog: pytest.LogCaptureFixture) -> None:
    y = np.array([[1, 0], [0, 1], [1, 1]])
    p = y * 0.9 + 0.05
    classes = ["164889003", "426783006"]
    with caplog.at_level("WARNING"):
        metrics = challenge_metrics(y, p, 0.5, classes=classes)
    assert math.isnan(metrics["challenge_score"]) and metrics["challenge_score_restricted"] == 1.0
    assert "challenge_score (official) not computed" in caplog.text
    # record 2 is also RBBB, which the model does not predict: only the official score sees it
    scored = to_scored_classes(np.c_[y, [0, 0, 1]], [*classes, "59118001"], load_weights())
    metrics = challenge_metrics(y, p, 0.5, classes=classes, scored_labels=scored)
    assert metrics["challenge_score"] < 1.0 == metrics["challenge_score_restricted"]
    with pytest.raises(ValueError, match="disagree"):
        challenge_metrics(y, p, 0.5, classes=classes, scored_labels=scored[::-1])


def test_fit_thresholds_maximise_f_beta_over_all_candidates() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((300, 4)) < 0.3).astype(int)
    p = np.clip(0.35 * y + rng.random((300, 4)) * 0.7, 0, 1)
    thresholds = fit_thresholds(y, p, beta=2)
    for k in range(4):

        def f_beta_at(t: float, k: int = k) -> float:
            f, _ = beta_measures(y[:, [k]], binarize(p[:, [k]], t), beta=2, normalize=False)
            return float(f[0])

        # every strict decision "p > t", t just below one of the scores or above all of them
        candidates = np.append(np.nextafter(np.unique(p[:, k]), -np.inf), 1.0)
        best = max(f_beta_at(t) for t in candidates)
        assert f_beta_at(thresholds[k]) == pytest.approx(best)
        assert np.nextafter(thresholds[k], np.inf) in p[:, k], "one float step below a validation score"


def test_fit_thresholds_strict_decision_reproduces_the_pr_curve_optimum() -> None:
    y = np.array([[1], [1], [0], [1], [0]])
    p = np.array([[0.9], [0.6], [0.6], [0.4], [0.2]])
    # p >= 0.9: P 1, R 1/3 -> F2 5/13; p >= 0.6: P 2/3, R 2/3 -> 2/3; p >= 0.2: P 3/5, R 1 -> 0.88
    # F2 at 0.4: 5 * 0.75 * 1 / (4 * 0.75 + 1) = 0.9375 is the best
    t = fit_thresholds(y, p, beta=2)[0]
    assert 0.2 < t < 0.4 and t == np.nextafter(0.4, -np.inf)
    np.testing.assert_array_equal(binarize(p, t)[:, 0], [1, 1, 1, 1, 0])


def test_binarize_is_strictly_greater() -> None:
    p = np.array([[0.5, 0.49], [0.7, 0.2]])
    np.testing.assert_array_equal(binarize(p, [0.5, 0.2]), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(binarize(p, 0.6), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(binarize(p, 0.49), [[1, 0], [1, 0]])


def test_per_class_table() -> None:
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.1, 0.7], [0.8, 0.6], [0.3, 0.4]])
    table = per_class_table(y, p, [0.5, 0.5], classes=["AF", "RBBB"])
    assert list(table["class"]) == ["AF", "RBBB"]
    assert list(table.columns) == [
        "class",
        "abbreviation",
        "name",
        "support",
        "threshold",
        "auroc",
        "average_precision",
        "f_beta",
        "g_beta",
        "tp",
        "fp",
        "fn",
        "tn",
        "no_test_positive",
    ]
    assert list(table["support"]) == [2, 2]
    assert table["auroc"].tolist() == [1.0, 1.0]
    assert not table["no_test_positive"].any()


def test_per_class_table_shows_what_the_macro_means_average() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.1, 0.7, 0.2], [0.8, 0.6, 0.7], [0.3, 0.4, 0.1]])
    table = per_class_table(y, p, 0.5, classes=["AF", "RBBB", "NSR"])
    metrics = challenge_metrics(y, p, 0.5)
    assert table["no_test_positive"].tolist() == [False, False, True]
    assert table.loc[2, ["f_beta", "g_beta", "average_precision"]].tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(table.loc[2, "auroc"])
    assert metrics["macro_f_beta"] == pytest.approx(table["f_beta"].mean())
    assert metrics["macro_g_beta"] == pytest.approx(table["g_beta"].mean())
    assert metrics["macro_map"] == pytest.approx(table["average_precision"].mean())
    kept = table[~table["no_test_positive"]]
    assert metrics["macro_f_beta_positive_classes"] == pytest.approx(kept["f_beta"].mean())
    text = confusion_markdown(table)
    assert "0.0000 (no positive test record)" in text and "1 of 3 classes have no positive test record" in text


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="must both be"):
        challenge_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0/1"):
        challenge_metrics(np.full((2, 2), 0.5), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        challenge_metrics(np.zeros((2, 2)), np.full((2, 2), np.nan))
