"""`cessl run | compile | submit | schedule | retrain`: the DAG locally, compiled, on a cluster.

- ``run``: the whole DAG on this machine with ``kfp.local`` (this Python environment, or the
  project image with ``--runner docker``), MLflow in ``./mlflow.db`` + ``./mlruns`` unless
  ``MLFLOW_TRACKING_URI``/``--tracking-uri`` says otherwise; prints the data version, the
  ranks allocated, the schedule, the test metrics, the MLflow run and the model version.
  Defaults are the demo's: the synthetic hospital in ``data/`` (created when missing), the
  embedded tiny backbone, a short schedule (max_steps mode: 150 steps; ``--epochs 200`` for
  the paper's). Unchanged steps are reused from the local task cache; a run
  killed during finetune resumes from its checkpoint.
- ``compile``: the pipeline's IR YAML (GPU request, node selector, tolerations, image).
- ``submit`` / ``schedule``: a run / a recurring run on a Kubeflow Pipelines endpoint, with
  the cluster defaults (:data:`pipeline.core.params.DEFAULTS`: the paper's 200 epochs).
- ``retrain``: run (or submit) only when the data version differs from the champion's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.locking import exclusive
from pipeline.core.constraints import (
    cron,
    existing_file,
    http_url,
    image,
    k8s_name,
    non_negative_float,
    non_negative_int,
    output_file,
    output_root,
    quantity,
    resource_name,
    tracking_uri,
)
from pipeline.core.params import (
    DEFAULTS,
    LOCAL_ONLY,
    PipelineParams,
    add_param_flags,
    params_from_args,
)
from pipeline.dags.finetune import (
    CompileOptions,
    LocalRunConfig,
    ResourceRequest,
    Toleration,
)
from pipeline.dags.kfp_auth import MODES as KFP_AUTH_MODES
from pipeline.registry.lineage import git_commit, push_data_version, read_data_version, source_data_version
from pipeline.registry.policy import GATE_METRICS, registered_model_name
from pipeline.registry.store import TRACKING_URI_ENV, TrackingConfig

if TYPE_CHECKING:
    from pipeline.dags.spec import ClusterRun, ClusterTarget, PipelineSpec

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "cessl_pipeline.yaml"  # = pipeline.dags.spec.finetune_spec().package
STATE_DIR = Path(".cache") / "cessl"
RUN_LOCK = "run.lock"  # in the state folder: one local run (run, retrain, compare) at a time

# `cessl run` on the embedded defaults: the demo hospital, the tiny default backbone and a
# schedule that finishes in minutes on two CPU cores: max_steps mode (epochs=0, 150 steps),
# where the cluster's DEFAULTS train the paper's 200 epochs. Every value can be overridden.
DEMO_PARAMS = DEFAULTS.replace(
    backbone_config="tiny",
    labelled_ratio=0.3,
    epochs=0,
    max_steps=150,
    batch_size=16,
    val_every=25,
    min_class_count=10,
)


# --------------------------------------------------------------------------- arguments


def add_compile_flags(parser: argparse.ArgumentParser, with_image: bool = True) -> None:
    group = parser.add_argument_group("cluster settings (compile time)")
    if with_image:
        group.add_argument(
            "--image",
            type=image,
            default=None,
            help="component image (default: $CESSL_IMAGE or localhost:5000/cessl:0.1.0)",
        )
    group.add_argument(
        "--accelerator-type", type=resource_name, default="nvidia.com/gpu", help="finetune's accelerator resource"
    )
    group.add_argument("--accelerator-limit", type=non_negative_int, default=1, help="accelerators for finetune")
    group.add_argument("--no-gpu", action="store_true", help="finetune requests no accelerator")
    group.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label finetune must run on (repeatable)",
    )
    group.add_argument(
        "--toleration",
        action="append",
        default=None,
        metavar="KEY[=VALUE][:EFFECT]",
        help="taint finetune tolerates (repeatable; default nvidia.com/gpu:NoSchedule)",
    )
    group.add_argument(
        "--finetune-cpu", type=quantity, default="4", help="finetune's CPU request (Kubernetes quantity)"
    )
    group.add_argument(
        "--finetune-memory", type=quantity, default="16Gi", help="finetune's memory request (Kubernetes quantity)"
    )
    defaults = CompileOptions()
    group.add_argument(
        "--finetune-cpu-limit",
        type=_optional(quantity),
        default=defaults.finetune_resources.cpu_limit,
        help="finetune's CPU limit ('' for none; default: %(default)s)",
    )
    group.add_argument(
        "--finetune-memory-limit",
        type=_optional(quantity),
        default=None,
        help="finetune's memory limit ('' for none; default: its memory request)",
    )
    group.add_argument(
        "--image-pull-secret",
        action="append",
        type=k8s_name,
        default=None,
        metavar="NAME",
        help="Secret every step's pod pulls the image with (repeatable; default: $CESSL_IMAGE_PULL_SECRET)",
    )
    group.add_argument(
        "--checkpoint-pvc",
        default=defaults.checkpoint_pvc,
        help="PVC mounted at /mnt/checkpoints on finetune ('' for none; default: %(default)s)",
    )
    group.add_argument(
        "--credentials-secret",
        default=defaults.credentials_secret,
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ('' for none; default: %(default)s)",
    )
    group.add_argument(
        "--mlflow-secret",
        default=defaults.mlflow_secret,
        help="Secret with the pipeline's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
        "('' for none; default: %(default)s)",
    )
    group.add_argument(
        "--config-map",
        default=defaults.config_map,
        help="ConfigMap with the MLflow / S3 endpoints ('' for none; default: %(default)s)",
    )


def compile_options(args: argparse.Namespace, cache_ingest: bool = True) -> CompileOptions:
    selector = {}
    for item in args.node_selector:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--node-selector {item!r}: expected KEY=VALUE")
        selector[key] = value
    tolerations = (
        CompileOptions().tolerations if args.toleration is None else tuple(Toleration.parse(t) for t in args.toleration)
    )
    return CompileOptions(
        image=args.image or CompileOptions().image,
        accelerator_type="" if args.no_gpu else args.accelerator_type,
        accelerator_limit=args.accelerator_limit,
        node_selector=selector,
        tolerations=tolerations,
        finetune_resources=ResourceRequest(
            cpu=args.finetune_cpu,
            memory=args.finetune_memory,
            cpu_limit=args.finetune_cpu_limit,
            memory_limit=args.finetune_memory if args.finetune_memory_limit is None else args.finetune_memory_limit,
        ),
        checkpoint_pvc=args.checkpoint_pvc,
        credentials_secret=args.credentials_secret,
        mlflow_secret=args.mlflow_secret,
        config_map=args.config_map,
        image_pull_secrets=(
            CompileOptions().image_pull_secrets if args.image_pull_secret is None else tuple(args.image_pull_secret)
        ),
        cache_ingest=cache_ingest,
    )


# --------------------------------------------------------------------------- local run


@dataclass
class RunSummary:
    """What `cessl run` reports."""

    data_version: str
    git_commit: str
    model_name: str
    model_version: str
    run_id: str
    tracking_uri: str
    rank_map: dict[str, int]
    test_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    aliases: list[str]
    seconds: float
    schedule: str = ""  # e.g. "200 epochs = 400 steps" or "150 steps"
    n_quarantined: int | None = None  # records ingest quarantined (None: not known)
    reused: bool = False  # an identical earlier registration was reused: nothing new registered
    report_uri: str = ""  # the evaluation report (HTML) among the run's artifacts

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ensure_demo_data(data_dir: Path) -> None:
    """Create the demo hospital (``ml.data.dvc.ensure_demo_data``: generated, ``dvc add``-ed)
    when ``data_dir`` holds no WFDB record yet."""
    if data_dir.is_dir() and any(data_dir.rglob("*.hea")):
        return
    from ml.data.dvc import ensure_demo_data as make_demo

    demo = make_demo(data_dir.parent)
    log.info("demo hospital ready in %s (data version %s)", demo.path, demo.version)


def local_params(args: argparse.Namespace, params: PipelineParams, tracking: TrackingConfig) -> PipelineParams:
    """``params`` with the local paths and the data version filled in."""
    state = Path(args.state_dir).absolute()
    source = params.source
    if not source.startswith("s3://"):
        path = Path(source).absolute()
        if source == DEMO_PARAMS.source and not args.no_demo_data:
            ensure_demo_data(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: data folder not found")
        version = read_data_version(path, Path.cwd())
        source, data_version, commit = str(path), version.md5, version.git_commit
    else:  # the S3 objects' own version, never the local data.dvc's
        data_version = args.data_version or source_data_version(source)
        commit = git_commit(Path.cwd())
    return params.replace(
        source=source,
        data_version=args.data_version or data_version,
        git_commit=commit,
        tracking_uri=tracking.tracking_uri,
        checkpoint_root=str(state / "checkpoints"),
        state_dir=str(state),
        cache_dir=args.backbone_cache or "",
    )


def summarise_run(
    tracking: TrackingConfig, run_id: str, version: str, params: PipelineParams, seconds: float
) -> RunSummary:
    import mlflow

    from pipeline.registry.tracking import CHAMPION_PREFIX, TEST_PREFIX

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = tracking.client()
    run = client.get_run(run_id)
    tracking.activate()
    rank_map = mlflow.artifacts.load_dict(f"runs:/{run_id}/rank_map.json")
    mv = client.get_model_version(tracking.model_name, version)
    return RunSummary(
        data_version=run.data.tags.get("data_version", params.data_version),
        git_commit=params.git_commit,
        model_name=tracking.model_name,
        model_version=version,
        run_id=run_id,
        tracking_uri=tracking.tracking_uri,
        rank_map={k: int(v) for k, v in rank_map.items()},
        test_metrics={k.removeprefix(TEST_PREFIX): v for k, v in run.data.metrics.items() if k.startswith(TEST_PREFIX)},
        champion_metrics={
            k.removeprefix(CHAMPION_PREFIX): v for k, v in run.data.metrics.items() if k.startswith(CHAMPION_PREFIX)
        },
        aliases=list(getattr(mv, "aliases", []) or []),
        seconds=seconds,
        schedule=schedule_of(run.data.params, params),
        n_quarantined=_int_or_none(run.data.tags.get("n_quarantined")),
        # log_and_register reuses an earlier identical run: it started before this one did.
        reused=run.info.start_time is not None and run.info.start_time < (time.time() - seconds) * 1000 - 1000,
        report_uri=f"{run.info.artifact_uri.rstrip('/')}/evaluation/report.html" if run.info.artifact_uri else "",
    )


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def schedule_of(logged: dict[str, str], params: PipelineParams) -> str:
    """The schedule a run trained with, from its logged ``train.*`` parameters: ``"200 epochs
    = 400 steps"`` or ``"150 steps"`` (``params``' own words when they are missing)."""
    steps, epochs = logged.get("train.max_steps"), logged.get("train.epochs")
    if steps is None:
        return params.schedule()
    if epochs in (None, "", "None", "null"):
        return f"{steps} steps"
    return f"{epochs} epochs = {steps} steps"


