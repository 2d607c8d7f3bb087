"""The pre-training pipeline ``cessl-pretrain``: compiled, or run locally.

    validate -> ingest -> preprocess -> pretrain (TrainJob: N nodes x M GPUs) -> register-backbone
                                         |  waits with a timeout, streams the job's logs
                                         +- shared checkpoint volume: store copy, checkpoints, backbone

Ingest and preprocess are the fine-tune pipeline's own steps (``pipeline.dags.finetune.add_data``):
the source corpus becomes one dataset store. The launch step (``pretrain``) hands it to
the pre-training job (``components.pretrain.launch_step``): a Kubeflow Trainer TrainJob
(``backend`` ``cluster``, or ``docker`` for the SDK's local container backend) or, for a
local run, a child process (``local``). The last step registers the backbone in MLflow as a
version of ``cessl-backbone-<config>`` (``pipeline.registry.backbones``), exactly as
``cessl backbone pretrain --register`` does; a fine-tune run then takes it as
``--backbone models:/cessl-backbone-<config>/<version>``.

Parameters and compile options: the job's shape and placement (``nodes``,
``nproc_per_node``, ``gpus_per_node``, ``cpu_per_node``, ``memory_per_node``,
``trainer_image``, ``runtime``, ``namespace``, ``timeout_s``, ``checkpoint_pvc``) are
pipeline parameters (:class:`pipeline.core.pretrain_params.PretrainParams`): the launch step
reads them at run time and puts them on the TrainJob, so one compiled pipeline serves any
cluster size. KFP fixes at compile time what it places on the pipeline's *own* pods
(:class:`pipeline.dags.finetune.CompileOptions`): the image of every step (and the default of
``trainer_image``), the steps' CPU / memory requests, the credentials Secret (ingest,
register), the endpoints ConfigMap, caching, the launch step's retries, and whether the
launch step mounts the checkpoint volume at all (``CompileOptions.checkpoint_pvc`` ''
compiles a pipeline without a volume, for ``backend=local`` only; otherwise the mount's
claim is the ``checkpoint_pvc`` parameter and its path :data:`WORKSPACE_MOUNT`, where the
TrainJob's nodes mount it too, the ``checkpoint_root`` default). No KFP task requests a GPU: the GPUs are the TrainJob's.

On a cluster the launch step's service account creates the TrainJob: it needs RBAC on
``trainer.kubeflow.org`` (``trainjobs``: create, get, list, watch, delete; ``trainingruntimes``
and, cluster-scoped, ``clustertrainingruntimes``: get, list) and on the core API (``pods``:
get, list, watch; ``pods/log``: get; ``events``: list) to follow the job and stream its logs.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.
"""

import logging
from types import SimpleNamespace
from typing import NamedTuple

from kfp import kubernetes

from pipeline.core.pretrain_params import DEFAULTS, PretrainParams
from pipeline.dags.finetune import (
    INGEST,
    PREPROCESS,
    VALIDATE,
    CompileOptions,
    add_data,
    configure_tasks,
    kfp_lineage,
    pipeline_dag,
)
from pipeline.dags.tasks import PretrainComponents, StepComponents, build_components, build_pretrain_components

log = logging.getLogger(__name__)

PRETRAIN_PIPELINE_NAME = "cessl-pretrain"
PRETRAIN, REGISTER_BACKBONE = "pretrain", "register-backbone"
# Where the launch step mounts the shared volume: the path the TrainJob's nodes mount it at
# (components.trainjob.WORKSPACE, the runtime's), so a path on it means the same file in both.
WORKSPACE_MOUNT = "/workspace"
# The launch step's inputs that are pipeline parameters of the same name.
LAUNCH_PARAMS = (
    "backbone_config",
    "epochs",
    "max_steps",
    "batch_size",
    "base_lr",
    "lr",
    "weight_decay",
    "cutmix_alpha",
    "seed",
    "checkpoint_every",
    "device",
    "nodes",
    "nproc_per_node",
    "gpus_per_node",
    "cpu_per_node",
    "memory_per_node",
    "backend",
    "trainer_image",
    "runtime",
    "trainjob_namespace",
    "timeout_s",
    "checkpoint_pvc",
    "checkpoint_root",
)


class PretrainOutputs(NamedTuple):
    model_name: str
    model_version: str
    run_id: str


def compiled_defaults(options: CompileOptions, defaults: PretrainParams = DEFAULTS) -> PretrainParams:
    """The parameters' defaults in a pipeline compiled with ``options``: the TrainJob's image
    is the pipeline's, and with a volume the job works under its mount (its claim
    ``options.checkpoint_pvc``); without one the job can only run in the launch pod."""
    mounted = bool(options.kubernetes and options.checkpoint_pvc)
    return defaults.replace(
        trainer_image=defaults.trainer_image or options.image,
        checkpoint_pvc=options.checkpoint_pvc if mounted else "",
        checkpoint_root=WORKSPACE_MOUNT if mounted else defaults.checkpoint_root,
        backend="local" if not mounted and defaults.backend == "cluster" else defaults.backend,
    )


def build_pretrain_pipeline(
    options: CompileOptions | None = None,
    defaults: PretrainParams = DEFAULTS,
    steps: StepComponents | None = None,
    pretrain_steps: PretrainComponents | None = None,
):
    """The ``@dsl.pipeline`` function of ``cessl-pretrain`` (reads top-down as the DAG)."""
    options = options or CompileOptions()
    steps = steps or build_components(options.image)
    pretrain_steps = pretrain_steps or build_pretrain_components(options.image)
    mount = bool(options.kubernetes and options.checkpoint_pvc)

    def cessl_pretrain(run: SimpleNamespace) -> PretrainOutputs:
        validate = pretrain_steps.validate_pretrain(params=dict(vars(run)))
        ingest, preprocess = add_data(steps, run, after=validate)
        launch = pretrain_steps.pretrain_backbone(
            store=preprocess.outputs["store"], **{name: getattr(run, name) for name in LAUNCH_PARAMS}
        )
        register = pretrain_steps.register_backbone(
            backbone=launch.outputs["backbone"],
            tracking_uri=run.tracking_uri,
            alias=run.alias,
            git_commit=run.git_commit,
            **kfp_lineage(PRETRAIN_PIPELINE_NAME),
        )
        configure_tasks(
            options,
            {VALIDATE: validate, INGEST: ingest, PREPROCESS: preprocess, PRETRAIN: launch, REGISTER_BACKBONE: register},
            uncached=(PRETRAIN, REGISTER_BACKBONE),  # a TrainJob and the registry: side effects outside KFP
            credentials=(INGEST, REGISTER_BACKBONE),
        )
        if options.finetune_retries:  # the job resumes from its last checkpoint on the volume
            launch.set_retry(num_retries=options.finetune_retries, backoff_duration="60s")
        if mount:
            kubernetes.mount_pvc(launch, pvc_name=run.checkpoint_pvc, mount_path=WORKSPACE_MOUNT)
        return PretrainOutputs(
            model_name=register.outputs["model_name"],
            model_version=register.outputs["model_version"],
            run_id=register.outputs["run_id"],
        )

    return pipeline_dag(
        PRETRAIN_PIPELINE_NAME,
        "CE-SSL pre-training: WFDB source corpus -> backbone pre-trained as a Kubeflow Trainer "
        "TrainJob -> registered in MLflow (cessl-backbone-<config>).",
        cessl_pretrain,
        compiled_defaults(options, defaults),
        return_annotation=PretrainOutputs,
    )
