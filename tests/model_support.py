"""Helpers of the model-serving tests (no tests here): a tinylight backbone and an adapter with
non-zero LoRA weights (no training), and the probability columns of a prediction table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from serving_support import random_backbone, site_adapter

from ml.model.lora import LoRAConfig

# SNOMED codes of the Challenge (AF, IAVB, RBBB, SNR): diagnoses get their abbreviations.
CLASSES = ["164889003", "270492004", "59118001", "426783006"]
THRESHOLDS = [0.3, 0.5, 0.5, 0.7]


def p_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("p_")]


def make_model_dirs(root: Path) -> tuple[Path, Path]:
    """A tinylight backbone and an adapter with non-zero LoRA weights (no training), in ``root``."""
    backbone, state = random_backbone(root, "tinylight", seed=7)
    adapter = site_adapter(
        root / "adapter", state, "tinylight", CLASSES, LoRAConfig(r=4), bn_noise=0, thresholds=THRESHOLDS
    )
    return backbone, adapter
