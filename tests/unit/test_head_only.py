"""The head-only baseline (ml/eval/head_only.py): a linear head on the frozen backbone's pooled
features, fitted to its optimum, with thresholds from the validation records; the pooled
features are exactly what the classifier reads; and the ``head-only`` training method
(ml/train/methods.py, ml/train/recipe.py) is that head inside the backbone's classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ml.eval.evaluate import features_with_labels, predict_with_labels
from ml.eval.head_only import fit_head, fit_linear_probe
from ml.eval.metrics import DEFAULT_THRESHOLD, binarize, fit_thresholds, thresholded_metrics
from ml.model.adapter import state_dict_identity
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


def test_the_head_only_method_fits_the_probe_into_the_classifier_without_a_gradient_step(tmp_path):
    """``cessl compare``'s head-only row: the classifier becomes the probe fitted on the frozen
    backbone's pooled features of the labelled records (no gradient step, the backbone's
    weights and BatchNorm statistics untouched), its thresholds fitted on the valid records as
    every method's, and the saved adapter predicts what the probe does (the evaluate step's path)."""
    from train_support import N_CLASSES, TINY_TRAIN, tiny_splits

    from ml.model.adapter import AdapterMeta, load_adapter, save_adapter
    from ml.model.backbone import backbone_config
    from ml.model.lora import LoRAConfig
    from ml.train.config import TrainConfig
    from ml.train.methods import get_method
    from ml.train.recipe import finetune
    from ml.train.trainer import fit

    config = backbone_config("tinylight", N_CLASSES)
    torch.manual_seed(0)
    backbone = ECGTransformer(config).state_dict()
    splits = tiny_splits({"train": 24, "valid": 16, "test": 12})
    train = TrainConfig(**(TINY_TRAIN | {"method": "head-only", "max_steps": 4}))
    outcome = finetune(backbone, config, LoRAConfig(), {}, train, splits["train"], None, splits["valid"])
    model, result = outcome.model, outcome.result

    assert (result.steps, result.best_step, [r["step"] for r in result.history]) == (0, 0, [0.0])
    state = model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], backbone[k])}
    assert changed == {f"classifier.{i}.{leaf}" for i in (0, 1) for leaf in ("weight", "bias")}
    head = sum(p.numel() for p in model.classifier.parameters())
    assert (outcome.trainable, outcome.total) == (head, sum(p.numel() for p in model.parameters()))
    method = get_method("head-only")
    assert method.trainable == "head" and not method.reads_unlabelled and not method.uses_adapters

    # the model is the probe: the same probabilities from the same pooled features
    features, labels = features_with_labels(model, splits["train"])
    test_x, _ = features_with_labels(model, splits["test"])
    probs, _ = predict_with_labels(model, splits["test"])
    np.testing.assert_allclose(probs, fit_head(features, labels).probabilities(test_x), atol=1e-5)
    valid_probs, valid_labels = predict_with_labels(model, splits["valid"])
    np.testing.assert_array_equal(outcome.thresholds, fit_thresholds(valid_labels, valid_probs))

    meta = AdapterMeta(backbone_id=state_dict_identity(backbone), classes=["a", "b", "c"], method="head-only")
    loaded, _ = load_adapter(save_adapter(model, tmp_path / "adapter", meta), backbone)
    np.testing.assert_allclose(predict_with_labels(loaded, splits["test"])[0], probs, atol=1e-6)
    with pytest.raises(ValueError, match="no gradient step"):
        fit(model, splits["train"], None, splits["valid"], train)


def _head_at_first_step(monkeypatch, method: str, head_init: str) -> tuple[dict, dict, dict]:
    """``recipe.finetune`` of ``method`` with ``head_init``, stopped where it calls the trainer
    (before step 1): the model's state then, the state ``build_model`` gives with the same seed
    (today's start) and the labelled split's frozen features and labels."""
    from train_support import N_CLASSES, TINY_TRAIN, tiny_splits

    from ml.model.backbone import backbone_config
    from ml.model.lora import LoRAConfig
    from ml.train import recipe
    from ml.train.build import build_model
    from ml.train.config import TrainConfig

    config = backbone_config("tinylight", N_CLASSES)
    torch.manual_seed(0)
    backbone = ECGTransformer(config).state_dict()
    splits = tiny_splits({"train": 24, "valid": 8})
    train = TrainConfig(**(TINY_TRAIN | {"method": method, "max_steps": 2, "head_init": head_init}))
    seen: dict = {}

    class Stop(Exception):
        pass

    def at_first_step(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise Stop

    monkeypatch.setattr(recipe, "fit", at_first_step)
    with pytest.raises(Stop):
        recipe.finetune(
            backbone, config, LoRAConfig(p=0.2), {}, train, splits["train"], splits["valid"], splits["valid"]
        )
    built = build_model(backbone, config, method, LoRAConfig(p=0.2), {}, seed=train.seed)
    features, labels = features_with_labels(built, splits["train"])
    return seen, built.state_dict(), {"features": features, "labels": labels}


HEAD = {f"classifier.{i}.{leaf}" for i in (0, 1) for leaf in ("weight", "bias")}


@pytest.mark.parametrize("method", ["cessl", "full"])
def test_a_linear_probe_start_is_the_probe_in_the_classifier_and_nothing_else(monkeypatch, method):
    """LP-FT (``head_init`` linear-probe): before the first gradient step the classifier is the
    head-only probe fitted on the labelled records' frozen features; the backbone and LoRA
    weights (and BatchNorm statistics) are those the model was built with."""
    start, built, frozen = _head_at_first_step(monkeypatch, method, "linear-probe")
    assert {k for k in built if not torch.equal(start[k], built[k])} == HEAD
    probe = fit_head(frozen["features"], frozen["labels"]).head_state()
    for name, value in probe.items():
        np.testing.assert_allclose(start[name].numpy(), value, rtol=1e-5, atol=1e-6)


def test_a_random_start_is_the_model_as_built(monkeypatch):
    """``head_init`` random changes nothing: the trainer gets the model as built from the seed,
    every weight the same as before the option existed (linear-probe is the default)."""
    from ml.train.config import TrainConfig

    assert TrainConfig().head_init == "linear-probe"
    start, built, _ = _head_at_first_step(monkeypatch, "cessl", "random")
    assert all(torch.equal(start[k], built[k]) for k in built)


def test_head_init_is_checked_and_keys_only_a_linear_probe_start():
    from ml.train.config import TrainConfig

    with pytest.raises(ValueError, match="head_init"):
        TrainConfig(head_init="zeros")
    assert "head_init" not in TrainConfig(head_init="random").schedule_fingerprint()  # resume as before
    assert TrainConfig(head_init="linear-probe").schedule_fingerprint()["head_init"] == "linear-probe"


def test_a_linear_probe_started_cessl_adapter_reads_back_as_the_model_that_trained(tmp_path):
    """LP-FT replaces classifier.0's frozen weight (LoRA adapts that layer): the adapter stores it,
    so the model read back from the file answers as the one fine-tuned (it used to take the
    backbone's classifier.0 on load, and a pipeline run's evaluation scored a broken head)."""
    from train_support import N_CLASSES, TINY_TRAIN, tiny_splits

    from ml.model.adapter import AdapterMeta, load_adapter, save_adapter
    from ml.model.backbone import backbone_config
    from ml.model.lora import LoRAConfig
    from ml.train import recipe
    from ml.train.config import TrainConfig

    config = backbone_config("tinylight", N_CLASSES)
    torch.manual_seed(0)
    backbone = ECGTransformer(config).state_dict()
    splits = tiny_splits({"train": 24, "valid": 8, "test": 8})
    train = TrainConfig(**(TINY_TRAIN | {"method": "cessl", "max_steps": 2, "head_init": "linear-probe"}))
    outcome = recipe.finetune(
        backbone, config, LoRAConfig(p=0.2), {}, train, splits["train"], splits["valid"], splits["valid"]
    )
    model = outcome.model
    assert not torch.equal(model.classifier[0].weight, backbone["classifier.0.weight"])  # the probe's
    meta = AdapterMeta(backbone_id=state_dict_identity(backbone), classes=[str(i) for i in range(N_CLASSES)])
    loaded, _ = load_adapter(save_adapter(model, tmp_path / "adapter", meta), backbone)
    np.testing.assert_allclose(
        predict_with_labels(loaded, splits["test"])[0], predict_with_labels(model, splits["test"])[0], atol=1e-6
    )
