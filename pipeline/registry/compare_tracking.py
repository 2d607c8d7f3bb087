"""MLflow glue of ``cessl compare``: one parent run per comparison, one child run per cell.

- :func:`start_comparison`: the parent run (tags ``cessl.run_kind = comparison`` and the
  comparison's id; parameters: the grid and the choices every cell shares). It stays
  RUNNING while the cells train; :class:`ComparisonRun` (written as a small JSON file) is
  how the pipeline's later steps find it.
- :func:`log_cell_run`: a cell as a child run (tag ``mlflow.parentRunId``): parameters
  method / labelled_ratio / seed plus the shared ones and the finetune's ``train.*`` config
  (the real step count), test metrics (``test_*``), ``ms_per_step``, ``peak_memory_mb``
  (tag ``memory_measure`` says what it is), ``trainable_params``, training curves.
- :func:`finish_comparison`: the table (CSV, Markdown), the plot and the cells (JSON) as
  artifacts of the parent run under ``comparison/``, a few summary metrics, status FINISHED.
- :func:`fail_comparison`: a local run that failed marks its parent run FAILED.

Cells are experiments: nothing here registers a model version.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import read_json, write_json
from components.compare import CellPredictions, CellResult, CompareGrid, ComparisonFiles, ratio_label
from pipeline.registry.store import TrackingConfig, ensure_experiment
from pipeline.registry.tracking import TEST_PREFIX, log_curves, param_value

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_KIND = "cessl.run_kind"
TAG_COMPARISON = "cessl.comparison_id"
KIND_COMPARISON = "comparison"
KIND_CELL = "comparison-cell"
CELL_PREDICTIONS = "evaluation/predictions.npz"  # a cell run's predictions on the shared test split
# Cost figures of a cell, logged as metrics of its child run.
COST_METRICS = ("ms_per_step", "peak_memory_mb", "trainable_params", "total_params", "steps")


@dataclass(frozen=True)
class ComparisonRun:
    """The parent run, as the pipeline's steps pass it on (no endpoint or credential in it)."""

    run_id: str
    experiment_id: str
    comparison_id: str
    params: dict[str, Any] = field(default_factory=dict)  # the shared choices (logged params)
    tags: dict[str, str] = field(default_factory=dict)  # the parent's lineage tags, which every cell run carries too

    def write(self, path: Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> ComparisonRun:
        return cls(**read_json(path, "comparison run"))


def new_comparison_id() -> str:
    """E.g. ``20260101-120000-1a2b3c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def log_batch(
    client: Any, run_id: str, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
) -> None:
    """Parameters (as text) and the finite metrics in one call."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, param_value(v)) for k, v in (params or {}).items()],
        metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics or {}).items()],
    )