def next_steps(summary: RunSummary) -> list[str]:
    """What to do after a run: look at it in MLflow, read its report, promote it."""
    uri = summary.tracking_uri
    flag = f" --tracking-uri {uri}" if uri else ""
    lines = [f"mlflow ui --backend-store-uri {uri}" if uri else "mlflow ui"]
    if summary.report_uri:
        lines.append(f"evaluation report: {summary.report_uri}")
    if "champion" not in summary.aliases:
        lines.append(f"cessl promote {summary.model_name}{flag}")
    return lines


def print_summary(summary: RunSummary, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from components.allocate_ranks import summarise

    console = console or Console()
    head = Table(title="CE-SSL run", show_header=False)
    head.add_row("data version", Text(summary.data_version))
    head.add_row("git commit", Text(summary.git_commit))
    if summary.n_quarantined is not None:
        head.add_row("quarantined records", str(summary.n_quarantined))
    head.add_row("ranks allocated", Text(summarise(summary.rank_map)))
    head.add_row("schedule", Text(summary.schedule))
    head.add_row("MLflow run", Text(f"{summary.run_id} ({summary.tracking_uri})"))
    aliases = ", ".join(summary.aliases) or "no alias"
    head.add_row(
        "model version",
        Text(f"{summary.model_name} v{summary.model_version} [{aliases}]")
        + (Text(" reused an identical earlier registration", style="yellow") if summary.reused else Text("")),
    )
    head.add_row("wall time", f"{summary.seconds:.0f} s")
    console.print(head)
    if summary.rank_map:
        ranks = Table(title="rank map")
        ranks.add_column("layer")
        ranks.add_column("rank", justify="right")
        for layer, rank in summary.rank_map.items():
            ranks.add_row(Text(layer), str(rank))
        console.print(ranks)
    metrics = Table(title="test metrics")
    metrics.add_column("metric")
    metrics.add_column("challenger", justify="right")
    if summary.champion_metrics:
        metrics.add_column("champion (same split)", justify="right")
    for key, value in sorted(summary.test_metrics.items()):
        row = [escape(key), f"{value:.4f}"]
        if summary.champion_metrics:
            champ = summary.champion_metrics.get(key)
            row.append("" if champ is None else f"{champ:.4f}")
        metrics.add_row(*row)
    console.print(metrics)
    console.print("next:", style="bold")
    for line in next_steps(summary):
        console.print(Text(f"  {line}"), soft_wrap=True)


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


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "sites", None):
        return cmd_run_network(args)
    params = params_from_args(args, DEMO_PARAMS)
    preflight_local(args, params)  # checks only: a bad command line leaves nothing behind
    with project_lock(args):  # then, before any work, one local run of this project at a time
        return _run(args, params)


