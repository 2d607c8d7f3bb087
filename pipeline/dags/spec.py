"""Every DAG as one :class:`PipelineSpec`, and what is done with any of them.

The four pipelines (:func:`finetune_spec` single-site ``cessl-finetune``, :func:`network_spec`
``cessl-network``, :func:`compare_spec` ``cessl-compare``, :func:`pretrain_spec`
``cessl-pretrain``) differ in their DAG (their modules build it) and in nothing else that
the commands do with them: :func:`compile_spec` writes the IR YAML, :func:`submit` starts one
run and :func:`schedule` a recurring run on a Kubeflow Pipelines endpoint,
:func:`run_local` runs the DAG here with ``kfp.local``.

What goes to a cluster is checked for values of this machine first
(:mod:`pipeline.dags.local_values`): a compiled pipeline's parameter defaults and images, a
run's arguments; refused with one line naming the flag or ``sites.yaml`` field to set, or
warned about where the value can be legitimate on a cluster.

No ``from __future__ import annotations``: the DAG modules' pipeline functions are read by kfp.
"""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import compiler

from pipeline.core.failures import failed_run_message
from pipeline.core.params import DEFAULTS as PARAM_DEFAULTS
from pipeline.core.pretrain_params import DEFAULTS as PRETRAIN_DEFAULTS
from pipeline.core.pretrain_params import PretrainParams
from pipeline.core.sites import DEFAULT_SITES_FILE
from pipeline.dags.compare import COMPARE_PIPELINE_NAME, CompareSettings, build_compare_pipeline
from pipeline.dags.finetune import (
    PIPELINE_NAME,
    CompileOptions,
    LocalRunConfig,
    PipelineRunError,
    build_pipeline,
    execute_local,
)
from pipeline.dags.local_values import check_local_values
from pipeline.dags.network import NETWORK_PIPELINE_NAME, NetworkSettings, build_network_pipeline
from pipeline.dags.pretrain import PRETRAIN_PIPELINE_NAME, build_pretrain_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSpec:
    """One DAG: its name, how it is built for a set of compile options, the file ``compile``
    writes by default and the output a finished run has (a run without it failed)."""

    name: str
    build: Callable[[CompileOptions], Any]  # the @dsl.pipeline function for these options
    package: str
    output: str
    about: str = ""  # what compile's log line says of it (e.g. the grid)


def finetune_spec() -> PipelineSpec:
    """The single-site fine-tune: ingest ... register (``pipeline.dags.finetune``)."""
    return PipelineSpec(PIPELINE_NAME, build_pipeline, "cessl_pipeline.yaml", "run_id")


def network_spec(settings: NetworkSettings | None = None) -> PipelineSpec:
    """The hospital network (``pipeline.dags.network``); ``settings``: parallelism, default sites."""
    settings = settings or NetworkSettings()
    return PipelineSpec(
        NETWORK_PIPELINE_NAME,
        lambda options: build_network_pipeline(settings, options),
        "cessl_network.yaml",
        "Output",
        f"network of {len(settings.sites)} sites" if settings.sites else "",
    )


def compare_spec(settings: CompareSettings) -> PipelineSpec:
    """The method comparison over ``settings.grid`` (``pipeline.dags.compare``)."""
    return PipelineSpec(
        COMPARE_PIPELINE_NAME,
        lambda options: build_compare_pipeline(settings, options),
        "cessl_compare.yaml",
        "Output",
        settings.grid.describe(),
    )


def pretrain_spec(defaults: PretrainParams = PRETRAIN_DEFAULTS) -> PipelineSpec:
    """The pre-training pipeline (``pipeline.dags.pretrain``) with ``defaults`` compiled in."""
    return PipelineSpec(
        PRETRAIN_PIPELINE_NAME,
        lambda options: build_pretrain_pipeline(options, defaults),
        "cessl_pretrain.yaml",
        "model_version",
    )


# --------------------------------------------------------------------------- compile


def compiled_defaults(pipeline: Any) -> dict[str, Any]:
    """The parameter defaults of a built pipeline (what the KFP run form starts from) but the
    parameter classes' own placeholder source (``data``: every run sets its own)."""
    inputs = pipeline.component_spec.inputs or {}
    placeholders = (PARAM_DEFAULTS.source, PRETRAIN_DEFAULTS.source)
    return {
        name: spec.default
        for name, spec in inputs.items()
        if spec.default is not None and not (name == "source" and spec.default in placeholders)
    }


