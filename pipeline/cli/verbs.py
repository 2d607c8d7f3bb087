"""The pipeline verbs' command lines: ``run | compile | submit | schedule | retrain``, ``compare``
and ``backbone pipeline compile | submit | run``.

Each verb is its option groups (:mod:`pipeline.cli.options`) and its body's name; the bodies
(:mod:`pipeline.cli.run`, :mod:`pipeline.cli.compare`, :mod:`pipeline.cli.pretrain_pipeline`)
import kfp, mlflow and pandas, so they load only when their verb runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from pipeline.cli.options import (
    add_cluster,
    add_cluster_settings,
    add_local,
    add_params_options,
    add_schedule,
    add_site_parallelism,
    add_sites,
    add_submission,
    add_tracking,
    command,
)
from pipeline.core.constraints import (
    MAX_SEED,
    comma_list,
    field_value,
    image,
    non_negative_int,
    output_file,
    quantity,
)
from pipeline.core.params import CLUSTER, DEFAULTS, DEMO_PARAMS, LOCAL, PipelineParams, add_param_flags
from pipeline.core.pretrain_params import DEFAULTS as PRETRAIN_DEFAULTS
from pipeline.core.pretrain_params import LOCAL_DEFAULTS as PRETRAIN_LOCAL_DEFAULTS
from pipeline.core.pretrain_params import PretrainParams, add_pretrain_flags

DEFAULT_PACKAGE = "cessl_pipeline.yaml"
NETWORK_PACKAGE = "cessl_network.yaml"
COMPARE_PACKAGE = "cessl_compare.yaml"
PRETRAIN_PACKAGE = "cessl_pretrain.yaml"

# --------------------------------------------------------------------------- run | compile | submit | ...


def add_run_commands(subparsers: argparse._SubParsersAction) -> None:
    """``cessl run | compile | submit | schedule | retrain`` (bodies: :mod:`pipeline.cli.run`)."""
    run = subparsers.add_parser("run", help="run the pipeline locally (kfp.local) and print a summary")
    add_param_flags(run, DEMO_PARAMS)
    add_params_options(run, LOCAL)
    add_tracking(run)
    add_local(run)
    add_sites(run)
    add_site_parallelism(run)
    command(run, "pipeline.cli.run:cmd_run")

    comp = subparsers.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    comp.add_argument("-o", "--output", type=output_file, default=DEFAULT_PACKAGE)
    add_params_options(comp)
    add_cluster_settings(comp)
    add_sites(comp)
    command(comp, "pipeline.cli.run:cmd_compile")

    for name, text in (
        ("submit", "submit one run to Kubeflow Pipelines"),
        ("schedule", "create a KFP recurring run (retraining)"),
    ):
        sub = subparsers.add_parser(name, help=text)
        add_param_flags(sub, DEFAULTS)
        add_params_options(sub, CLUSTER)
        add_tracking(sub)
        add_cluster(sub)
        add_cluster_settings(sub)
        add_submission(sub)
        add_sites(sub)
        if name == "submit":
            sub.add_argument("--run-name", default=None, help="the KFP run's name (default: cessl-<time>)")
        else:
            add_schedule(sub)
        command(sub, f"pipeline.cli.run:cmd_{name}")

    retrain = subparsers.add_parser(
        "retrain",
        help="run the pipeline if the data changed since the champion",
        description="Parameters default to `cessl run`'s (the local profile), or with --host to "
        "`cessl submit`'s (the cluster profile).",
    )
    add_param_flags(retrain, None)
    add_params_options(retrain, f"{LOCAL}, or {CLUSTER} with --host")
    add_tracking(retrain)
    add_local(retrain)
    add_cluster(retrain, host_required=False)
    add_cluster_settings(retrain, with_image=False)
    retrain.add_argument("--run-name", default=None, help="with --host: the KFP run's name (default: cessl-<time>)")
    add_sites(retrain)
    add_site_parallelism(retrain)
    command(retrain, "pipeline.cli.run:cmd_retrain")


# --------------------------------------------------------------------------- compare

# The grid's flags: each takes a list of one pipeline parameter's values, checked by that
# parameter's own constraints (pipeline.core.params.PipelineParams metadata) when parsed.
GRID_FLAGS: dict[str, tuple[str, str]] = {  # flag -> (PipelineParams field, default)
    "--methods": ("method", "cessl,head-only,fixmatch"),  # head-only: the honest baseline (frozen backbone + a head)
    "--ratios": ("labelled_ratio", "0.05,0.1"),  # the paper's labelled fractions (5% and 10%)
    "--seeds": ("seed", "0,1,2"),
}
# PipelineParams fields compare takes no flag for: the grid's, and those of a registration
# (pipeline.dags.compare.EXCLUDED_PARAMS, which tests/unit/test_cli_options.py pins this to).
COMPARE_EXCLUDED: tuple[str, ...] = (*(name for name, _ in GRID_FLAGS.values()), "model_name", "frozen_testset")


def grid_type(field_name: str, example: str) -> Callable[[str], tuple[Any, ...]]:
    """The argparse ``type=`` of a grid flag: distinct values of PipelineParams.<field_name>."""
    field = next(f for f in dataclasses.fields(PipelineParams) if f.name == field_name)
    return comma_list(field_value(field), example)


def add_compare_commands(subparsers: argparse._SubParsersAction) -> None:
    """``cessl compare`` (body: :mod:`pipeline.cli.compare`)."""
    parser = subparsers.add_parser(
        "compare",
        help="compare methods x labelled ratios x seeds on the same splits (MLflow parent run + table)",
        description=(
            "Fine-tune and evaluate every cell of a grid on the same splits (one kfp pipeline, "
            "cessl-compare), log each cell as an MLflow child run of one parent run, print the table "
            "of mean +- std over seeds. Pipeline parameters default to `cessl run`'s (the local profile: "
            "150 steps), or with --compile to the cluster's (200 epochs)."
        ),
    )
    grid = parser.add_argument_group("the grid")
    helps = {
        "--methods": "comma-separated methods, of --method's choices",
        "--ratios": "comma-separated labelled ratios, each in (0, 1)",
        "--seeds": f"comma-separated seeds, each in [0, {MAX_SEED}]",
    }
    for flag, (field_name, default) in GRID_FLAGS.items():
        grid.add_argument(
            flag, type=grid_type(field_name, default), default=default, help=f"{helps[flag]} (default: %(default)s)"
        )
    grid.add_argument(
        "--parallelism",
        type=non_negative_int,
        default=None,
        help="cells at once (default: 1 locally, no limit when compiled)",
    )
    add_param_flags(parser, None, exclude=COMPARE_EXCLUDED)
    add_params_options(parser, f"{LOCAL}, or {CLUSTER} with --compile")
    add_tracking(parser)
    add_local(parser, registry=False)
    parser.add_argument(
        "--compile", action="store_true", help="compile the pipeline for a cluster instead of running it"
    )
    parser.add_argument(
        "-o", "--output", type=output_file, default=COMPARE_PACKAGE, help="compiled YAML (with --compile)"
    )
    add_cluster_settings(parser, with_image=False)
    command(parser, "pipeline.cli.compare:cmd_compare")


# --------------------------------------------------------------------------- backbone pipeline


def add_pretrain_pipeline_commands(backbone_sub: argparse._SubParsersAction) -> None:
    """``cessl backbone pipeline compile | submit | run`` (bodies: :mod:`pipeline.cli.pretrain_pipeline`)."""
    parser = backbone_sub.add_parser(
        "pipeline",
        help="the pre-training pipeline cessl-pretrain: compile, submit, run",
        description="Ingest + preprocess a source corpus, pre-train a backbone (a Kubeflow Trainer TrainJob "
        "on a cluster), register it in MLflow as cessl-backbone-<config>.",
    )
    sub = parser.add_subparsers(dest="pipeline_command", required=True, metavar="VERB")
    body = "pipeline.cli.pretrain_pipeline"

    comp = sub.add_parser("compile", help="compile cessl-pretrain to KFP IR YAML")
    comp.add_argument("-o", "--output", type=output_file, default=PRETRAIN_PACKAGE)
    add_params_options(comp, params=PretrainParams)
    add_pretrain_settings(comp, with_pvc=True)
    command(comp, f"{body}:cmd_compile")

    submit = sub.add_parser("submit", help="submit one pre-training run to Kubeflow Pipelines")
    add_pretrain_flags(submit, PRETRAIN_DEFAULTS)
    add_params_options(submit, params=PretrainParams)
    add_tracking(submit)
    add_cluster(submit)
    add_pretrain_settings(submit, with_pvc=False)  # the volume: --checkpoint-pvc, a pipeline parameter
    add_submission(submit)
    submit.add_argument("--run-name", default=None, help="the KFP run's name (default: cessl-pretrain-<time>)")
    command(submit, f"{body}:cmd_submit")

    run = sub.add_parser("run", help="run cessl-pretrain locally (kfp.local) and register the backbone")
    add_pretrain_flags(run, PRETRAIN_LOCAL_DEFAULTS)
    add_params_options(run, params=PretrainParams)
    add_tracking(run)
    add_local(run, registry=False)
    command(run, f"{body}:cmd_run")


def add_pretrain_settings(parser: argparse.ArgumentParser, with_pvc: bool) -> None:
    """What the compiled pre-training pipeline asks of the cluster for its own steps (unset:
    ``CompileOptions``' default, see :func:`pipeline.cli.pretrain_pipeline.pretrain_compile_options`)."""
    group = parser.add_argument_group("cluster settings of the pipeline's own steps (compile time)")
    if "--image" not in parser._option_string_actions:  # argparse offers no public lookup of a flag
        group.add_argument(
            "--image", type=image, default=None, help="steps' image, and the TrainJob's unless --trainer-image"
        )
    if with_pvc:
        group.add_argument(
            "--checkpoint-pvc",
            default=PRETRAIN_DEFAULTS.checkpoint_pvc,
            help="claim the launch step and the TrainJob share, mounted at /workspace "
            "('' for none: backend local only; a run may name another claim; default: %(default)s)",
        )
    group.add_argument(
        "--credentials-secret",
        default=None,
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for ingest and register ('' for none; "
        "default: $CESSL_CREDENTIALS_SECRET or cessl-s3-credentials)",
    )
    group.add_argument(
        "--config-map",
        default=None,
        help="ConfigMap with the MLflow / S3 endpoints ('' for none; default: cessl-pipeline-defaults)",
    )
    group.add_argument("--step-cpu", type=quantity, default="1", help="CPU request of each step's pod")
    group.add_argument("--step-memory", type=quantity, default="4Gi", help="memory request of each step's pod")
    group.add_argument(
        "--retries",
        type=non_negative_int,
        default=2,
        help="retries of the launch step (the job resumes from its checkpoint)",
    )
