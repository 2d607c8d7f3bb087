"""The official PhysioNet/CinC Challenge 2021 score, as the Challenge's ``evaluate_model.py``.

The Challenge scores binary predictions over 26 SNOMED-CT classes with a reward matrix W
(``challenge2021_weights.csv``, vendored from physionetchallenges/evaluation-2021; see its
PROVENANCE note). A class may be a set of equivalent codes (``713427006|59118001``,
``284470004|63593006``, ``427172004|17338001``, ``733534002|164909002``): a record is
positive for it when any of its codes is a label (or an output).

1. Modified confusion matrix A (26 x 26): every record spreads a credit of 1 over the
   (label j, output k) pairs of its positive labels and outputs,
   ``A[j, k] += 1 / max(|labels u outputs|, 1)``.
2. Observed score ``sum(W * A)``; the correct classifier's score (outputs = labels); the
   inactive classifier's score (it outputs only the normal class, sinus rhythm 426783006).
3. ``score = (observed - inactive) / (correct - inactive)``, and 0 when
   ``correct == inactive``. 1 is a perfect classifier, 0 the inactive one.

Two scores of a model's 0/1 outputs over its own class list (usually a subset of the 26):

- :func:`challenge_score` is the official score. The labels are every scored class of each
  record (all 26, as the Challenge reads them from the headers); the outputs are mapped to
  the scored classes by code (equivalent codes merged: a scored class is output when any of
  its model columns is), and a scored class the model does not predict is never output.
  Missing a class therefore costs what the Challenge charges for it.
- :func:`challenge_score_restricted` is the same formula with the labels limited to the
  model's own classes: a record's diagnoses outside the model's list are dropped. It is not
  the Challenge score: on a restricted class set it ignores every diagnosis the model cannot
  output and rewards over-prediction. It needs only the model's labels, and is NaN when no
  model class is scored.

Columns that are not scored classes are ignored on both sides, as the Challenge ignores
unscored codes. The inactive classifier outputs the normal class even when the model has no
such column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

WEIGHTS_CSV = Path(__file__).with_name("challenge2021_weights.csv")
NORMAL_CLASS = "426783006"  # sinus rhythm: the inactive classifier's only output


@dataclass(frozen=True)
class ChallengeWeights:
    """The scored classes (each a set of equivalent codes) and the reward matrix W."""

    classes: tuple[frozenset[str], ...]
    weights: np.ndarray  # (K, K): rows labels, columns outputs

    def index_of(self, code: str) -> int:
        """Index of the scored class containing ``code``; -1 when it is not scored."""
        for k, codes in enumerate(self.classes):
            if code.strip() in codes:
                return k
        return -1


@lru_cache(maxsize=4)
def load_weights(path: str | Path = WEIGHTS_CSV) -> ChallengeWeights:
    """Read a Challenge weight table: a header of class labels (``a|b`` for equivalent
    codes), then one row per class, labelled in the first column."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    header = [cell.strip() for cell in lines[0].split(",")[1:]]
    rows = [[cell.strip() for cell in line.split(",")] for line in lines[1:]]
    if [row[0] for row in rows] != header or any(len(row) != len(header) + 1 for row in rows):
        raise ValueError(f"{path}: the weight table must be square with matching row and column labels")
    weights = np.array([[float(cell) for cell in row[1:]] for row in rows], dtype=np.float64)
    classes = tuple(frozenset(label.split("|")) for label in header)
    return ChallengeWeights(classes, weights)


def to_scored_classes(matrix: np.ndarray, classes: Sequence[str], table: ChallengeWeights) -> np.ndarray:
    """(N, C) 0/1 over the model's ``classes`` -> (N, K) bool over the scored classes.

    A scored class is positive when any model column mapped to it is; unscored columns are
    dropped; scored classes without a column stay 0.
    """
    m = np.asarray(matrix).astype(bool)
    if m.shape[1] != len(classes):
        raise ValueError(f"{m.shape[1]} columns for {len(classes)} class names")
    out = np.zeros((m.shape[0], len(table.classes)), dtype=bool)
    for column, code in enumerate(classes):
        k = table.index_of(str(code))
        if k >= 0:
            out[:, k] |= m[:, column]
    return out


