"""Golden tests: the project's scores against the official Challenge 2021 code and the CE-SSL
authors' evaluation code.

Two oracles, each checked against the other:

- the numbers those programs produced on generated cases, stored in
  ``tests/fixtures/scoring_golden/`` (how, from which commits: its PROVENANCE.md). Challenge
  cases cover partial class sets (all 26, 13, random subsets, one class, no normal class,
  only unscored codes), equivalent codes, unscored codes and records without a diagnosis;
  reference cases cover tied scores, scores equal to the threshold and classes without a
  positive (or without a negative) test record;
- a literal restatement of each program's loops below (not their code), which the stored
  numbers validate first and which then scores the cases that hypothesis generates.

Known, documented differences from the reference evaluation (``ml.eval.metrics``): a class
without a positive test record and without a prediction, where the reference divides 0 by
0 and stops, counts 0 here; average precision takes tied scores as one threshold
(scikit-learn), the reference ranks tied records one by one, so the two agree where no
positive record's score is tied with another record's.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ml.eval.challenge import (
    ChallengeWeights,
    challenge_score,
    challenge_score_restricted,
    load_weights,
    scored_codes,
    to_scored_classes,
)
from ml.eval.metrics import challenge_metrics, per_class_average_precision, per_class_table

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "scoring_golden"
SINUS_RHYTHM = "426783006"
UNSCORED = ("164951009", "251187003", "233892002")


@cache
def golden(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(json.loads((GOLDEN / name).read_text(encoding="utf-8"))["cases"])


def golden_ids(name: str) -> list[str]:
    return [case["name"] for case in golden(name)]


# --------------------------------------------------------------------------- Challenge 2021


def restated_challenge_score(dx: list[list[str]], classes: list[str], outputs: Any, table: ChallengeWeights) -> float:
    """``evaluate_model.py`` restated: a scored class is labelled when a record's ``#Dx`` shares
    a code with it and output when any model column naming one of its codes is 1; then the
    modified confusion matrix, record by record, and the normalised score."""
    labels = [[bool(codes & set(d)) for codes in table.classes] for d in dx]
    outs = [
        [any(int(outputs[i][c]) == 1 for c, code in enumerate(classes) if code in codes) for codes in table.classes]
        for i in range(len(dx))
    ]
    normal = next(j for j, codes in enumerate(table.classes) if SINUS_RHYTHM in codes)
    inactive = [[j == normal for j in range(len(table.classes))] for _ in dx]

    def total(out: list[list[bool]]) -> float:
        a = np.zeros(table.weights.shape)
        for lab, o in zip(labels, out, strict=True):
            norm = max(sum(x or y for x, y in zip(lab, o, strict=True)), 1)
            for j in (j for j, x in enumerate(lab) if x):
                for k in (k for k, y in enumerate(o) if y):
                    a[j, k] += 1.0 / norm
        return float(np.nansum(table.weights * a))

    observed, correct, inactive_score = total(outs), total(labels), total(inactive)
    return 0.0 if correct == inactive_score else (observed - inactive_score) / (correct - inactive_score)


def project_inputs(dx: list[list[str]], classes: list[str], table: ChallengeWeights) -> tuple[np.ndarray, np.ndarray]:
    """What the pipeline hands ``ml.eval``: the records' labels of every scored class (N, 26,
    over ``scored_codes``) and their labels of the model's classes (N, C), from header codes."""
    codes = sorted({c for d in dx for c in d} | set(classes))
    multi_hot = np.array([[c in d for c in codes] for d in dx], dtype=bool).reshape(len(dx), len(codes))
    scored = to_scored_classes(multi_hot, codes, table)
    own = np.zeros((len(dx), len(classes)), dtype=np.int64)
    for c, code in enumerate(classes):
        k = table.index_of(code)
        own[:, c] = scored[:, k] if k >= 0 else multi_hot[:, codes.index(code)]
    return scored, own


def project_scores(dx: list[list[str]], classes: list[str], outputs: Any) -> tuple[float, float]:
    """``challenge_score`` and ``challenge_score_restricted`` of a case."""
    table = load_weights()
    out = np.asarray(outputs, dtype=np.int64).reshape(len(dx), len(classes))
    scored, own = project_inputs(dx, classes, table)
    return challenge_score(scored, scored_codes(), out, classes), challenge_score_restricted(own, out, classes)


@pytest.mark.parametrize("case", golden("challenge2021.json"), ids=golden_ids("challenge2021.json"))
def test_challenge_scores_match_the_official_code(case: dict[str, Any]) -> None:
    official, restricted = project_scores(case["dx"], case["classes"], case["outputs"])
    assert official == pytest.approx(case["official"], abs=1e-12)
    if case["official_restricted"] is None:  # no scored class: undefined here
        assert math.isnan(restricted)
    else:
        assert restricted == pytest.approx(case["official_restricted"], abs=1e-12)