def _run(args: argparse.Namespace, params: PipelineParams) -> int:
    """``cessl run``'s work, under the project lock, on validated parameters."""
    tracking = TrackingConfig.resolve(
        args.tracking_uri, params.experiment_name, registered_model_name(params.model_name, params.method)
    )
    params = local_params(args, params, tracking)
    prepare_store(tracking)
    log.info(
        "data %s (version %s), schedule %s, MLflow %s",
        params.source,
        params.data_version,
        params.schedule(),
        tracking.tracking_uri,
    )
    from pipeline.dags.spec import finetune_spec, run_local

    start = time.perf_counter()
    outputs = run_local(finetune_spec(), params, local_run_config(args, "last_run.log"))
    seconds = time.perf_counter() - start
    summary = summarise_run(tracking, str(outputs["run_id"]), str(outputs["model_version"]), params, seconds)
    if args.promote:
        from pipeline.cli.registry import run_promote

        run_promote(tracking, args.promote_metric, args.promote_margin, force=False)
        summary.aliases = list(
            getattr(tracking.client().get_model_version(tracking.model_name, summary.model_version), "aliases", [])
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary.to_json(), indent=2, sort_keys=True), encoding="utf-8")
    export_testset(tracking)
    if not args.no_push and "://" not in params.source:
        push_data_version(Path(params.source), params.data_version, Path.cwd())
    print_summary(summary)  # last: it ends with what to do next
    return 0


