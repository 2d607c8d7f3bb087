"""Fine-tuning configuration: one dataclass for the schedule and the method.

The method (``cessl`` and the baselines) is a name in the registry of
:mod:`ml.train.methods`; :attr:`TrainConfig.training_method` is its entry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ml.train.methods import DEFAULT_METHOD, TrainingMethod, get_method

# The paper's schedule: batch 64, or 16 when fewer than 2% of the records are labelled.
DEFAULT_BATCH_SIZE = 64
SMALL_BATCH_SIZE = 16
SMALL_LABEL_RATIO = 0.02
EPOCHS = 200


# The fields that determine a run's result; a resumed run must share them with the run
# that wrote the checkpoint (not where it runs, how it is watched, or where it saves).
SCHEDULE_FIELDS: tuple[str, ...] = (
    "method",
    "lr",
    "weight_decay",
    "warmup_frac",
    "max_steps",
    "batch_size",
    "unlabelled_batch_size",
    "val_every",
    "patience",
    "monitor",
    "cutmix_alpha",
    "fixmatch_tau",
    "fixmatch_lambda_u",
    "seed",
)


def batch_size_for_label_ratio(labelled_ratio: float) -> int:
    """Labelled batch size of the paper: 16 when the labelled ratio is below 2%, else 64."""
    return SMALL_BATCH_SIZE if labelled_ratio < SMALL_LABEL_RATIO else DEFAULT_BATCH_SIZE


def steps_for_epochs(num_labelled: int, batch_size: int, epochs: int = EPOCHS) -> int:
    """Total steps = labelled batches per epoch x epochs (200 in the paper)."""
    return max(1, math.ceil(num_labelled / batch_size)) * epochs


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
    max_steps: int = 1000
    batch_size: int = DEFAULT_BATCH_SIZE  # labelled batch
    unlabelled_batch_size: int | None = None  # None: same as batch_size
    eval_batch_size: int = 128
    val_every: int = 50
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
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, logged and checkpointed

    def __post_init__(self) -> None:
        get_method(self.method)  # a clear error for an unknown name
        for name in ("max_steps", "batch_size", "eval_batch_size", "val_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict (for logging, MLflow params and checkpoints)."""
        return asdict(self)

    def schedule_fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        return {key: getattr(self, key) for key in SCHEDULE_FIELDS}
