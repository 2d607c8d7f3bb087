"""Adapter <-> backbone identity: an adapter refuses a different backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.model.adapter import AdapterMeta, BackboneMismatchError, load_adapter, load_backbone_weights, save_adapter
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone


def _random_backbone(folder: Path, seed: int, source: str = "pretrain") -> Path:
    torch.manual_seed(seed)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    state = ECGTransformer(config).state_dict()
    return save_backbone(state, config, CODE15_CLASSES, folder, source=source, data_version=f"test-{seed}")


def test_adapter_refuses_a_different_backbone(tmp_path: Path) -> None:
    """An adapter records the identity of its backbone; another backbone is refused clearly."""
    a, b = (
        read_backbone(_random_backbone(tmp_path / "a", seed=1)),
        read_backbone(_random_backbone(tmp_path / "b", seed=2)),
    )
    state_a, config, meta_a = a.state, a.config, a.meta
    state_b, meta_b = b.state, b.meta

    classes = ["AF", "SB", "RBBB"]
    model = ECGTransformer(backbone_config(config.name, len(classes)), LoRAConfig(r=4))
    load_backbone_weights(model, state_a, drop_head=True)  # fine-tuning replaces the 6-class pre-training head
    mark_trainable(model, "lora")
    adapter = save_adapter(model, tmp_path / "adapter", AdapterMeta(backbone_id=meta_a["identity"], classes=classes))

    restored, meta = load_adapter(adapter, state_a)
    assert meta.backbone_id == meta_a["identity"] and restored.config.num_classes == 3
    with pytest.raises(BackboneMismatchError) as err:
        load_adapter(adapter, state_b)
    assert meta_a["identity"] in str(err.value) and meta_b["identity"] in str(err.value)