def test_the_challenge_restatement_matches_the_official_code() -> None:
    table = load_weights()
    for case in golden("challenge2021.json"):
        got = restated_challenge_score(case["dx"], case["classes"], case["outputs"], table)
        assert got == pytest.approx(case["official"], abs=1e-12), case["name"]


def test_the_golden_challenge_cases_cover_partial_class_sets() -> None:
    cases = golden("challenge2021.json")
    sizes = {len({load_weights().index_of(c) for c in case["classes"]} - {-1}) for case in cases}
    assert {0, 1, 13, 26} <= sizes and len(sizes) > 10
    differ = [c for c in cases if c["official_restricted"] is not None and c["official"] != c["official_restricted"]]
    assert len(differ) > len(cases) // 3  # on a partial class set the restricted score is another number


@st.composite
def challenge_case(draw: st.DrawFn) -> tuple[list[list[str]], list[str], np.ndarray]:
    """Records' header codes, a model's class list (any part of the 26, either code of an
    equivalence set, unscored codes, both codes of a set as two columns) and its 0/1 outputs."""
    table = load_weights()
    sets = [sorted(codes) for codes in table.classes]
    n = draw(st.integers(1, 12))
    code_of = st.sampled_from(range(len(sets))).flatmap(lambda k: st.sampled_from(sets[k]))
    dx = draw(st.lists(st.lists(code_of | st.sampled_from(UNSCORED), max_size=4), min_size=n, max_size=n))
    classes = draw(st.lists(code_of | st.sampled_from(UNSCORED), min_size=1, max_size=30, unique=True))
    outputs = np.array(draw(st.lists(st.booleans(), min_size=n * len(classes), max_size=n * len(classes))))
    return dx, classes, outputs.reshape(n, len(classes)).astype(np.int64)


@given(challenge_case())
def test_challenge_scores_match_the_restatement_on_generated_cases(case) -> None:
    dx, classes, outputs = case
    table = load_weights()
    official, restricted = project_scores(dx, classes, outputs)
    assert official == pytest.approx(restated_challenge_score(dx, classes, outputs, table), abs=1e-12)
    kept = [codes for codes in table.classes if codes & set(classes)]  # restricted: only these are labelled
    limited = [[c for c in d if any(c in codes for codes in kept)] for d in dx]
    if kept:
        assert restricted == pytest.approx(restated_challenge_score(limited, classes, outputs, table), abs=1e-12)
    else:
        assert math.isnan(restricted)


# --------------------------------------------------------------------------- the authors' evaluation