def start_comparison(
    config: TrackingConfig,
    comparison_id: str,
    grid: CompareGrid,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> ComparisonRun:
    """Create the parent run (RUNNING) with the grid and the shared parameters (``comparison_id``
    empty: a new one)."""
    comparison_id = comparison_id or new_comparison_id()
    client = config.client()
    experiment_id = ensure_experiment(config)
    run = client.create_run(
        experiment_id,
        run_name=f"compare-{comparison_id}",
        tags={TAG_KIND: KIND_COMPARISON, TAG_COMPARISON: comparison_id, **dict(tags or {})},
    )
    run_id = run.info.run_id
    logged = {
        "methods": ",".join(grid.methods),
        "labelled_ratios": ",".join(f"{r:g}" for r in grid.labelled_ratios),
        "seeds": ",".join(str(s) for s in grid.seeds),
        "n_cells": len(grid.cells()),
        **dict(params),
    }
    log_batch(client, run_id, params=logged)
    log.info("comparison %s: parent run %s (%s)", comparison_id, run_id, grid.describe())
    return ComparisonRun(
        run_id, experiment_id, comparison_id, dict(params), {k: v for k, v in (tags or {}).items() if v}
    )


def log_cell_run(
    config: TrackingConfig,
    parent: ComparisonRun,
    result: CellResult,
    *,
    train_config: Mapping[str, Any] | None = None,
    curves: Sequence[Mapping[str, float]] = (),
    tags: Mapping[str, str] | None = None,
    predictions: Path | None = None,
) -> str:
    """Log one cell as a FINISHED child run of ``parent`` (``predictions``: its
    ``predictions.npz``, which the summary pairs with the other cells'); returns its run id."""
    client = config.client()
    run = client.create_run(
        parent.experiment_id,
        run_name=result.cell.name,
        tags={
            TAG_PARENT: parent.run_id,
            TAG_KIND: KIND_CELL,
            TAG_COMPARISON: parent.comparison_id,
            "method": result.method,
            "memory_measure": result.memory_measure,
            "split_fingerprint": result.split_fingerprint,
            "test_split_hash": result.test_split_hash,
            **{k: str(v) for k, v in result.extra.items()},
            **parent.tags,
            **dict(tags or {}),
        },
    )
    run_id = run.info.run_id
    params = {
        **parent.params,
        **{f"train.{k}": v for k, v in dict(train_config or {}).items() if k not in ("extra", "checkpoint_dir")},
        "method": result.method,
        "labelled_ratio": result.labelled_ratio,
        "seed": result.seed,
    }
    cost = {key: float(getattr(result, key)) for key in COST_METRICS}
    log_batch(
        client, run_id, params=params, metrics={**{f"{TEST_PREFIX}{k}": v for k, v in result.metrics.items()}, **cost}
    )
    log_curves(client, run_id, curves)
    if predictions is not None and Path(predictions).is_file():
        client.log_artifact(run_id, str(predictions), artifact_path=CELL_PREDICTIONS.rsplit("/", 1)[0])
    client.set_terminated(run_id, "FINISHED")
    log.info("cell %s: child run %s of %s", result.cell.name, run_id, parent.run_id)
    return run_id


def cell_predictions(config: TrackingConfig, results: Sequence[CellResult], dest: Path) -> dict[str, CellPredictions]:
    """The logged predictions of every cell that has a child run (cell name -> predictions)."""
    from mlflow.exceptions import MlflowException

    client = config.client()
    found: dict[str, CellPredictions] = {}
    for result in results:
        if not result.run_id:
            continue
        try:
            local = client.download_artifacts(result.run_id, CELL_PREDICTIONS, str(Path(dest) / result.cell.name))
        except (MlflowException, OSError) as err:
            log.warning("cell %s: no predictions to pair (%s)", result.cell.name, err)
            continue
        found[result.cell.name] = CellPredictions.load(Path(local))
    return found


def finish_comparison(config: TrackingConfig, parent: ComparisonRun, files: ComparisonFiles, table: Any) -> None:
    """Attach the comparison's files to the parent run, log the row means, mark it FINISHED."""
    client = config.client()
    for run_path, local in files.artifacts().items():
        client.log_artifact(parent.run_id, str(local), artifact_path=str(Path(run_path).parent))
    for _, row in table.iterrows():
        prefix = f"{row['method']}.{ratio_label(row['labelled_ratio']).rstrip('%')}pct"
        means = {f"{prefix}.{k.removesuffix('_mean')}": row[k] for k in table.columns if k.endswith("_mean")}
        log_batch(client, parent.run_id, metrics=means)
    client.set_terminated(parent.run_id, "FINISHED")
    log.info("comparison %s: table and plot logged to run %s", parent.comparison_id, parent.run_id)


def find_parent_run(config: TrackingConfig, id_tag: str, run_id_value: str, kind: str):
    """The parent run of kind ``kind`` whose ``id_tag`` is ``run_id_value`` (a comparison's or
    a network's), None when there is none yet."""
    experiment = config.client().get_experiment_by_name(config.experiment_name)
    if experiment is None:
        return None
    runs = config.client().search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{id_tag}` = '{run_id_value}' and tags.`{TAG_KIND}` = '{kind}'",
    )
    return runs[0] if runs else None


def find_comparison(config: TrackingConfig, comparison_id: str):
    """The parent run of ``comparison_id`` (None when there is none yet)."""
    return find_parent_run(config, TAG_COMPARISON, comparison_id, KIND_COMPARISON)


def child_runs(config: TrackingConfig, parent_run_id: str) -> list:
    """The child runs of a parent run."""
    client = config.client()
    parent = client.get_run(parent_run_id)
    return list(
        client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    )


def fail_comparison(config: TrackingConfig, comparison_id: str) -> str | None:
    """Mark the comparison's parent run FAILED if it is still running; its id (or None)."""
    run = find_comparison(config, comparison_id)
    if run is None or run.info.status != "RUNNING":
        return None
    config.client().set_terminated(run.info.run_id, "FAILED")
    return str(run.info.run_id)
