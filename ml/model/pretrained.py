"""Pre-trained backbones: one folder format, safe import, and an embedded default.

A backbone folder holds two files::

    backbone.safetensors   the r = 0 state dict in the reference names (buffers included)
    backbone_config.json   {"format_version": 1, "name": "tiny", "config": {BackboneConfig},
                            "classes": [...], "identity": sha256, "data_version": str | null,
                            "source": "pretrain" | "import" | "embedded-default",
                            "created": ISO-8601 UTC, ...free metadata}

``identity`` is :func:`ml.model.adapter.state_dict_identity` of the weights: an adapter
records the identity of the backbone it was trained on, and :func:`read_backbone` refuses
a folder whose weights no longer hash to it. ``classifier.1`` is the *pre-training* head
(``classes``, e.g. the 6 CODE-15% diagnoses); fine-tuning replaces it with a fresh head
for the hospital's classes (``ml.model.adapter.load_backbone_weights(..., drop_head=True)``).

Three ways to get one:

- :func:`save_backbone` after supervised pre-training (``ml.train.pretrain``);
- :func:`import_reference_checkpoint`: the authors' released checkpoints, torch pickles of
  a state dict. Read with ``torch.load(weights_only=True)`` only (a pickle holding anything
  but tensors and plain containers is refused, nothing in it runs); a ``{"state_dict": ...}``
  / ``{"model": ...}`` wrapper and a DDP ``module.`` prefix are accepted; keys and shapes
  must match the named config exactly, and the error lists every difference;
- ``ml.train.default_backbone.ensure_default_backbone``: pre-trains a small backbone on a
  synthetic "source hospital" once, caches it and returns the folder, so the demo needs no
  download (it trains, so it lives in ``ml.train``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ml.model.adapter import (
    CheckpointError,
    check_state_dict,
    check_tensor_values,
    read_weights,
    state_dict_identity,
)
from ml.model.backbone import BACKBONE_CONFIGS, BackboneConfig, ECGTransformer, backbone_config

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
FORMAT_VERSION = 1
SOURCES = ("pretrain", "import", "embedded-default")
# The CODE-15% pre-training labels of the released checkpoints (classifier.1 rows, in order).
CODE15_CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
HEAD_NOTE = (
    "classifier.1 is the pre-training head for `classes`; fine-tuning replaces it with a "
    "fresh head for the target classes (ml.model.adapter.load_backbone_weights(..., drop_head=True))"
)


# --- the folder format ---------------------------------------------------------------------
def _expected_state(config: BackboneConfig) -> dict[str, Tensor]:
    """The r = 0 model's state dict, shapes only (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return ECGTransformer(config).state_dict()


def config_from_dict(data: Mapping[str, Any]) -> BackboneConfig:
    """A BackboneConfig from its JSON form (unknown keys are an error, missing ones default)."""
    known = {f.name for f in fields(BackboneConfig)}
    unknown = set(data) - known
    if unknown:
        raise CheckpointError(f"backbone config has unknown fields {sorted(unknown)}")
    return BackboneConfig(**dict(data))


def save_backbone(
    state_dict: Mapping[str, Tensor],
    config: BackboneConfig,
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    source: str = "pretrain",
    data_version: str | None = None,
    **meta: Any,
) -> Path:
    """Write ``out_dir/backbone.safetensors`` + ``backbone_config.json``; returns ``out_dir``.

    The state dict must match ``config`` exactly (names and shapes). ``meta`` is stored
    as extra JSON fields (JSON-serialisable values). The weights are written first and the
    config last, each by an atomic rename; the config carries the weights' identity, so a
    half-written folder is detected by :func:`read_backbone`.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    classes = [str(c) for c in classes]
    if len(classes) != config.num_classes:
        raise ValueError(f"{len(classes)} class names for a {config.num_classes}-class backbone")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    expected = _expected_state(config)
    check_state_dict(expected, tensors, f"{config.name} backbone state dict")
    check_tensor_values(tensors, f"{config.name} backbone state dict for {out_dir}", expected)
    identity = state_dict_identity(tensors)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{BACKBONE_WEIGHTS}.{uuid.uuid4().hex[:8]}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "identity": identity, "name": config.name})
    os.replace(tmp, out_dir / BACKBONE_WEIGHTS)
    document = {
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "config": asdict(config),
        "classes": classes,
        "identity": identity,
        "data_version": data_version,
        "source": source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "head": HEAD_NOTE,
        **meta,
    }
    tmp = out_dir / f".{BACKBONE_CONFIG}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / BACKBONE_CONFIG)
    logger.info(
        "saved %s backbone (%s, %d classes) to %s, identity %s",
        config.name,
        source,
        len(classes),
        out_dir,
        identity[:12],
    )
    return out_dir


def read_backbone_meta(backbone_dir: str | Path) -> dict[str, Any]:
    """The parsed ``backbone_config.json`` of a backbone folder (no weights read)."""
    path = Path(backbone_dir) / BACKBONE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{Path(backbone_dir)} is not a backbone folder (no {BACKBONE_CONFIG})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    for key in ("config", "classes", "identity"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return meta


@dataclass(frozen=True)
class PretrainedBackbone:
    """What a backbone folder holds: the r = 0 weights, their config and the folder's metadata."""

    state: dict[str, Tensor]
    config: BackboneConfig
    meta: dict[str, Any]  # the parsed backbone_config.json
    checks: dict[str, Any] = field(default_factory=dict)  # what read_backbone verified (backbone show)

    @property
    def name(self) -> str:
        """The size name (tinylight, tiny, base, medium, large)."""
        return self.config.name

    @property
    def identity(self) -> str:
        """:func:`ml.model.adapter.state_dict_identity` of the weights (verified on reading)."""
        return str(self.meta["identity"])

    @property
    def classes(self) -> list[str]:
        """The pre-training classes (classifier.1 rows, in order)."""
        return list(self.meta["classes"])


