"""The fine-tuning loop: ``fit(model, labelled, unlabelled, valid, config) -> TrainResult``.

Schedule (the paper's): AdamW over the trainable parameters, linear warm-up over
``warmup_frac`` of the steps then linear decay to 0. The number of steps is
``config.max_steps``, or in epochs mode (``config.epochs`` set) complete labelled batches
per epoch x epochs (:meth:`TrainConfig.resolve_steps`, applied by :func:`fit`). The model is
validated on macro average precision at step 0 before any update (``validate_at_start``),
every ``val_every`` steps and at the last step; the step-0 validation is the starting point
of early stopping and of the history. Early stopping after ``patience`` validations without
improvement, where a tie counts as an improvement (as in the reference: the later of equal
states is kept); the best state is restored at the end, so a run that never improves ends
with the initial weights.

Each step is the method's step function (:mod:`ml.train.methods`, chosen by ``config.method``). All randomness is
seeded from ``config.seed``: batch order (:mod:`ml.train.loaders`), augmentations (one
``torch.Generator``), LoRA random deactivation (the layers' shared RNG, re-seeded here) and
torch's global RNG (inside ``torch.random.fork_rng``, so the caller's RNG is untouched).

Precision (:mod:`ml.train.precision`): ``config.precision`` is resolved once against the
device (``auto`` -> bf16 on a bf16-capable GPU, else fp32); a bf16 step runs its forward and
loss under autocast, the backward and the AdamW update act on the float32 master weights.
fp32 is the unchanged path. Validation predicts under the same autocast, metrics in float64.

No host stalls in the loop: the step's logged tensors are summed on the device and read back
every ``log_every`` steps (and at each validation), never per step; the callbacks get the
window's means. Batches are copied to a GPU from pinned memory without blocking.

Checkpoints: after every validation ``last.pt`` in ``config.checkpoint_dir`` is replaced
atomically by the complete training state (model, optimizer, scheduler, RNG states, loader
positions, early-stopping state, history). A run that was killed and is started again with
the same config resumes from there and ends with exactly the result of an uninterrupted
run. Checkpoints hold tensors and plain Python types only (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ml.eval.evaluate import predict_with_labels
from ml.eval.metrics import macro_auroc, macro_average_precision
from ml.model.lora import lora_layers, seed_deactivation
from ml.train.augment import AugmentRNG, make_augment_rng
from ml.train.checkpoint import load_checkpoint, save_checkpoint
from ml.train.config import TrainConfig, resolve_device
from ml.train.loaders import BatchIterator, StreamPosition, dataset_size, derive_seed
from ml.train.methods import StepFn
from ml.train.precision import Precision
from ml.train.steps import EncoderHeadModel, StepOutput

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
# Independent random streams derived from config.seed.
_LABELLED, _UNLABELLED, _AUGMENT, _DEACTIVATION, _TORCH = range(5)
CUDA_LOG_EVERY = 10  # log_every 0 on CUDA: read the losses back every 10 steps


def log_interval(config: TrainConfig, device: torch.device) -> int:
    """Steps between read-backs of the training losses: ``config.log_every``, or for 0 every
    step on the CPU (a read-back costs nothing there) and every :data:`CUDA_LOG_EVERY` on CUDA."""
    if config.log_every:
        return config.log_every
    return CUDA_LOG_EVERY if device.type == "cuda" else 1


class LossWindow:
    """The step's logged tensors summed on the device (float64), read back once per window.

    float64 sums of the float32 losses in step order are exactly what summing the Python
    floats did, so the logged means do not change by a bit.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, logs: Mapping[str, Tensor]) -> None:
        for key, value in logs.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The means since the last read (one device-to-host copy), and start a new window."""
        if not self.steps:
            return {}
        keys = list(self.sums)
        totals = torch.stack([self.sums[k] for k in keys]).tolist()
        means = {k: total / self.steps for k, total in zip(keys, totals, strict=True)}
        self.sums, self.steps = {}, 0
        return means


# --- callbacks and result -----------------------------------------------------------------
@dataclass
class TrainResult:
    """What a fine-tuning run ends with (the model itself holds the best state)."""

    best_step: int
    best_score: float
    best_metrics: dict[str, float]
    steps: int  # optimisation steps done
    stopped_early: bool
    # One record per validation: "step", the validation metrics, "train_loss" (mean since the
    # previous validation) and "lr"; the step-0 record has no "train_loss" nor "lr" (no update yet).
    history: list[dict[str, float]]
    resumed_from: int | None = None  # step of the checkpoint this run continued from
    seconds: float = 0.0  # wall time of this call (not of the interrupted part)
    device: str = "cpu"
    monitor: str = "macro_map"
    precision: str = "fp32"  # the resolved precision the run trained in (fp32 or bf16)


class Callback(Protocol):
    """Observer of a run (e.g. the pipeline's MLflow logger). Metrics are plain floats."""

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def on_end(self, result: TrainResult) -> None: ...


class BaseCallback:
    """No-op :class:`Callback`; subclass and override what you need."""

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def on_end(self, result: TrainResult) -> None:
        pass


# --- schedule -----------------------------------------------------------------------------
def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: ``s / warmup`` during warm-up, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[AdamW, LambdaLR]:
    """AdamW over the parameters with ``requires_grad`` and the warm-up/decay scheduler."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (call mark_trainable first)")
    optimizer = AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = LambdaLR(optimizer, linear_warmup_decay(config.warmup_steps, config.max_steps))
    return optimizer, scheduler


# --- state --------------------------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Best validation score so far (higher is better) and validations since it improved.

    A score equal to the best counts as an improvement (the reference's ``>=``), so the
    best step moves to the later of equal validations. NaN never improves, except as the
    first validation.
    """

    patience: int
    best_score: float = -math.inf
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_validations: int = 0
    stopped: bool = False

    def update(self, step: int, score: float, metrics: Mapping[str, float]) -> bool:
        """Record a validation; True when it is the new best (ties included)."""
        improved = self.best_step is None or (not math.isnan(score) and score >= self.best_score)
        value = score if not math.isnan(score) else -math.inf
        if improved:
            self.best_score, self.best_step, self.best_metrics = value, step, dict(metrics)
            self.bad_validations = 0
        else:
            self.bad_validations += 1
            self.stopped = self.bad_validations >= self.patience
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_metrics": dict(self.best_metrics),
            "bad_validations": self.bad_validations,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_step = state["best_step"]
        self.best_metrics = dict(state["best_metrics"])
        self.bad_validations = int(state["bad_validations"])
        self.stopped = bool(state["stopped"])


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _deactivation_rng(model: nn.Module) -> random.Random | None:
    layers = lora_layers(model)
    return next(iter(layers.values())).rng if layers else None


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the block, then restore.

    On CUDA strict, and only when ``CUBLAS_WORKSPACE_CONFIG`` is set (cuBLAS cannot be
    deterministic without it): kernels with a deterministic variant use it (the memory-
    efficient attention backward does so only in strict mode) and an op without one stops
    the run with torch's error naming it (``TrainConfig.deterministic = False`` allows it).
    On CPU warn-only: CPU runs are deterministic for a fixed thread count.
    """
    if enabled and device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        log.info("CUBLAS_WORKSPACE_CONFIG is not set: CUDA run not forced to deterministic algorithms")
        enabled = False
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def validation_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What a validation records: macro mAP (the early-stopping monitor), macro AUROC and the
    binary cross-entropy of the validation records' probabilities."""
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    bce = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    return {
        "macro_map": macro_average_precision(labels, probs),
        "macro_auroc": macro_auroc(labels, probs),
        "loss": bce,
    }


# --- the loop -----------------------------------------------------------------------------
class _Run:
    """One call of :func:`fit`: holds the model, optimiser, iterators and RNGs."""

    def __init__(
        self,
        model: nn.Module,
        labelled: Dataset,
        unlabelled: Dataset | None,
        valid: Dataset,
        config: TrainConfig,
        callbacks: Sequence[Callback],
    ) -> None:
        if not isinstance(model, EncoderHeadModel):
            raise TypeError(f"{type(model).__name__} has no encode/head: the training steps need an ECGTransformer")
        self.method = config.training_method
        if self.method.step is None:
            raise ValueError(f"method {config.method!r} takes no gradient step (ml.train.recipe.finetune fits it)")
        self.loss_of: StepFn = self.method.step
        if self.method.reads_unlabelled and (unlabelled is None or dataset_size(unlabelled) == 0):
            raise ValueError(f"method {config.method!r} needs a non-empty unlabelled dataset")
        self.config, self.callbacks = config, list(callbacks)
        self.device = resolve_device(config.device)
        self.precision: Precision = config.resolved_precision()
        self.model = model.to(self.device)
        self.labelled, self.unlabelled, self.valid = labelled, unlabelled, valid
        self.optimizer, self.scheduler = build_optimizer(self.model, config)
        self.generator = make_augment_rng(
            derive_seed(config.seed, _AUGMENT), derive_seed(config.seed, _AUGMENT, 1), self.device
        )
        seed_deactivation(self.model, derive_seed(config.seed, _DEACTIVATION))
        self.early = EarlyStopping(config.patience)
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.resumed_from: int | None = None
        self.positions = {"labelled": StreamPosition(), "unlabelled": StreamPosition()}
        self.best_state: dict[str, Tensor] | None = None
        self.checkpoint_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None

    # -- checkpointing --
    def state_dict(self) -> dict[str, Any]:
        rng = _deactivation_rng(self.model)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.schedule_fingerprint(),
            "step": self.step,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "augment": self.generator.get_state(),
                "deactivation": rng.getstate() if rng is not None else None,  # tuple of ints
            },
            "loaders": {name: pos.to_dict() for name, pos in self.positions.items()},
            "early_stopping": self.early.state_dict(),
            "best_state": self.best_state,
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = self.config.schedule_fingerprint()
        saved = state["config"]
        changed = sorted(k for k in expected if saved.get(k) != expected[k])
        if state.get("format") != CHECKPOINT_FORMAT or changed:
            raise ValueError(
                f"checkpoint {self.checkpoint_path} was written with a different configuration "
                f"(differs in {changed or ['format']}); use another checkpoint_dir or resume=False"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        augment = state["rng"]["augment"]
        if isinstance(self.generator, AugmentRNG) and isinstance(augment, Tensor):
            self.generator.device.set_state(augment)  # a checkpoint from before the host stream
        else:
            self.generator.set_state(augment)
        rng = _deactivation_rng(self.model)
        if rng is not None and state["rng"]["deactivation"] is not None:
            rng.setstate(state["rng"]["deactivation"])
        self.positions = {name: StreamPosition(**pos) for name, pos in state["loaders"].items()}
        self.early.load_state_dict(state["early_stopping"])
        self.best_state = state["best_state"]
        self.history = list(state["history"])
        self.step = self.resumed_from = int(state["step"])

    def maybe_resume(self) -> None:
        if self.checkpoint_path is None or not self.config.resume or not self.checkpoint_path.exists():
            return
        self.load_state_dict(load_checkpoint(self.checkpoint_path))
        log.info("resumed from %s at step %d", self.checkpoint_path, self.step)

    def save(self) -> None:
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.state_dict())

    # -- steps --
    def iterators(self) -> tuple[BatchIterator, BatchIterator | None]:
        cfg = self.config
        labelled = BatchIterator(
            self.labelled,
            cfg.batch_size,
            derive_seed(cfg.seed, _LABELLED),
            self.device,
            self.positions["labelled"],
            cfg.num_workers,
        )
        unlabelled = None
        if self.method.reads_unlabelled:
            assert self.unlabelled is not None
            unlabelled = BatchIterator(
                self.unlabelled,
                cfg.unlabelled_batch,
                derive_seed(cfg.seed, _UNLABELLED),
                self.device,
                self.positions["unlabelled"],
                cfg.num_workers,
            )
        return labelled, unlabelled

    def loss(self, labelled: BatchIterator, unlabelled: BatchIterator | None) -> StepOutput:
        x, y = next(labelled)
        x_u = next(unlabelled)[0] if unlabelled is not None else None
        with self.precision.autocast():
            return self.loss_of(self.model, x, y, x_u, self.generator, self.config)

    def validate(self) -> dict[str, float]:
        cfg = self.config
        with self.precision.autocast():
            probs, labels = predict_with_labels(self.model, self.valid, cfg.eval_batch_size, self.device)
        return validation_metrics(probs, labels)

    def run(self) -> TrainResult:
        cfg = self.config
        start_time = time.perf_counter()
        self.maybe_resume()
        self.validate_at_start()
        labelled, unlabelled = self.iterators()
        self.model.train()
        every = log_interval(cfg, self.device)
        window, since_validation = LossWindow(), LossWindow()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"fine-tune ({cfg.method})",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.max_steps and not self.early.stopped:
                out = self.loss(labelled, unlabelled)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                self.optimizer.step()
                lr = float(self.scheduler.get_last_lr()[0])
                self.scheduler.step()
                self.step += 1
                window.add(out.logs)
                since_validation.add({"loss": out.loss})
                bar.update(1)
                validating = self.step % cfg.val_every == 0 or self.step == cfg.max_steps
                if validating or self.step % every == 0:
                    self.report_steps(window.read() | {"lr": lr}, bar)
                if validating:
                    self.positions = {
                        "labelled": labelled.position,
                        "unlabelled": unlabelled.position if unlabelled is not None else StreamPosition(),
                    }
                    self.after_validation(self.validate(), since_validation.read()["loss"], lr)
        except (KeyboardInterrupt, SystemExit):
            # SIGINT / SIGTERM (pipeline.core.process): the last checkpoint, written atomically, stays as it is.
            log.warning("fine-tuning stopped at step %d; a rerun resumes from the last checkpoint", self.step)
            raise
        finally:
            bar.close()
        return self.finish(time.perf_counter() - start_time)

    def report_steps(self, logs: dict[str, float], bar: tqdm) -> None:
        """Hand a window's mean losses (and the last lr) to the progress bar and the callbacks."""
        bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        for cb in self.callbacks:
            cb.on_step(self.step, logs)

    def validate_at_start(self) -> None:
        """Validate the untouched model at step 0, once: a resumed run finds it in its history.

        Its record starts the history and the curves, and early stopping: a run whose
        updates never reach its score ends with the initial state.
        """
        if self.config.validate_at_start and self.step == 0 and not self.history:
            self.after_validation(self.validate())

    def after_validation(
        self, metrics: dict[str, float], train_loss: float | None = None, lr: float | None = None
    ) -> None:
        """Record a validation (``train_loss``/``lr`` None: before any update), checkpoint."""
        cfg = self.config
        trained = {} if train_loss is None or lr is None else {"train_loss": train_loss, "lr": lr}
        record = {"step": float(self.step), **metrics, **trained}
        self.history.append(record)
        if self.early.update(self.step, metrics[cfg.monitor], metrics):
            self.best_state = _cpu_state(self.model)
        log.info(
            "step %d: valid %s %.4f (best %.4f at step %s), train loss %s%s",
            self.step,
            cfg.monitor,
            metrics[cfg.monitor],
            self.early.best_score,
            self.early.best_step,
            "-" if train_loss is None else f"{train_loss:.4f}",
            " - early stop" if self.early.stopped else "",
        )
        for cb in self.callbacks:
            cb.on_validation(self.step, record)
        self.save()

    def finish(self, seconds: float) -> TrainResult:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        result = TrainResult(
            best_step=int(self.early.best_step or 0),
            best_score=self.early.best_score,
            best_metrics=dict(self.early.best_metrics),
            steps=self.step,
            stopped_early=self.early.stopped,
            history=copy.deepcopy(self.history),
            resumed_from=self.resumed_from,
            seconds=seconds,
            device=str(self.device),
            monitor=self.config.monitor,
            precision=self.precision.name,
        )
        log.info(
            "done after %d steps: best %s %.4f at step %d",
            result.steps,
            result.monitor,
            result.best_score,
            result.best_step,
        )
        for cb in self.callbacks:
            cb.on_end(result)
        return result