def testset_pending(tracking: TrackingConfig) -> int:
    """The version of a refreshed test set no run has drawn yet (0 when none is pending)."""
    from pipeline.registry.testsets import REDRAW, current

    pointer = current(tracking.client(), tracking.model_name)
    return pointer.version if pointer is not None and pointer.status == REDRAW else 0


def export_testset(tracking: TrackingConfig) -> None:
    """The model's frozen test set as ``testsets/<model>.json`` here, DVC-tracked (best effort)."""
    from pipeline.registry.testsets import export

    try:
        path = export(tracking.client(), tracking.model_name, Path.cwd())
    except Exception as err:  # the registry holds the set; this file is a copy
        log.warning("frozen test set of %s not written to testsets/: %s", tracking.model_name, err)
        return
    if path is not None:
        log.info("frozen test set of %s: %s", tracking.model_name, path)


# --------------------------------------------------------------------------- network


# The network demo's schedule: three hospitals must train in the time one did (make demo).
NETWORK_DEMO_PARAMS = DEMO_PARAMS.replace(max_steps=40, val_every=20, min_class_count=5, labelled_ratio=0.5)


def network_demo_params(args: argparse.Namespace) -> PipelineParams:
    """`cessl run --sites`'s parameters: a flag left at `cessl run`'s default takes the network
    demo's (:data:`NETWORK_DEMO_PARAMS`: three sites train in the time one does)."""
    params = params_from_args(args, NETWORK_DEMO_PARAMS)
    kept = {
        name: getattr(NETWORK_DEMO_PARAMS, name)
        for name, value in params.arguments().items()
        if value == getattr(DEMO_PARAMS, name) != getattr(NETWORK_DEMO_PARAMS, name)
    }
    return params.replace(**kept)


def network_registry(args: argparse.Namespace, base: PipelineParams, demo: bool = False):
    """The sites of ``--sites`` (``--site`` selects some), validated on ``base``; with ``demo``
    (a local run) the demo's synthetic hospitals are made when ``--sites`` names the missing
    default file."""
    from pipeline.cli.sites import ensure_demo_network, network_params
    from pipeline.core.sites import DEFAULT_SITES_FILE, load_sites

    path = Path(args.sites)
    if demo and not path.exists() and args.sites == DEFAULT_SITES_FILE and not getattr(args, "no_demo_data", False):
        ensure_demo_network(path)
    registry = load_sites(path, base).select(args.site)
    network_params(base, list(registry))
    return registry


