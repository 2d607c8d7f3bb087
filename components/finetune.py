"""Step: CE-SSL fine-tuning -> adapter (safetensors + config) and training curves.

The model is built for the method (``ml.train.finetune.build_model_for_method``: LoRA at
the allocated ranks with random deactivation for ``cessl``), trained with
``ml.train.trainer.fit`` on the labelled train split (+ the unlabelled split for the
semi-supervised methods), validated on the valid split; per-class thresholds are then
fitted on the valid split (F-beta2) and stored in the adapter config.

Resumable: checkpoints go to ``<checkpoint_root>/<hash of this step's inputs>``, a path
that is the same when the same inputs are run again, so a task killed mid-training and
started again continues from its last validation. Training curves are appended to
``curves.jsonl`` in the same folder as they happen (rows past the resumed step are dropped
on resume). Runs on the GPU when there is one, else on the CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import StepError, read_json, sha256_json
from components.data_access import dataset, open_store
from ml.data.splits import Splits
from ml.model.pretrained import read_backbone

log = logging.getLogger(__name__)

CURVES_FILE = "curves.jsonl"
DEFAULT_CHECKPOINT_ROOT = Path(tempfile.gettempdir()) / "cessl-checkpoints"


@dataclass(frozen=True)
class FinetuneConfig:
    """The step's parameters (the pipeline's)."""

    method: str = "cessl"
    r: int = 16
    p: float = 0.2
    labelled_ratio: float = 0.05
    max_steps: int = 1000
    batch_size: int = 0  # 0: the paper's rule for labelled_ratio
    val_every: int = 50
    seed: int = 0
    patience: int = 10
    lr: float = 1e-3
    device: str = "auto"
    progress: bool = False

    def train_config(self, n_train: int, checkpoint_dir: Path):
        from ml.train.config import TrainConfig, batch_size_for_label_ratio

        batch = self.batch_size or batch_size_for_label_ratio(self.labelled_ratio)
        batch = max(1, min(batch, n_train))
        return TrainConfig(
            method=self.method, lr=self.lr, max_steps=self.max_steps, batch_size=batch,
            val_every=min(self.val_every, self.max_steps), patience=self.patience, seed=self.seed,
            checkpoint_dir=str(checkpoint_dir), resume=True, device=self.device, progress=self.progress,
        )


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
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "extra"} | self.extra

    def summary_metrics(self) -> dict[str, float]:
        return {
            f"best_valid_{self.monitor}": self.best_score, "best_step": float(self.best_step),
            "steps": float(self.steps), "trainable_params": float(self.trainable_params),
            "seconds": self.seconds,
        }


class CurveRecorder:
    """Trainer callback appending every step's and every validation's metrics to a JSONL file."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = Path(path)
        truncate_curves(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: Mapping[str, float]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"step": step, **{f"train_{k}": float(v) for k, v in metrics.items()}})

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"step": step, **{f"valid_{k}": float(v) for k, v in metrics.items()
                                      if k not in ("step", "train_loss", "lr")}})

    def on_end(self, result) -> None:
        self._file.close()


def read_curves(path: Path) -> list[dict[str, float]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_curves(path: Path, keep_until: int) -> None:
    """Drop rows logged after ``keep_until`` (they are replayed after a resume)."""
    rows = [r for r in read_curves(path) if r["step"] <= keep_until]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


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


def checkpoint_key(backbone_identity: str, splits: Splits, store_fingerprint: str, rank_map: Mapping[str, int],
                   config: FinetuneConfig) -> str:
    """Stable hash of everything that determines the training run."""
    inputs = {"backbone": backbone_identity, "splits": splits.to_dict(), "store": store_fingerprint,
              "rank_map": dict(rank_map), "config": {k: v for k, v in asdict(config).items() if k != "progress"}}
    return sha256_json(inputs)[:24]


def finetune_step(store_dir: Path, splits_path: Path, backbone_dir: Path, rank_map_path: Path,
                  config: FinetuneConfig, adapter_dir: Path, curves_path: Path,
                  checkpoint_root: str | Path | None = None, store_fingerprint: str = "") -> FinetuneResult:
    """Fine-tune, write the adapter to ``adapter_dir`` and the curves to ``curves_path`` (JSONL)."""
    from ml.eval.evaluate import predict_with_labels
    from ml.eval.metrics import fit_thresholds
    from ml.model.adapter import AdapterMeta, save_adapter
    from ml.model.backbone import backbone_config
    from ml.model.lora import count_parameters
    from ml.train.finetune import build_model_for_method
    from ml.train.trainer import fit

    splits = Splits.load(splits_path)
    rank_map = {k: int(v) for k, v in read_json(rank_map_path, "rank map").items()}
    backbone = read_backbone(backbone_dir)
    state, name, identity = backbone.state, backbone.name, backbone.identity
    store = open_store(store_dir)
    classes = splits.classes
    fingerprint = store_fingerprint or str(getattr(store, "fingerprint", "")) or str(Path(store_dir).resolve())
    key = checkpoint_key(identity, splits, fingerprint, rank_map, config)
    checkpoint_dir = Path(checkpoint_root or DEFAULT_CHECKPOINT_ROOT) / key
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    resume_step = _checkpoint_step(checkpoint_dir)
    if resume_step:
        log.info("resuming fine-tuning from %s at step %d", checkpoint_dir, resume_step)

    model = build_model_for_method(state, backbone_config(name, len(classes)), config.method, rank_map=rank_map,
                                   p=config.p, r=config.r, seed=config.seed)
    train, valid = dataset(store, splits.train, classes), dataset(store, splits.valid, classes)
    unlabelled = dataset(store, splits.unlabelled or splits.train, classes)
    if not splits.unlabelled and config.method in ("cessl", "fixmatch"):
        log.warning("%s: no unlabelled records; the labelled train split stands in for them", splits_path)
    train_config = config.train_config(len(train), checkpoint_dir)
    recorder = CurveRecorder(checkpoint_dir / CURVES_FILE, resume_step)
    result = fit(model, train, unlabelled, valid, train_config, callbacks=[recorder])

    probs, labels = predict_with_labels(model, valid, train_config.eval_batch_size)
    thresholds = fit_thresholds(labels, probs, beta=2.0)
    meta = AdapterMeta(backbone_id=identity, classes=list(classes), thresholds=[float(t) for t in thresholds],
                       method=config.method,
                       extra={"backbone_name": name, "train_config": train_config.to_dict() | {"checkpoint_dir": None},
                              "best_step": result.best_step, "best_valid": result.best_metrics})
    model.cpu()
    save_adapter(model, adapter_dir, meta)
    Path(curves_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint_dir / CURVES_FILE, curves_path)
    trainable, total = count_parameters(model)
    log.info("fine-tuned %s (%s) on %s: best valid %s %.4f at step %d of %d", config.method, name, result.device,
             result.monitor, result.best_score, result.best_step, result.steps)
    return FinetuneResult(
        checkpoint_dir=str(checkpoint_dir), best_step=result.best_step, best_score=float(result.best_score),
        steps=result.steps, resumed_from=result.resumed_from, stopped_early=result.stopped_early,
        device=result.device, seconds=result.seconds, trainable_params=trainable, total_params=total,
        monitor=result.monitor, extra={"classes": list(classes), "backbone_id": identity},
    )