def restated_reference(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """The CE-SSL reference ``evaluation.py`` restated: predictions ``probs > threshold``; per
    class F-beta2 / G-beta2 from TP, FP, FN counted record by record (None where the
    denominator is 0, where the reference raises), their sum over classes / C; average
    precision as the mean precision at the rank of each positive record (0 without one)."""
    n, c = y.shape
    f, g, ap = [], [], []
    for k in range(c):
        tp = fp = fn = 0.0
        for i in range(n):
            predicted = probs[i, k] > thresholds[k]
            tp += float(predicted and y[i, k] == 1)
            fp += float(predicted and y[i, k] == 0)
            fn += float(not predicted and y[i, k] == 1)
        f.append(5 * tp / (5 * tp + fp + 4 * fn) if 5 * tp + fp + 4 * fn else None)
        g.append(tp / (tp + fp + 2 * fn) if tp + fp + 2 * fn else None)
        order = np.argsort(-probs[:, k], kind="stable")
        hits = np.cumsum(y[order, k])
        at_positives = [hits[r] / (r + 1) for r in range(n) if y[order[r], k] == 1]
        ap.append(float(np.mean(at_positives)) if at_positives else 0.0)
    defined = None not in f
    return {
        "f_beta": sum(f) / c if defined else None,  # type: ignore[arg-type]
        "g_beta": sum(g) / c if defined else None,  # type: ignore[arg-type]
        "f_beta_class": f,
        "g_beta_class": g,
        "map_class": ap,
    }


def positive_ties(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,) bool: a positive record's score equals another record's (the average precisions differ)."""
    out = np.zeros(y.shape[1], dtype=bool)
    for k in range(y.shape[1]):
        values, counts = np.unique(probs[:, k], return_counts=True)
        tied = values[counts > 1]
        out[k] = bool(np.isin(probs[y[:, k] == 1, k], tied).any())
    return out


def assert_matches_reference(
    y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, ref: dict[str, Any]
) -> tuple[dict[str, float], pd.DataFrame]:
    """The project's metrics and per-class table of a case, checked against the reference's
    numbers ``ref`` (None: undefined there)."""
    metrics = challenge_metrics(y, probs, thresholds)
    table = per_class_table(y, probs, thresholds)
    no_positive = y.sum(axis=0) == 0
    for key, column in (("f_beta", "f_beta"), ("g_beta", "g_beta")):
        reference = ref[f"{key}_class"]
        for k, value in enumerate(reference):
            # where the reference divides 0 by 0 (no positive, no prediction) the class counts 0
            assert table[column][k] == pytest.approx(0.0 if value is None else value, abs=1e-12)
        expected = ref[key] if ref[key] is not None else sum(v or 0.0 for v in reference) / len(reference)
        assert metrics[f"macro_{key}"] == pytest.approx(expected, abs=1e-12)
    ties = positive_ties(y, probs)
    ap = table["average_precision"].to_numpy()
    np.testing.assert_allclose(ap[~ties], np.asarray(ref["map_class"])[~ties], rtol=1e-7, atol=1e-12)
    if not ties.any():
        assert metrics["macro_map"] == pytest.approx(float(np.mean(ref["map_class"])), rel=1e-7, abs=1e-12)
    assert table["no_test_positive"].tolist() == no_positive.tolist()
    assert np.all(ap[no_positive] == 0.0)
    return metrics, table


@pytest.mark.parametrize("case", golden("reference_evaluation.json"), ids=golden_ids("reference_evaluation.json"))
def test_metrics_match_the_authors_evaluation(case: dict[str, Any]) -> None:
    y, probs, thresholds = np.array(case["y"]), np.array(case["probs"]), np.array(case["thresholds"])
    metrics, table = assert_matches_reference(y, probs, thresholds, case)
    assert metrics["ranking_loss"] == pytest.approx(case["ranking_loss"], abs=1e-12)
    assert metrics["coverage"] == pytest.approx(case["coverage"], abs=1e-12)
    expected_auroc = np.array([np.nan if v is None else v for v in case["auroc_class"]])
    np.testing.assert_allclose(table["auroc"], expected_auroc, atol=1e-12, equal_nan=True)
    if case["auroc"] is not None:
        assert metrics["macro_auroc"] == pytest.approx(case["auroc"], abs=1e-12)


def test_the_reference_restatement_matches_the_authors_evaluation() -> None:
    for case in golden("reference_evaluation.json"):
        y, probs = np.array(case["y"]), np.array(case["probs"])
        got = restated_reference(y, probs, np.array(case["thresholds"]))
        for key in ("f_beta", "g_beta", "f_beta_class", "g_beta_class"):
            assert got[key] == pytest.approx(case[key], abs=1e-12), (case["name"], key)
        ties = positive_ties(y, probs)
        np.testing.assert_allclose(np.asarray(got["map_class"])[~ties], np.asarray(case["map_class"])[~ties], rtol=1e-7)


def test_the_golden_reference_cases_cover_ties_and_empty_classes() -> None:
    cases = golden("reference_evaluation.json")
    assert sum(any(positive_ties(np.array(c["y"]), np.array(c["probs"]))) for c in cases) > 10
    assert sum(np.any(np.array(c["y"]).sum(axis=0) == 0) for c in cases) > 20
    at_threshold = [np.any(np.array(c["probs"]) == np.array(c["thresholds"])) for c in cases]
    assert sum(at_threshold) > 20 and any(c["f_beta"] is None for c in cases)


@st.composite
def reference_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels with empty and full classes, scores from a coarse grid (ties) or not, thresholds
    that are often one of the scores."""
    n, c = draw(st.integers(2, 25)), draw(st.integers(2, 5))
    y = np.array(draw(st.lists(st.booleans(), min_size=n * c, max_size=n * c))).reshape(n, c).astype(np.int64)
    grid = draw(st.booleans())
    score = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) if grid else st.floats(0, 1, allow_nan=False)
    probs = np.array(draw(st.lists(score, min_size=n * c, max_size=n * c))).reshape(n, c)
    thresholds = np.array([draw(st.sampled_from([*probs[:, k].tolist(), 0.5])) for k in range(c)])
    return y, probs, thresholds


@given(reference_case())
def test_metrics_match_the_reference_restatement_on_generated_cases(case) -> None:
    y, probs, thresholds = case
    assert_matches_reference(y, probs, thresholds, restated_reference(y, probs, thresholds))


@given(reference_case(), st.randoms(use_true_random=False))
def test_average_precision_does_not_depend_on_the_order_of_tied_records(case, random) -> None:
    y, probs, _ = case
    order = list(range(len(y)))
    random.shuffle(order)
    np.testing.assert_allclose(
        per_class_average_precision(y[order], probs[order]), per_class_average_precision(y, probs), equal_nan=True
    )
