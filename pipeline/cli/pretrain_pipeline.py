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

from pipeline.cli.options import given
from pipeline.core.pretrain_params import (
    DEFAULTS,
    LOCAL_DEFAULTS,
    LOCAL_ONLY,
    PretrainParams,
    params_from_args,
)
from pipeline.dags.finetune import CompileOptions, ResourceRequest

log = logging.getLogger(__name__)


def pretrain_compile_options(args: argparse.Namespace, checkpoint_pvc: str) -> CompileOptions:
    """The compile options of ``cessl-pretrain`` (no accelerator on any step: the GPUs are the TrainJob's;
    an unset flag keeps :class:`CompileOptions`' default)."""
    defaults = CompileOptions()
    return CompileOptions(
        image=args.image or defaults.image,
        accelerator_type="",
        tolerations=(),
        step_resources=ResourceRequest(cpu=args.step_cpu, memory=args.step_memory),
        checkpoint_pvc=checkpoint_pvc,
        credentials_secret=given(args.credentials_secret, defaults.credentials_secret),
        config_map=given(args.config_map, defaults.config_map),
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
    from pipeline.cli.shell import runnable

    print(f"next: {runnable(f'cessl run --backbone {uri} --backbone-config {params.backbone_config}')}")
    return 0