def modified_confusion_matrix(labels: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """A[j, k] = sum over records of labels[j] outputs[k] / max(|labels u outputs|, 1)."""
    lab, out = np.asarray(labels, dtype=bool), np.asarray(outputs, dtype=bool)
    norm = np.maximum((lab | out).sum(axis=1), 1).astype(np.float64)
    return (lab / norm[:, None]).T @ out.astype(np.float64)


def normalized_score(labels: np.ndarray, outputs: np.ndarray, table: ChallengeWeights) -> float:
    """(observed - inactive) / (correct - inactive) over the scored classes; 0 when undefined."""
    inactive = np.zeros_like(labels, dtype=bool)
    inactive[:, table.index_of(NORMAL_CLASS)] = True
    observed, correct, inactive_score = (
        float(np.nansum(table.weights * modified_confusion_matrix(labels, o))) for o in (outputs, labels, inactive)
    )
    if correct == inactive_score:
        return 0.0
    return (observed - inactive_score) / (correct - inactive_score)


def scored_codes(weights: ChallengeWeights | None = None) -> list[str]:
    """One SNOMED-CT code per scored class, in the weight table's order (the smallest code of
    an equivalence set: any of its codes names the class). A label matrix over these codes is
    the ``labels`` argument of :func:`challenge_score`."""
    table = weights if weights is not None else load_weights()
    return [min(codes) for codes in table.classes]


def unlabelled_scored_classes(label_classes: Sequence[str], weights: ChallengeWeights | None = None) -> list[str]:
    """The scored classes (as ``a|b`` for an equivalence set) that no column of ``label_classes`` labels."""
    table = weights if weights is not None else load_weights()
    covered = {table.index_of(str(code)) for code in label_classes}
    return ["|".join(sorted(codes)) for k, codes in enumerate(table.classes) if k not in covered]


def labels_agree(
    y_true: np.ndarray, classes: Sequence[str], scored_labels: np.ndarray, weights: ChallengeWeights | None = None
) -> bool:
    """Whether a model's labels ``y_true`` (N, C over ``classes``) are the records' labels of every
    scored class ``scored_labels`` (N, 26 over :func:`scored_codes`) on the scored classes the model has."""
    table = weights if weights is not None else load_weights()
    own = to_scored_classes(y_true, classes, table)
    scored = np.asarray(scored_labels).astype(bool)
    if own.shape != scored.shape:
        return False
    present = sorted({table.index_of(str(code)) for code in classes} - {-1})
    return bool(np.array_equal(own[:, present], scored[:, present]))


def challenge_score(
    labels: np.ndarray,
    label_classes: Sequence[str],
    outputs: np.ndarray,
    output_classes: Sequence[str],
    weights: ChallengeWeights | None = None,
) -> float:
    """The official Challenge 2021 score of a model's 0/1 ``outputs`` (N, C) over its
    ``output_classes``, against ``labels`` (N, L) over ``label_classes``, which must label
    every scored class (e.g. :func:`scored_codes`; ValueError otherwise). A scored class
    outside ``output_classes`` is never output."""
    table = weights if weights is not None else load_weights()
    missing = unlabelled_scored_classes(label_classes, table)
    if missing:
        raise ValueError(
            f"the Challenge score needs the labels of all {len(table.classes)} scored classes; "
            f"{len(missing)} have no label column: {missing} (challenge_score_restricted scores the model's classes alone)"
        )
    return normalized_score(
        to_scored_classes(labels, label_classes, table), to_scored_classes(outputs, output_classes, table), table
    )


def scores_any(classes: Sequence[str], weights: ChallengeWeights | None = None) -> bool:
    """Whether any of ``classes`` is a class the Challenge 2021 scores."""
    table = weights if weights is not None else load_weights()
    return any(table.index_of(str(code)) >= 0 for code in classes)


def warn_unscored(classes: Sequence[str]) -> None:
    """Say that :func:`challenge_score_restricted` is undefined for ``classes`` (none is scored)."""
    log.warning(
        "none of the classes %s is scored by the Challenge 2021: challenge_score_restricted undefined", list(classes)
    )


def challenge_score_restricted(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], weights: ChallengeWeights | None = None
) -> float:
    """The Challenge formula with the labels limited to the model's ``classes``: ``y_true`` and
    ``y_pred`` (N, C) over the same columns; every other diagnosis of a record is dropped.
    Not the Challenge score (see the module docstring); NaN when no class is scored."""
    table = weights if weights is not None else load_weights()
    if not scores_any(classes, table):
        warn_unscored(classes)
        return float("nan")
    return normalized_score(to_scored_classes(y_true, classes, table), to_scored_classes(y_pred, classes, table), table)
