"""Step: fine-tuning -> adapter (safetensors + config) and training curves.

The shared recipe (:func:`ml.train.recipe.finetune`) builds the method's model (for
``cessl``: LoRA at the allocated ranks with random deactivation), trains it with
``ml.train.trainer.fit`` on the labelled train split (+ the unlabelled split for the
semi-supervised methods), validates on the valid split, and fits per-class thresholds on
the valid split (F-beta2); they are stored in the adapter config.

Resumable: checkpoints go to ``<checkpoint_root>/<hash of this step's inputs>``, a path
that is the same when the same inputs are run again, so a task killed mid-training and
started again continues from its last validation. Training curves are appended to
``curves.jsonl`` in the same folder as they happen (rows past the resumed step are dropped
on resume). Runs on the device ``train.device`` names (``auto``: the GPU when there is one).
A task the compiled pipeline gave an accelerator (``CESSL_REQUIRE_GPU=1``) stops first, with
one line, when its image's torch has no CUDA or sees no GPU (``ml.train.gpu``).

Cost: :class:`ml.train.callbacks.StepProfiler` measures the mean training step (ms) and the
peak memory over the steps (CUDA: max_memory_allocated; CPU: peak-RSS growth), for the
comparison of methods (``cessl compare``).

Precision: ``train.precision`` ``auto`` is resolved here for the step's device (bf16 on a
GPU that supports it, else fp32) before the checkpoint key is built; the resolved name is in
the adapter's JSON (``precision``), in its logged train config (``train.precision`` in
MLflow, next to the run's requested ``precision``) and in the step's metadata.

Schedule: ``train.epochs`` set (epochs mode) is resolved here to its real step count
(:meth:`ml.train.config.TrainConfig.resolve_steps`, complete labelled batches per epoch x
epochs, after the batch is clamped to the labelled split) before the checkpoint key is
built, so the checkpointed and logged config says how many steps were run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import StepError, read_json, sha256_json
from components.data_access import dataset, open_store
from components.locking import exclusive
from ml.data.splits import Splits
from ml.model.pretrained import read_backbone

if TYPE_CHECKING:
    from ml.model.lora import LoRAConfig
    from ml.train.config import TrainConfig

log = logging.getLogger(__name__)

CURVES_FILE = "curves.jsonl"
LOCK_FILE = ".lock"
LOCK_WAIT_S = 24 * 3600.0  # a concurrent identical fine-tune: wait for it, then resume from its checkpoint
DEFAULT_CHECKPOINT_ROOT = Path(tempfile.gettempdir()) / "cessl-checkpoints"


@dataclass
class FinetuneResult:
    checkpoint_dir: str
    best_step: int
    best_score: float
    steps: int
    resumed_from: int | None
    stopped_early: bool
    device: str
    seconds: float
    trainable_params: int
    total_params: int
    monitor: str = "macro_map"
    ms_per_step: float = float("nan")  # mean training step, validations left out
    peak_memory_mb: float = float("nan")  # over the training steps; memory_measure says how
    memory_measure: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Plain JSON values (unmeasured NaN figures left out)."""
        fields = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {k: v for k, v in fields.items() if not (isinstance(v, float) and not math.isfinite(v))} | self.extra

    def summary_metrics(self) -> dict[str, float]:
        """The run's figures (the cost ones only when measured: a run with no step has none)."""
        cost = {"ms_per_step": self.ms_per_step, "peak_memory_mb": self.peak_memory_mb}
        return {
            f"best_valid_{self.monitor}": self.best_score,
            "best_step": float(self.best_step),
            "steps": float(self.steps),
            "trainable_params": float(self.trainable_params),
            "total_params": float(self.total_params),
            "seconds": self.seconds,
        } | {k: v for k, v in cost.items() if math.isfinite(v)}


def _checkpoint_step(checkpoint_dir: Path) -> int:
    """Step of the checkpoint a resumed run starts from (0 when there is none)."""
    from ml.train.trainer import CHECKPOINT_NAME, load_checkpoint

    path = checkpoint_dir / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    try:
        return int(load_checkpoint(path)["step"])
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise StepError(f"{path}: unreadable checkpoint ({err}); delete it to start over") from err


def checkpoint_key(
    backbone_identity: str,
    splits: Splits,
    store_fingerprint: str,
    rank_map: Mapping[str, int],
    lora: LoRAConfig,
    train: TrainConfig,
) -> str:
    """Stable hash of everything that determines the training run (not where or how it is watched)."""
    inputs = {
        "backbone": backbone_identity,
        "splits": splits.to_dict(),
        "store": store_fingerprint,
        "rank_map": dict(rank_map),
        "lora": asdict(lora),
        "schedule": train.schedule_fingerprint(),
    }
    return sha256_json(inputs)[:24]


def _clamp_batch(train: TrainConfig, n_train: int) -> TrainConfig:
    """``train`` with its labelled batch no larger than the labelled train split."""
    if train.batch_size <= n_train:
        return train
    log.info("labelled batch %d > %d labelled train records: using %d", train.batch_size, n_train, n_train)
    return dataclasses.replace(train, batch_size=max(1, n_train))


def describe_schedule(train: TrainConfig) -> str:
    """E.g. ``"200 epochs = 400 steps"`` (a resolved epochs-mode config) or ``"150 steps"``;
    ``"no gradient step"`` for a method that takes none (``head-only``)."""
    from ml.train.methods import NO_GRADIENT_STEP

    if train.training_method.fits_head_only:
        return NO_GRADIENT_STEP
    if train.epochs is None:
        return f"{train.max_steps} steps"
    return f"{train.epochs} epochs = {train.max_steps} steps"


