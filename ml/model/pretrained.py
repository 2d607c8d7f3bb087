"""Pre-trained backbones: one folder format, safe import, and an embedded default.

A backbone folder holds two files::

    backbone.safetensors   the r = 0 state dict in the reference names (buffers included)
    backbone_config.json   {"format_version": 1, "name": "tiny", "config": {BackboneConfig},
                            "classes": [...], "identity": sha256, "data_version": str | null,
                            "source": "pretrain" | "import" | "embedded-default",
                            "created": ISO-8601 UTC, ...free metadata}

``identity`` is :func:`ml.model.adapter.state_dict_identity` of the weights: an adapter
records the identity of the backbone it was trained on, and :func:`load_backbone` refuses
a folder whose weights no longer hash to it. ``classifier.1`` is the *pre-training* head
(``classes``, e.g. the 6 CODE-15% diagnoses); fine-tuning replaces it with a fresh head
for the hospital's classes (``ml.model.adapter.load_backbone(..., drop_head=True)``).

Three ways to get one:

- :func:`save_backbone` after supervised pre-training (``ml.train.pretrain``);
- :func:`import_reference_checkpoint`: the authors' released checkpoints, torch pickles of
  a state dict. Read with ``torch.load(weights_only=True)`` only (a pickle holding anything
  but tensors and plain containers is refused, nothing in it runs); a ``{"state_dict": ...}``
  / ``{"model": ...}`` wrapper and a DDP ``module.`` prefix are accepted; keys and shapes
  must match the named config exactly, and the error lists every difference;
- :func:`ensure_default_backbone`: pre-trains a small backbone on a synthetic "source
  hospital" (its own seed and class mix, not the demo's fine-tuning data) once, caches it
  and returns the folder, so the demo needs no download.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ml.model.adapter import CheckpointError, check_state_dict, load_checkpoint, state_dict_identity
from ml.model.backbone import BACKBONE_CONFIGS, BackboneConfig, ECGTransformer, backbone_config

logger = logging.getLogger(__name__)

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_CONFIG = "backbone_config.json"
FORMAT_VERSION = 1
SOURCES = ("pretrain", "import", "embedded-default")
# The CODE-15% pre-training labels of the released checkpoints (classifier.1 rows, in order).
CODE15_CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
# The same six diagnoses as SNOMED-CT codes (IAVB, RBBB, LBBB, SB, AF, STach), and sinus rhythm.
CODE15_SNOMED = ("270492004", "59118001", "164909002", "426177001", "164889003", "427084000")
NSR_SNOMED = "426783006"
HEAD_NOTE = ("classifier.1 is the pre-training head for `classes`; fine-tuning replaces it with a "
             "fresh head for the target classes (ml.model.adapter.load_backbone(..., drop_head=True))")
CACHE_ENV = "CESSL_CACHE"


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


def save_backbone(state_dict: Mapping[str, Tensor], config: BackboneConfig, classes: Sequence[str],
                  out_dir: str | Path, *, source: str = "pretrain", data_version: str | None = None,
                  **meta: Any) -> Path:
    """Write ``out_dir/backbone.safetensors`` + ``backbone_config.json``; returns ``out_dir``.

    The state dict must match ``config`` exactly (names and shapes). ``meta`` is stored
    as extra JSON fields (JSON-serialisable values). The weights are written first and the
    config last, each by an atomic rename; the config carries the weights' identity, so a
    half-written folder is detected by :func:`load_backbone`.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    classes = [str(c) for c in classes]
    if len(classes) != config.num_classes:
        raise ValueError(f"{len(classes)} class names for a {config.num_classes}-class backbone")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    check_state_dict(_expected_state(config), tensors, f"{config.name} backbone state dict")
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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "head": HEAD_NOTE,
        **meta,
    }
    tmp = out_dir / f".{BACKBONE_CONFIG}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / BACKBONE_CONFIG)
    logger.info("saved %s backbone (%s, %d classes) to %s, identity %s", config.name, source,
                len(classes), out_dir, identity[:12])
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


def load_backbone(backbone_dir: str | Path) -> tuple[dict[str, Tensor], BackboneConfig, dict[str, Any]]:
    """(state dict, config, metadata) of a backbone folder.

    Verifies that the weights hash to the recorded identity and match the config exactly.
    """
    backbone_dir = Path(backbone_dir)
    meta = read_backbone_meta(backbone_dir)
    config = config_from_dict(meta["config"])
    weights = backbone_dir / BACKBONE_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{backbone_dir} is not a backbone folder (no {BACKBONE_WEIGHTS})")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
    identity = state_dict_identity(state)
    if identity != meta["identity"]:
        raise CheckpointError(
            f"{weights}: the weights' identity {identity} is not the {meta['identity']} recorded in "
            f"{BACKBONE_CONFIG}: the folder was modified or only partly written")
    check_state_dict(_expected_state(config), state, str(weights))
    if len(meta["classes"]) != config.num_classes:
        raise CheckpointError(f"{backbone_dir / BACKBONE_CONFIG}: {len(meta['classes'])} classes for a "
                              f"{config.num_classes}-class head")
    return state, config, meta