def cmd_run_network(args: argparse.Namespace) -> int:
    """`cessl run --sites`: the network locally; the per-site summary and the cross-site matrix."""
    from pipeline.cli.sites import print_network_summary, run_network
    from pipeline.core.sites import DEFAULT_SITES_FILE

    params = network_demo_params(args)
    preflight_local(args, params.replace(source="."))  # the sites' sources: checked per site
    # the demo's hospitals are generated under the lock; any other registry is checked before it
    demo = args.sites == DEFAULT_SITES_FILE and not Path(args.sites).exists()
    registry = None if demo else network_registry(args, params)
    with project_lock(args):
        summary = run_network(args, params, registry or network_registry(args, params, demo=True))
    if args.json:
        Path(args.json).write_text(json.dumps(summary.to_json(), indent=2, sort_keys=True), encoding="utf-8")
    print_network_summary(summary)  # last: it ends with what to do next
    if summary.error and not any(s.status != "failed" for s in summary.sites):
        from pipeline.dags.finetune import PipelineRunError

        raise PipelineRunError(summary.error)
    return 0 if summary.ok else 1


def network_cluster_arguments(args: argparse.Namespace, with_versions: bool = True) -> dict[str, Any]:
    """The network pipeline's arguments for a cluster run: the cluster defaults and the sites
    of ``--sites`` as its list parameter (data versions as listed from here, or "")."""
    from pipeline.cli.sites import data_versions, preflight_sites
    from pipeline.dags.network import network_arguments, site_items
    from pipeline.registry.network_tracking import new_network_id

    params = params_from_args(args, DEFAULTS)
    ready, failed = preflight_sites(network_registry(args, params))  # as a local run: bad folders left out
    if not ready:
        raise FileNotFoundError("; ".join(f"site {f.site}: {f.reason}" for f in failed))
    params = params.replace(
        git_commit=git_commit(Path.cwd()), tracking_uri=args.tracking_uri or "", checkpoint_root=args.checkpoint_root
    )
    versions = data_versions(ready, Path.cwd()) if with_versions else {}
    items = site_items(ready, params, data_versions=versions)
    arguments = network_arguments(params, items, "" if not with_versions else new_network_id())
    return {k: v for k, v in arguments.items() if v != "" or k not in LOCAL_ONLY}


# --------------------------------------------------------------------------- cluster


def warn_synthetic_backbone(backbone: str, what: str) -> bool:
    """Warn loudly when a cluster run would fine-tune on the embedded synthetic backbone
    (``backbone`` "default"); the resolve_backbone step warns again in its log. True if warned."""
    from components.backbone import SYNTHETIC_BACKBONE_WARNING

    if backbone not in ("", "default"):
        return False
    log.warning("%s: %s", what, SYNTHETIC_BACKBONE_WARNING)
    return True


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.dags.spec import compile_spec, finetune_spec, network_spec

    warn_synthetic_backbone(DEFAULTS.backbone, "the compiled pipeline's default backbone parameter")
    if args.sites:
        from pipeline.dags.network import NetworkSettings, site_items

        items = site_items(list(network_registry(args, DEFAULTS)), DEFAULTS)  # the default list parameter
        spec = network_spec(NetworkSettings(sites=tuple(items)))
        output = Path(args.output if args.output != DEFAULT_PACKAGE else spec.package)
        path = compile_spec(spec, output, compile_options(args), sites_file=args.sites)
        log.info("wrote %s (network of %d sites; a run passes its own `sites`)", path, len(items))
        return 0
    path = compile_spec(finetune_spec(), Path(args.output), compile_options(args))
    log.info("wrote %s", path)
    return 0