def finetune_step(
    store_dir: Path,
    splits_path: Path,
    backbone_dir: Path,
    rank_map_path: Path,
    adapter_dir: Path,
    curves_path: Path,
    *,
    lora: LoRAConfig,
    train: TrainConfig,
    checkpoint_root: str | Path | None = None,
    store_fingerprint: str,
    progress_label: str = "",
) -> FinetuneResult:
    """Fine-tune ``train.method``, write the adapter to ``adapter_dir`` and the curves to ``curves_path`` (JSONL).

    ``store_fingerprint`` (the preprocess step's) identifies the data in the checkpoint key.
    ``progress_label``: how the progress lines name the run (default ``fine-tune (METHOD)``).
    """
    from ml.train.gpu import check_required_gpu

    check_required_gpu("finetune")  # before any data is read: a GPU task on a CPU image stops now
    if not store_fingerprint:
        raise StepError(f"{store_dir}: no store fingerprint given (the preprocess step's); it keys the checkpoints")
    splits = Splits.load(splits_path)
    rank_map = {k: int(v) for k, v in read_json(rank_map_path, "rank map").items()}
    backbone = read_backbone(backbone_dir)
    state, name, identity = backbone.state, backbone.name, backbone.identity
    store = open_store(store_dir)
    classes = splits.classes
    train_ds, valid = dataset(store, splits.train, classes), dataset(store, splits.valid, classes)
    unlabelled = dataset(store, splits.unlabelled, classes) if splits.unlabelled else None
    # The real step count (epochs mode) before anything is keyed or logged on the config.
    train = _clamp_batch(train, len(train_ds)).resolve_steps(len(train_ds)).resolve_precision()
    log.info("schedule: %s, precision %s", describe_schedule(train), train.precision)
    checkpoint_dir = Path(checkpoint_root or DEFAULT_CHECKPOINT_ROOT) / checkpoint_key(
        identity, splits, store_fingerprint, rank_map, lora, train
    )
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # One fine-tune per checkpoint folder at a time (a checkpoint volume shared by concurrent
    # runs of the same inputs): the second waits, then resumes from the first one's checkpoint.
    with exclusive(checkpoint_dir / LOCK_FILE, wait=LOCK_WAIT_S, what=f"checkpoint folder {checkpoint_dir}"):
        return _finetune_in(
            checkpoint_dir,
            state,
            name,
            identity,
            classes,
            lora,
            rank_map,
            train,
            train_ds,
            unlabelled,
            valid,
            adapter_dir,
            curves_path,
            progress_label or f"fine-tune ({train.method})",
        )


def _finetune_in(
    checkpoint_dir: Path,
    state,
    name: str,
    identity: str,
    classes,
    lora: LoRAConfig,
    rank_map: Mapping[str, int],
    train: TrainConfig,
    train_ds,
    unlabelled,
    valid,
    adapter_dir: Path,
    curves_path: Path,
    progress_label: str,
) -> FinetuneResult:
    from ml.model.adapter import AdapterMeta, save_adapter
    from ml.model.backbone import backbone_config
    from ml.train.callbacks import CurveRecorder, ProgressLine, StepProfiler
    from ml.train.config import resolve_device
    from ml.train.recipe import finetune

    train = dataclasses.replace(train, checkpoint_dir=str(checkpoint_dir))
    resume_step = _checkpoint_step(checkpoint_dir)
    if resume_step:
        log.info("resuming fine-tuning from %s at step %d", checkpoint_dir, resume_step)

    recorder = CurveRecorder(checkpoint_dir / CURVES_FILE, resume_step)
    profiler = StepProfiler(resolve_device(train.device))
    outcome = finetune(
        state,
        backbone_config(name, len(classes)),
        lora,
        rank_map,
        train,
        train_ds,
        unlabelled,
        valid,
        callbacks=[recorder, profiler, ProgressLine(train.max_steps, label=progress_label)],
    )
    result = outcome.result
    meta = AdapterMeta(
        backbone_id=identity,
        classes=list(classes),
        thresholds=[float(t) for t in outcome.thresholds],
        method=train.method,
        precision=result.precision,
        extra={
            "backbone_name": name,
            "train_config": train.to_dict() | {"checkpoint_dir": None},
            "best_step": result.best_step,
            "best_valid": result.best_metrics,
        },
    )
    outcome.model.cpu()
    save_adapter(outcome.model, adapter_dir, meta)
    Path(curves_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint_dir / CURVES_FILE, curves_path)
    log.info(
        "fine-tuned %s (%s) on %s: best valid %s %.4f at step %d of %d",
        train.method,
        name,
        result.device,
        result.monitor,
        result.best_score,
        result.best_step,
        result.steps,
    )
    return FinetuneResult(
        checkpoint_dir=str(checkpoint_dir),
        best_step=result.best_step,
        best_score=float(result.best_score),
        steps=result.steps,
        resumed_from=result.resumed_from,
        stopped_early=result.stopped_early,
        device=result.device,
        seconds=result.seconds,
        trainable_params=outcome.trainable,
        total_params=outcome.total,
        monitor=result.monitor,
        ms_per_step=profiler.ms_per_step,
        peak_memory_mb=profiler.peak_memory_mb,
        memory_measure=profiler.memory_measure,
        extra={
            "classes": list(classes),
            "backbone_id": identity,
            "schedule": describe_schedule(train),
            "precision": result.precision,
        },
    )