def build_backbone(backbone_dir: str | Path) -> ECGTransformer:
    """The plain (r = 0) model of a backbone folder, weights loaded, in eval mode."""
    state, config, _ = load_backbone(backbone_dir)
    model = ECGTransformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- importing released checkpoints ---------------------------------------------------------
def read_reference_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A released checkpoint's state dict, unpickled with ``weights_only=True`` only.

    Refuses (CheckpointError naming the file) a pickle holding anything but tensors and
    plain containers, and a dict with non-tensor entries. Unwraps ``{"state_dict": ...}`` /
    ``{"model_state_dict": ...}`` / ``{"model": ...}`` and strips a DDP ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: not a plain tensor state dict; refusing to unpickle it. "
                              f"{err}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated or not a torch file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_reference_checkpoint(path: str | Path, config_name: str, out_dir: str | Path, *,
                                classes: Sequence[str] | None = None,
                                data_version: str | None = None) -> Path:
    """Import a released reference checkpoint of size ``config_name`` as a backbone folder.

    The class count comes from the checkpoint's ``classifier.1`` (6 for the CODE-15%
    checkpoints; ``classes`` defaults to :data:`CODE15_CLASSES` then, else ``class_<i>``).
    The head is kept: fine-tuning replaces it. Keys and shapes must match exactly.
    """
    if config_name not in BACKBONE_CONFIGS:
        raise ValueError(f"unknown backbone config {config_name!r}; choose one of {sorted(BACKBONE_CONFIGS)}")
    path = Path(path)
    state = read_reference_checkpoint(path)
    head = state.get("classifier.1.weight")
    num_classes = (int(head.shape[0]) if head is not None and head.dim() == 2
                   else BACKBONE_CONFIGS[config_name].num_classes)
    config = backbone_config(config_name, num_classes)
    check_state_dict(_expected_state(config), state, f"{path} as a {config_name!r} backbone")
    converted = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    if converted:
        logger.warning("%s: %d floating tensors are not float32 (e.g. %s); converting to float32",
                       path, len(converted), converted[0])
        state = {k: v.float() if k in converted else v for k, v in state.items()}
    if classes is None:
        classes = list(CODE15_CLASSES) if num_classes == len(CODE15_CLASSES) else [
            f"class_{i}" for i in range(num_classes)]
    return save_backbone(state, config, classes, out_dir, source="import", data_version=data_version,
                         imported_from=str(path), imported_sha256=file_sha256(path))


# --- the embedded default -------------------------------------------------------------------
@dataclass(frozen=True)
class DefaultRecipe:
    """How the embedded default backbone is made: a short supervised pre-training on a
    synthetic source hospital. Changing any field requires a new ``version``."""

    name: str = "tiny"
    version: int = 1
    n_records: int = 320
    classes: tuple[str, ...] = CODE15_SNOMED  # targets (classifier.1 rows)
    extra_rhythms: tuple[str, ...] = (NSR_SNOMED,)  # also drawn, as all-zero labels
    data_seed: int = 15_000  # the demo hospital uses 20240620 and ten classes
    max_steps: int = 64  # 3.2 epochs; ~2 CPU-minutes for tiny (about a minute on 2 idle cores)
    batch_size: int = 16
    lr: float = 1e-3  # explicit: the paper's rule would give 1.6e-5 at batch 16, too small for so few steps
    cutmix_alpha: float = 0.75
    seed: int = 0

    @property
    def folder_name(self) -> str:
        return f"{self.name}-default-v{self.version}"


DEFAULT_RECIPES: dict[str, DefaultRecipe] = {
    "tiny": DefaultRecipe(),
    "tinylight": DefaultRecipe(name="tinylight", max_steps=96),  # ~1.5 CPU-minutes
}