def cluster_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Pipeline arguments for a cluster run (the cluster defaults, no local paths)."""
    params = params_from_args(args, DEFAULTS)
    data_version = args.data_version or source_data_version(params.source, Path.cwd())
    arguments = params.replace(
        data_version=data_version,
        git_commit=git_commit(Path.cwd()),
        tracking_uri=args.tracking_uri or "",
        checkpoint_root=args.checkpoint_root,
    ).arguments()
    # Unset local-only settings keep the compiled defaults (e.g. checkpoint_root on the PVC).
    return {k: v for k, v in arguments.items() if v != "" or k not in LOCAL_ONLY}


def kfp_client(args: argparse.Namespace):
    """The KFP client for ``--host`` / ``--namespace``, authenticated as ``--kfp-auth`` says."""
    from pipeline.dags.kfp_auth import make_client, resolve_auth

    return make_client(args.host, args.namespace, resolve_auth(args.kfp_auth, args.kfp_token_file))


def cluster_target(args: argparse.Namespace) -> ClusterTarget:
    """Where ``submit`` / ``schedule`` send a run: ``--host``, ``--kfp-experiment``,
    ``--namespace``, ``--service-account``, ``--no-cache`` (``pipeline.dags.spec.ClusterTarget``)."""
    from pipeline.dags.spec import ClusterTarget

    return ClusterTarget(
        client=kfp_client(args),
        host=args.host,
        experiment=args.kfp_experiment,
        namespace=args.namespace,
        service_account=args.service_account,
        caching=not args.no_cache,
    )


def cluster_run(args: argparse.Namespace, arguments: dict[str, Any], options: CompileOptions) -> ClusterRun:
    """What ``submit`` / ``schedule`` send: ``arguments``, and ``--package`` or the pipeline
    compiled with ``options`` under ``--pipeline-root`` (``pipeline.dags.spec.ClusterRun``)."""
    from pipeline.core.sites import DEFAULT_SITES_FILE
    from pipeline.dags.spec import ClusterRun

    return ClusterRun(
        arguments=arguments,
        options=options,
        folder=Path(args.pipeline_root),
        package=Path(args.package) if args.package else None,
        sites_file=getattr(args, "sites", None) or DEFAULT_SITES_FILE,
    )


def cluster_request(args: argparse.Namespace, recurring: bool) -> tuple[PipelineSpec, ClusterTarget, ClusterRun]:
    """The spec, target and run of ``submit`` (``recurring`` False) or ``schedule``, with or
    without ``--sites``, every parameter checked before the server is asked. A recurring run
    lists its source again each time: its data version is the data found at run time (a
    network's: a fresh network id too)."""
    from pipeline.cli.preflight import check_kfp_host
    from pipeline.dags.spec import finetune_spec, network_spec

    params = params_from_args(args, DEFAULTS)  # every parameter valid before the server is asked
    if args.sites:
        network_registry(args, params)  # the sites valid, too
    check_kfp_host(args.host)
    warn_synthetic_backbone(params.backbone, "every run of this schedule" if recurring else "this run")
    if args.sites:
        spec = network_spec()
        arguments = network_cluster_arguments(args, with_versions=not recurring)
        # a site whose version is unknown here (S3 not listable) is listed again by its ingest
        known = all(item.get("data_version") for item in arguments["sites"])
    else:
        spec = finetune_spec()
        arguments = cluster_arguments(args)
        if recurring:
            arguments["data_version"] = ""
        # Unknown data version (an S3 source this machine cannot list): ingest must list it again.
        known = bool(arguments.get("data_version"))
    return spec, cluster_target(args), cluster_run(args, arguments, compile_options(args, cache_ingest=known))


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.dags.spec import submit

    spec, target, run = cluster_request(args, recurring=False)
    submit(spec, target, run, args.run_name or "")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipeline.dags.spec import schedule

    spec, target, run = cluster_request(args, recurring=True)
    schedule(spec, target, run, args.job_name, args.cron)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    if args.sites:
        return cmd_retrain_network(args)
    params = params_from_args(args, DEFAULTS if args.host else DEMO_PARAMS)
    if args.host:
        from pipeline.cli.preflight import check_kfp_host, check_tracking

        check_kfp_host(args.host)
        check_tracking(args.tracking_uri, writes=False, create=args.create_store)
        return _retrain(args, params)
    preflight_local(args, params)
    with project_lock(args):
        return _retrain(args, params)


def _retrain(args: argparse.Namespace, params: PipelineParams) -> int:
    from pipeline.registry.policy import champion_data_version

    tracking = TrackingConfig.resolve(
        args.tracking_uri, params.experiment_name, registered_model_name(params.model_name, params.method)
    )
    if "://" not in params.source and not Path(params.source).is_dir():
        raise FileNotFoundError(f"{Path(params.source).absolute()}: data folder not found")
    current = args.data_version or source_data_version(params.source, Path.cwd())
    if not current:
        raise ValueError(
            f"cannot tell the data version of {params.source} (see the warning above); pass --data-version"
        )
    trained_on = champion_data_version(tracking.client(), tracking.model_name)
    pending = testset_pending(tracking)
    if pending:
        log.info("%s: test set v%d was refreshed and waits for a run: retraining", tracking.model_name, pending)
    elif trained_on == current:
        log.info(
            "the champion of %s was trained on data version %s already: nothing to retrain",
            tracking.model_name,
            current,
        )
        return 0
    else:
        log.info("data version %s differs from the champion's (%s): retraining", current, trained_on or "no champion")
    if args.host:
        return cmd_submit(args)
    return _run(args, params)


def cmd_retrain_network(args: argparse.Namespace) -> int:
    """`cessl retrain --sites`: the network run (or submission) of only the sites whose data
    changed since their champion (``pipeline.registry.policy.changed_sites``)."""
    from pipeline.registry.store import TrackingConfig

    params = params_from_args(args, DEFAULTS if args.host else NETWORK_DEMO_PARAMS)
    if not args.host:
        preflight_local(args, params.replace(source="."))
    registry = network_registry(args, params)
    tracking = TrackingConfig.resolve(args.tracking_uri, params.experiment_name)
    from pipeline.dags.network import site_item
    from pipeline.registry.policy import changed_sites

    changes = changed_sites(
        tracking.client(),
        registry,
        lambda site: site_item(site, params)["model_name"],
        lambda source: source_data_version(source, Path.cwd()),
    )
    for change in changes:
        log.info("%s: %s", change.site, change.reason or f"champion trained on {change.trained_on} already")
    names = [change.site for change in changes if change.changed]
    if not names:
        log.info("no site's data changed since its champion: nothing to retrain")
        return 0
    log.info("retraining %d of %d sites: %s", len(names), len(registry), ", ".join(names))
    args.site = names
    if args.host:
        return cmd_submit(args)
    return cmd_run_network(args)


# --------------------------------------------------------------------------- parsers


def _add_sites(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        default=None,
        metavar="FILE",
        help="a hospital network's site registry (sites.yaml): one adapter per site, one run",
    )
    parser.add_argument(
        "--site", action="append", default=None, metavar="NAME", help="with --sites: only this site (repeatable)"
    )


def _add_site_parallelism(parser: argparse.ArgumentParser) -> None:
    # 1: the sites one after another. Two kfp.local tasks ending at the same moment have been
    # seen to abort at interpreter exit ("terminate called without an active exception")
    # on 2 shared cores; and in parallel they gain little on 2 cores.
    parser.add_argument(
        "--site-parallelism",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="with --sites: sites trained at once by the local run (0: no limit; default: %(default)s)",
    )


def _optional(check):
    """``check`` for a set value; '' (unset) stays ''."""

    def convert(text: str):
        return check(text) if text else ""

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def _add_tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        type=tracking_uri,
        default="",
        help=f"MLflow tracking URI (default: ${TRACKING_URI_ENV} or sqlite:///./mlflow.db)",
    )
    parser.add_argument(
        "--create-store",
        action="store_true",
        help="create a new sqlite MLflow store at --tracking-uri (default: only ./mlflow.db is created)",
    )
    parser.add_argument("--data-version", default="", help="override the data version (default: from the .dvc file)")


