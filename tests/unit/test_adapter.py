"""Adapters: save/load round trip, backbone identity, merged export, safe checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ml.model.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMeta,
    BackboneMismatchError,
    CheckpointError,
    export_merged,
    load_adapter,
    load_backbone_weights,
    load_merged,
    read_state_dict,
    save_adapter,
    state_dict_identity,
)
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, lora_layers, mark_trainable, merge_lora

CLASSES = [f"c{i}" for i in range(19)]


class NotATensor:
    """A custom class: a pickle holding it must not be loaded."""


@pytest.fixture(scope="module")
def backbone_state(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)


@pytest.fixture(scope="module")
def x(reference_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(reference_dir / "golden_input.npy"))[:, :, :, :2048]


def fine_tuned(backbone_state: dict[str, torch.Tensor], x: torch.Tensor) -> ECGTransformer:
    """A tinylight model that looks fine-tuned: non-zero LoRA, moved biases, moved BN stats."""
    torch.manual_seed(0)
    rank_map = {"encoder_layers.0.conv3": 2, "transformer_layers.0.fc2": 0}
    model = ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(r=4, rank_map=rank_map, p=0.2))
    load_backbone_weights(model, backbone_state)
    mark_trainable(model, "lora")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
        model.train()
        model(x)  # BatchNorm running statistics move
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_adapter_round_trip(tmp_path: Path, backbone_state: dict, x: torch.Tensor) -> None:
    model = fine_tuned(backbone_state, x)
    with torch.no_grad():  # a linear-probe start (LP-FT) replaces classifier.0's frozen weight too
        model.classifier[0].weight.mul_(0.5)
    meta = AdapterMeta(
        backbone_id=state_dict_identity(backbone_state),
        classes=CLASSES,
        thresholds=[0.5] * 19,
        method="cessl",
        extra={"dataset": "g12ec"},
    )
    save_adapter(model, tmp_path / "adapter", meta)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    stored = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert "encoder_layers.0.conv1.lora_A" in stored and "classifier.1.weight" in stored
    assert "encoder_layers.0.bn1.running_mean" in stored and "transformer_layers.0.norm1.weight" in stored
    assert "transformer_layers.0.fc2.lora_A" not in stored  # rank 0: not adapted
    assert (
        "encoder_layers.0.conv1.conv.weight" not in stored and "classifier.0.weight" in stored
    )  # the head: the site's
    assert sum(t.numel() for t in stored.values()) < 0.2 * sum(t.numel() for t in backbone_state.values())

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["rank_map"]["encoder_layers.0.conv3"] == 2 and config["p"] == 0.2
    assert config["backbone_config"]["name"] == "tinylight" and config["extra"] == {"dataset": "g12ec"}

    loaded, loaded_meta = load_adapter(tmp_path / "adapter", backbone_state)
    assert loaded_meta == meta
    assert loaded.rank_map() == model.rank_map()
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_backbone_identity_mismatch_is_refused(tmp_path: Path, backbone_state: dict, x: torch.Tensor) -> None:
    model = fine_tuned(backbone_state, x)
    good_id = state_dict_identity(backbone_state)
    save_adapter(model, tmp_path, AdapterMeta(backbone_id=good_id, classes=CLASSES))
    other = {k: v.clone() for k, v in backbone_state.items()}
    other["encoder_layers.0.conv1.conv.weight"][0, 0, 0, 0] += 1e-3
    other_id = state_dict_identity(other)
    with pytest.raises(BackboneMismatchError) as err:
        load_adapter(tmp_path, other)
    assert good_id in str(err.value) and other_id in str(err.value)


def test_state_dict_identity() -> None:
    a = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}
    assert state_dict_identity(a) == state_dict_identity(dict(reversed(list(a.items()))))
    assert state_dict_identity(a) != state_dict_identity({**a, "w": a["w"].view(3, 2)})
    assert state_dict_identity(a) != state_dict_identity({**a, "b": torch.zeros(3, dtype=torch.float64)})
    assert state_dict_identity(a) != state_dict_identity({**a, "c": torch.zeros(())})


def test_saving_a_merged_model_stores_the_unmerged_tensors(
    tmp_path: Path, backbone_state: dict, x: torch.Tensor
) -> None:
    model = fine_tuned(backbone_state, x)
    expected = logits(model, x)
    merge_lora(model)
    save_adapter(model, tmp_path, AdapterMeta(backbone_id=state_dict_identity(backbone_state), classes=CLASSES))
    assert all(layer.merged for layer in lora_layers(model).values())
    loaded, _ = load_adapter(tmp_path, backbone_state)
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-5, rtol=0)


def test_export_merged_loads_into_a_plain_model(tmp_path: Path, backbone_state: dict, x: torch.Tensor) -> None:
    model = fine_tuned(backbone_state, x)
    path = export_merged(model, tmp_path / "merged.safetensors", extra={"run": "1"})
    assert not any(layer.merged for layer in lora_layers(model).values())  # the model is untouched
    plain = ECGTransformer(backbone_config("tinylight", 19))
    plain.load_state_dict(read_state_dict(path), strict=True)
    torch.testing.assert_close(logits(plain, x), logits(model, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_merged(path), x), logits(plain, x), atol=0, rtol=0)
    assert json.loads(path.with_suffix(".json").read_text())["merged_from"]["p"] == 0.2


def test_read_state_dict_is_safe(tmp_path: Path, backbone_state: dict) -> None:
    pt = tmp_path / "backbone.pt"
    torch.save(backbone_state, pt)
    assert state_dict_identity(read_state_dict(pt)) == state_dict_identity(backbone_state)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in backbone_state.items()}, "epoch": 3}, wrapped)
    assert list(read_state_dict(wrapped)) == list(backbone_state)

    st = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone_state.items()}, str(st))
    assert state_dict_identity(read_state_dict(st)) == state_dict_identity(backbone_state)

    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        read_state_dict(evil)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.pt")


def test_load_backbone_weights_strict_errors(backbone_state: dict) -> None:
    model = ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(r=4))
    broken = dict(backbone_state)
    del broken["encoder_layers.0.bn1.running_mean"]
    broken["extra.weight"] = torch.zeros(1)
    broken["classifier.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(model, broken)
    message = str(err.value)
    assert "encoder_layers.0.bn1.running_mean" in message and "extra.weight" in message
    assert "classifier.0.weight: expected (64, 64), got (3, 3)" in message

    # a pre-training checkpoint with its own 6-class head: dropped on request
    pretrained = {**backbone_state, "classifier.1.weight": torch.zeros(6, 64), "classifier.1.bias": torch.zeros(6)}
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight"):
        load_backbone_weights(model, pretrained)
    head = model.classifier[1].weight.detach().clone()
    load_backbone_weights(model, pretrained, drop_head=True)
    assert torch.equal(model.classifier[1].weight, head)
    assert torch.equal(model.classifier[0].weight, backbone_state["classifier.0.weight"])
