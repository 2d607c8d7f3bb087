"""The CE-SSL pipeline as one Kubeflow DAG, its compile options and local execution.

    ingest -> preprocess -> split -> allocate_ranks -> finetune (GPU) -> evaluate -> register
       resolve_testset -------^ |        ^                                                 ^
                                |        resolve_backbone (default, folder, s3://, models:/) |
                                +-------------------------> score_champion ----------------+

:func:`build_pipeline` returns the ``@dsl.pipeline`` function for a set of
:class:`CompileOptions` (image, GPU request, node selector / tolerations, resources,
checkpoint volume, credentials secret): cluster settings are fixed at compile time, the
run's choices (:class:`pipeline.core.params.PipelineParams`) are pipeline parameters: the
function's signature is generated from that dataclass (:func:`pipeline_function`: each
parameter described by its field's help text, shown in the KFP run form). Compiling,
submitting and running it locally (:func:`execute_local`, settings that only a cluster honours
left out) are the same for every DAG: :mod:`pipeline.dags.spec`.

The parts other pipelines reuse (the method comparison, ``pipeline.dags.compare``):
:func:`add_shared_inputs` (ingest -> preprocess, resolve_backbone), :func:`add_finetune_chain`
(split -> allocate_ranks -> finetune -> evaluate for one method / labelled ratio / seed),
:func:`add_testset` (resolve_testset), :func:`configure_tasks` (the cluster settings by task
name: GPU on finetune, caching, resources, Secret, ConfigMap), :func:`pipeline_function`
and :func:`execute_local`.

No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.
"""

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, TextIO

from kfp import dsl, kubernetes

from ml.errors import StepFailedError
from ml.train.gpu import IMAGE_ENV, REQUIRE_GPU_ENV
from pipeline.core.failures import failed_run_message
from pipeline.core.params import DEFAULTS, PipelineParams, field_types
from pipeline.dags.tasks import StepComponents, build_components, default_image

log = logging.getLogger(__name__)

PIPELINE_NAME = "cessl-finetune"
CHECKPOINT_MOUNT = "/mnt/checkpoints"
SECRET_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The pipeline's MLflow identity (an MLflow server with --app-name basic-auth), its own Secret.
MLFLOW_SECRET_ENV_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Endpoints every step reads from the deployment's ConfigMap (deploy/pipeline-config.yaml).
CONFIG_MAP_ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
TAIL_LINES = 60


@dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration; parsed from ``key[=value][:Effect]``."""

    key: str
    value: str | None = None
    effect: str | None = "NoSchedule"

    @property
    def operator(self) -> str:
        return "Exists" if self.value is None else "Equal"

    @classmethod
    def parse(cls, text: str) -> "Toleration":
        spec, _, effect = text.partition(":")
        key, eq, value = spec.partition("=")
        if not key:
            raise ValueError(f"toleration {text!r}: expected key[=value][:Effect]")
        if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {text!r}: unknown effect {effect!r}")
        return cls(key=key, value=value if eq else None, effect=effect or None)


@dataclass(frozen=True)
class ResourceRequest:
    """Requests and limits of a task (Kubernetes quantities; "" leaves one unset).

    Limits matter where a Profile namespace has a ResourceQuota (pods without limits are
    refused there) and to keep one run from starving the node."""

    cpu: str = ""
    memory: str = ""
    cpu_limit: str = ""
    memory_limit: str = ""


@dataclass(frozen=True)
class CompileOptions:
    """Cluster settings fixed at compile time.

    ``accelerator_type`` empty -> finetune requests no accelerator (it then runs on CPU,
    as it does locally). ``checkpoint_pvc`` mounts a PersistentVolumeClaim at
    :data:`CHECKPOINT_MOUNT` on finetune so a retried/restarted task resumes.
    ``credentials_secret`` injects the S3 credentials (``AWS_*``) from a
    Kubernetes Secret into the steps that touch S3 or MLflow, and ``mlflow_secret`` the
    pipeline's MLflow identity (``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``, a separate
    Secret, see ``cessl access init``) into the same steps; ``config_map`` the
    endpoints (:data:`CONFIG_MAP_ENV_KEYS`) into every step. Defaults: the names in
    ``deploy/`` (``$CESSL_CREDENTIALS_SECRET``, ``$CESSL_MLFLOW_SECRET``, ``$CESSL_CHECKPOINT_PVC``
    override them). ``credentials_optional``: the Secrets may be absent (the steps then use
    the default AWS chain: IRSA, workload identity, an instance profile; and an MLflow server
    without authentication). ``image_pull_secrets``: Secrets every task's pod pulls the image
    with (a private registry; ``$CESSL_IMAGE_PULL_SECRET``). A task with an accelerator gets
    ``CESSL_REQUIRE_GPU=1`` and ``CESSL_IMAGE``: it stops at once on an image without CUDA
    (``ml.train.gpu``).
    """

    image: str = field(default_factory=default_image)
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu", None, "NoSchedule"),)
    finetune_resources: ResourceRequest = ResourceRequest(cpu="4", memory="16Gi", cpu_limit="8", memory_limit="16Gi")
    step_resources: ResourceRequest = ResourceRequest(cpu="1", memory="4Gi", cpu_limit="2", memory_limit="4Gi")
    checkpoint_pvc: str = field(default_factory=lambda: os.environ.get("CESSL_CHECKPOINT_PVC", "cessl-checkpoints"))
    credentials_secret: str = field(
        default_factory=lambda: os.environ.get("CESSL_CREDENTIALS_SECRET", "cessl-s3-credentials")
    )
    credentials_optional: bool = True
    mlflow_secret: str = field(
        default_factory=lambda: os.environ.get("CESSL_MLFLOW_SECRET", "cessl-mlflow-credentials")
    )
    config_map: str = "cessl-pipeline-defaults"
    image_pull_secrets: tuple[str, ...] = field(
        default_factory=lambda: tuple(filter(None, [os.environ.get("CESSL_IMAGE_PULL_SECRET", "")]))
    )
    finetune_retries: int = 2
    caching: bool = True
    cache_ingest: bool = True  # False for recurring runs: the source is listed again every time
    kubernetes: bool = True  # False: leave out settings that only a cluster honours

    @classmethod
    def local(cls, image: str | None = None) -> "CompileOptions":
        """What ``kfp.local`` can use: no GPU, resources, volumes, secrets or retries."""
        return cls(
            image=image or default_image(),
            accelerator_type="",
            tolerations=(),
            finetune_resources=ResourceRequest(),
            step_resources=ResourceRequest(),
            finetune_retries=0,
            checkpoint_pvc="",
            credentials_secret="",
            mlflow_secret="",
            config_map="",
            image_pull_secrets=(),
            kubernetes=False,
        )


class PipelineOutputs(NamedTuple):
    run_id: str
    model_version: str


class PipelineRunError(StepFailedError):
    """A local pipeline run failed (a task failed, or it ended without outputs)."""


@dataclass(frozen=True)
class ExtraParameter:
    """A pipeline parameter that is not a field of the run's parameter dataclass (a network's
    ``sites``, a comparison's ``grid``); ``help`` is its description in the KFP run form."""

    name: str
    annotation: type
    default: Any
    help: str


def loop_parameters(name: str, items: list[Any], what: str, id_name: str, id_what: str) -> list[ExtraParameter]:
    """A looping pipeline's own parameters: ``name``, the list it loops over (``items`` by
    default; ``what`` describes it), and ``id_name``, the run's id (``id_what``; '' for a new one)."""
    return [
        ExtraParameter(name, list, items, what),
        ExtraParameter(id_name, str, "", f"{id_what}; '' for a new one"),
    ]


def parameter_help(params_type: type) -> dict[str, str]:
    """Each field's help text (its ``metadata["help"]``, as the flags show it): the
    description of its pipeline parameter."""
    return {f.name: str(f.metadata.get("help", "")).replace("%%", "%") for f in dataclasses.fields(params_type)}


def pipeline_signature(
    defaults: Any = DEFAULTS,
    *,
    exclude: Collection[str] = (),
    extra: Sequence[ExtraParameter] = (),
    return_annotation: Any = PipelineOutputs,
) -> inspect.Signature:
    """The pipeline function's signature: one typed parameter per field of ``defaults``'
    dataclass (:class:`PipelineParams`, ``PretrainParams``; but ``exclude``), with
    ``defaults``' values, then ``extra`` (kfp reads it with ``inspect.signature``)."""
    types = typing.get_type_hints(type(defaults))
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [
            *(
                inspect.Parameter(name, kind, default=value, annotation=types[name])
                for name, value in defaults.arguments().items()
                if name not in exclude
            ),
            *(inspect.Parameter(p.name, kind, default=p.default, annotation=p.annotation) for p in extra),
        ],
        return_annotation=return_annotation,
    )


def args_docstring(signature: inspect.Signature, descriptions: Mapping[str, str]) -> str:
    """A docstring whose ``Args:`` section describes every parameter of ``signature``: kfp
    writes those into the IR (``root.inputDefinitions.parameters.<name>.description``), which
    the KFP run form shows. Every parameter must have a description."""
    missing = [name for name in signature.parameters if not descriptions.get(name, "").strip()]
    if missing:
        raise ValueError(f"pipeline parameters without a description: {', '.join(missing)}")
    lines = [f"    {name}: {' '.join(descriptions[name].split())}" for name in signature.parameters]
    return "\n".join(["The pipeline's parameters.", "", "Args:", *lines])