def fit(
    model: nn.Module,
    labelled: Dataset,
    unlabelled: Dataset | None,
    valid: Dataset,
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Fine-tune ``model`` with ``config.method``; returns with the best state loaded.

    ``model`` must already have its trainable parameters marked (see
    :func:`ml.train.build.build_model`). ``unlabelled`` is needed for the methods that
    read unlabelled data (``TrainingMethod.reads_unlabelled``) and ignored otherwise. When
    ``config.checkpoint_dir`` holds a checkpoint of the same configuration and
    ``config.resume`` is set, training continues from it. In epochs mode (``config.epochs``
    set) the number of steps comes from ``len(labelled)`` (:meth:`TrainConfig.resolve_steps`);
    ``config.precision`` ``auto`` is resolved for the device (:meth:`TrainConfig.resolve_precision`).
    """
    config = config.resolve_steps(dataset_size(labelled)).resolve_precision()
    device = resolve_device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _deterministic_algorithms(config.deterministic, device):
        torch.manual_seed(derive_seed(config.seed, _TORCH))
        return _Run(model, labelled, unlabelled, valid, config, callbacks).run()


__all__ = [
    "BaseCallback",
    "Callback",
    "EarlyStopping",
    "TrainResult",
    "build_optimizer",
    "fit",
    "linear_warmup_decay",
    "validation_metrics",
]
