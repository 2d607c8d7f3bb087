"""The PhysioNet/CinC Challenge 2021 score against hand-computed cases (the official code's
own numbers on generated cases: ``test_scoring_golden.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.eval.challenge import (
    NORMAL_CLASS,
    WEIGHTS_CSV,
    challenge_score,
    challenge_score_restricted,
    labels_agree,
    load_weights,
    modified_confusion_matrix,
    scored_codes,
    to_scored_classes,
    unlabelled_scored_classes,
)

AF, NSR, RBBB = "164889003", "426783006", "59118001"


def official(y: np.ndarray, pred: np.ndarray, classes: list[str], label_classes: list[str] | None = None) -> float:
    """The official score of ``pred`` over ``classes`` when ``y`` (over ``label_classes``, by
    default ``classes``) holds every diagnosis of the records."""
    scored = to_scored_classes(y, label_classes or classes, load_weights())
    return challenge_score(scored, scored_codes(), pred, classes)


def test_vendored_weights_are_the_official_26_classes() -> None:
    table = load_weights()
    assert WEIGHTS_CSV.is_file()
    assert table.weights.shape == (26, 26)
    np.testing.assert_array_equal(np.diag(table.weights), 1.0)
    np.testing.assert_array_equal(table.weights, table.weights.T)
    for pair in (
        ("713427006", "59118001"),
        ("284470004", "63593006"),
        ("427172004", "17338001"),
        ("733534002", "164909002"),
    ):
        assert table.index_of(pair[0]) == table.index_of(pair[1]) >= 0
    assert table.index_of(NORMAL_CLASS) >= 0 and table.index_of("000000") == -1
    k = [table.index_of(c) for c in (AF, NSR, RBBB)]
    assert table.weights[k[0], k[1]] == 0.25 and table.weights[k[0], k[2]] == 0.4
    assert table.weights[k[1], k[2]] == 0.35


def test_three_records_by_hand() -> None:
    classes = [AF, NSR, RBBB]
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    pred = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    # observed: r0 A[AF,AF] += 1; r1 A[NSR,AF] += 1/2; r2 A[AF,RBBB], A[RBBB,RBBB] += 1/2
    observed = 1 + 0.25 / 2 + 0.4 / 2 + 1 / 2
    # correct: r0 1; r1 1; r2 labels {AF, RBBB} x outputs {AF, RBBB}, each pair 1/2
    correct = 1 + 1 + (1 + 0.4 + 0.4 + 1) / 2
    # inactive (NSR only): r0 A[AF,NSR] 1/2; r1 A[NSR,NSR] 1; r2 A[AF,NSR], A[RBBB,NSR] 1/3
    inactive = 0.25 / 2 + 1 + (0.25 + 0.35) / 3
    expected = (observed - inactive) / (correct - inactive)
    assert official(y, pred, classes) == pytest.approx(expected)
    assert expected == pytest.approx(0.5 / 2.075)
    # the records have no diagnosis outside the model's classes: limiting the labels changes nothing
    assert challenge_score_restricted(y, pred, classes) == pytest.approx(expected)


def test_a_class_the_model_lacks_counts_in_the_official_score_only() -> None:
    # the model predicts AF alone; record 0 is AF + RBBB, record 1 is NSR
    scored = to_scored_classes(np.array([[1, 0, 1], [0, 1, 0]]), [AF, NSR, RBBB], load_weights())
    pred = np.array([[1], [0]])
    # official: observed r0 (A[AF,AF] + A[RBBB,AF]) / 2 = (1 + 0.4) / 2; r1 outputs nothing
    # correct r0 (1 + 0.4 + 0.4 + 1) / 2, r1 1; inactive (NSR) r0 (0.25 + 0.35) / 3, r1 1
    expected = (0.7 - 1.2) / (2.4 - 1.2)
    assert challenge_score(scored, scored_codes(), pred, [AF]) == pytest.approx(expected)
    # restricted to AF the model is perfect: RBBB and NSR are dropped from the labels
    assert challenge_score_restricted(np.array([[1], [0]]), pred, [AF]) == pytest.approx(1.0)


def test_the_official_score_needs_every_scored_class_labelled() -> None:
    y = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="24 have no label column"):
        challenge_score(y, [AF, NSR], y, [AF, NSR])
    assert unlabelled_scored_classes(scored_codes()) == []
    assert "59118001|713427006" in unlabelled_scored_classes([AF, NSR])
    table = load_weights()
    assert [table.index_of(code) for code in scored_codes()] == list(range(26))


def test_labels_agree_checks_the_model_columns_against_the_scored_labels() -> None:
    y = np.array([[1, 0], [0, 1]])
    scored = to_scored_classes(np.c_[y, [1, 0]], [AF, NSR, RBBB], load_weights())  # RBBB: not a model class
    assert labels_agree(y, [AF, NSR], scored)
    assert not labels_agree(y[::-1], [AF, NSR], scored)
    assert not labels_agree(y, [AF, NSR], scored[:1])


def test_perfect_is_one_and_inactive_is_zero() -> None:
    classes = [AF, NSR, RBBB, "164890007"]
    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.3).astype(int)
    assert official(y, y, classes) == pytest.approx(1.0)
    normal_only = np.zeros_like(y)
    normal_only[:, 1] = 1
    assert official(y, normal_only, classes) == pytest.approx(0.0)
    # without a normal column the inactive classifier still outputs the normal class
    no_normal = [AF, RBBB, "164890007"]
    assert challenge_score_restricted(y[:, [0, 2, 3]], y[:, [0, 2, 3]], no_normal) == pytest.approx(1.0)
    # ... and the official score of such a model counts the normal records it cannot flag
    assert y[:, 1].any() and official(y, y[:, [0, 2, 3]], no_normal, classes) < 1.0


def test_equivalent_codes_merge_and_unscored_columns_are_ignored() -> None:
    # complete RBBB labelled, RBBB predicted: the same Challenge class -> perfect
    y = np.array([[1, 0], [0, 0]])
    pred = np.array([[0, 1], [0, 0]])
    assert official(y, pred, ["713427006", RBBB]) == pytest.approx(1.0)
    assert challenge_score_restricted(y, pred, ["713427006", RBBB]) == pytest.approx(1.0)
    classes = [AF, NSR, RBBB]
    y3 = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    p3 = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    extended = [*classes, "000000"]
    with_unscored = challenge_score_restricted(np.c_[y3, [1, 0, 1]], np.c_[p3, [0, 1, 1]], extended)
    assert with_unscored == pytest.approx(challenge_score_restricted(y3, p3, classes))
    assert official(np.c_[y3, [1, 0, 1]], np.c_[p3, [0, 1, 1]], extended) == pytest.approx(official(y3, p3, classes))


def test_no_scored_class() -> None:
    y = np.array([[1, 0], [0, 1]])
    assert math.isnan(challenge_score_restricted(y, y, ["0", "1"]))
    # officially such a model outputs nothing: below the inactive classifier, here on two AF records
    scored = to_scored_classes(np.array([[1], [1]]), [AF], load_weights())
    # correct: 1 per record; inactive (NSR): 0.25 / 2 per record; observed 0
    assert challenge_score(scored, scored_codes(), y, ["0", "1"]) == pytest.approx(-0.125 / 0.875)


def test_modified_confusion_matrix_matches_a_loop_restatement() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random((50, 26)) < 0.1
    outputs = rng.random((50, 26)) < 0.1
    expected = np.zeros((26, 26))
    for i in range(50):
        norm = max(int((labels[i] | outputs[i]).sum()), 1)
        for j in np.flatnonzero(labels[i]):
            for k in np.flatnonzero(outputs[i]):
                expected[j, k] += 1.0 / norm
    np.testing.assert_allclose(modified_confusion_matrix(labels, outputs), expected)
    scored = to_scored_classes(np.array([[1, 1]]), ["713427006", RBBB], load_weights())
    assert scored.sum() == 1 and scored[0, load_weights().index_of(RBBB)]
