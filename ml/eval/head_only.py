"""The head-only baseline: the frozen pre-trained backbone with a linear head fit on a site's
labelled records, its thresholds on the site's validation split.

What a site gets without adapting the backbone at all, trained as well as a head can be: the
classifier of the backbone reads the pooled features (``ECGTransformer.pooled``: encoder,
transformer, max-pool; every LoRA update off) and is linear (``Linear(d, d) -> Linear(d, C)``,
no activation), so the best head on frozen features is a per-class logistic regression on
them, which is convex and fitted to its optimum here (scikit-learn, L2 with ``C`` = 1 on
standardised features, classes weighted to balance, as for rare diagnoses) instead of a head
trained by SGD for a fixed number of steps. A class with no positive (or no negative) training
record gets its training prevalence as a constant probability. Thresholds: the F-beta2-optimal
point on the validation split (:func:`ml.eval.metrics.fit_thresholds`), as for every adapter.

CE-SSL has to beat this row at a site for its adaptation to have earned its cost there (the
cross-site matrix, ``ml.eval.cross_site``). The same head is the ``head-only`` training method
of ``cessl compare`` (``ml.train.methods``): :meth:`LinearProbe.head_state` writes it into
the backbone's classifier, so the model is evaluated like every other method's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from ml.eval.metrics import DEFAULT_THRESHOLD, fit_thresholds

log = logging.getLogger(__name__)

REGULARISATION_C = 1.0
PREVALENCE_CLIP = 1e-4


@dataclass(frozen=True)
class LinearProbe:
    """Per class a logistic regression on standardised features, and its threshold."""

    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    coef: np.ndarray  # (C, d)
    intercept: np.ndarray  # (C,)
    thresholds: np.ndarray  # (C,)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, d) pooled features -> (N, C) probabilities."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        logits = z @ self.coef.T + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def head_state(self) -> dict[str, np.ndarray]:
        """The probe as the backbone's classifier (``Linear(d, d) -> Linear(d, C)`` on the pooled
        features): the first layer standardises, the second holds the logistic regressions, so
        the model outputs :meth:`probabilities` (the ``head-only`` training method's model)."""
        return {
            "classifier.0.weight": np.diag(1.0 / self.scale),
            "classifier.0.bias": -self.mean / self.scale,
            "classifier.1.weight": self.coef,
            "classifier.1.bias": self.intercept,
        }


def _fit_class(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():  # one kind of record only: its prevalence, whatever the features
        prevalence = min(max(float(y.mean()), PREVALENCE_CLIP), 1 - PREVALENCE_CLIP)
        return np.zeros(z.shape[1]), math.log(prevalence / (1 - prevalence))
    model = LogisticRegression(C=REGULARISATION_C, class_weight="balanced", max_iter=2000)
    model.fit(z, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def fit_head(train_features: np.ndarray, train_labels: np.ndarray) -> LinearProbe:
    """Fit the head on the training records (thresholds left at :data:`DEFAULT_THRESHOLD`)."""
    x, y = np.asarray(train_features, dtype=np.float64), np.asarray(train_labels).astype(np.int64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"a head needs (N, d) features and (N, C) labels of N > 0 records, got {x.shape}, {y.shape}")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    fitted = [_fit_class(z, y[:, k]) for k in range(y.shape[1])]
    return LinearProbe(
        mean,
        scale,
        np.stack([coef for coef, _ in fitted]),
        np.array([bias for _, bias in fitted]),
        np.full(y.shape[1], DEFAULT_THRESHOLD),
    )


def fit_linear_probe(
    train_features: np.ndarray, train_labels: np.ndarray, valid_features: np.ndarray, valid_labels: np.ndarray
) -> LinearProbe:
    """Fit the head on the training records, its thresholds on the validation records."""
    probe = fit_head(train_features, train_labels)
    if len(valid_features) == 0:
        log.warning("head-only baseline: no validation record, thresholds left at %.2f", DEFAULT_THRESHOLD)
        return probe
    thresholds = fit_thresholds(np.asarray(valid_labels).astype(np.int64), probe.probabilities(valid_features))
    return dataclasses.replace(probe, thresholds=thresholds)
