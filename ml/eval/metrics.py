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
- **Macro means, and classes with no positive test record.** A test split may hold no
  positive record of some class (a rare diagnosis, a small split). Its F-beta, G-beta and
  average precision are then 0 (no true positive is possible), and the macro means follow
  the CE-SSL reference evaluation: ``macro_f_beta``, ``macro_g_beta`` and ``macro_map`` are
  means over *every* class, such a class counting 0. The same means over only the classes
  with at least one positive record are reported beside them as
  ``macro_f_beta_positive_classes``, ``macro_g_beta_positive_classes`` and
  ``macro_map_positive_classes``; ``n_classes_without_positives`` says how many classes
  differ (:func:`classes_without_positives` lists them, and a warning names them).
- **Macro AUROC**: per class :func:`sklearn.metrics.roc_auc_score` (computed for every class
  at once in its Mann-Whitney form: the leave-one-out intervals recompute it n times), then the mean over the
  classes where it is defined (at least one positive and one negative record), as the
  Challenge's ``np.nanmean`` does (the reference's ``roc_auc_score(average="macro")``
  refuses such a split).
- **Average precision**: :func:`sklearn.metrics.average_precision_score` per class (the
  step-wise area under the precision-recall curve). It equals the reference's ``mAP``
  except where a positive record's score is tied with another record's: scikit-learn takes
  tied scores as one threshold, the reference ranks tied records one by one in its sort order.
