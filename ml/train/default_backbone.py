"""The embedded default backbone: pre-trained once on a synthetic source hospital, then cached.

:func:`ensure_default_backbone` pre-trains a small backbone (:class:`DefaultRecipe`) on a
synthetic "source hospital" (its own seed and class mix, not the demo's fine-tuning data)
once, caches it as a backbone folder (``ml.model.pretrained``'s format) and returns the
folder, so the demo needs no download. It trains, so it lives here and not in ``ml.model``.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ml.data.preprocess import preprocess_signal
from ml.data.synth import SynthConfig, synthesize_record
from ml.model.adapter import CheckpointError
from ml.model.pretrained import BACKBONE_CONFIG, read_backbone, save_backbone
from ml.train.pretrain import PretrainConfig, TensorPairDataset, pretrain

logger = logging.getLogger(__name__)

# The CODE-15% diagnoses as SNOMED-CT codes (IAVB, RBBB, LBBB, SB, AF, STach), and sinus rhythm.
CODE15_SNOMED = ("270492004", "59118001", "164909002", "426177001", "164889003", "427084000")
NSR_SNOMED = "426783006"
CACHE_ENV = "CESSL_CACHE"


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
def _file_lock(path: Path) -> Iterator[None]:
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
        meta = read_backbone(folder).meta
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as err:
        logger.warning("cached backbone %s is unusable (%s); rebuilding it", folder, err)
        return False
    if meta.get("recipe") != json.loads(json.dumps(asdict(recipe))):
        logger.warning("cached backbone %s was made by another recipe; rebuilding it", folder)
        return False
    return True


def ensure_default_backbone(
    cache_dir: str | Path | None = None, *, name: str = "tiny", force: bool = False, progress: bool = True
) -> Path:
    """The embedded default backbone folder, pre-training and caching it on first use.

    ``cache_dir``: the folder holding cached backbones (default :func:`default_cache_dir`);
    the backbone lives in ``<cache_dir>/<name>-default-v<version>``. Deterministic for a
    given machine (seeded data and training). Concurrent callers wait for one build.
    """
    if name not in DEFAULT_RECIPES:
        raise ValueError(
            f"no embedded default backbone of size {name!r} (available: "
            f"{sorted(DEFAULT_RECIPES)}); pre-train or import one with `cessl backbone`"
        )
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


def build_default_backbone(
    out_dir: str | Path, recipe: DefaultRecipe = DefaultRecipe(), *, progress: bool = True
) -> Path:
    """Pre-train ``recipe`` from scratch into ``out_dir`` (no caching; see ensure_default_backbone)."""
    t0 = time.perf_counter()
    logger.info(
        "building the embedded default %s backbone: %d synthetic source-hospital records, "
        "%d steps (one-off; cached afterwards)",
        recipe.name,
        recipe.n_records,
        recipe.max_steps,
    )
    dataset, classes, data_version = source_hospital(recipe)
    t_data = time.perf_counter() - t0
    config = PretrainConfig(
        backbone=recipe.name,
        num_classes=len(classes),
        max_steps=recipe.max_steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        cutmix_alpha=recipe.cutmix_alpha,
        seed=recipe.seed,
        device="cpu",
        distributed=False,
        progress=progress,
    )
    with torch.random.fork_rng(devices=[]):
        result = pretrain(dataset, config)
    elapsed = time.perf_counter() - t0
    out = save_backbone(
        result.state_dict,
        result.config,
        classes,
        out_dir,
        source="embedded-default",
        data_version=data_version,
        recipe=asdict(recipe),
        training={
            "steps": result.steps,
            "lr": result.lr,
            "losses": result.losses,
            "data_s": round(t_data, 1),
            "total_s": round(elapsed, 1),
        },
    )
    logger.info("default %s backbone built in %.0f s (data %.0f s)", recipe.name, elapsed, t_data)
    return out


def source_hospital(recipe: DefaultRecipe) -> tuple[TensorPairDataset, list[str], str]:
    """(dataset, classes, data version) of the default backbone's synthetic source hospital.

    Records come from the project's synthetic-hospital generator (``ml.data.synth``) and go
    through the same preprocessing as real records (``ml.data.preprocess``), straight to
    tensors (no WFDB files). The source hospital differs from the demo's on purpose: its
    own seed, and the six CODE-15% diagnoses as classes (normal sinus rhythm is drawn too,
    as all-zero labels, like CODE-15%'s normal records).
    """
    synth = SynthConfig(
        records=recipe.n_records, classes=(*recipe.classes, *recipe.extra_rhythms), seed=recipe.data_seed, prefix="SRC"
    )
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
    counts = dict(zip(recipe.classes, y.sum(0).astype(int).tolist(), strict=True))
    logger.info("synthetic source hospital: %d records, positives per class %s", recipe.n_records, counts)
    dataset = TensorPairDataset(torch.from_numpy(x), torch.from_numpy(y))
    return dataset, list(recipe.classes), f"synth-source:seed={recipe.data_seed}:sha256={digest}"
