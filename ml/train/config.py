"""Fine-tuning configuration: one dataclass for the schedule and the method.

Two ways to say how long to train:

- ``max_steps`` mode (``epochs=None``, the default of :class:`TrainConfig`): exactly
  ``max_steps`` optimisation steps; for quick runs and tests.
- ``epochs`` mode (``epochs`` set): the reference's schedule, steps = labelled batches per
  epoch x ``epochs`` (200 in the paper) with incomplete batches skipped
  (:func:`steps_for_epochs`). ``max_steps`` is then derived from the number of labelled
  records by :meth:`TrainConfig.resolve_steps`; :func:`ml.train.trainer.fit` calls it, and a
  caller that logs the config can call it first to log the real step count.

Either way the model is validated at step 0 (``validate_at_start``), every ``val_every``
steps and at the last step; early stopping waits ``patience`` validations without an
improvement of ``monitor``, a tie counting as an improvement, as in the reference.

The method (``cessl`` and the baselines) is a name in the registry of
:mod:`ml.train.methods`; :attr:`TrainConfig.training_method` is its entry.

``precision`` (``fp32 | bf16 | auto``, :mod:`ml.train.precision`) is resolved against the
device once, by :meth:`TrainConfig.resolve_precision` (:func:`ml.train.trainer.fit` calls it);
the resolved config names ``fp32`` or ``bf16``, never ``auto``, so what is logged and
checkpointed is what ran. ``head_init`` (:data:`HEAD_INITS`): where the classifier starts
before the first gradient step: ``random`` (the model's initialisation) or ``linear-probe``
(LP-FT, Kumar et al. 2022: the linear probe of :mod:`ml.eval.head_only` fitted on the labelled
records' frozen features, :func:`ml.train.recipe.init_head`); ``head-only`` is that probe
whatever it says. ``log_every``: the training loss reaches the callbacks (and the
progress bar) every that many steps and at every validation, averaged on the device in
between, so the step never waits for the GPU to hand a number back (0, the default: every
step on the CPU, where a read-back costs nothing, every 10 steps on CUDA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ml.train.methods import DEFAULT_METHOD, TrainingMethod, get_method
from ml.train.precision import DEFAULT_PRECISION, Precision, check_precision_name, resolve_precision

# The paper's schedule: batch 64, or 16 when fewer than 2% of the records are labelled.
DEFAULT_BATCH_SIZE = 64
SMALL_BATCH_SIZE = 16
SMALL_LABEL_RATIO = 0.02
EPOCHS = 200
# Where the classifier starts (ml.train.recipe.init_head): the model's random initialisation,
# or the linear probe on the frozen backbone's features of the labelled records (LP-FT).
HEAD_INITS: tuple[str, ...] = ("random", "linear-probe")
DEFAULT_HEAD_INIT = "linear-probe"  # LP-FT: bench/RESULTS.md "LP-FT" (+0.26 test F-beta2 at 40 steps)
# The fields that determine a run's result; a resumed run must share them with the run
# that wrote the checkpoint (not where it runs, how it is watched, or where it saves).
SCHEDULE_FIELDS: tuple[str, ...] = (
    "method",
    "lr",
    "weight_decay",
    "warmup_frac",
    "max_steps",
    "epochs",
    "batch_size",
    "unlabelled_batch_size",
    "val_every",
    "validate_at_start",
    "patience",
    "monitor",
    "cutmix_alpha",
    "fixmatch_tau",
    "fixmatch_lambda_u",
    "seed",
    "precision",  # in the fingerprint only when it is not fp32 (see schedule_fingerprint)
    "head_init",  # in the fingerprint only when it is not random (see schedule_fingerprint)
)


def batch_size_for_label_ratio(labelled_ratio: float) -> int:
    """Labelled batch size of the paper: 16 when the labelled ratio is below 2%, else 64."""
    return SMALL_BATCH_SIZE if labelled_ratio < SMALL_LABEL_RATIO else DEFAULT_BATCH_SIZE


def batches_per_epoch(num_labelled: int, batch_size: int) -> int:
    """Complete labelled batches in one epoch (incomplete batches skipped), at least 1."""
    if num_labelled < 0 or batch_size < 1:
        raise ValueError(f"need num_labelled >= 0 and batch_size >= 1, got {num_labelled}, {batch_size}")
    return max(1, num_labelled // batch_size)


def steps_for_epochs(num_labelled: int, batch_size: int, epochs: int = EPOCHS) -> int:
    """Total steps of the reference schedule: complete labelled batches per epoch x epochs.

    Like the reference, the last incomplete batch of an epoch is not counted
    (``floor(num_labelled / batch_size)``, at least 1), so 130 records in batches of 64
    make 2 batches per epoch and 400 steps over 200 epochs.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return batches_per_epoch(num_labelled, batch_size) * epochs


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class TrainConfig:
    """Everything :func:`ml.train.trainer.fit` needs besides the model and the data."""

    method: str = DEFAULT_METHOD  # a name in ml.train.methods.METHODS
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.01  # linear warm-up over this fraction of max_steps, then linear decay to 0
    max_steps: int = 1000  # max_steps mode; replaced by resolve_steps in epochs mode
    epochs: int | None = None  # None: max_steps mode; set: steps = complete labelled batches x epochs
    batch_size: int = DEFAULT_BATCH_SIZE  # labelled batch
    unlabelled_batch_size: int | None = None  # None: same as batch_size
    eval_batch_size: int = 128
    val_every: int = 50
    validate_at_start: bool = True  # validate at step 0: the start of early stopping and of the curves
    patience: int = 10  # in validations
    monitor: str = "macro_map"  # validation metric for early stopping (higher is better)
    cutmix_alpha: float = 0.75
    fixmatch_tau: float = 0.95
    fixmatch_lambda_u: float = 1.0
    seed: int = 0
    checkpoint_dir: str | None = None  # None: no checkpoints, no resume
    resume: bool = True  # continue from checkpoint_dir/last.pt when it exists
    device: str = "auto"
    num_workers: int = 0
    deterministic: bool = True  # torch.use_deterministic_algorithms during fit
    progress: bool = True  # tqdm progress bar
    precision: str = DEFAULT_PRECISION  # fp32 | bf16 | auto (ml.train.precision); fit resolves auto
    head_init: str = DEFAULT_HEAD_INIT  # random | linear-probe (ml.train.recipe.init_head)
    # Steps between training-loss reports to the callbacks (losses averaged on the device);
    # 0: every step on the CPU, every 10 on CUDA (ml.train.trainer.log_interval).
    log_every: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, logged and checkpointed

    def __post_init__(self) -> None:
        get_method(self.method)  # a clear error for an unknown name
        check_precision_name(self.precision)
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"unknown head_init {self.head_init!r}; choose one of {', '.join(HEAD_INITS)}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0: automatic), got {self.log_every}")
        for name in ("max_steps", "batch_size", "eval_batch_size", "val_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if self.unlabelled_batch_size is not None and self.unlabelled_batch_size < 1:
            raise ValueError(f"unlabelled_batch_size must be >= 1, got {self.unlabelled_batch_size}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0.5 <= self.fixmatch_tau < 1.0:
            raise ValueError(f"fixmatch_tau must be in [0.5, 1), got {self.fixmatch_tau}")

    @property
    def training_method(self) -> TrainingMethod:
        """The registry entry of :attr:`method`."""
        return get_method(self.method)

    @property
    def unlabelled_batch(self) -> int:
        return self.unlabelled_batch_size or self.batch_size

    @property
    def warmup_steps(self) -> int:
        return int(self.max_steps * self.warmup_frac)

    def resolve_steps(self, num_labelled: int) -> TrainConfig:
        """This config with ``max_steps`` set from ``epochs`` for ``num_labelled`` records.

        In ``max_steps`` mode (``epochs is None``) the config itself. Idempotent, so
        :func:`ml.train.trainer.fit` can resolve a config its caller resolved already.
        """
        if self.epochs is None:
            return self
        return replace(self, max_steps=steps_for_epochs(num_labelled, self.batch_size, self.epochs))

    def resolved_precision(self) -> Precision:
        """:attr:`precision` on :attr:`device` (``auto`` -> bf16 on a bf16-capable GPU, else fp32)."""
        return resolve_precision(self.precision, resolve_device(self.device))

    def resolve_precision(self) -> TrainConfig:
        """This config with ``auto`` replaced by what it means on :attr:`device` (idempotent)."""
        resolved = self.resolved_precision().name
        return self if resolved == self.precision else replace(self, precision=resolved)

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict (for logging, MLflow params and checkpoints)."""
        return asdict(self)

    def schedule_fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint.

        ``precision`` is left out when it is ``fp32`` and ``head_init`` when it is ``random``:
        such a run keys and resumes its checkpoints exactly as before the option existed (its
        checkpoints have no such field); a bf16 run never resumes an fp32 checkpoint, a
        linear-probe start never a random one, nor the reverse.
        """
        fingerprint = {key: getattr(self, key) for key in SCHEDULE_FIELDS}
        if fingerprint["precision"] == "fp32":
            del fingerprint["precision"]
        if fingerprint["head_init"] == "random":
            del fingerprint["head_init"]
        return fingerprint