- **F-beta / G-beta** (beta = 2), as the CE-SSL reference evaluation computes them, so the
  numbers compare with the published ones: per class
  ``F = (1+b^2) TP / ((1+b^2) TP + b^2 FN + FP)`` and ``G = TP / (TP + FP + b FN)`` with
  every record weighing 1 in the confusion counts (the reference's ``single=True``).
- **Challenge 2020 F-beta / G-beta** (``macro_f_beta_challenge2020`` /
  ``macro_g_beta_challenge2020``): the official ``compute_beta_measures``, where each record
  weighs ``1 / max(#true labels, 1)`` (``normalize=True``) and the macro mean is the
  ``nanmean`` over classes with ``TP + FP + FN > 0`` (a class with no positive but a false
  alarm counts as 0 there, one with neither is left out, as in the Challenge).
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
from sklearn.metrics import coverage_error, precision_recall_curve

from ml.eval.challenge import (
    challenge_score,
    challenge_score_restricted,
    labels_agree,
    scored_codes,
    scores_any,
    warn_unscored,
)

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
# What each test metric is: the evaluation report states it next to each number.
METRIC_DEFINITIONS: dict[str, str] = {
    "ranking_loss": "label ranking loss (lower is better)",
    "coverage": "coverage error, 1-based (lower is better)",
    "macro_auroc": "mean AUROC over the classes with a positive and a negative test record",
    "macro_map": "mean average precision over all classes, a class with no positive test record counting 0",
    "macro_map_positive_classes": "mean average precision over the classes with a positive test record",
    "macro_f_beta": "mean F-beta2 over all classes, a class with no positive test record counting 0 (CE-SSL reference)",
    "macro_f_beta_positive_classes": "mean F-beta2 over the classes with a positive test record",
    "macro_g_beta": "mean G-beta2 over all classes, a class with no positive test record counting 0 (CE-SSL reference)",
    "macro_g_beta_positive_classes": "mean G-beta2 over the classes with a positive test record",
    "macro_f_beta_challenge2020": "Challenge 2020 F-beta2 (records weigh 1/#labels; nanmean over classes)",
    "macro_g_beta_challenge2020": "Challenge 2020 G-beta2 (records weigh 1/#labels; nanmean over classes)",
    "challenge_score": "official Challenge 2021 score: all 26 scored classes, one the model lacks is never output",
    "challenge_score_restricted": "Challenge 2021 formula on the model's classes only (not the Challenge score)",
    "n_classes_without_positives": "classes with no positive test record (0 in the macro means above)",
}
METRIC_NAMES: tuple[str, ...] = tuple(METRIC_DEFINITIONS)
# One line for a metrics table that cannot carry METRIC_DEFINITIONS row by row.
MACRO_CONVENTION = (
    "macro F-beta2 / G-beta2 / mAP: all classes, a class with no positive test record counting 0 "
    "(CE-SSL reference); *_positive_classes: only the classes with one; challenge_score: the official "
    "Challenge 2021 score over all 26 scored classes; challenge_score_restricted: the model's classes only"
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
    """Label ranking loss (:func:`sklearn.metrics.label_ranking_loss`, for every record at once;
    lower is better): per record the share of its (positive, negative) label pairs whose
    positive scores no higher than the negative, 0 for a record without both kinds, averaged."""
    y, p = _check(y_true, probs)
    if not len(y):
        return float("nan")
    positive = y.astype(bool)
    pairs = positive[:, :, None] & ~positive[:, None, :]  # (N, C, C): (positive j, negative k)
    wrong = (pairs & (p[:, :, None] <= p[:, None, :])).sum(axis=(1, 2))
    n_pos = positive.sum(axis=1)
    n_pairs = n_pos * (y.shape[1] - n_pos)
    return float(np.mean(np.where(n_pairs > 0, wrong / np.maximum(n_pairs, 1), 0.0)))


def coverage(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Coverage error, scikit-learn's 1-based convention (lower is better)."""
    y, p = _check(y_true, probs)
    return float(coverage_error(y, p))


def per_class_auroc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC per class; NaN for a class with only one label value present.

    :func:`sklearn.metrics.roc_auc_score` in its Mann-Whitney form, all classes at once: the
    share of (positive, negative) record pairs whose positive scores higher, a tie counting
    one half (the area under the ROC curve with tied scores as one threshold)."""
    from scipy.stats import rankdata

    y, p = _check(y_true, probs)
    n_pos = y.sum(axis=0).astype(np.float64)
    n_neg = len(y) - n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    if not defined.any():
        return np.full(y.shape[1], np.nan)
    u = (rankdata(p, axis=0) * y).sum(axis=0) - n_pos * (n_pos + 1) / 2
    return np.where(defined, u / np.where(defined, n_pos * n_neg, 1.0), np.nan)


def _average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """:func:`sklearn.metrics.average_precision_score` of one class with a positive record: over
    the distinct scores, highest first, the recall gained at each times the precision there."""
    order = np.argsort(-scores, kind="stable")
    y, scores = y[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # each distinct score's last record
    true_positives = np.cumsum(y)[last].astype(np.float64)
    precision = true_positives / (last + 1)
    return float(np.diff(true_positives, prepend=0.0) @ precision / true_positives[-1])


def per_class_average_precision(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Average precision per class (:func:`_average_precision`); NaN for a class with no positive record."""
    y, p = _check(y_true, probs)
    out = np.full(y.shape[1], np.nan)
    for k in np.flatnonzero(y.any(axis=0)):
        out[k] = _average_precision(y[:, k], p[:, k])
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def has_positives(y_true: np.ndarray) -> np.ndarray:
    """(C,) bool: the classes with at least one positive record."""
    return np.asarray(y_true).sum(axis=0) > 0


def counted_as_zero(values: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Per-class ``values`` as the macro means take them: 0 for a class with no positive record."""
    return np.where(has_positives(y_true), values, 0.0)


def macro_mean(values: np.ndarray, y_true: np.ndarray) -> float:
    """The reference's macro mean of per-class ``values``: over every class, a class with no
    positive record counting 0 (NaN when there is no class)."""
    return float(counted_as_zero(values, y_true).mean()) if len(values) else float("nan")


def macro_mean_positive_classes(values: np.ndarray, y_true: np.ndarray) -> float:
    """The mean of per-class ``values`` over the classes with at least one positive record."""
    return _nanmean(values[has_positives(y_true)])


def macro_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over the classes where it is defined."""
    return _nanmean(per_class_auroc(y_true, probs))


def macro_average_precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro mAP as the reference computes it: mean average precision over every class, a
    class with no positive record counting 0."""
    return macro_mean(per_class_average_precision(y_true, probs), y_true)


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
    """Indices of the classes with no positive record (0 in the macro means, left out of the
    ``*_positive_classes`` ones)."""
    return [int(k) for k in np.flatnonzero(~has_positives(y_true))]


def thresholded_metrics(y_true: np.ndarray, y_pred: np.ndarray, beta: float = 2.0) -> dict[str, float]:
    """Macro F-beta and G-beta of binary predictions, over all classes (``macro_f_beta``,
    ``macro_g_beta``: the reference's) and over the classes with a positive record
    (``*_positive_classes``): the one definition that :func:`challenge_metrics` reports and
    the promotion gate's paired bootstrap (:mod:`ml.eval.bootstrap`) recomputes on every resample."""
    y = np.asarray(y_true)
    f_beta, g_beta = beta_measures(y, y_pred, beta)
    return {
        "macro_f_beta": macro_mean(f_beta, y),
        "macro_f_beta_positive_classes": macro_mean_positive_classes(f_beta, y),
        "macro_g_beta": macro_mean(g_beta, y),
        "macro_g_beta_positive_classes": macro_mean_positive_classes(g_beta, y),
    }


def challenge_scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str] | None,
    scored_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """``challenge_score`` (official; NaN without ``classes`` or ``scored_labels``, the (N, 26)
    labels over :func:`ml.eval.challenge.scored_codes`) and ``challenge_score_restricted``
    (NaN without ``classes`` or when none of them is scored) of 0/1 predictions ``y_pred`` over
    the model's ``classes``. Quiet: :func:`challenge_metrics` says why a score is NaN."""
    nan = float("nan")
    if classes is None:
        return {"challenge_score": nan, "challenge_score_restricted": nan}
    official = nan
    if scored_labels is not None:
        if not labels_agree(y_true, classes, scored_labels):
            raise ValueError(
                "the records' labels of the scored classes disagree with their labels of the model's classes"
            )
        official = challenge_score(scored_labels, scored_codes(), y_pred, classes)
    restricted = challenge_score_restricted(y_true, y_pred, classes) if scores_any(classes) else nan
    return {"challenge_score": official, "challenge_score_restricted": restricted}


def _warn_incomplete(y: np.ndarray, classes: Sequence[str] | None, scored_labels: np.ndarray | None) -> None:
    """Say which test metrics a split or a model leaves undefined or counts differently."""
    missing = classes_without_positives(y)
    if missing:
        names = [classes[k] for k in missing] if classes is not None else missing
        log.warning(
            "%d of %d classes have no positive test record: they count 0 in macro_f_beta / macro_g_beta / "
            "macro_map and are left out of the *_positive_classes means: %s",
            len(missing),
            y.shape[1],
            names,
        )
    if classes is not None and scored_labels is None:
        log.warning("no labels of the Challenge's scored classes: challenge_score (official) not computed")
    if classes is not None and not scores_any(classes):
        warn_unscored(classes)


def metric_values(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | Sequence[float] | float = DEFAULT_THRESHOLD,
    beta: float = 2.0,
    classes: Sequence[str] | None = None,
    scored_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """:func:`challenge_metrics` without its warnings: the statistic the 95% intervals of
    :mod:`ml.eval.intervals` recompute on every leave-one-out set of the records."""
    y, p = _check(y_true, probs)
    pred = binarize(p, thresholds)
    f_2020, g_2020 = beta_measures(y, pred, beta, normalize=True)
    average_precision = per_class_average_precision(y, p)
    return {
        "ranking_loss": ranking_loss(y, p),
        "coverage": coverage(y, p),
        "macro_auroc": macro_auroc(y, p),
        "macro_map": macro_mean(average_precision, y),
        "macro_map_positive_classes": macro_mean_positive_classes(average_precision, y),
        **thresholded_metrics(y, pred, beta),
        "macro_f_beta_challenge2020": _nanmean(f_2020),
        "macro_g_beta_challenge2020": _nanmean(g_2020),
        **challenge_scores(y, pred, classes, scored_labels),
        "n_classes_without_positives": float(len(classes_without_positives(y))),
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
    the official one (:func:`challenge_scores`); without them they are NaN. Warns about the
    classes without a positive test record and about a Challenge score it cannot compute.
    """
    y, _ = _check(y_true, probs)
    _warn_incomplete(y, classes, scored_labels)
    return metric_values(y_true, probs, thresholds, beta, classes, scored_labels)


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
    F-beta, G-beta, the confusion counts tp/fp/fn/tn at the threshold, and ``no_test_positive``.

    AP, F-beta and G-beta are the values the macro means average: 0 for a class with no
    positive record (``no_test_positive``), which is left out of the ``*_positive_classes``
    means; its AUROC is NaN (undefined, left out of ``macro_auroc``).
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
            "average_precision": counted_as_zero(per_class_average_precision(y, p), y),
            "f_beta": counted_as_zero(f_beta, y),
            "g_beta": counted_as_zero(g_beta, y),
            "tp": np.asarray(tp, dtype=np.int64),
            "fp": np.asarray(fp, dtype=np.int64),
            "fn": np.asarray(fn, dtype=np.int64),
            "tn": np.asarray(tn, dtype=np.int64),
            "no_test_positive": ~has_positives(y),
        }
    )


def confusion_markdown(table: pd.DataFrame, beta: float = 2.0) -> str:
    """A per-class confusion summary (a :func:`per_class_table`) as a Markdown table, one row per
    class, and how the macro means count a class with no positive test record."""
    lines = [
        f"# Per-class confusion on the test split (F-beta{beta:g} at each class's threshold)",
        "",
        "| class | abbreviation | name | TP | FP | FN | TN | F-beta | threshold |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        f = "" if np.isnan(row.f_beta) else f"{row.f_beta:.4f}"
        if row.no_test_positive:
            f += " (no positive test record)"
        cells = [str(row[0]), str(row.abbreviation), str(row.name).replace("|", "/")]
        lines.append(f"| {' | '.join(cells)} | {row.tp} | {row.fp} | {row.fn} | {row.tn} | {f} | {row.threshold:.4f} |")
    n_missing = int(table["no_test_positive"].sum())
    lines += [
        "",
        f"{n_missing} of {len(table)} classes have no positive test record: their F-beta{beta:g} counts 0 in "
        f"macro_f_beta (the mean over all {len(table)} classes, as the CE-SSL reference evaluation computes it); "
        "macro_f_beta_positive_classes leaves them out.",
    ]
    return "\n".join(lines) + "\n"
