"""Tiny model folders for serving, without training: a random backbone and site adapters whose
every stored tensor is moved off the backbone (as training would leave them).

Shared by the serving tests and ``bench/serve.py`` (which puts this folder on its path): it
imports only ``ml`` and torch, so the benchmark runs from a clone without pytest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ml.model.adapter import AdapterMeta, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone


def random_backbone(root: Path, config_name: str, seed: int | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A backbone folder ``root/backbone`` of random weights (CODE-15% head) and its state dict.
    ``seed``: torch's seed first (None: the generator as it stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    config = backbone_config(config_name, len(CODE15_CLASSES))
    folder = save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")
    return folder, read_backbone(folder).state


def site_adapter(
    out: Path,
    state: dict[str, torch.Tensor],
    config_name: str,
    classes: Sequence[str],
    lora: LoRAConfig,
    *,
    seed: int | None = None,
    weight_noise: float = 0.05,
    bn_noise: float = 0.1,
    thresholds: Sequence[float] | None = None,
) -> Path:
    """An adapter folder ``out`` for ``state``'s backbone: LoRA, biases and head moved by
    ``weight_noise`` x N(0, 1), BatchNorm running means by ``bn_noise`` (0: left as they are).
    ``seed``: torch's seed first (None: the generator as it stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = ECGTransformer(backbone_config(config_name, len(classes)), lora)
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "lora")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * weight_noise)
        if bn_noise:
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.add_(torch.randn_like(buffer) * bn_noise)
    meta = AdapterMeta(
        backbone_id=state_dict_identity(state),
        classes=list(classes),
        thresholds=list(thresholds) if thresholds is not None else [0.5] * len(classes),
    )
    return save_adapter(model.eval(), out, meta)


@contextlib.contextmanager
def sqlite_registry(root: Path, experiment_name: str = "serving") -> Iterator[tuple[str, str]]:
    """``(store URI, experiment id)`` of a new SQLite MLflow store under ``root`` (artifacts in
    ``root/mlruns``), MLflow's global tracking and registry URIs pointing at it meanwhile."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri, mlflow.create_experiment(experiment_name, artifact_location=(root / "mlruns").as_uri())
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