def pipeline_function(
    body: Callable[[SimpleNamespace], Any],
    defaults: Any = DEFAULTS,
    *,
    exclude: Collection[str] = (),
    extra: Sequence[ExtraParameter] = (),
    return_annotation: Any = PipelineOutputs,
) -> Callable[..., Any]:
    """A function with the signature of :func:`pipeline_signature` that calls ``body`` with its
    arguments by name (the pipeline parameters, as channels), documented by the fields' help
    texts (:func:`parameter_help`) and ``extra``'s; kfp reads both, the body reads as the DAG."""
    signature = pipeline_signature(defaults, exclude=exclude, extra=extra, return_annotation=return_annotation)
    descriptions = parameter_help(type(defaults)) | {p.name: p.help for p in extra}

    def pipeline_func(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(SimpleNamespace(**bound.arguments))

    pipeline_func.__signature__ = signature  # type: ignore[attr-defined]
    pipeline_func.__doc__ = args_docstring(signature, descriptions)
    return pipeline_func


def pipeline_dag(
    name: str, description: str, body: Callable[[SimpleNamespace], Any], defaults: Any, **signature: Any
) -> Any:
    """The ``@dsl.pipeline`` ``name`` of ``body`` (:func:`pipeline_function` of ``defaults``
    and ``signature``'s ``exclude``, ``extra``, ``return_annotation``)."""
    return dsl.pipeline(name=name, description=description)(pipeline_function(body, defaults, **signature))


def loop_dag(
    name: str,
    description: str,
    body: Callable[[SimpleNamespace], Any],
    defaults: PipelineParams,
    options: CompileOptions,
    *,
    exclude: Collection[str],
    extra: Sequence[ExtraParameter],
) -> Any:
    """A :func:`pipeline_dag` that loops over a list parameter of ``extra`` (the network's
    sites, the comparison's grid) and returns its summary (text): the run's parameters but
    ``exclude`` (the loop item's own), the checkpoint root the compile options' default."""
    defaults = defaults.replace(checkpoint_root=default_checkpoint_root(options))
    return pipeline_dag(name, description, body, defaults, exclude=exclude, extra=extra, return_annotation=str)


def shared_arguments(values: Any, exclude: Collection[str]) -> dict[str, Any]:
    """The run's parameters but ``exclude`` (a loop item's own): ``values`` a parameter
    dataclass or the pipeline function's ``run`` namespace."""
    items = values.arguments() if hasattr(values, "arguments") else vars(values)
    return {name: value for name, value in items.items() if name in PARAM_NAMES and name not in exclude}


def default_checkpoint_root(options: CompileOptions) -> str:
    """With a checkpoint volume, finetune checkpoints there unless the run says otherwise."""
    return CHECKPOINT_MOUNT if options.checkpoint_pvc and options.kubernetes else ""


def _request(task: dsl.PipelineTask, resources: ResourceRequest) -> None:
    if resources.cpu:
        task.set_cpu_request(resources.cpu)
    if resources.memory:
        task.set_memory_request(resources.memory)
    if resources.cpu_limit:
        task.set_cpu_limit(resources.cpu_limit)
    if resources.memory_limit:
        task.set_memory_limit(resources.memory_limit)


def _configure_finetune(task: dsl.PipelineTask, options: CompileOptions) -> None:
    """GPU request, scheduling constraints, resources, checkpoint volume, retries."""
    _request(task, options.finetune_resources)
    if options.accelerator_type:
        task.set_accelerator_type(options.accelerator_type)
        task.set_accelerator_limit(options.accelerator_limit)
        # the step stops at once (one line) if its image's torch cannot use the GPU
        task.set_env_variable(REQUIRE_GPU_ENV, "1")
        task.set_env_variable(IMAGE_ENV, options.image)
    if options.finetune_retries:
        task.set_retry(num_retries=options.finetune_retries, backoff_duration="30s")
    if not options.kubernetes:
        return
    for key, value in options.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in options.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    if options.checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=options.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)


def _use_config_map(task: dsl.PipelineTask, options: CompileOptions) -> None:
    if options.kubernetes and options.config_map:
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=options.config_map,
            config_map_key_to_env={key: key for key in CONFIG_MAP_ENV_KEYS},
            optional=True,
        )


def _use_credentials(task: dsl.PipelineTask, options: CompileOptions) -> None:
    """The S3 and the MLflow Secrets' keys as the task's environment (each Secret '' : none)."""
    if not options.kubernetes:
        return
    for secret, keys in (
        (options.credentials_secret, SECRET_ENV_KEYS),
        (options.mlflow_secret, MLFLOW_SECRET_ENV_KEYS),
    ):
        if secret:
            kubernetes.use_secret_as_env(
                task,
                secret_name=secret,
                secret_key_to_env={key: key for key in keys},
                optional=options.credentials_optional,
            )


