"""`cessl compare`: choose a method by comparing methods on your own data.

    cessl compare --methods cessl,head-only,fixmatch --ratios 0.05,0.1 --seeds 0,1,2 [pipeline flags]
    cessl compare --methods cessl,fixmatch,lora,full --compile -o cessl_compare.yaml

Runs the ``cessl-compare`` pipeline (:mod:`pipeline.dags.compare`) locally with ``kfp.local``:
ingest, preprocess and the backbone once, then every cell of the grid (methods x labelled
ratios x seeds) fine-tuned and evaluated on the same splits, each cell an MLflow child run
of one parent run; prints the table (mean +- std over seeds of macro F-beta2, AUROC, mAP,
Challenge score, ms/step, peak memory, trainable parameters) and where the CSV, Markdown
and plot are (artifacts ``comparison/`` of the parent run). Nothing is registered. The
baseline to beat is ``head-only`` (the frozen backbone and a linear head fitted on the
labelled records: no gradient step, so its ms/step and peak memory are n/a).

Parameters default to ``cessl run``'s (the demo's: the demo hospital, the tiny backbone,
max_steps mode with 150 steps); with ``--compile`` to the cluster's (the paper's 200
epochs), and the compiled pipeline requests a GPU on every fine-tune (the ``cessl compile``
cluster flags apply). Locally the cells run one at a time (``--parallelism``) so that
ms/step stays comparable on shared CPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from components.compare import (
    CELLS_JSON,
    PAIRED_CSV,
    PAIRED_NOTE,
    CompareGrid,
    comparison_table,
    memory_measure,
    paired_rows,
    read_cells,
    table_rows,
)
from pipeline.cli.run import (
    compile_options,
    local_params,
    local_run_config,
    preflight_local,
    project_lock,
)
from pipeline.core.params import DEFAULTS, DEMO_PARAMS, PipelineParams, params_from_args
from pipeline.dags.compare import EXCLUDED_PARAMS, CompareSettings, compare_arguments
from pipeline.dags.finetune import PipelineRunError
from pipeline.registry.compare_tracking import fail_comparison, new_comparison_id
from pipeline.registry.store import TrackingConfig

log = logging.getLogger(__name__)

COMPARE_EXPERIMENT = "cessl-compare"
TABLE_WIDTH = 160


def base_params(compile_only: bool) -> PipelineParams:
    """The defaults: the cluster's for ``--compile``, else the local demo's."""
    return (DEFAULTS if compile_only else DEMO_PARAMS).replace(experiment_name=COMPARE_EXPERIMENT)


def grid_from_args(args: argparse.Namespace) -> CompareGrid:
    """The grid of the (already validated) grid flags."""
    return CompareGrid(methods=tuple(args.methods), labelled_ratios=tuple(args.ratios), seeds=tuple(args.seeds))


def print_table(table: pd.DataFrame, title: str) -> None:
    headings, rows = table_rows(table, memory=False)
    _print_rows(headings, rows, title, f"mean +- std over seeds; peak MB: {memory_measure(table)}")


def _print_rows(headings: list[str], rows: list[list[str]], title: str, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title, caption=caption)
    for i, heading in enumerate(headings):
        out.add_column(heading, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    console = Console()
    console.width = max(console.width, TABLE_WIDTH)  # a narrow terminal wraps lines rather than cells
    console.print(out)


def load_table(tracking: TrackingConfig, parent_run_id: str) -> pd.DataFrame:
    """The comparison table, rebuilt from the cells logged with the parent run."""
    import mlflow

    tracking.activate()
    with tempfile.TemporaryDirectory(prefix="cessl-compare-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=parent_run_id, artifact_path=f"comparison/{CELLS_JSON}", dst_path=tmp
        )
        return comparison_table(read_cells(Path(path)))


def print_paired(tracking: TrackingConfig, parent_run_id: str) -> pd.DataFrame:
    """The paired differences against CE-SSL logged with the parent run, printed (empty if none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.activate()
    with tempfile.TemporaryDirectory(prefix="cessl-compare-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=parent_run_id, artifact_path=f"comparison/{PAIRED_CSV}", dst_path=tmp
            )
        except (MlflowException, OSError):
            return pd.DataFrame()
        paired = pd.read_csv(path)
    headings, rows = paired_rows(paired)
    _print_rows(headings, rows, "paired differences on the shared test split", PAIRED_NOTE)
    return paired


def cmd_compare(args: argparse.Namespace) -> int:
    grid = grid_from_args(args)
    params = params_from_args(args, base_params(args.compile), exclude=EXCLUDED_PARAMS)
    parallelism = args.parallelism if args.parallelism is not None else (0 if args.compile else 1)
    settings = CompareSettings(grid=grid, parallelism=parallelism, defaults=params)
    if args.compile:
        return compile_comparison(args, settings)
    return run_comparison(args, params, settings)


def compile_comparison(args: argparse.Namespace, settings: CompareSettings) -> int:
    from pipeline.dags.spec import compare_spec, compile_spec

    options = compile_options(args)  # checks the cluster flags before anything is written
    log.info("%s, schedule %s", settings.grid.describe(), settings.defaults.schedule())
    path = compile_spec(compare_spec(settings), Path(args.output), options)
    log.info("wrote %s", path)
    return 0


def run_comparison(args: argparse.Namespace, params: PipelineParams, settings: CompareSettings) -> int:
    """Every check first (the flags were checked when parsed; here the stores, the data, the
    backbone, Docker), then the project lock, then the first log line and the work: a bad
    command line leaves nothing behind and says nothing but its one error line."""
    preflight_local(args, params)
    with project_lock(args):  # then one local run of this project at a time
        log.info("%s, schedule %s", settings.grid.describe(), params.schedule())
        return _run_comparison(args, params, settings)


def _run_comparison(args: argparse.Namespace, params: PipelineParams, settings: CompareSettings) -> int:
    from pipeline.dags.spec import compare_spec, run_local

    tracking = TrackingConfig.resolve(args.tracking_uri, params.experiment_name)
    params = local_params(args, params, tracking)
    comparison_id = new_comparison_id()
    config = local_run_config(args, "last_compare.log")
    start = time.perf_counter()
    try:
        arguments = compare_arguments(params, settings.grid, comparison_id)
        parent_run_id = str(run_local(compare_spec(settings), params, config, arguments)["Output"])
    except PipelineRunError:
        failed = fail_comparison(tracking, comparison_id)
        if failed:
            log.error("comparison %s failed: parent run %s marked FAILED", comparison_id, failed)
        raise
    seconds = time.perf_counter() - start
    table = load_table(tracking, parent_run_id)
    print_table(table, f"cessl compare: {settings.grid.describe()} ({params.schedule()})")
    paired = print_paired(tracking, parent_run_id)
    log.info(
        "MLflow parent run %s (%s, experiment %s): table, plot and cells under comparison/; %.0f s",
        parent_run_id,
        tracking.tracking_uri,
        params.experiment_name,
        seconds,
    )
    if args.json:
        summary = {
            "parent_run_id": parent_run_id,
            "comparison_id": comparison_id,
            "tracking_uri": tracking.tracking_uri,
            "seconds": seconds,
            "table": json.loads(table.to_json(orient="records", double_precision=15)),
            "paired": json.loads(paired.to_json(orient="records", double_precision=15)) if not paired.empty else [],
        }
        Path(args.json).write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    return 0
