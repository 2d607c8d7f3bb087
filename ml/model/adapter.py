"""Adapters: store only what fine-tuning changed, on top of a shared pre-trained backbone.

An adapter directory holds, peft style,

- ``adapter_model.safetensors``: the LoRA tensors, every bias, the whole classifier head
  (``classifier.1.weight``, which trains, and ``classifier.0.weight``, which LoRA adapts
  but a linear-probe start replaces: LP-FT), the BatchNorm / LayerNorm state (running
  statistics included: they saw the hospital's unlabelled data) and any other parameter that
  was trainable when saved;
- ``adapter_config.json``: the backbone config, the backbone identity (sha256 of the
  PRE-TRAINED backbone state dict), the class list, the per-layer rank map, the
  deactivation probability, thresholds, the method, the precision it was trained in
  (``fp32`` when absent: older adapters) and free ``extra`` metadata.

``load_adapter`` rebuilds the fine-tuned model from the adapter and the backbone state
dict, and refuses a backbone whose identity differs. ``export_merged`` writes a plain r = 0
model (LoRA merged in) that loads into ``ECGTransformer(config)``.

Checkpoints are read safely and through one reader, :func:`read_weights`:
``torch.load(weights_only=True)`` for .pt/.pth, safetensors for ours; a damaged or
mislabelled file (truncated, a pickle renamed ``.safetensors``, a text file named ``.pt``)
is a :class:`CheckpointError` naming the file, never a library's own exception. Strict
key/shape checks name every missing, unexpected or mismatched entry, and
:func:`check_tensor_values` refuses integer or boolean weights, NaN/Inf and non-positive
BatchNorm variances, naming the tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ml.errors import BadFileError
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, lora_layers, mark_trainable, merge_lora, unmerge_lora

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


class CheckpointError(BadFileError, ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model (the message names the file)."""


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
    # The resolved precision the adapter was trained in (fp32 | bf16); adapters written
    # before the option existed have none in their JSON and were trained in fp32.
    precision: str = "fp32"


