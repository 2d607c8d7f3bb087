"""Adapters: store only what fine-tuning changed, on top of a shared pre-trained backbone.

An adapter directory holds, peft style,

- ``adapter_model.safetensors``: the LoRA tensors, every bias, classifier.1.weight, the
  BatchNorm / LayerNorm state (running statistics included: they saw the hospital's
  unlabelled data) and any other parameter that was trainable when saved;
- ``adapter_config.json``: the backbone config, the backbone identity (sha256 of the
  PRE-TRAINED backbone state dict), the class list, the per-layer rank map, the
  deactivation probability, thresholds, the method and free ``extra`` metadata.

``load_adapter`` rebuilds the fine-tuned model from the adapter and the backbone state
dict, and refuses a backbone whose identity differs. ``export_merged`` writes a plain r = 0
model (LoRA merged in) that loads into ``ECGTransformer(config)``.

Checkpoints are read safely: ``torch.load(weights_only=True)`` for .pt/.pth, safetensors
for ours, with strict key/shape checks that name every missing, unexpected or mismatched
entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, lora_layers, mark_trainable, merge_lora, unmerge_lora

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


class BackboneMismatchError(CheckpointError):
    """The adapter was trained on a different pre-trained backbone."""


@dataclass
class AdapterMeta:
    """What an adapter records besides its tensors and the model's own configuration."""

    backbone_id: str
    classes: list[str]
    thresholds: list[float] | None = None
    method: str = "cessl"
    extra: dict[str, Any] = field(default_factory=dict)


# --- identity and safe loading -------------------------------------------------------------
def state_dict_identity(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted names, shapes, dtypes and raw bytes of a state dict."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict file (a released checkpoint, a merged export), read without running pickled code.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``,
    which refuses arbitrary Python objects. A ``{"state_dict": ...}`` (or ``model_state_dict``
    / ``model``) wrapper is unwrapped and a DDP ``module.`` prefix is stripped. Every failure
    (missing, truncated, unsafe, entries that are not tensors) is a CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: not a plain tensor state dict; refusing to unpickle it (refused by torch.load "
            f"weights_only=True: {err})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_state_dict(
    expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], what: str = "checkpoint"
) -> None:
    """Strict key and shape match; the error lists missing, unexpected and mismatched keys."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and expected[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{what} does not match the model:\n  missing: {missing}\n  unexpected: {unexpected}"
            f"\n  mismatched shapes: {mismatched}"
        )


def _is_lora_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def load_backbone_weights(model: ECGTransformer, state_dict: Mapping[str, Tensor], drop_head: bool = False) -> None:
    """Load a pre-trained (r = 0) backbone state dict into a model that may carry LoRA.

    Every non-LoRA entry must match by name and shape; the LoRA tensors keep their init.
    ``drop_head=True`` skips classifier.1 (the pre-training head, e.g. 6 CODE classes),
    which keeps the model's freshly initialised downstream head.
    """
    target = model.state_dict()
    skip = ("classifier.1.",) if drop_head else ()
    expected = {k: v for k, v in target.items() if not _is_lora_key(k) and not k.startswith(skip)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(skip)} if drop_head else state_dict
    check_state_dict(expected, given, "backbone checkpoint")
    model.load_state_dict(dict(given), strict=False)


# --- adapters ------------------------------------------------------------------------------
def adapter_state_keys(model: nn.Module) -> list[str]:
    """State-dict names an adapter stores: LoRA tensors, every bias parameter,
    classifier.1.weight, all BatchNorm/LayerNorm state, and any trainable parameter."""
    norm_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _NORM_TYPES))
    params = dict(model.named_parameters())
    keys = []
    for name in model.state_dict():
        param = params.get(name)
        if (
            _is_lora_key(name)
            or name.startswith(norm_prefixes)
            or name == "classifier.1.weight"
            or (param is not None and (name.endswith(".bias") or param.requires_grad))
        ):
            keys.append(name)
    return keys


def _model_config_dict(model: ECGTransformer) -> dict[str, Any]:
    lc = model.lora_config
    return {
        "backbone_config": asdict(model.config),
        "rank_map": model.rank_map(),
        "r": lc.r,
        "p": lc.p,
        "never_deactivate": list(lc.never_deactivate),
        "alpha": lc.alpha,
    }


def save_adapter(model: ECGTransformer, out_dir: str | Path, meta: AdapterMeta) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` to ``out_dir``.

    Call ``mark_trainable`` first: trainable parameters beyond the LoRA rule are stored
    too. The tensors are taken from the unmerged model (a merged model is unmerged for
    the save and merged again afterwards).
    """
    if len(meta.classes) != model.config.num_classes:
        raise ValueError(f"{len(meta.classes)} class names for a {model.config.num_classes}-class model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = [layer for layer in lora_layers(model).values() if layer.merged]
    unmerge_lora(model)
    try:
        state = model.state_dict()
        tensors = {k: state[k].detach().cpu().contiguous() for k in adapter_state_keys(model)}
    finally:
        for layer in merged:
            layer.merge()
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"format_version": FORMAT_VERSION, **_model_config_dict(model), **asdict(meta)}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    n_elems = sum(t.numel() for t in tensors.values())
    logger.info("saved adapter to %s: %d tensors, %d values", out_dir, len(tensors), n_elems)
    return out_dir