def _use_pull_secrets(task: dsl.PipelineTask, options: CompileOptions) -> None:
    if options.kubernetes and options.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(options.image_pull_secrets))


def configure_tasks(
    options: CompileOptions,
    tasks: Mapping[str, dsl.PipelineTask],
    *,
    uncached: Collection[str] = (),
    credentials: Collection[str] = (),
) -> None:
    """The cluster settings of a pipeline's tasks, by display name: every task gets its name,
    caching (off for ``uncached`` and, unless ``options.cache_ingest``, for ``ingest``), the
    ConfigMap's endpoints, the image pull Secrets and its resources; ``credentials`` the
    Secret; ``finetune`` the GPU request (and the GPU check), scheduling constraints,
    checkpoint volume and retries."""
    for name, task in tasks.items():
        task.set_display_name(name)
        cached = options.caching and name not in uncached and (name != INGEST or options.cache_ingest)
        task.set_caching_options(enable_caching=cached)
        if name == FINETUNE or name.endswith("-" + FINETUNE):  # a network site's baseline-finetune too
            _configure_finetune(task, options)
        else:
            _request(task, options.step_resources)
        if name in credentials:
            _use_credentials(task, options)
        _use_config_map(task, options)
        _use_pull_secrets(task, options)


# Display names of the tasks (configure_tasks keys its settings on them).
VALIDATE, INGEST, PREPROCESS, BACKBONE = "validate", "ingest", "preprocess", "backbone"
PARAM_NAMES = frozenset(field_types())
SPLIT, ALLOCATE_RANKS, FINETUNE, EVALUATE = "split", "allocate-ranks", "finetune", "evaluate"
RESOLVE_TESTSET, SCORE_CHAMPION, REGISTER = "resolve-testset", "score-champion", "register"
# A network site's own choices of its fine-tune chain (its loop item's fields).
SITE_CHOICES = ("r", "p", "compress", "batch_size", "lr")


class SharedInputs(NamedTuple):
    """The tasks every fine-tune of a run reads: the data (ingest -> preprocess) and the backbone."""

    ingest: dsl.PipelineTask
    preprocess: dsl.PipelineTask
    backbone: dsl.PipelineTask
    validate: dsl.PipelineTask

    @property
    def store(self) -> Any:
        return self.preprocess.outputs["store"]

    @property
    def backbone_model(self) -> Any:
        return self.backbone.outputs["backbone_model"]

    def tasks(self) -> dict[str, dsl.PipelineTask]:
        return {VALIDATE: self.validate, INGEST: self.ingest, PREPROCESS: self.preprocess, BACKBONE: self.backbone}


def add_validate(steps: StepComponents, run: SimpleNamespace) -> dsl.PipelineTask:
    """validate: every run parameter checked before any work (a comparison's grid and a
    network's sites are checked by their own first steps)."""
    return steps.validate(params={k: v for k, v in vars(run).items() if k in PARAM_NAMES})


def add_backbone(steps: StepComponents, run: SimpleNamespace, after: dsl.PipelineTask) -> dsl.PipelineTask:
    """resolve_backbone from the run's parameters (once per run, however many fine-tunes read it)."""
    backbone = steps.resolve_backbone(
        backbone=run.backbone,
        backbone_config=run.backbone_config,
        cache_dir=run.cache_dir,
        tracking_uri=run.tracking_uri,
    )
    backbone.after(after)
    return backbone


def item_field(item: Any, key: str) -> Any:
    """Field ``key`` of a ``dsl.ParallelFor`` loop item (a channel). Attribute access is not
    enough for every key: ``item.name`` is the loop channel's own name (the plain string
    ``sites-loop-item``), not the item's ``name`` field, and every site's records were keyed
    ``sites-loop-item/<id>``; the loop argument's ``__getattr__`` makes the field's channel."""
    return type(item).__getattr__(item, key)


