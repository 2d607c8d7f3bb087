"""The tiny fine-tuning setup the trainer and precision tests share: synthetic splits of a
3-class task, a tinylight model and the base of a CPU training config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ml.model.backbone import backbone_config
from ml.model.lora import LoRAConfig
from ml.train.build import build_model
from ml.train.config import TrainConfig
from ml.train.synthetic import SyntheticTaskConfig, make_splits

N_CLASSES = 3
# what every tiny run shares; each test file adds its own schedule
TINY_TRAIN: dict[str, Any] = dict(
    method="cessl", batch_size=4, val_every=2, seed=1, device="cpu", progress=False, lr=3e-3
)


def tiny_splits(sizes: Mapping[str, int]) -> dict:
    """Synthetic ``train`` / ``valid`` / ``unlabelled`` splits of ``sizes`` records (seed 3)."""
    _, splits = make_splits(dict(sizes), SyntheticTaskConfig(num_classes=N_CLASSES, positive_rate=0.4), seed=3)
    return splits


def tiny_model(method: str = "cessl") -> torch.nn.Module:
    """A tinylight model of ``method`` (LoRA p = 0.2), no pre-trained weights, seed 0."""
    return build_model(None, backbone_config("tinylight", N_CLASSES), method, LoRAConfig(p=0.2), seed=0)


def tiny_config(base: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """:data:`TINY_TRAIN` with ``base`` (a test file's schedule) and ``overrides`` laid over it."""
    return TrainConfig(**(TINY_TRAIN | dict(base) | overrides))
