"""Test metrics of CE-SSL: the CE-SSL reference evaluation, the Challenge 2020 and 2021 scores.

All functions take ``y_true`` (N, C) of 0/1 and ``probs`` (N, C) of scores in [0, 1]
(any monotone score works for the ranking metrics) and return plain floats / numpy arrays.

Definitions (and the conventions we chose where sources differ):

- **Ranking loss**: :func:`sklearn.metrics.label_ranking_loss` - the average fraction of
  (positive, negative) label pairs of a record that are ordered wrongly. Records with no
  positive (or no negative) label contribute 0.
- **Coverage**: :func:`sklearn.metrics.coverage_error` - how far down the ranked label list
  one must go, on average, to cover every true label. This is the 1-based convention of
  scikit-learn, which the CE-SSL reference evaluation uses (minimum = mean number of true
  labels per record); the textbook definition of Zhang & Zhou subtracts 1. Records with no
  true label contribute 0. Lower is better.
- **Macro AUROC / macro mAP**: per class :func:`sklearn.metrics.roc_auc_score` /
  :func:`sklearn.metrics.average_precision_score`, then the mean over classes. A class
  whose column has no positive (or, for AUROC, no negative) record is undefined (NaN) and
  left out of the macro mean, as the Challenge's ``np.nanmean`` does.
- **F-beta / G-beta** (beta = 2), as the CE-SSL reference evaluation computes them, so the
  numbers compare with the published ones: per class
  ``F = (1+b^2) TP / ((1+b^2) TP + b^2 FN + FP)`` and ``G = TP / (TP + FP + b FN)`` with
  every record weighing 1 in the confusion counts; ``macro_f_beta`` / ``macro_g_beta`` are
  the means over the classes with at least one positive test record. A class without one
  is excluded explicitly: it is reported (``n_classes_without_positives`` in the metrics,
  :func:`classes_without_positives`, a warning) rather than averaged in as F = 0.
- **Challenge 2020 F-beta / G-beta** (``macro_f_beta_challenge2020`` /
  ``macro_g_beta_challenge2020``): the official ``compute_beta_measures``, where each record
  weighs ``1 / max(#true labels, 1)`` (``normalize=True``) and the macro mean is the
  ``nanmean`` over classes with ``TP + FP + FN > 0`` (a class with no positive but a false
  alarm counts as 0 there, as in the Challenge).
- **Challenge 2021 score** (:mod:`ml.eval.challenge`): ``challenge_score`` is the official
  one, over all 26 scored classes; it needs the class names (SNOMED-CT codes) and the test
  records' labels of every scored class (``scored_labels``), and is NaN without them.
  ``challenge_score_restricted`` drops the labels of the classes the model does not predict
  (it needs the class names only); on a partial class set it is not the Challenge score.
- **Thresholds**: a record is predicted positive for class k when ``probs[:, k] >
  thresholds[k]`` (strictly, as the reference evaluation decides). :func:`fit_thresholds`
  picks, per class, the F-beta-optimal point of the validation precision-recall curve and
  returns the largest threshold whose strict decision reproduces that point (one float
  step below the curve's ``>=`` threshold); a class with no positive in the validation set
  keeps the neutral threshold 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    coverage_error,
    label_ranking_loss,
    precision_recall_curve,
    roc_auc_score,
)

from ml.eval.challenge import challenge_score, challenge_score_restricted, labels_agree, scored_codes

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
METRIC_NAMES: tuple[str, ...] = (
    "ranking_loss",
    "coverage",
    "macro_auroc",
    "macro_map",
    "macro_f_beta",
    "macro_g_beta",
    "macro_f_beta_challenge2020",
    "macro_g_beta_challenge2020",
    "challenge_score",
    "challenge_score_restricted",
    "n_classes_without_positives",
)


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must both be (N, C)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return y.astype(np.int64), p


def ranking_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Label ranking loss (scikit-learn definition; lower is better)."""
    y, p = _check(y_true, probs)
    return float(label_ranking_loss(y, p))


