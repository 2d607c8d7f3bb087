"""``cessl backbone pipeline compile | submit | run``: the pre-training pipeline ``cessl-pretrain``.

The same three verbs as the fine-tune pipeline's (``cessl compile | submit | run``), under
``backbone`` because what they make is a registered backbone:

- ``compile``: the IR YAML (the steps' image, the checkpoint volume, Secret and ConfigMap
  are compile options; the TrainJob's shape is a set of pipeline parameters, see
  :mod:`pipeline.dags.pretrain`).
- ``submit``: one run on a Kubeflow Pipelines endpoint (``--nodes``, ``--nproc-per-node``,
  ``--gpus-per-node``, ... as run arguments); the cluster defaults of
  :data:`pipeline.core.pretrain_params.DEFAULTS` (backend ``cluster``).
- ``run``: the whole DAG here with ``kfp.local``; the job runs on this machine (backend
  ``local``: one node, ``--nproc-per-node`` processes), the backbone is registered in the
  local MLflow store unless ``--tracking-uri`` / ``$MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.core.constraints import image, non_negative_int, output_file, output_root, quantity
from pipeline.core.pretrain_params import (
    DEFAULTS,
    LOCAL_DEFAULTS,
    LOCAL_ONLY,
    PretrainParams,
    add_pretrain_flags,
    params_from_args,
)
from pipeline.dags.finetune import CompileOptions, ResourceRequest

log = logging.getLogger(__name__)

PRETRAIN_PACKAGE = "cessl_pretrain.yaml"


def add_pipeline_commands(backbone_sub: argparse._SubParsersAction) -> None:
    """``cessl backbone pipeline ...`` (added to ``cessl backbone``'s actions)."""
    from pipeline.cli.run import STATE_DIR, _add_cluster, _add_local, _add_tracking

    parser = backbone_sub.add_parser(
        "pipeline",
        help="the pre-training pipeline cessl-pretrain: compile, submit, run",
        description="Ingest + preprocess a source corpus, pre-train a backbone (a Kubeflow Trainer TrainJob "
        "on a cluster), register it in MLflow as cessl-backbone-<config>.",
    )
    sub = parser.add_subparsers(dest="pipeline_command", required=True, metavar="VERB")

    comp = sub.add_parser("compile", help="compile cessl-pretrain to KFP IR YAML")
    comp.add_argument("-o", "--output", type=output_file, default=PRETRAIN_PACKAGE)
    _add_compile_flags(comp, with_pvc=True)
    comp.set_defaults(func=cmd_compile)

    submit = sub.add_parser("submit", help="submit one pre-training run to Kubeflow Pipelines")
    add_pretrain_flags(submit, DEFAULTS)
    _add_tracking(submit)
    _add_cluster(submit)
    _add_compile_flags(submit, with_pvc=False)  # the volume: --checkpoint-pvc, a pipeline parameter
    submit.add_argument(
        "--pipeline-root", type=output_root, default=str(STATE_DIR), help="where the compiled YAML is written"
    )
    submit.add_argument("--no-cache", action="store_true")
    submit.add_argument("--run-name", default=None)
    submit.set_defaults(func=cmd_submit)

    run = sub.add_parser("run", help="run cessl-pretrain locally (kfp.local) and register the backbone")
    add_pretrain_flags(run, LOCAL_DEFAULTS)
    _add_tracking(run)
    _add_local(run, registry=False)
    run.set_defaults(func=cmd_run)


def _add_compile_flags(parser: argparse.ArgumentParser, with_pvc: bool) -> None:
    group = parser.add_argument_group("cluster settings of the pipeline's own steps (compile time)")
    defaults = CompileOptions()
    if "--image" not in parser._option_string_actions:
        group.add_argument(
            "--image", type=image, default=None, help="steps' image, and the TrainJob's unless --trainer-image"
        )
    if with_pvc:
        group.add_argument(
            "--checkpoint-pvc",
            default=DEFAULTS.checkpoint_pvc,
            help="claim the launch step and the TrainJob share, mounted at /workspace "
            "('' for none: backend local only; a run may name another claim; default: %(default)s)",
        )
    group.add_argument(
        "--credentials-secret",
        default=defaults.credentials_secret,
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for ingest and register ('' for none)",
    )
    group.add_argument(
        "--config-map", default=defaults.config_map, help="ConfigMap with the MLflow / S3 endpoints ('' for none)"
    )
    group.add_argument("--step-cpu", type=quantity, default="1", help="CPU request of each step's pod")
    group.add_argument("--step-memory", type=quantity, default="4Gi", help="memory request of each step's pod")
    group.add_argument(
        "--retries",
        type=non_negative_int,
        default=2,
        help="retries of the launch step (the job resumes from its checkpoint)",
    )


def pretrain_compile_options(args: argparse.Namespace, checkpoint_pvc: str) -> CompileOptions:
    """The compile options of ``cessl-pretrain`` (no accelerator on any step: the GPUs are the TrainJob's)."""
    return CompileOptions(
        image=args.image or CompileOptions().image,
        accelerator_type="",
        tolerations=(),
        step_resources=ResourceRequest(cpu=args.step_cpu, memory=args.step_memory),
        checkpoint_pvc=checkpoint_pvc,
        credentials_secret=args.credentials_secret,
        config_map=args.config_map,
        finetune_retries=args.retries,
    )


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.dags.spec import compile_spec, pretrain_spec

    defaults = DEFAULTS.replace(checkpoint_pvc=args.checkpoint_pvc)  # validated: a claim name or ''
    options = pretrain_compile_options(args, args.checkpoint_pvc)
    path = compile_spec(pretrain_spec(defaults), Path(args.output), options)
    log.info("wrote %s", path)
    return 0


def cluster_arguments(args: argparse.Namespace, params: PretrainParams) -> dict[str, Any]:
    """The pipeline's arguments for a cluster run: no local paths (unset local-only values keep
    the compiled defaults, e.g. checkpoint_root on the volume's mount; an unset
    ``--trainer-image`` keeps the compiled one, the pipeline's image)."""
    from pipeline.registry.lineage import git_commit, source_data_version

    arguments = params.replace(
        data_version=args.data_version or source_data_version(params.source, Path.cwd()),
        git_commit=git_commit(Path.cwd()),
        tracking_uri=args.tracking_uri or "",
        checkpoint_root=args.checkpoint_root,
    ).arguments()
    # '' keeps the compiled default: the local-only paths, and the TrainJob's image (the package's)
    return {k: v for k, v in arguments.items() if v != "" or k not in (*LOCAL_ONLY, "trainer_image")}


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_kfp_host
    from pipeline.cli.run import cluster_run, cluster_target
    from pipeline.dags.spec import pretrain_spec, submit

    params = params_from_args(args, DEFAULTS)  # every parameter valid before the server is asked
    options = pretrain_compile_options(args, params.checkpoint_pvc)
    check_kfp_host(args.host)
    run = cluster_run(args, cluster_arguments(args, params), options)
    log.info("pre-training %s", params.describe())
    submit(pretrain_spec(), cluster_target(args), run, args.run_name or "")
    return 0


def local_params(args: argparse.Namespace, params: PretrainParams, tracking_uri: str) -> PretrainParams:
    """``params`` with the local paths, the data version and the commit filled in."""
    from pipeline.registry.lineage import git_commit, read_data_version, source_data_version

    state = Path(args.state_dir).absolute()
    source = params.source
    if "://" not in source:
        path = Path(source).absolute()
        source, version = str(path), args.data_version or read_data_version(path, Path.cwd()).md5
    else:
        version = args.data_version or source_data_version(source)
    return params.replace(
        source=source,
        data_version=version,
        git_commit=git_commit(Path.cwd()),
        tracking_uri=tracking_uri,
        checkpoint_root=str(state / "checkpoints"),
        state_dir=str(state),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_records_folder
    from pipeline.cli.run import local_run_config, preflight_local, prepare_store, project_lock
    from pipeline.dags.spec import pretrain_spec, run_local
    from pipeline.registry.backbones import BACKBONE_EXPERIMENT
    from pipeline.registry.store import TrackingConfig

    params = params_from_args(args, LOCAL_DEFAULTS)
    if params.backend == "cluster":
        raise ValueError("--backend cluster: a local run launches its job here (local or docker); use `submit`")
    preflight_local(args)  # the tracking store (and Docker for --runner docker), before any work
    if params.backend == "docker":  # the job's nodes are containers on this machine
        from pipeline.cli.preflight import check_docker

        check_docker()
    if "://" not in params.source:
        if not Path(params.source).is_dir():
            raise FileNotFoundError(f"--source {Path(params.source).absolute()}: folder not found")
        check_records_folder(Path(params.source))
    with project_lock(args):
        tracking = TrackingConfig.resolve(args.tracking_uri, BACKBONE_EXPERIMENT)
        params = local_params(args, params, tracking.tracking_uri)
        prepare_store(tracking)
        log.info("pre-training %s on %s (data version %s)", params.describe(), params.source, params.data_version)
        start = time.perf_counter()
        outputs = run_local(pretrain_spec(params), params, local_run_config(args, "last_pretrain.log"))
    uri = f"models:/{outputs['model_name']}/{outputs['model_version']}"
    print(f"registered backbone {uri} (MLflow run {outputs['run_id']}, {time.perf_counter() - start:.0f} s)")
    print(f"next: cessl run --backbone {uri} --backbone-config {params.backbone_config}")
    return 0