def read_backbone(backbone_dir: str | Path) -> PretrainedBackbone:
    """The weights, config and metadata of a backbone folder.

    Verifies that the weights hash to the recorded identity, match the config exactly
    (names and shapes) and hold sane values (:func:`ml.model.adapter.check_tensor_values`:
    floating point, finite, BatchNorm variances > 0); ``checks`` says what was verified.
    """
    backbone_dir = Path(backbone_dir)
    meta = read_backbone_meta(backbone_dir)
    config = config_from_dict(meta["config"])
    weights = backbone_dir / BACKBONE_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{backbone_dir} is not a backbone folder (no {BACKBONE_WEIGHTS})")
    state = read_weights(weights)
    identity = state_dict_identity(state)
    if identity != meta["identity"]:
        raise CheckpointError(
            f"{weights}: the weights' identity {identity} is not the {meta['identity']} recorded in "
            f"{BACKBONE_CONFIG}: the folder was modified or only partly written"
        )
    expected = _expected_state(config)
    check_state_dict(expected, state, str(weights))
    checks = check_tensor_values(state, str(weights), expected)
    if len(meta["classes"]) != config.num_classes:
        raise CheckpointError(
            f"{backbone_dir / BACKBONE_CONFIG}: {len(meta['classes'])} classes for a {config.num_classes}-class head"
        )
    checks = {
        "identity_verified": identity,
        "shapes_match_config": config.name,
        **checks,
        "classes_match_head": config.num_classes,
    }
    return PretrainedBackbone(state=state, config=config, meta=meta, checks=checks)


def build_backbone(backbone_dir: str | Path) -> ECGTransformer:
    """The plain (r = 0) model of a backbone folder, weights loaded, in eval mode."""
    backbone = read_backbone(backbone_dir)
    model = ECGTransformer(backbone.config)
    model.load_state_dict(backbone.state, strict=True)
    return model.eval()


# --- importing released checkpoints ---------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_reference_checkpoint(
    path: str | Path,
    config_name: str,
    out_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    data_version: str | None = None,
) -> Path:
    """Import a released reference checkpoint of size ``config_name`` as a backbone folder.

    The class count comes from the checkpoint's ``classifier.1`` (6 for the CODE-15%
    checkpoints; ``classes`` defaults to :data:`CODE15_CLASSES` then, else ``class_<i>``).
    The head is kept: fine-tuning replaces it. Keys and shapes must match exactly, and
    the values must be sane (floating point weights, no NaN/Inf, BatchNorm variances > 0;
    :func:`ml.model.adapter.check_tensor_values`): nothing is written otherwise.
    """
    if config_name not in BACKBONE_CONFIGS:
        raise ValueError(f"unknown backbone config {config_name!r}; choose one of {sorted(BACKBONE_CONFIGS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = read_weights(path)
    head = state.get("classifier.1.weight")
    num_classes = (
        int(head.shape[0]) if head is not None and head.dim() == 2 else BACKBONE_CONFIGS[config_name].num_classes
    )
    config = backbone_config(config_name, num_classes)
    expected = _expected_state(config)
    check_state_dict(expected, state, f"{path} as a {config_name!r} backbone")
    check_tensor_values(state, str(path), expected)  # dtypes, NaN/Inf, BatchNorm variances: before any write
    converted = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    if converted:
        logger.warning(
            "%s: %d floating tensors are not float32 (e.g. %s); converting to float32",
            path,
            len(converted),
            converted[0],
        )
        state = {k: v.float() if k in converted else v for k, v in state.items()}
    if classes is None:
        classes = (
            list(CODE15_CLASSES) if num_classes == len(CODE15_CLASSES) else [f"class_{i}" for i in range(num_classes)]
        )
    return save_backbone(
        state,
        config,
        classes,
        out_dir,
        source="import",
        data_version=data_version,
        imported_from=str(path),
        imported_sha256=file_sha256(path),
    )
