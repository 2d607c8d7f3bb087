"""The training-method registry: every method's adapters, trainable set and data, built models."""

from __future__ import annotations

import logging

import pytest
import torch

from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, lora_layers
from ml.train.build import build_model, build_scoring_model
from ml.train.config import TrainConfig
from ml.train.methods import DEFAULT_METHOD, METHOD_NAMES, METHODS, TrainingMethod, get_method

N_CLASSES = 3
LORA = LoRAConfig(r=8, p=0.3)
RANK_MAP = {"encoder_layers.0.conv1": 4}

# name: (LoRA config it trains with or None, trainable set, reads unlabelled data)
EXPECTED = {
    "cessl": (LoRAConfig(r=8, p=0.3, rank_map=RANK_MAP), "lora", True),
    "lora": (LoRAConfig(r=8, p=0.0), "lora", False),
    "full": (None, "full", False),
    "fixmatch": (None, "full", True),
    "head-only": (None, "head", False),  # no gradient step: the classifier alone, fitted in closed form
}


def test_registry_lists_every_method_once() -> None:
    assert set(METHOD_NAMES) == set(EXPECTED) and DEFAULT_METHOD in METHODS
    assert all(name == entry.name for name, entry in METHODS.items())
    assert [m for m in METHOD_NAMES if METHODS[m].production] == ["cessl"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_method_says_what_it_trains(name: str) -> None:
    lora, trainable, reads_unlabelled = EXPECTED[name]
    method = get_method(name)
    assert get_method(method) is method
    assert method.lora_config(LORA, RANK_MAP) == lora
    assert method.trainable == trainable and method.uses_adapters == (lora is not None)
    assert method.reads_unlabelled == reads_unlabelled
    assert method.allocates_ranks == (name == "cessl")
    assert method.fits_head_only == (name == "head-only") == (method.step is None)
    assert TrainConfig(method=name).training_method is method


def test_an_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*cessl"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="nope")


def test_lora_builds_a_uniform_rank_model_without_deactivation_or_warning(caplog) -> None:
    config = backbone_config("tinylight", N_CLASSES)
    with caplog.at_level(logging.WARNING):
        model = build_model(ECGTransformer(config).state_dict(), config, "lora", LORA, rank_map=RANK_MAP)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    layers = lora_layers(model)
    assert len(layers) == 13 and {layer.r for layer in layers.values()} == {8}
    assert {layer.p for layer in layers.values()} == {0.0}


def test_cessl_uses_the_rank_map_and_p_full_has_no_adapters() -> None:
    config = backbone_config("tinylight", N_CLASSES)
    cessl = build_model(None, config, "cessl", LORA, rank_map=RANK_MAP)
    assert cessl.encoder_layers[0].conv1.r == 4 and cessl.encoder_layers[0].conv2.r == 8
    assert cessl.encoder_layers[0].conv1.p == 0.3
    full = build_model(None, config, get_method("full"), LORA, rank_map=RANK_MAP)
    assert not lora_layers(full) and all(p.requires_grad for p in full.parameters())


def test_scoring_model_is_uniform_rank_r_without_deactivation() -> None:
    lora = LoRAConfig(r=8, p=0.5, rank_map=RANK_MAP)
    model = build_scoring_model(None, backbone_config("tinylight", N_CLASSES), lora)
    assert {(layer.r, layer.p) for layer in lora_layers(model).values()} == {(8, 0.0)}


def test_the_build_seed_fixes_the_new_parameters() -> None:
    config = backbone_config("tinylight", N_CLASSES)
    a, b, c = (build_model(None, config, "cessl", LORA, seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder_layers.0.conv1.lora_A"], c["encoder_layers.0.conv1.lora_A"])


def test_a_new_method_is_one_entry() -> None:
    entry = TrainingMethod(
        "probe",
        "test only",
        rank_policy="uniform",
        deactivation=True,
        reads_unlabelled=False,
        step=METHODS["lora"].step,
    )
    assert entry.lora_config(LORA, RANK_MAP) == LoRAConfig(r=8, p=0.3)
