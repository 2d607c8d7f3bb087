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
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli.local import local_run_config, preflight_local, prepare_store, project_lock
from pipeline.cli.options import given
from pipeline.cli.verbs import DEFAULT_PACKAGE
from pipeline.core.logsafe import redact
from pipeline.core.params import (
    DEFAULTS,
    DEMO_PARAMS,
    LOCAL_ONLY,
    PipelineParams,
    params_from_args,
)
from pipeline.dags.finetune import (
    CompileOptions,
    ResourceRequest,
    Toleration,
)
from pipeline.registry.lineage import git_commit, push_data_version, read_data_version, source_data_version
from pipeline.registry.policy import registered_model_name
from pipeline.registry.store import TrackingConfig
from pipeline.registry.tracking import candidates_model_name

if TYPE_CHECKING:
    from pipeline.dags.spec import ClusterRun, ClusterTarget, PipelineSpec

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- arguments


def compile_options(args: argparse.Namespace, cache_ingest: bool = True) -> CompileOptions:
    """The cluster settings of :func:`pipeline.cli.options.add_cluster_settings` (an unset
    flag keeps :class:`CompileOptions`' default)."""
    defaults = CompileOptions()
    selector = {}
    for item in args.node_selector:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--node-selector {item!r}: expected KEY=VALUE")
        selector[key] = value
    tolerations = (
        defaults.tolerations if args.toleration is None else tuple(Toleration.parse(t) for t in args.toleration)
    )
    return CompileOptions(
        image=args.image or defaults.image,
        accelerator_type="" if args.no_gpu else args.accelerator_type,
        accelerator_limit=args.accelerator_limit,
        node_selector=selector,
        tolerations=tolerations,
        finetune_resources=ResourceRequest(
            cpu=args.finetune_cpu,
            memory=args.finetune_memory,
            cpu_limit=given(args.finetune_cpu_limit, defaults.finetune_resources.cpu_limit),
            memory_limit=args.finetune_memory if args.finetune_memory_limit is None else args.finetune_memory_limit,
        ),
        checkpoint_pvc=given(args.checkpoint_pvc, defaults.checkpoint_pvc),
        credentials_secret=given(args.credentials_secret, defaults.credentials_secret),
        mlflow_secret=given(args.mlflow_secret, defaults.mlflow_secret),
        config_map=given(args.config_map, defaults.config_map),
        image_pull_secrets=(
            defaults.image_pull_secrets if args.image_pull_secret is None else tuple(args.image_pull_secret)
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
    gate_warning: str = ""  # the split's power check when the test part is too small for the gate
    n_test: int | None = None  # test records the metrics (and their intervals) are over (None: not known)

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

    client = tracking.client()
    run = client.get_run(run_id)
    tracking.activate()
    rank_map = mlflow.artifacts.load_dict(f"runs:/{run_id}/rank_map.json")
    mv = client.get_model_version(candidates_model_name(tracking.model_name), version)  # the pipeline's version
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
        gate_warning=gate_warning(run.data.tags),
        n_test=records_tested(run.data.params),
    )


def records_tested(logged: Mapping[str, str]) -> int | None:
    """The size of the test split a run was evaluated on (its ``split_sizes`` parameter), or None."""
    try:
        return int(json.loads(logged["split_sizes"])["test"])
    except (KeyError, TypeError, ValueError):
        return None


def gate_warning(tags: dict[str, str]) -> str:
    """The split's power check (run tag ``gate_power``) when the test part is too small for
    the champion gate to decide; "" when it suffices or was not recorded."""
    from ml.eval.power import PowerCheck
    from pipeline.registry.policy import TAG_GATE_POWER

    try:
        check = PowerCheck.from_json(json.loads(tags[TAG_GATE_POWER]))
    except (KeyError, TypeError, ValueError):
        return ""
    return "" if check.sufficient else f"cannot decide: {check.describe()}"


def _int_or_none(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def schedule_of(logged: dict[str, str], params: PipelineParams) -> str:
    """The schedule a run trained with, from its logged ``train.*`` parameters: ``"200 epochs
    = 400 steps"``, ``"150 steps"`` or ``"no gradient step"`` (``head-only``); ``params``' own
    words when they are missing."""
    from ml.train.methods import METHODS, NO_GRADIENT_STEP

    method = METHODS.get(logged.get("train.method", ""))
    if method is not None and method.fits_head_only:
        return NO_GRADIENT_STEP
    steps, epochs = logged.get("train.max_steps"), logged.get("train.epochs")
    if steps is None:
        return params.schedule()
    if epochs in (None, "", "None", "null"):
        return f"{steps} steps"
    return f"{epochs} epochs = {steps} steps"


def next_steps(summary: RunSummary) -> list[str]:
    """What to do after a run: look at it in MLflow, read its report, promote it (commands
    spelled so that they run from here: :func:`pipeline.cli.shell.runnable`)."""
    from pipeline.cli.shell import runnable, shell_uri

    uri = shell_uri(summary.tracking_uri)
    flag = f" --tracking-uri {uri}" if summary.tracking_uri else ""
    lines = [runnable(f"mlflow ui --backend-store-uri {uri}" if summary.tracking_uri else "mlflow ui")]
    if summary.report_uri:
        lines.append(f"evaluation report: {summary.report_uri}")
    if "champion" not in summary.aliases:
        from pipeline.registry.signing import KEYGEN_HINT, has_signing_key

        if not has_signing_key():
            lines.append(runnable(KEYGEN_HINT))
        lines.append(runnable(f"cessl promote {shlex.quote(summary.model_name)}{flag}"))
    return lines


def summary_fields(summary: RunSummary) -> list[tuple[str, Any]]:
    """The run summary's ``label, value`` rows; every ID whole."""
    from rich.text import Text

    from components.allocate_ranks import summarise

    aliases = ", ".join(summary.aliases) or "no alias"
    version = Text(f"{summary.model_name} v{summary.model_version} [{aliases}]")
    if summary.reused:
        version += Text(" reused an identical earlier registration", style="yellow")
    rows: list[tuple[str, Any]] = [("data version", summary.data_version), ("git commit", summary.git_commit)]
    if summary.n_quarantined is not None:
        rows.append(("quarantined records", summary.n_quarantined))
    rows += [
        ("ranks allocated", summarise(summary.rank_map)),
        ("schedule", summary.schedule),
        ("MLflow run", summary.run_id),
        ("tracking URI", redact(summary.tracking_uri)),
        ("model version", version),
        ("wall time", f"{summary.seconds:.0f} s"),
    ]
    if summary.gate_warning:
        rows.append(("champion gate", Text(summary.gate_warning, style="bold yellow")))
    return rows


SUMMARY_DIGITS = 3  # two models' "0.432 [0.210, 0.601]" and the longest metric name fit 80 columns


def print_summary(summary: RunSummary, console=None) -> None:
    """The run's IDs, its rank map, its test metrics and what to do next; fits 80 columns
    without cutting an ID (:mod:`pipeline.cli.render`)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from ml.eval.intervals import BOUNDS, interval_text
    from ml.eval.metrics import MACRO_CONVENTION
    from pipeline.cli.render import print_fields

    console = console or Console()
    print_fields(console, "CE-SSL run", summary_fields(summary))
    if summary.rank_map:
        ranks = Table(title="rank map")
        ranks.add_column("layer", no_wrap=True)
        ranks.add_column("rank", justify="right")
        for layer, rank in summary.rank_map.items():
            ranks.add_row(Text(layer), str(rank))
        console.print(ranks)
    records = f"{summary.n_test} test records" if summary.n_test is not None else "the test records"
    metrics = Table(title=f"test metrics [95% jackknife-t interval over {records}]", caption=MACRO_CONVENTION)
    metrics.add_column("metric", overflow="fold")  # a long name folds rather than lose its end
    metrics.add_column("challenger", justify="right", no_wrap=True)
    if summary.champion_metrics:
        metrics.add_column("champion (same split)", justify="right", no_wrap=True)
    for key in sorted(k for k in summary.test_metrics if not k.endswith(BOUNDS)):
        row = [escape(key), interval_text(summary.test_metrics, key, SUMMARY_DIGITS)]
        if summary.champion_metrics:
            champion = summary.champion_metrics
            row.append(interval_text(champion, key, SUMMARY_DIGITS) if key in champion else "")
        metrics.add_row(*row)
    console.print(metrics)
    console.print("next:", style="bold")
    for line in next_steps(summary):
        console.print(Text(f"  {line}"), soft_wrap=True)


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
            getattr(
                tracking.client().get_model_version(candidates_model_name(tracking.model_name), summary.model_version),
                "aliases",
                [],
            )
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

    pointer = current(tracking.client(), candidates_model_name(tracking.model_name))
    return pointer.version if pointer is not None and pointer.status == REDRAW else 0


def export_testset(tracking: TrackingConfig) -> None:
    """The model's frozen test set as ``testsets/<model>.json`` here, DVC-tracked (best effort)."""
    from pipeline.registry.testsets import export

    try:
        path = export(tracking.client(), candidates_model_name(tracking.model_name), Path.cwd())
    except Exception as err:  # the registry holds the set; this file is a copy
        log.warning("frozen test set of %s not written to testsets/: %s", tracking.model_name, err)
        return
    if path is not None:
        log.info("frozen test set of %s: %s", tracking.model_name, path)


# --------------------------------------------------------------------------- network


# The network demo's schedule: three hospitals must train in the time one did (make demo).
NETWORK_DEMO_PARAMS = DEMO_PARAMS.replace(
    max_steps=40, val_every=20, min_class_count=5, labelled_ratio=0.5, test_ratio=0.4
)


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
    from pipeline.registry.policy import champion_data_version, drift_since_champion

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
    retrains = bool(pending) or trained_on != current
    log_drift(tracking.model_name, drift_since_champion(tracking.client(), tracking.model_name), retrains)
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


def log_drift(where: str, drift: str, retrains: bool) -> None:
    """What ``cessl retrain`` says of the monitor's drift reports since a champion (``drift``)."""
    if not drift:
        return
    if retrains:
        log.info("%s: %s; this retraining answers it", where, drift)
    else:
        log.warning(
            "%s: %s; its data is unchanged, so retraining would reproduce the champion: add the recent records "
            "(`cessl data add`, labelled where possible: they also serve as unlabelled data) and retrain",
            where,
            drift,
        )


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
        log_drift(change.site, change.drift, change.changed)
    names = [change.site for change in changes if change.changed]
    if not names:
        log.info("no site's data changed since its champion: nothing to retrain")
        return 0
    log.info("retraining %d of %d sites: %s", len(names), len(registry), ", ".join(names))
    args.site = names
    if args.host:
        return cmd_submit(args)
    return cmd_run_network(args)