def read_adapter_config(in_dir: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory."""
    path = Path(in_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter config not found")
    return json.loads(path.read_text())


def load_adapter(in_dir: str | Path, backbone_state_dict: Mapping[str, Tensor]) -> tuple[ECGTransformer, AdapterMeta]:
    """Rebuild the fine-tuned model: the backbone state dict, then the adapter on top.

    Refuses (BackboneMismatchError) a backbone whose identity is not the one the adapter
    was trained on. The returned model is unmerged and in eval mode.
    """
    in_dir = Path(in_dir)
    config = read_adapter_config(in_dir)
    meta = AdapterMeta(
        backbone_id=config["backbone_id"],
        classes=list(config["classes"]),
        thresholds=config.get("thresholds"),
        method=config.get("method", "cessl"),
        extra=dict(config.get("extra", {})),
    )
    actual = state_dict_identity(backbone_state_dict)
    if actual != meta.backbone_id:
        raise BackboneMismatchError(
            f"{in_dir}: adapter was trained on backbone {meta.backbone_id}, but the given "
            f"backbone state dict has identity {actual}"
        )
    lora = LoRAConfig(
        r=config["r"],
        rank_map=dict(config["rank_map"]),
        p=config["p"],
        never_deactivate=tuple(config["never_deactivate"]),
        alpha=config["alpha"],
    )
    model = ECGTransformer(BackboneConfig(**config["backbone_config"]), lora)
    adapter = load_file(str(in_dir / ADAPTER_WEIGHTS), device="cpu")
    combined = {k: v for k, v in backbone_state_dict.items() if k not in adapter}
    combined.update(adapter)
    check_state_dict(model.state_dict(), combined, f"{in_dir}: backbone + adapter")
    model.load_state_dict(combined, strict=True)
    mark_trainable(model, "lora" if lora_layers(model) else "full")
    model.eval()
    return model, meta


def export_merged(model: ECGTransformer, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a plain r = 0 model with the LoRA update merged in (W + (1 - p) B A; classifier.0:
    W + B A) as safetensors, plus ``<path>.json`` with the backbone config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = copy.deepcopy(model).cpu()
    merge_lora(merged)
    tensors = {k: v.detach().contiguous() for k, v in merged.state_dict().items() if not _is_lora_key(k)}
    with torch.device("meta"):
        plain = ECGTransformer(model.config)
    check_state_dict(plain.state_dict(), tensors, "merged export")
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "backbone_config": asdict(model.config),
        "merged_from": _model_config_dict(model),
        "extra": dict(extra or {}),
    }
    path.with_suffix(".json").write_text(json.dumps(config, indent=2, sort_keys=True))
    logger.info("exported merged r=0 model to %s", path)
    return path


def load_merged(path: str | Path) -> ECGTransformer:
    """Load a model written by ``export_merged`` into a plain r = 0 ECGTransformer (eval mode)."""
    path = Path(path)
    config = json.loads(path.with_suffix(".json").read_text())
    model = ECGTransformer(BackboneConfig(**config["backbone_config"]))
    state = read_state_dict(path)
    check_state_dict(model.state_dict(), state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()