def coverage(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Coverage error, scikit-learn's 1-based convention (lower is better)."""
    y, p = _check(y_true, probs)
    return float(coverage_error(y, p))


def per_class_auroc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC per class; NaN for a class with only one label value present."""
    y, p = _check(y_true, probs)
    out = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        if 0 < y[:, k].sum() < len(y):
            out[k] = roc_auc_score(y[:, k], p[:, k])
    return out


def per_class_average_precision(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Average precision per class; NaN for a class with no positive record."""
    y, p = _check(y_true, probs)
    out = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        if y[:, k].any():
            out[k] = average_precision_score(y[:, k], p[:, k])
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over the classes where it is defined."""
    return _nanmean(per_class_auroc(y_true, probs))


def macro_average_precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro mAP: mean average precision over the classes with at least one positive."""
    return _nanmean(per_class_average_precision(y_true, probs))


def confusion_counts(
    y_true: np.ndarray, y_pred: np.ndarray, normalize: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (TP, FP, FN, TN) as floats; every record weighs 1 (the reference's counts).

    With ``normalize`` each record weighs ``1 / max(number of true labels, 1)`` (Challenge 2020).
    """
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_pred).astype(bool)
    if y.shape != pred.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {pred.shape} differ in shape")
    weight = 1.0 / np.maximum(y.sum(axis=1), 1) if normalize else np.ones(len(y))
    w = weight[:, None]
    tp = (w * (y & pred)).sum(axis=0)
    fp = (w * (~y & pred)).sum(axis=0)
    fn = (w * (y & ~pred)).sum(axis=0)
    tn = (w * (~y & ~pred)).sum(axis=0)
    return tp, fp, fn, tn


def beta_measures(
    y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0, normalize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F-beta and G-beta of binary predictions (NaN where undefined)."""
    tp, fp, fn, _ = confusion_counts(y_true, y_pred, normalize)
    b2 = beta**2
    f_den = (1 + b2) * tp + b2 * fn + fp
    g_den = tp + fp + beta * fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f_beta = np.where(f_den > 0, (1 + b2) * tp / f_den, np.nan)
        g_beta = np.where(g_den > 0, tp / g_den, np.nan)
    return f_beta, g_beta


def binarize(probs: np.ndarray, thresholds: np.ndarray | Sequence[float] | float) -> np.ndarray:
    """0/1 predictions: ``probs > thresholds`` strictly (per-class thresholds broadcast over rows)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (p.shape[1],))
    return (p > t[None, :]).astype(np.int64)


def fit_thresholds(y_true: np.ndarray, probs: np.ndarray, beta: float = 2.0) -> np.ndarray:
    """Per class, the threshold of the F-beta-optimal point of the precision-recall curve.

    The curve's point at score ``s`` predicts ``probs >= s``; the returned threshold is the
    next float below ``s``, so the strict decision ``probs > threshold`` of
    :func:`binarize` reproduces exactly that point. Classes without a positive record get
    :data:`DEFAULT_THRESHOLD` (0.5), with a warning.
    """
    y, p = _check(y_true, probs)
    thresholds = np.full(y.shape[1], DEFAULT_THRESHOLD)
    b2 = beta**2
    for k in range(y.shape[1]):
        if not y[:, k].any():
            log.warning("class %d has no positive record: threshold left at %.2f", k, DEFAULT_THRESHOLD)
            continue
        precision, recall, thr = precision_recall_curve(y[:, k], p[:, k])
        # The last (precision=1, recall=0) point has no threshold.
        precision, recall = precision[:-1], recall[:-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            f_beta = (1 + b2) * precision * recall / (b2 * precision + recall)
        thresholds[k] = float(np.nextafter(thr[int(np.nanargmax(f_beta))], -np.inf))
    return thresholds


def classes_without_positives(y_true: np.ndarray) -> list[int]:
    """Indices of the classes with no positive record (excluded from the macro averages)."""
    y = np.asarray(y_true)
    return [int(k) for k in np.flatnonzero(y.sum(axis=0) == 0)]


def _macro_over_positive_classes(values: np.ndarray, y: np.ndarray) -> float:
    """Mean of ``values`` over the classes with at least one positive record (NaNs left out)."""
    return _nanmean(values[y.sum(axis=0) > 0])


def thresholded_metrics(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0) -> dict[str, float]:
    """``macro_f_beta`` and ``macro_g_beta`` of binary predictions: the one definition that
    :func:`challenge_metrics` reports and the promotion gate's paired bootstrap
    (:mod:`ml.eval.bootstrap`) recomputes on every resample."""
    y = np.asarray(y_true)
    f_beta, g_beta = beta_measures(y, y_pred, beta)
    return {
        "macro_f_beta": _macro_over_positive_classes(f_beta, y),
        "macro_g_beta": _macro_over_positive_classes(g_beta, y),
    }


def challenge_scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str] | None,
    scored_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """``challenge_score`` (official; NaN without ``classes`` or ``scored_labels``, the (N, 26)
    labels over :func:`ml.eval.challenge.scored_codes`) and ``challenge_score_restricted``
    (NaN without ``classes``) of 0/1 predictions ``y_pred`` over the model's ``classes``."""
    nan = float("nan")
    if classes is None:
        return {"challenge_score": nan, "challenge_score_restricted": nan}
    official = nan
    if scored_labels is None:
        log.warning("no labels of the Challenge's scored classes: challenge_score (official) not computed")
    elif not labels_agree(y_true, classes, scored_labels):
        raise ValueError("the records' labels of the scored classes disagree with their labels of the model's classes")
    else:
        official = challenge_score(scored_labels, scored_codes(), y_pred, classes)
    return {
        "challenge_score": official,
        "challenge_score_restricted": challenge_score_restricted(y_true, y_pred, classes),
    }


def challenge_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | Sequence[float] | float = DEFAULT_THRESHOLD,
    beta: float = 2.0,
    classes: Sequence[str] | None = None,
    scored_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """All CE-SSL test metrics (:data:`METRIC_NAMES`), predictions being ``probs > thresholds``.

    ``classes`` (SNOMED-CT codes, one per column) enable the Challenge 2021 scores and
    ``scored_labels`` (N, 26: the records' labels over :func:`ml.eval.challenge.scored_codes`)
    the official one (:func:`challenge_scores`); without them they are NaN.
    """
    y, p = _check(y_true, probs)
    pred = binarize(p, thresholds)
    f_2020, g_2020 = beta_measures(y, pred, beta, normalize=True)
    missing = classes_without_positives(y)
    if missing:
        names = [classes[k] for k in missing] if classes is not None else missing
        log.warning(
            "%d of %d classes have no positive test record and are excluded from the macro averages: %s",
            len(missing),
            y.shape[1],
            names,
        )
    return {
        "ranking_loss": ranking_loss(y, p),
        "coverage": coverage(y, p),
        "macro_auroc": macro_auroc(y, p),
        "macro_map": macro_average_precision(y, p),
        **thresholded_metrics(y, pred, beta),
        "macro_f_beta_challenge2020": _nanmean(f_2020),
        "macro_g_beta_challenge2020": _nanmean(g_2020),
        **challenge_scores(y, pred, classes, scored_labels),
        "n_classes_without_positives": float(len(missing)),
    }


def class_labels(classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The Challenge abbreviation and name of each class (a SNOMED code); the code itself
    for both where the label mapping does not know it (or cannot be read)."""
    try:
        from ml.data.labels import LabelMapping, canonical_code

        mapping = LabelMapping.from_csv()
    except (ValueError, KeyError, OSError):
        return list(classes), list(classes)
    found = [mapping.diagnoses.get(canonical_code(c)) for c in classes]
    abbreviations = [d.abbreviation if d and d.abbreviation else c for c, d in zip(classes, found, strict=True)]
    names = [d.name if d and d.name else c for c, d in zip(classes, found, strict=True)]
    return abbreviations, names


def per_class_table(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | Sequence[float] | float = DEFAULT_THRESHOLD,
    classes: Sequence[str] | None = None,
    beta: float = 2.0,
    normalize: bool = False,
) -> pd.DataFrame:
    """One row per class: its code, abbreviation and name, support, threshold, AUROC, AP,
    F-beta, G-beta (NaN where undefined) and the confusion counts tp/fp/fn/tn at the threshold.

    A class with support 0 is left out of the macro F-beta / G-beta.
    """
    y, p = _check(y_true, probs)
    names = list(classes) if classes is not None else [str(k) for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} class names for {y.shape[1]} columns")
    predicted = binarize(p, thresholds)
    f_beta, g_beta = beta_measures(y, predicted, beta, normalize)
    tp, fp, fn, tn = confusion_counts(y, predicted, False)
    abbreviations, full_names = class_labels(names)
    return pd.DataFrame(
        {
            "class": names,
            "abbreviation": abbreviations,
            "name": full_names,
            "support": y.sum(axis=0),
            "threshold": np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],)),
            "auroc": per_class_auroc(y, p),
            "average_precision": per_class_average_precision(y, p),
            "f_beta": f_beta,
            "g_beta": g_beta,
            "tp": np.asarray(tp, dtype=np.int64),
            "fp": np.asarray(fp, dtype=np.int64),
            "fn": np.asarray(fn, dtype=np.int64),
            "tn": np.asarray(tn, dtype=np.int64),
        }
    )


def confusion_markdown(table: pd.DataFrame, beta: float = 2.0) -> str:
    """A per-class confusion summary (a :func:`per_class_table`) as a Markdown table, one row per class."""
    lines = [
        f"# Per-class confusion on the test split (F-beta{beta:g} at each class's threshold)",
        "",
        "| class | abbreviation | name | TP | FP | FN | TN | F-beta | threshold |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        f = "" if np.isnan(row.f_beta) else f"{row.f_beta:.4f}"
        cells = [str(row[0]), str(row.abbreviation), str(row.name).replace("|", "/")]
        lines.append(f"| {' | '.join(cells)} | {row.tp} | {row.fp} | {row.fn} | {row.tn} | {f} | {row.threshold:.4f} |")
    return "\n".join(lines) + "\n"
