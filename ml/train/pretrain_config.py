"""What a pre-training run is: :class:`PretrainConfig` (the loop's settings, with the one set
of defaults every entry point uses) and :class:`PretrainRun` (that config on a dataset store:
what each process of a job runs, handed over as JSON).

No torch here: the command line and the pipeline's parameters read these defaults while
building their parsers. "Not set" is the zero of the type everywhere (``max_steps`` 0:
``epochs`` epochs; ``lr`` 0: the scaling rule; ``num_classes`` 0: the data's; ``checkpoint_dir``
'': no checkpoints), so the same values travel as flags, KFP parameters and JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

LR_REFERENCE_BATCH = 1024
DEFAULT_DIST_TIMEOUT_S = 1800.0  # torch's own default for gloo; bounds every collective
PAPER_CUTMIX_ALPHA = 0.75  # ml.train.augment.CUTMIX_ALPHA (that module imports torch)
DTYPES = ("float32", "float64")


def scaled_lr(base_lr: float, world_size: int, batch_size: int) -> float:
    """The paper's rule: ``base_lr x world_size x batch_size / 1024`` (batch per process)."""
    return base_lr * world_size * batch_size / LR_REFERENCE_BATCH


@dataclass(frozen=True)
class PretrainConfig:
    """Everything :func:`ml.train.pretrain.pretrain` needs besides the data.

    backbone: size name (``ml.model.backbone.BACKBONE_CONFIGS``); the classifier gets
    ``num_classes`` outputs (0: the length of the dataset's label vector).
    max_steps: optimizer steps to stop after (0: ``epochs`` full epochs).
    batch_size: per process; the global batch is ``world_size x batch_size``.
    lr: 0 applies :func:`scaled_lr` to ``base_lr``; a number overrides the rule.
    cutmix_alpha: Beta(alpha, alpha) of Cutmix; 0 disables it.
    checkpoint_dir: where ``pretrain_last.pt`` is written and resumed from ('' : nowhere).
    sync_batchnorm: BatchNorm over the global batch when running multi-process.
    dist_timeout_s: the longest any collective (all-reduce, barrier) may wait for the other
    processes before the run fails; it must exceed rank 0's checkpoint write time.
    measure_comm: time the gradient all-reduce (a DDP comm hook) and the BatchNorm
    all-reduces of every step, and count their bytes (benchmarks).
    """

    backbone: str = "tiny"
    num_classes: int = 0
    epochs: int = 50
    max_steps: int = 0
    batch_size: int = 64
    base_lr: float = 1e-3
    lr: float = 0.0
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    cutmix_alpha: float = PAPER_CUTMIX_ALPHA
    seed: int = 0
    checkpoint_dir: str = ""
    checkpoint_every: int = 100
    resume: bool = True
    num_workers: int = 0
    device: str = "auto"
    distributed: bool = True  # join torchrun's process group when WORLD_SIZE > 1
    sync_batchnorm: bool = True
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    measure_comm: bool = False
    dtype: str = "float32"  # "float64" for exact equivalence checks (tests), not for real runs
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "max_steps", "lr", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: not set), got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.cutmix_alpha < 0:
            raise ValueError(f"cutmix_alpha must be >= 0 (0 disables Cutmix), got {self.cutmix_alpha}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")

    def learning_rate(self, world_size: int) -> float:
        return self.lr or scaled_lr(self.base_lr, world_size, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """The config of the fields ``values`` names (other keys are not its business): how a
        flat set of flags or pipeline parameters, or the JSON of :meth:`to_dict`, becomes one."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass(frozen=True)
class PretrainRun:
    """One pre-training run on a dataset store: what every process of a job runs
    (``python -m components.pretrain SPEC``), whatever launched it.

    store / out: the dataset store and the backbone folder to write, as the processes see them.
    classes: the codes to pre-train on (empty: every class the store names).
    data_version: recorded with the backbone ('' : the store's, else a hash of its records).
    """

    store: str
    out: str
    config: PretrainConfig = field(default_factory=PretrainConfig)
    classes: tuple[str, ...] = ()
    data_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainRun:
        """The run of :meth:`to_json`'s (parsed) JSON; a missing, unknown or malformed field is a ValueError."""
        try:
            return cls(
                store=str(data["store"]),
                out=str(data["out"]),
                config=PretrainConfig(**dict(data.get("config") or {})),  # an unknown key is a TypeError
                classes=tuple(str(c) for c in data.get("classes") or ()),
                data_version=str(data.get("data_version") or ""),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a pre-training run: {err!r}") from err