def _add_local(parser: argparse.ArgumentParser, registry: bool = True) -> None:
    """Options of a local run (``registry``: also the champion gate's)."""
    parser.add_argument(
        "--pipeline-root", type=output_root, default="local_outputs", help="task outputs and the task cache"
    )
    parser.add_argument(
        "--state-dir",
        type=output_root,
        default=str(STATE_DIR),
        help="checkpoints and incremental ingest/preprocess state",
    )
    parser.add_argument(
        "--backbone-cache",
        default="",
        help="cache of the embedded default backbone (default: $CESSL_CACHE/backbones or ~/.cache/cessl/backbones)",
    )
    parser.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="kfp.local runner: this environment, or the project image on Docker",
    )
    parser.add_argument(
        "--image", type=image, default=None, help="component image (--runner docker, and compiled pipelines)"
    )
    parser.add_argument("--no-cache", action="store_true", help="run every step again")
    parser.add_argument("--no-demo-data", action="store_true", help="never create the demo hospital")
    parser.add_argument(
        "--show-task-logs", action="store_true", help="stream the tasks' output (default: <pipeline-root>/last_run.log)"
    )
    parser.add_argument(
        "--json", type=_optional(output_file), default="", metavar="PATH", help="also write the summary as JSON"
    )
    parser.add_argument(
        "--wait-lock",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another local run of this project to finish (default: fail at once)",
    )
    if not registry:
        return
    parser.add_argument(
        "--no-push", action="store_true", help="do not `dvc push` the data version to the default DVC remote"
    )
    parser.add_argument("--promote", action="store_true", help="run the champion gate after registering")
    parser.add_argument("--promote-metric", default="macro_f_beta", choices=GATE_METRICS)
    parser.add_argument("--promote-margin", type=non_negative_float, default=0.0)