# --- identity and safe loading -------------------------------------------------------------
def state_dict_identity(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted names, shapes, dtypes and raw bytes of a state dict."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unpickling_reason(err: Exception) -> str:
    """The useful line of torch's weights-only refusal (without its advice to turn the check off)."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return line
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0]
    return lines[0] if lines and "weights_only" not in lines[0] else "not a plain tensor pickle"


def torch_load_checked(path: str | Path, what: str = "a plain tensor state dict") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is a CheckpointError naming the file.

    ``weights_only=True`` refuses any pickled object but tensors and plain containers
    (nothing in the file runs). A truncated file, a text file, a zip that is not a torch
    archive... raise whatever torch or pickle raise inside (UnpicklingError, KeyError,
    RuntimeError, EOFError...): all of them become "not a readable torch checkpoint".
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickled object other than tensors, or no pickle at all
        raise CheckpointError(
            f"{path}: not {what}; refusing to unpickle it (refused by torch.load weights_only=True: "
            f"{_unpickling_reason(err)})"
        ) from err
    except MemoryError:
        raise
    except Exception as err:  # truncated, not a torch file: torch/pickle raise many types here
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def _safetensors_problem(path: Path) -> str | None:
    """Why a file cannot be a safetensors file (from its 8-byte header length and JSON header), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte safetensors header length"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            return f"header length field says {n} bytes but the file has {size - 8} after it (truncated, or not safetensors)"
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"header is not JSON ({err}); not a safetensors file"
    if not isinstance(header, dict):
        return "header is not a JSON object; not a safetensors file"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"tensor {name!r} has no valid data_offsets"
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        return f"truncated: the tensors need {8 + n + end} bytes, the file has {size}"
    return None


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Every weights file read goes through here: a ``name -> tensor`` dict, or a CheckpointError naming the file.

    ``.safetensors`` via safetensors (the header is checked first: a truncated file or a
    pickle renamed ``.safetensors`` is refused with the reason); anything else (.pt, .pth)
    via :func:`torch_load_checked`. A ``{"state_dict": ...}`` (or ``model_state_dict`` /
    ``model``) wrapper is unwrapped and a DDP ``module.`` prefix is stripped. Entries that
    are not tensors are refused. Values are not checked here: see :func:`check_tensor_values`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            problem = _safetensors_problem(path)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read the weights file ({err})") from err
        if problem:
            raise CheckpointError(f"{path}: not a readable safetensors file: {problem}")
        try:
            return dict(load_file(str(path), device="cpu"))
        except MemoryError:
            raise
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    obj = torch_load_checked(path)
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
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict file (a released checkpoint, a merged export), read without running pickled code.

    Same as :func:`read_weights` (kept for its callers).
    """
    return read_weights(path)


# Integer buffers a model may hold (everything else must be floating point).
INTEGER_BUFFERS = ("num_batches_tracked",)


def check_tensor_values(
    state_dict: Mapping[str, Tensor], where: str, expected: Mapping[str, Tensor] | None = None
) -> dict[str, Any]:
    """Refuse weights no model should hold; returns a summary of what was checked.

    - dtype: floating point, except the known integer buffers (BatchNorm
      ``num_batches_tracked``, or whatever ``expected`` holds as an integer); no bool;
    - finiteness: no NaN or Inf in any tensor;
    - value range: BatchNorm ``running_var`` > 0 (a zero or negative variance divides by
      nothing or takes the square root of a negative number).

    Every problem is listed (tensor name and reason) in one CheckpointError.
    """
    problems: list[str] = []
    dtypes: dict[str, int] = {}
    n_values = 0
    n_bn = 0
    for name, t in state_dict.items():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + 1
        n_values += t.numel()
        want = expected.get(name) if expected is not None else None
        integer_ok = name.rsplit(".", 1)[-1] in INTEGER_BUFFERS or (
            want is not None and not want.is_floating_point() and want.dtype != torch.bool
        )
        if t.dtype == torch.bool:
            problems.append(f"{name}: dtype bool, expected a floating point tensor")
            continue
        if not t.is_floating_point():
            if t.is_complex():
                problems.append(f"{name}: dtype {t.dtype}, expected a floating point tensor")
            elif not integer_ok:
                problems.append(f"{name}: dtype {t.dtype}, expected a floating point tensor (integer weights)")
            continue
        if integer_ok and want is not None and not want.is_floating_point():
            problems.append(f"{name}: dtype {t.dtype}, expected an integer buffer ({want.dtype})")
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int((~finite).sum()) - n_nan
            problems.append(f"{name}: {n_nan} NaN and {n_inf} Inf value(s) of {t.numel()}")
            continue
        if name.endswith("running_var"):
            n_bn += 1
            bad = int((t <= 0).sum())
            if bad:
                problems.append(
                    f"{name}: {bad} BatchNorm running variance(s) <= 0 (min {float(t.min()):.3g}); variances must be > 0"
                )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{where}: invalid weights: " + "; ".join(shown))
    return {
        "tensors": len(state_dict),
        "values": n_values,
        "dtypes": dict(sorted(dtypes.items())),
        "floating_point": True,
        "finite": True,
        "batchnorm_variances_positive": n_bn,
    }


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
HEAD_WEIGHTS = ("classifier.0.weight", "classifier.1.weight")


def adapter_state_keys(model: nn.Module) -> list[str]:
    """State-dict names an adapter stores: LoRA tensors, every bias parameter, the classifier
    head's weights (the site's own: a linear-probe start, ``ml.train.recipe.init_head``,
    replaces classifier.0's frozen weight too), all BatchNorm/LayerNorm state, and any
    trainable parameter."""
    norm_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, _NORM_TYPES))
    params = dict(model.named_parameters())
    keys = []
    for name in model.state_dict():
        param = params.get(name)
        if (
            _is_lora_key(name)
            or name.startswith(norm_prefixes)
            or name in HEAD_WEIGHTS
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
        # copies: the re-merge below writes into the weights in place (classifier.0.weight is stored)
        tensors = {
            k: state[k].detach().cpu().clone(memory_format=torch.contiguous_format) for k in adapter_state_keys(model)
        }
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
        precision=str(config.get("precision", "fp32")),
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
    adapter = read_weights(in_dir / ADAPTER_WEIGHTS)
    check_tensor_values(adapter, str(in_dir / ADAPTER_WEIGHTS), model.state_dict())
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
