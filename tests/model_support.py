"""Helpers of the model-serving tests (no tests here): a tinylight backbone and an adapter with
non-zero LoRA weights (no training), and the probability columns of a prediction table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ml.model.adapter import AdapterMeta, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone

# SNOMED codes of the Challenge (AF, IAVB, RBBB, SNR): diagnoses get their abbreviations.
CLASSES = ["164889003", "270492004", "59118001", "426783006"]


def p_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("p_")]


def make_model_dirs(root: Path) -> tuple[Path, Path]:
    """A tinylight backbone and an adapter with non-zero LoRA weights (no training), in ``root``."""
    torch.manual_seed(7)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    backbone = save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")
    state = read_backbone(backbone).state
    model = ECGTransformer(backbone_config("tinylight", len(CLASSES)), LoRAConfig(r=4))
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "lora")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    meta = AdapterMeta(backbone_id=state_dict_identity(state), classes=CLASSES, thresholds=[0.3, 0.5, 0.5, 0.7])
    adapter = save_adapter(model.eval(), root / "adapter", meta)
    return backbone, adapter