def _add_cluster(parser: argparse.ArgumentParser, host_required: bool = True) -> None:
    parser.add_argument(
        "--host", type=http_url, required=host_required, default=None, help="Kubeflow Pipelines endpoint URL"
    )
    parser.add_argument(
        "--namespace",
        type=_optional(k8s_name),
        default=None,
        help="KFP namespace: a multi-user install's Profile namespace (e.g. kubeflow-user-example-com)",
    )
    parser.add_argument(
        "--service-account",
        type=_optional(k8s_name),
        default=None,
        help="ServiceAccount the run's pods use (default: KFP's, pipeline-runner or the Profile's default-editor)",
    )
    parser.add_argument(
        "--kfp-auth",
        choices=KFP_AUTH_MODES,
        default="auto",
        help="token: $KF_PIPELINES_TOKEN or --kfp-token-file; service-account: the pod's projected token "
        "($KF_PIPELINES_SA_TOKEN_PATH); none; auto (default): the first of these that is set",
    )
    parser.add_argument(
        "--kfp-token-file",
        type=existing_file,
        default=None,
        metavar="PATH",
        help="file holding the KFP bearer token (never pass a token itself as a flag)",
    )
    parser.add_argument("--kfp-experiment", default="cessl", help="KFP experiment")
    parser.add_argument(
        "--package", type=existing_file, default=None, help="compiled pipeline YAML (default: compile now)"
    )
    parser.add_argument("--checkpoint-root", default="", help="checkpoint root inside the pod (e.g. /mnt/checkpoints)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the pipeline locally (kfp.local) and print a summary")
    add_param_flags(run, DEMO_PARAMS)
    _add_tracking(run)
    _add_local(run)
    _add_sites(run)
    _add_site_parallelism(run)
    run.set_defaults(func=cmd_run)

    comp = subparsers.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    comp.add_argument("-o", "--output", type=output_file, default=DEFAULT_PACKAGE)
    add_compile_flags(comp)
    _add_sites(comp)
    comp.set_defaults(func=cmd_compile)

    for name, func, text in (
        ("submit", cmd_submit, "submit one run to Kubeflow Pipelines"),
        ("schedule", cmd_schedule, "create a KFP recurring run (retraining)"),
    ):
        sub = subparsers.add_parser(name, help=text)
        add_param_flags(sub, DEFAULTS)
        _add_tracking(sub)
        _add_cluster(sub)
        add_compile_flags(sub)
        sub.add_argument(
            "--pipeline-root", type=output_root, default=str(STATE_DIR), help="where the compiled YAML is written"
        )
        sub.add_argument("--no-cache", action="store_true")
        _add_sites(sub)
        if name == "submit":
            sub.add_argument("--run-name", default=None)
        else:
            sub.add_argument(
                "--cron", type=cron, required=True, help="cron expression, 5 or 6 fields (KFP: with seconds)"
            )
            sub.add_argument("--job-name", default="cessl-retrain")
        sub.set_defaults(func=func)

    retrain = subparsers.add_parser(
        "retrain",
        help="run the pipeline if the data changed since the champion",
        description="Parameters default to `cessl run`'s (the demo's), or with --host to `cessl submit`'s.",
    )
    add_param_flags(retrain, None)
    _add_tracking(retrain)
    _add_local(retrain)
    _add_cluster(retrain, host_required=False)
    add_compile_flags(retrain, with_image=False)
    retrain.add_argument("--run-name", default=None)
    _add_sites(retrain)
    _add_site_parallelism(retrain)
    retrain.set_defaults(func=cmd_retrain)
