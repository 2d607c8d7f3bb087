"""Step: gather what one pipeline run produced into a :class:`Registration` bundle.

The bundle is everything MLflow is told about the run - parameters, tags (data version,
git commit, test split hash, backbone identity), test metrics, the champion's metrics on
the same split and the paired bootstrap against it (``score_champion``), training curves, the rank map, the files to attach,
the backbone and adapter folders - plus a fingerprint of the run's inputs and outputs, so
registering the same run twice gives one model version.
Writing it to MLflow is the pipeline's job (``pipeline.registry.tracking.log_and_register``);
nothing here imports mlflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.common import StepError, read_json, sha256_dir, sha256_json
from components.evaluate import (
    CHAMPION_FILE,
    GATE_FILE,
    METRICS_FILE,
    PER_CLASS_FILE,
    PR_FILE,
    PREDICTIONS_FILE,
    ROC_FILE,
    ChampionEvaluation,
)
from ml.data.splits import Splits
from ml.train.callbacks import read_curves

log = logging.getLogger(__name__)

CHAMPION_ARTIFACT_DIR = "champion"  # run artifacts: champion.json, predictions.npz, paired_bootstrap.json


@dataclass
class Registration:
    """One run, ready to be logged and registered."""

    params: dict[str, Any]
    tags: dict[str, str]
    test_metrics: dict[str, float]
    curves: list[dict[str, float]]
    rank_map: dict[str, int]
    classes: list[str]
    backbone_dir: Path
    adapter_dir: Path
    splits: Splits
    champion: ChampionEvaluation | None = None  # the champion scored on this test split
    artifacts: dict[str, Path] = field(default_factory=dict)  # path in the run ("folder/name") -> local file
    fingerprint: str = ""
    run_name: str = ""
    data_version: str = ""
    git_commit: str = ""

    def data_info(self) -> dict[str, Any]:
        return {
            "data_version": self.data_version,
            "git_commit": self.git_commit,
            "test_split_hash": self.splits.test_split_hash,
            "split_sizes": self.splits.sizes(),
            "source": self.params.get("source", ""),
        }


def _artifact(path: Path) -> Path:
    if not path.is_file():
        raise StepError(f"{path}: expected output of an earlier step is missing")
    return path


def _champion(path: Path | None, splits: Splits) -> ChampionEvaluation | None:
    if path is None:
        return None
    champion = ChampionEvaluation.read(path)
    if champion.test_split_hash != splits.test_split_hash:
        raise StepError(
            f"{path}: the champion was scored on test split {champion.test_split_hash[:12]}, "
            f"this run's is {splits.test_split_hash[:12]}"
        )
    return champion


def champion_artifacts(champion_path: Path | None) -> dict[str, Path]:
    """The score_champion folder's files as run artifacts (``champion/...``): the champion's
    per-record predictions and the paired bootstrap the promotion gate reads."""
    if champion_path is None or not Path(champion_path).is_dir():
        return {}
    names = (CHAMPION_FILE, PREDICTIONS_FILE, GATE_FILE)
    return {
        f"{CHAMPION_ARTIFACT_DIR}/{n}": Path(champion_path) / n for n in names if (Path(champion_path) / n).is_file()
    }


def collect_registration(
    *,
    splits_path: Path,
    backbone_dir: Path,
    rank_map_path: Path,
    adapter_dir: Path,
    curves_path: Path,
    evaluation_dir: Path,
    params: Mapping[str, Any],
    data_version: str,
    git_commit: str,
    champion_path: Path | None = None,
    report_path: Path | None = None,
    quarantine_path: Path | None = None,
) -> Registration:
    """Read the upstream outputs into a :class:`Registration`."""
    from ml.model.pretrained import read_backbone_meta

    splits = Splits.load(splits_path)
    evaluation = read_json(Path(evaluation_dir) / METRICS_FILE, "evaluation metrics")
    rank_map = {k: int(v) for k, v in read_json(rank_map_path, "rank map").items()}
    adapter_config = read_json(Path(adapter_dir) / "adapter_config.json", "adapter config")
    backbone = read_backbone_meta(backbone_dir)
    train_config = dict(adapter_config.get("extra", {}).get("train_config", {}))
    all_params = {
        **dict(params),
        **{f"train.{k}": v for k, v in train_config.items() if k != "extra"},
        "split_sizes": splits.sizes(),
        "n_classes": len(splits.classes),
        "data_version": data_version,
    }
    tags = {
        "data_version": data_version,
        "git_commit": git_commit,
        "test_split_hash": splits.test_split_hash,
        "backbone_id": str(adapter_config.get("backbone_id", backbone.get("identity", ""))),
        "backbone_name": str(backbone.get("name", "")),
        "backbone_source": str(backbone.get("source", "")),
        "method": str(params.get("method", adapter_config.get("method", ""))),
        "classes": ",".join(splits.classes),
    }
    files = {"evaluation": [METRICS_FILE, PER_CLASS_FILE, ROC_FILE, PR_FILE, PREDICTIONS_FILE]}
    artifacts = {
        f"{folder}/{name}": _artifact(Path(evaluation_dir) / name) for folder, names in files.items() for name in names
    }
    artifacts["training/curves.jsonl"] = _artifact(Path(curves_path))
    artifacts["data/splits.json"] = _artifact(Path(splits_path))  # what it trained on (a test-set redraw avoids it)
    if report_path is not None and Path(report_path).is_file():
        artifacts["evaluation/report.html"] = Path(report_path)
    if quarantine_path is not None and Path(quarantine_path).is_file():
        artifacts["data/quarantine.md"] = Path(quarantine_path)
    artifacts |= champion_artifacts(champion_path)
    fingerprint = sha256_json(
        {
            "adapter": sha256_dir(adapter_dir),
            "data_version": data_version,
            "test_split": splits.test_split_hash,
            "params": all_params,
        }
    )
    method, r = params.get("method", "cessl"), params.get("r", "")
    bundle = Registration(
        params=all_params,
        tags=tags,
        test_metrics={k: float(v) for k, v in evaluation["metrics"].items()},
        curves=read_curves(curves_path),
        rank_map=rank_map,
        classes=list(splits.classes),
        backbone_dir=Path(backbone_dir),
        adapter_dir=Path(adapter_dir),
        splits=splits,
        champion=_champion(champion_path, splits),
        artifacts=artifacts,
        fingerprint=fingerprint,
        run_name=f"{method}-r{r}-{(data_version or 'nodata')[:8]}",
        data_version=data_version,
        git_commit=git_commit,
    )
    log.info(
        "registration bundle: %d params, %d test metrics, %d curve rows, fingerprint %s",
        len(all_params),
        len(bundle.test_metrics),
        len(bundle.curves),
        fingerprint[:12],
    )
    return bundle
