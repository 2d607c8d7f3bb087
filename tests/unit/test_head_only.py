"""The head-only baseline (ml/eval/head_only.py): a linear head on the frozen backbone's pooled
features, fitted to its optimum, with thresholds from the validation records; and the pooled
features are exactly what the classifier reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ml.eval.evaluate import features_with_labels
from ml.eval.head_only import fit_linear_probe
from ml.eval.metrics import DEFAULT_THRESHOLD, binarize, thresholded_metrics
from ml.model.backbone import BACKBONE_CONFIGS, ECGTransformer


def _features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 follows feature 0, class 1 feature 1 (noisy), class 2 never occurs."""
    x = rng.normal(size=(n, 8)) * np.array([1, 1, 1, 1, 5, 5, 5, 5])  # unequal scales: standardised
    y = np.stack([x[:, 0] > 0.3, x[:, 1] + 0.5 * rng.normal(size=n) > 0, np.zeros(n, bool)], axis=1)
    return x, y.astype(np.int64)


def test_the_probe_learns_what_the_features_carry_and_the_prevalence_of_what_they_do_not():
    rng = np.random.default_rng(0)
    probe = fit_linear_probe(*_features(rng, 200), *_features(rng, 80))
    test_x, test_y = _features(rng, 300)
    probs = probe.probabilities(test_x)
    assert probs.shape == (300, 3) and np.all((probs > 0) & (probs < 1))
    f_beta = thresholded_metrics(test_y[:, :2], binarize(probs[:, :2], probe.thresholds[:2]))["macro_f_beta"]
    assert f_beta > 0.85
    assert np.allclose(probs[:, 2], probs[0, 2]) and probs[0, 2] < 1e-3  # never seen: its (clipped) prevalence
    assert probe.thresholds[2] == DEFAULT_THRESHOLD  # no positive validation record
    assert np.all(probe.thresholds[:2] != DEFAULT_THRESHOLD)  # fitted on the validation records


def test_no_training_record_is_one_clear_error():
    with pytest.raises(ValueError, match="N > 0"):
        fit_linear_probe(np.zeros((0, 4)), np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((0, 2)))


def test_pooled_features_are_what_the_classifier_reads():
    torch.manual_seed(0)
    model = ECGTransformer(BACKBONE_CONFIGS["tinylight"]).eval()
    config = model.config
    x = torch.randn(3, config.n_leads, 1, 6144)
    y = torch.zeros(3, config.num_classes)
    features, labels = features_with_labels(model, TensorDataset(x, y), batch_size=2)
    assert features.shape == (3, config.d_model) and labels.shape == (3, config.num_classes)
    with torch.no_grad():
        logits = model(x)
        again = torch.as_tensor(features, dtype=torch.float32)
        for layer in model.classifier:
            again = layer(again)
    assert torch.allclose(again, logits, atol=1e-5)