def default_cache_dir() -> Path:
    """Where default backbones are cached: ``$CESSL_CACHE/backbones`` or ``~/.cache/cessl/backbones``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "cessl") / "backbones"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid_default(folder: Path, recipe: DefaultRecipe) -> bool:
    """Whether ``folder`` holds an intact default backbone made by exactly ``recipe``."""
    if not (folder / BACKBONE_CONFIG).is_file():
        return False
    try:
        _, _, meta = load_backbone(folder)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        logger.warning("cached backbone %s is unusable (%s); rebuilding it", folder, err)
        return False
    if meta.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        logger.warning("cached backbone %s was made by another recipe; rebuilding it", folder)
        return False
    return True


def ensure_default_backbone(cache_dir: str | Path | None = None, *, name: str = "tiny",
                            force: bool = False, progress: bool = True) -> Path:
    """The embedded default backbone folder, pre-training and caching it on first use.

    ``cache_dir``: the folder holding cached backbones (default :func:`default_cache_dir`);
    the backbone lives in ``<cache_dir>/<name>-default-v<version>``. Deterministic for a
    given machine (seeded data and training). Concurrent callers wait for one build.
    """
    if name not in DEFAULT_RECIPES:
        raise ValueError(f"no embedded default backbone of size {name!r} (available: "
                         f"{sorted(DEFAULT_RECIPES)}); pre-train or import one with `cessl backbone`")
    recipe = DEFAULT_RECIPES[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / recipe.folder_name
    if not force and _valid_default(folder, recipe):
        return folder
    with _file_lock(root / f".{recipe.folder_name}.lock"):
        if not force and _valid_default(folder, recipe):  # built by another process meanwhile
            return folder
        tmp = root / f".{recipe.folder_name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            build_default_backbone(tmp, recipe, progress=progress)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_default_backbone(out_dir: str | Path, recipe: DefaultRecipe = DefaultRecipe(), *,
                           progress: bool = True) -> Path:
    """Pre-train ``recipe`` from scratch into ``out_dir`` (no caching; see ensure_default_backbone)."""
    from ml.train.pretrain import PretrainConfig, pretrain

    t0 = time.perf_counter()
    logger.info("building the embedded default %s backbone: %d synthetic source-hospital records, "
                "%d steps (one-off; cached afterwards)", recipe.name, recipe.n_records, recipe.max_steps)
    dataset, classes, data_version = source_hospital(recipe)
    t_data = time.perf_counter() - t0
    config = PretrainConfig(backbone=recipe.name, num_classes=len(classes), max_steps=recipe.max_steps,
                            batch_size=recipe.batch_size, lr=recipe.lr, cutmix_alpha=recipe.cutmix_alpha,
                            seed=recipe.seed, device="cpu", distributed=False, progress=progress)
    with torch.random.fork_rng(devices=[]):
        result = pretrain(dataset, config)
    elapsed = time.perf_counter() - t0
    out = save_backbone(result.state_dict, result.config, classes, out_dir, source="embedded-default",
                        data_version=data_version, recipe=asdict(recipe),
                        training={"steps": result.steps, "lr": result.lr, "losses": result.losses,
                                  "data_s": round(t_data, 1), "total_s": round(elapsed, 1)})
    logger.info("default %s backbone built in %.0f s (data %.0f s)", recipe.name, elapsed, t_data)
    return out


def source_hospital(recipe: DefaultRecipe) -> tuple[Any, list[str], str]:
    """(dataset, classes, data version) of the default backbone's synthetic source hospital.

    Records come from the project's synthetic-hospital generator (``ml.data.synth``) and go
    through the same preprocessing as real records (``ml.data.preprocess``), straight to
    tensors (no WFDB files). The source hospital differs from the demo's on purpose: its
    own seed, and the six CODE-15% diagnoses as classes (normal sinus rhythm is drawn too,
    as all-zero labels, like CODE-15%'s normal records).
    """
    import numpy as np

    from ml.data.preprocess import preprocess_signal
    from ml.data.synth import SynthConfig, synthesize_record
    from ml.train.pretrain import TensorPairDataset

    synth = SynthConfig(records=recipe.n_records, classes=(*recipe.classes, *recipe.extra_rhythms),
                        seed=recipe.data_seed, prefix="SRC")
    column = {code: j for j, code in enumerate(recipe.classes)}
    x = np.empty((recipe.n_records, 12, 6144), np.float32)
    y = np.zeros((recipe.n_records, len(recipe.classes)), np.float32)
    for i in range(recipe.n_records):
        record = synthesize_record(i, synth)
        x[i] = preprocess_signal(record.signal, record.fs)
        for code in record.labels:
            if code in column:
                y[i, column[code]] = 1.0
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
    counts = dict(zip(recipe.classes, y.sum(0).astype(int).tolist()))
    logger.info("synthetic source hospital: %d records, positives per class %s", recipe.n_records, counts)
    return TensorPairDataset(x, y), list(recipe.classes), f"synth-source:seed={recipe.data_seed}:sha256={digest}"
