"""Predict with a model and score it with the CE-SSL test metrics (:mod:`ml.eval.metrics`).

The metrics include the reference's macro F-beta2 / G-beta2 (every record weighs 1,
positive when score > threshold), their Challenge 2020 variants, and the Challenge 2021
score (:mod:`ml.eval.challenge`): the official ``challenge_score`` from the class names and
the test records' labels of every scored class, and ``challenge_score_restricted`` from
the class names alone. Classes with no positive test record count 0 in the macro means
(as in the reference evaluation), are left out of the ``*_positive_classes`` means, and
are listed in :attr:`EvaluationReport.classes_without_positives`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ml.eval.metrics import (
    challenge_metrics,
    classes_without_positives,
    fit_thresholds,
    per_class_table,
)

log = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(dataset: Dataset, batch_size: int, num_workers: int):
    """``(x, y)`` batches in dataset order."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator(),  # keeps the global RNG untouched
    )
    for batch in loader:
        yield batch[0], batch[1]


@torch.no_grad()
def predict_with_labels(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities (N, C) of ``model`` in eval mode, and the dataset's labels (N, C).

    The model's train/eval mode is restored afterwards.
    """
    return _outputs(model, dataset, batch_size, device, num_workers, lambda x: torch.sigmoid(model(x).float()))


def features_with_labels(
    model: nn.Module, dataset: Dataset, batch_size: int = 128, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled features (N, d) that the classifier of ``model`` (an ``ECGTransformer``)
    reads, in eval mode, and the dataset's labels (N, C)."""
    return _outputs(model, dataset, batch_size, device, 0, lambda x: model.pooled(x).float())  # type: ignore[operator]


def _outputs(
    model: nn.Module, dataset: Dataset, batch_size: int, device, num_workers: int, output
) -> tuple[np.ndarray, np.ndarray]:
    """``output(x)`` of every batch in eval mode, without gradients (float64), and the labels."""
    target = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    values, labels = [], []
    try:
        with torch.no_grad():
            for x, y in _batches(dataset, batch_size, num_workers):
                values.append(output(x.to(target, dtype=torch.float32)).cpu().numpy())
                labels.append(np.asarray(y, dtype=np.float32))
    finally:
        model.train(was_training)
    if not values:
        raise ValueError("cannot predict on an empty dataset")
    return np.concatenate(values).astype(np.float64), np.concatenate(labels)


def predict(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Sigmoid probabilities (N, C) of ``model`` in eval mode."""
    return predict_with_labels(model, dataset, batch_size, device, num_workers)[0]


@dataclass
class EvaluationReport:
    """Test metrics, the per-class table, and what they were computed from."""

    metrics: dict[str, float]
    per_class: pd.DataFrame
    thresholds: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    classes_without_positives: list[str]
    scored_labels: np.ndarray | None = None  # (N, 26) over ml.eval.challenge.scored_codes()


def evaluate(
    model: nn.Module,
    test: Dataset,
    valid: Dataset | None = None,
    thresholds: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 128,
    beta: float = 2.0,
    scored_labels: np.ndarray | None = None,
) -> EvaluationReport:
    """Score ``model`` on ``test`` with the CE-SSL test metrics.

    Thresholds: ``thresholds`` when given; else fitted per class on ``valid`` (F-beta
    optimal on its precision-recall curve); else 0.5 for every class. A record is
    positive for a class when its probability is strictly above the threshold.
    ``classes`` (SNOMED-CT codes) name the columns; ``scored_labels`` (N, 26) are the test
    records' labels of every Challenge-scored class, over
    :func:`ml.eval.challenge.scored_codes`, in ``test``'s order. Without ``classes`` both
    Challenge scores are NaN; without ``scored_labels`` the official ``challenge_score`` is.
    """
    if thresholds is None:
        if valid is not None:
            valid_probs, valid_labels = predict_with_labels(model, valid, batch_size)
            thresholds = fit_thresholds(valid_labels, valid_probs, beta)
        else:
            log.warning("no validation set and no thresholds: using 0.5 for every class")
    probs, labels = predict_with_labels(model, test, batch_size)
    if thresholds is None:
        thresholds = np.full(labels.shape[1], 0.5)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    metrics = challenge_metrics(labels, probs, thresholds, beta, classes, scored_labels)
    table = per_class_table(labels, probs, thresholds, classes, beta)
    names = list(classes) if classes is not None else [str(k) for k in range(labels.shape[1])]
    missing = [names[k] for k in classes_without_positives(labels)]
    return EvaluationReport(metrics, table, thresholds, probs, labels, missing, scored_labels)
