"""What every local run shares (``cessl run | retrain | compare``, ``run --sites``,
``backbone pipeline run``): the checks before any work, the project lock, the MLflow store
made ready, and how ``kfp.local`` runs the pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from components.locking import exclusive
from pipeline.core.params import DEMO_PARAMS, PipelineParams
from pipeline.dags.finetune import LocalRunConfig
from pipeline.registry.store import TrackingConfig

RUN_LOCK = "run.lock"  # in the state folder: one local run (run, retrain, compare) at a time


def project_lock(args: argparse.Namespace):
    """The lock of this project's local state (``<state_dir>/run.lock``): taken before any
    work by ``cessl run | retrain | compare``; ``--wait-lock`` seconds to wait for a holder."""
    return exclusive(
        Path(args.state_dir) / RUN_LOCK,
        wait=float(getattr(args, "wait_lock", 0.0) or 0.0),
        what=f"this project's run state ({args.state_dir})",
    )


def prepare_store(tracking: TrackingConfig) -> None:
    """Create (migrate) the MLflow store and the experiment before any training, so a store
    problem ends the run at once; a local SQLite store is initialised under a lock next to
    it (two processes migrating one fresh database collide)."""
    from pipeline.registry.store import ensure_experiment

    if tracking.tracking_uri.startswith("sqlite:///"):
        db = Path(tracking.tracking_uri.removeprefix("sqlite:///"))
        with exclusive(db.with_name(db.name + ".lock"), wait=600, what=f"the MLflow store {db}"):
            ensure_experiment(tracking)
    else:
        ensure_experiment(tracking)


def preflight_local(args: argparse.Namespace, params: PipelineParams | None = None) -> None:
    """Before any work of a local run (and before its project lock): a local backbone and a
    local data folder exist, the tracking store answers (or may be created), and a Docker
    engine answers for ``--runner docker``."""
    from pipeline.cli.preflight import (
        check_backbone,
        check_demo_data,
        check_docker,
        check_records_folder,
        check_tracking,
    )

    if params is not None:
        check_backbone(params.backbone)
    check_tracking(args.tracking_uri, writes=True, create=args.create_store)
    if args.runner == "docker":
        check_docker()
    if params is not None:
        demo = params.source == DEMO_PARAMS.source and not getattr(args, "no_demo_data", False)
        if "://" not in params.source and not demo and not Path(params.source).is_dir():
            raise FileNotFoundError(f"{Path(params.source).absolute()}: data folder not found")
        if demo:
            check_demo_data(Path(params.source))
        elif "://" not in params.source:
            check_records_folder(Path(params.source))


def local_run_config(args: argparse.Namespace, log_name: str) -> LocalRunConfig:
    """How a local command (run, compare, run --sites) runs its pipeline: the tasks' output goes
    to ``<pipeline-root>/<log_name>`` unless ``--show-task-logs`` streams it."""
    return LocalRunConfig(
        pipeline_root=Path(args.pipeline_root),
        cache=not args.no_cache,
        runner=args.runner,
        image=args.image,
        task_log=None if args.show_task_logs else Path(args.pipeline_root) / log_name,
    )