def compile_spec(
    spec: PipelineSpec, path: Path, options: CompileOptions | None = None, sites_file: str = DEFAULT_SITES_FILE
) -> Path:
    """Write ``spec``'s IR YAML to ``path``. For a cluster (``options.kubernetes``) the image
    and the compiled defaults are checked first (:mod:`pipeline.dags.local_values`; a site's
    source names its field in ``sites_file``)."""
    options = options or CompileOptions()
    pipeline = spec.build(options)
    if options.kubernetes:
        check_local_values(compiled_defaults(pipeline), sites_file, images=[options.image])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
    log.info("compiled %s (%s, image %s)", path, ", ".join(filter(None, [spec.name, spec.about])), options.image)
    return path


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class ClusterTarget:
    """Where a run goes: a KFP client for ``host``, its experiment, namespace, ServiceAccount
    and whether KFP may reuse cached steps."""

    client: Any
    host: str
    experiment: str = "cessl"
    namespace: str | None = None
    service_account: str | None = None
    caching: bool = True


@dataclass(frozen=True)
class ClusterRun:
    """What a submit or schedule sends: ``arguments``, and ``package`` (a compiled file), or
    the pipeline compiled now with ``options`` into ``folder``; a site's source names its
    field in ``sites_file``."""

    arguments: Mapping[str, Any]
    options: CompileOptions
    folder: Path
    package: Path | None = None
    sites_file: str = DEFAULT_SITES_FILE


def _package(spec: PipelineSpec, run: ClusterRun) -> Path:
    """Every argument checked for values of this machine, then the compiled package."""
    check_local_values(run.arguments, run.sites_file)
    if run.package:
        return Path(run.package)
    return compile_spec(spec, Path(run.folder) / spec.package, run.options, run.sites_file)


def submit(spec: PipelineSpec, target: ClusterTarget, run: ClusterRun, run_name: str = "") -> str:
    """Start one run of ``spec`` on ``target``; its run id."""
    package = _package(spec, run)
    run_name = run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = target.client.create_run_from_pipeline_package(
        str(package),
        arguments=dict(run.arguments),
        run_name=run_name,
        experiment_name=target.experiment,
        namespace=target.namespace,
        service_account=target.service_account,
        enable_caching=target.caching,
    )
    log.info(
        "submitted run %s (%s) to %s, experiment %s%s",
        result.run_id,
        run_name,
        target.host,
        target.experiment,
        f", as ServiceAccount {target.service_account}" if target.service_account else "",
    )
    return str(result.run_id)


def cron6(expression: str) -> str:
    """KFP's cron has a seconds field: ``m h dom mon dow`` -> ``0 m h dom mon dow``."""
    fields = expression.split()
    if len(fields) == 5:
        return "0 " + expression.strip()
    if len(fields) == 6:
        return expression.strip()
    raise ValueError(f"--cron {expression!r}: expected 5 or 6 fields (e.g. '0 3 * * 1')")


def schedule(spec: PipelineSpec, target: ClusterTarget, run: ClusterRun, job_name: str, cron: str) -> str:
    """Create a recurring run of ``spec`` on ``target`` (``cron``: 5 or 6 fields; one run at a
    time, no catch-up); its id."""
    package = _package(spec, run)
    experiment = target.client.create_experiment(target.experiment, namespace=target.namespace)
    job = target.client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=job_name,
        cron_expression=cron6(cron),
        pipeline_package_path=str(package),
        params=dict(run.arguments),
        max_concurrency=1,
        no_catchup=True,
        service_account=target.service_account,
        enable_caching=target.caching,
    )
    job_id = str(getattr(job, "recurring_run_id", "?"))
    log.info("recurring run %s (%s, cron %s) on %s", job_id, job_name, cron6(cron), target.host)
    return job_id


# --------------------------------------------------------------------------- local


def run_local(
    spec: PipelineSpec,
    params: Any,
    config: LocalRunConfig | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``spec``'s DAG on this machine with ``kfp.local`` (``arguments``, default
    ``params.arguments()``; ``params``: the run's parameters, whose local folders a Docker
    runner mounts); its outputs. :class:`PipelineRunError` (one line: the failed step and
    why) when a task failed."""
    config = config or LocalRunConfig()
    pipeline = spec.build(CompileOptions.local(config.image))
    values = params.arguments() if arguments is None else arguments
    outputs = execute_local(pipeline, values, params, config, spec.name)
    if spec.output not in outputs:
        raise PipelineRunError(failed_run_message(spec.name, config.task_log))
    return outputs