def add_data(
    steps: StepComponents, source: Any, *, after: dsl.PipelineTask, site: Any = ""
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """ingest -> preprocess of one source: ``source``'s ``source``, ``data_version``,
    ``state_dir`` and ``min_class_count`` (pipeline channels: the run's parameters, or a network
    site's loop item). ``data_version`` is part of ingest's inputs, hence of its cache key: the
    same version of the same source reuses ingest and everything downstream. ``site``: a
    network site's name (records are keyed (site, path)); "" for a single source."""
    ingest = steps.ingest(source=source.source, data_version=source.data_version, state_dir=source.state_dir, site=site)
    ingest.after(after)
    preprocess = steps.preprocess(
        manifest=ingest.outputs["manifest"], min_class_count=source.min_class_count, state_dir=source.state_dir
    )
    return ingest, preprocess


def add_shared_inputs(steps: StepComponents, run: SimpleNamespace) -> SharedInputs:
    """validate, then ingest -> preprocess and resolve_backbone, from the run's parameters."""
    validate = add_validate(steps, run)
    ingest, preprocess = add_data(steps, run, after=validate)
    return SharedInputs(ingest, preprocess, add_backbone(steps, run, validate), validate)


class FinetuneChain(NamedTuple):
    """One fine-tune: split -> allocate_ranks -> finetune -> evaluate."""

    split: dsl.PipelineTask
    ranks: dsl.PipelineTask
    finetune: dsl.PipelineTask
    evaluate: dsl.PipelineTask

    def data(self, inputs: SharedInputs) -> dict[str, Any]:
        """The store and the split: what most steps read."""
        return {"store": inputs.store, "splits": self.split.outputs["splits"]}

    def tasks(self) -> dict[str, dsl.PipelineTask]:
        return {SPLIT: self.split, ALLOCATE_RANKS: self.ranks, FINETUNE: self.finetune, EVALUATE: self.evaluate}


def add_finetune_chain(
    steps: StepComponents,
    run: SimpleNamespace,
    inputs: SharedInputs,
    *,
    method: Any,
    labelled_ratio: Any,
    seed: Any,
    test_seed: Any = None,
    frozen_testset: Any = "",
    choices: Mapping[str, Any] | None = None,
    site: Any = "",
) -> FinetuneChain:
    """split -> allocate_ranks -> finetune -> evaluate of ``method`` at ``labelled_ratio`` with
    ``seed`` (pipeline channels: the run's parameters, or a loop item's fields; ``test_seed``:
    the test cut's, ``seed`` unless given), the other
    choices from the run's parameters unless ``choices`` gives them (a network site's
    ``r``, ``p``, ``compress``, ``batch_size``, ``lr``). ``frozen_testset``: the
    ``resolve_testset`` step's reference (the split's test part is that frozen set), "" for
    a freshly drawn test set. ``site``: a network site's name (its fine-tune's log lines name it)."""
    run = SimpleNamespace(**(vars(run) | dict(choices or {})))
    split = steps.split(
        store=inputs.store,
        labelled_ratio=labelled_ratio,
        test_ratio=run.test_ratio,
        seed=seed,
        test_seed=seed if test_seed is None else test_seed,
        frozen_testset=frozen_testset,
        tracking_uri=run.tracking_uri,
    )
    ranks, finetune = add_training(
        steps, run, inputs, split, method=method, labelled_ratio=labelled_ratio, seed=seed, site=site
    )
    data = {"store": inputs.store, "splits": split.outputs["splits"]}
    evaluate = steps.evaluate(**data, backbone_model=inputs.backbone_model, adapter=finetune.outputs["adapter"])
    return FinetuneChain(split, ranks, finetune, evaluate)


def add_training(
    steps: StepComponents,
    run: SimpleNamespace,
    inputs: SharedInputs,
    split: dsl.PipelineTask,
    *,
    method: Any,
    labelled_ratio: Any,
    seed: Any,
    site: Any = "",
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """allocate_ranks -> finetune of ``method`` on ``split``'s records (the other choices from
    ``run``): the training part of :func:`add_finetune_chain`, and a network site's baseline,
    which trains on its CE-SSL chain's split."""
    data = {"store": inputs.store, "splits": split.outputs["splits"]}
    ranks = steps.allocate_ranks(
        **data,
        backbone_model=inputs.backbone_model,
        method=method,
        r=run.r,
        p=run.p,
        compress=run.compress,
        labelled_ratio=labelled_ratio,
        batch_size=run.batch_size,
        seed=seed,
    )
    finetune = steps.finetune(
        **data,
        backbone_model=inputs.backbone_model,
        rank_map=ranks.outputs["rank_map"],
        method=method,
        r=run.r,
        p=run.p,
        labelled_ratio=labelled_ratio,
        epochs=run.epochs,
        max_steps=run.max_steps,
        batch_size=run.batch_size,
        lr=run.lr,
        val_every=run.val_every,
        precision=run.precision,
        head_init=run.head_init,
        seed=seed,
        checkpoint_root=run.checkpoint_root,
        site=site,
    )
    return ranks, finetune


def kfp_lineage(pipeline_name: str) -> dict[str, Any]:
    """The KFP run's id, name and pipeline, as a registering step's inputs (MLflow tags)."""
    return {
        "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        "kfp_pipeline_name": pipeline_name,
    }


class RegisteredModel(NamedTuple):
    """One registered fine-tune: resolve_testset -> the fine-tune chain -> score_champion -> register."""

    testset: dsl.PipelineTask
    chain: FinetuneChain
    champion: dsl.PipelineTask
    register: dsl.PipelineTask

    def tasks(self) -> dict[str, dsl.PipelineTask]:
        return {
            RESOLVE_TESTSET: self.testset,
            **self.chain.tasks(),
            SCORE_CHAMPION: self.champion,
            REGISTER: self.register,
        }


def add_registered_model(
    steps: StepComponents,
    run: SimpleNamespace,
    inputs: SharedInputs,
    *,
    params: Mapping[str, Any],
    pipeline_name: str,
    site: Any = None,
    after: dsl.PipelineTask | None = None,
    network_id: Any = "",
) -> RegisteredModel:
    """The model a run registers (its frozen test set, its fine-tune chain, its registration)
    of the run's ``model_name``, ``method``, ``labelled_ratio`` and ``seed``, or a network
    ``site``'s (its loop item, whose :data:`SITE_CHOICES` replace the run's too; it goes to
    register whole). The champion is scored on the chain's test split, then the adapter logged
    and registered (alias challenger). ``params``: the run's PipelineParams as one mapping
    (channels allowed: the data version ingest settled on; a site's values replace them in
    register); ``network_id``: a network run's; ``after``: what the test set waits for."""
    model = run if site is None else site
    testset = add_testset(steps, run, model)
    if after is not None:
        testset.after(after)
    chain = add_finetune_chain(
        steps,
        run,
        inputs,
        method=model.method,
        labelled_ratio=model.labelled_ratio,
        seed=model.seed,
        frozen_testset=testset.output,
        choices=None if site is None else site_choices(site),
        site="" if site is None else item_field(site, "name"),
    )
    data = chain.data(inputs)
    champion = steps.score_champion(
        **data,
        evaluation=chain.evaluate.outputs["evaluation"],
        model_name=model.model_name,
        method=model.method,
        tracking_uri=run.tracking_uri,
    )
    champion.after(chain.evaluate)  # the champion of the moment the new model is ready
    extra = {"site": site, "network_id": network_id} if site is not None else {}
    register = steps.register(
        splits=data["splits"],
        backbone_model=inputs.backbone_model,
        rank_map=chain.ranks.outputs["rank_map"],
        adapter=chain.finetune.outputs["adapter"],
        curves=chain.finetune.outputs["curves"],
        evaluation=chain.evaluate.outputs["evaluation"],
        champion_evaluation=champion.outputs["champion_evaluation"],
        report=chain.evaluate.outputs["report"],
        quarantine_report=inputs.ingest.outputs["quarantine_report"],
        params=dict(params),
        **kfp_lineage(pipeline_name),
        **extra,
    )
    return RegisteredModel(testset, chain, champion, register)


def site_choices(site: Any) -> dict[str, Any]:
    """A network site's own fine-tune choices (:data:`SITE_CHOICES`, its loop item's fields)."""
    return {name: getattr(site, name) for name in SITE_CHOICES}


def add_testset(steps: StepComponents, run: SimpleNamespace, model: Any) -> dsl.PipelineTask:
    """resolve_testset: the frozen test set of ``model``'s ``model_name`` (trained with its
    ``method``: the run's parameters or a network site's fields), whose reference the split's
    test part is."""
    return steps.resolve_testset(
        model_name=model.model_name,
        method=model.method,
        tracking_uri=run.tracking_uri,
        frozen_testset=run.frozen_testset,
    )


def build_pipeline(options: CompileOptions | None = None, steps: StepComponents | None = None):
    """The ``@dsl.pipeline`` function for ``options`` (reads top-down as the DAG)."""
    options = options or CompileOptions()
    steps = steps or build_components(options.image)

    def cessl_pipeline(run: SimpleNamespace) -> PipelineOutputs:
        inputs = add_shared_inputs(steps, run)
        params = {**vars(run), "data_version": inputs.ingest.outputs["data_version"]}
        model = add_registered_model(steps, run, inputs, params=params, pipeline_name=PIPELINE_NAME)
        configure_tasks(
            options,
            {**inputs.tasks(), **model.tasks()},
            # the champion and the frozen test set change outside; register writes MLflow
            uncached=(RESOLVE_TESTSET, SCORE_CHAMPION, REGISTER),
            credentials=(INGEST, BACKBONE, RESOLVE_TESTSET, SPLIT, SCORE_CHAMPION, REGISTER),
        )
        register = model.register
        return PipelineOutputs(run_id=register.outputs["run_id"], model_version=register.outputs["model_version"])

    return pipeline_dag(
        PIPELINE_NAME,
        "CE-SSL: WFDB records -> evaluated, registered LoRA adapter (MLflow alias challenger).",
        cessl_pipeline,
        DEFAULTS.replace(checkpoint_root=default_checkpoint_root(options)),
    )


@dataclass(frozen=True)
class LocalRunConfig:
    """Where a ``kfp.local`` run keeps its task outputs, its cache and its task logs.

    ``task_log``: the tasks' own output (KFP executor dumps, training logs) goes to this
    file instead of the terminal, which keeps kfp.local's one-line-per-task progress
    readable; None streams everything.
    """

    pipeline_root: Path = Path("local_outputs")
    cache: bool = True
    runner: str = "subprocess"  # subprocess (this venv) | docker (the project image)
    image: str | None = None
    task_log: Path | None = None


# Environment a DockerRunner task receives from this process (credentials stay in the env).
DOCKER_ENV_PREFIXES = ("MLFLOW_", "AWS_", "CESSL_")
# The parameters that may name a folder of this machine (a parameter set lacking one: "").
LOCAL_PATH_FIELDS = ("state_dir", "checkpoint_root", "cache_dir", "source", "backbone", "tracking_uri")


def _local_paths(params: Any) -> list[Path]:
    """Host folders a containerised task must see at the same path (``params``: a run's
    parameters, :class:`PipelineParams` or ``PretrainParams``)."""
    value = {name: str(getattr(params, name, "") or "") for name in LOCAL_PATH_FIELDS}
    candidates = [value["state_dir"], value["checkpoint_root"], value["cache_dir"]]
    if value["source"] and "://" not in value["source"]:
        candidates.append(value["source"])
    if value["backbone"] not in ("", "default") and Path(value["backbone"]).exists():
        candidates.append(value["backbone"])
    if value["tracking_uri"].startswith("sqlite:///"):
        candidates.append(str(Path(value["tracking_uri"].removeprefix("sqlite:///")).parent))
    paths = []
    for candidate in filter(None, candidates):
        path = Path(candidate).absolute()
        if not path.exists() and not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
        paths.append(path if path.is_dir() else path.parent)
    roots = sorted(set(paths), key=lambda p: len(p.parts))
    return [p for i, p in enumerate(roots) if not any(p.is_relative_to(q) for q in roots[:i])]


def docker_runner(params: Any, labels: Mapping[str, str] | None = None):
    """A DockerRunner whose containers see the run's local folders, this user's id and
    the MLflow / S3 settings of this environment, on the host network (local servers);
    ``labels``: the run's (``pipeline.core.process.run_labels``), by which they die with it."""
    from docker.types import Mount
    from kfp import local

    mounts = [Mount(target=str(p), source=str(p), type="bind") for p in _local_paths(params)]
    environment = {k: v for k, v in os.environ.items() if k.startswith(DOCKER_ENV_PREFIXES)}
    environment |= {"HOME": "/tmp", "MPLCONFIGDIR": "/tmp/matplotlib"}
    # entrypoint: the image's is `cessl`; a task's command is a full command line (as on a
    # cluster, where KFP sets the container's command and so replaces the entrypoint).
    return local.DockerRunner(
        mounts=mounts,
        user=f"{os.getuid()}:{os.getgid()}",
        environment=environment,
        network_mode="host",
        entrypoint=["/usr/bin/env"],
        labels=dict(labels or {}),
    )


def init_local(config: LocalRunConfig, params: Any = None, labels: Mapping[str, str] | None = None) -> None:
    """``kfp.local.init`` with the task cache under ``<pipeline_root>/.kfp_cache``
    (``labels``: of the Docker runner's containers)."""
    from kfp import local

    if config.runner == "subprocess":
        runner = local.SubprocessRunner(use_venv=False)
    elif config.runner == "docker":
        runner = docker_runner(params or DEFAULTS, labels)
    else:
        raise ValueError(f"unknown local runner {config.runner!r} (subprocess | docker)")
    root = Path(config.pipeline_root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    # raise_on_error=False: a failed task ends the run without outputs (PipelineRunError below).
    local.init(
        runner=runner,
        pipeline_root=str(root),
        enable_caching=config.cache,
        cache_root=str(root / ".kfp_cache"),
        raise_on_error=False,
    )


_LOCAL_NOISE = (
    r".*have no effect in the current local runner.*",
    r".*custom or non-Python base image.*",
    r".*is not used by the current local runner.*",
)
# kfp.local's own one-line progress messages (pipeline start/end, task start/end, cache hits).
_PROGRESS = re.compile(
    r"^\d\d:\d\d:\d\d\.\d{3} - \w+ - (Running pipeline|Executing task|Task .*(finished|cache hit)|"
    r"Pipeline .* finished)"
)


# A long step's own progress lines (ml.train.callbacks.ProgressLine: step, loss, valid mAP, ETA).
TASK_PROGRESS_PREFIX = "cessl-progress "
_PROGRESS_MESSAGE = re.compile(r"^(Running pipeline|Executing task|Task .*(finished|cache hit)|Pipeline .* finished)")
_JSON_DUMP = re.compile(r'^\s+([{}\[\]"]|\},?$|\],?$)')  # the executor_input dumps of KFP's executor


class _ProgressTee(io.TextIOBase):
    """A stdout that writes everything to ``sink``, and kfp.local's progress lines and the
    tasks' own (:data:`TASK_PROGRESS_PREFIX`, throttled by the task) to ``terminal`` too."""

    def __init__(self, sink: TextIO, terminal: TextIO) -> None:
        self.sink, self.terminal, self._line = sink, terminal, ""

    def write(self, text: str) -> int:
        self.sink.write(text)
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if _PROGRESS.match(line):
                self.terminal.write(line + "\n")
                self.terminal.flush()
            elif line.lstrip().startswith(TASK_PROGRESS_PREFIX):  # kfp.local indents a task's lines
                self.terminal.write("  " + line.lstrip().removeprefix(TASK_PROGRESS_PREFIX) + "\n")
                self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.sink.flush()
        self.terminal.flush()


@contextlib.contextmanager
def _task_output(path: Path | None) -> Iterator[None]:
    """Send what the tasks print to ``path`` (progress lines still show); its tail on failure with ``-v``."""
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as sink:
        try:
            with contextlib.redirect_stdout(_ProgressTee(sink, sys.stdout)):
                yield
        except BaseException:
            sink.flush()
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            tail = [line for line in lines if not _JSON_DUMP.match(line)][-TAIL_LINES:]
            log.debug("a task failed; last %d lines of %s:\n%s", len(tail), path, "\n".join(tail))  # -v only
            raise


class _KfpOrchestratorNoise(logging.Filter):
    """Drops the INFO lines kfp.local's loop orchestrator writes to the root logger (one per
    loop input it resolves); its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = record.levelno < logging.WARNING and f"kfp{os.sep}local" in record.pathname
        # ... but its progress messages (task started / finished / cache hit) still show.
        return not noisy or bool(_PROGRESS_MESSAGE.match(record.getMessage()))


@contextlib.contextmanager
def _quiet_kfp_orchestrator() -> Iterator[None]:
    root, noise = logging.getLogger(), _KfpOrchestratorNoise()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


@contextlib.contextmanager
def _tasks_die_with_us() -> Iterator[None]:
    """The tasks started meanwhile know this process's pid (``pipeline.core.process``): they
    stop when it dies, even by ``kill -9``."""
    from pipeline.core.process import RUN_PID_ENV

    before = os.environ.get(RUN_PID_ENV)
    os.environ[RUN_PID_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUN_PID_ENV, None)
        else:
            os.environ[RUN_PID_ENV] = before


@contextlib.contextmanager
def _warm_tasks(runner: str) -> Iterator[None]:
    """For the subprocess runner: the tasks forked from one process that imported torch, MLflow
    and the steps once (``pipeline.dags.warm_tasks``) instead of each importing them again."""
    if runner != "subprocess":
        yield
        return
    from pipeline.dags.warm_tasks import task_server

    with task_server():
        yield


@contextlib.contextmanager
def _containers_die_with_us(runner: str) -> Iterator[dict[str, str]]:
    """For the Docker runner: the labels of this run's containers, which are removed when the
    run ends however it ends (``pipeline.core.process.containers_die_with_us``; a container is
    not a child process, so ``_tasks_die_with_us`` cannot reach it). Other runners: no labels."""
    if runner != "docker":
        yield {}
        return
    import docker

    from pipeline.core.process import containers_die_with_us

    client = docker.from_env()
    try:
        with containers_die_with_us(client) as labels:
            yield labels
    finally:
        client.close()


def execute_local(
    pipeline: Any, arguments: Mapping[str, Any], params: Any, config: LocalRunConfig, name: str
) -> dict[str, Any]:
    """Call a built pipeline function with ``kfp.local`` (initialised for ``config``); its
    outputs. ``params``: the local folders a Docker runner mounts. A failed task ends the run
    without outputs: :class:`PipelineRunError`."""
    with _containers_die_with_us(config.runner) as labels:
        init_local(config, params, labels)
        log.info(
            "running %s locally (%s runner, pipeline root %s%s)",
            name,
            config.runner,
            config.pipeline_root,
            f", task logs in {config.task_log}" if config.task_log else "",
        )
        with (
            warnings.catch_warnings(),
            _quiet_kfp_orchestrator(),
            _task_output(config.task_log),
            _tasks_die_with_us(),
            _warm_tasks(config.runner),
        ):
            for pattern in _LOCAL_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            outputs = pipeline(**arguments).outputs
    if not outputs:
        raise PipelineRunError(failed_run_message(name, config.task_log))
    return dict(outputs)
