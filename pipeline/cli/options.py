"""The option groups of the pipeline verbs, declared once, and the ``--params FILE`` reader.

A verb attaches the groups it needs (:func:`add_tracking`, :func:`add_local`,
:func:`add_cluster`, :func:`add_cluster_settings`, :func:`add_schedule`, :func:`add_sites`,
:func:`add_site_parallelism`, the training parameters of
:func:`pipeline.core.params.add_param_flags` and :func:`add_params_options`), and names
its body with :func:`command` (``"pipeline.cli.run:cmd_run"``): the body's module, and its
heavy imports (kfp, mlflow, torch, pandas), load only when the verb runs, so building the
parser stays fast.

``--params FILE`` (:func:`parse_args`): a YAML mapping of the verb's flags (``max-steps: 40``
or ``max_steps: 40``), read by the one reader of user files (:mod:`pipeline.core.files`),
each value checked by the flag's own ``type=`` / ``choices`` and, for
a pipeline parameter, its :class:`~pipeline.core.params.PipelineParams` constraints; an
unknown key or a bad value is one error line naming ``file:line``. The file's values are the
verb's defaults: flags on the command line override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.constraints import (
    add_tracking_uri_flag,
    cron,
    existing_file,
    http_url,
    image,
    k8s_name,
    non_negative_float,
    non_negative_int,
    optional,
    output_file,
    output_root,
    quantity,
    registered_model,
    resource_name,
    value_problem,
)
from pipeline.core.files import UserFileError, YamlFile, line_of, read_yaml
from pipeline.core.params import PipelineParams, add_profile_flag
from pipeline.dags.kfp_auth import MODES as KFP_AUTH_MODES
from pipeline.registry.policy import GATE_METRICS

T = TypeVar("T")

STATE_DIR = Path(".cache") / "cessl"
PARAMS_DEST = "params_file"
TARGET_DEST = "params_target"  # the verb's ParamsTarget: where the file's values go

# --------------------------------------------------------------------------- the verb's body


@dataclass(frozen=True)
class Command:
    """A verb's body, ``module:function``, imported when the verb runs (not when the parser is built)."""

    target: str

    def __call__(self, args: argparse.Namespace) -> int:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(args)


def command(parser: argparse.ArgumentParser, target: str) -> None:
    """Run ``target`` (``"pipeline.cli.run:cmd_run"``) when ``parser``'s verb is chosen."""
    parser.set_defaults(func=Command(target))


def given(value: T | None, default: T) -> T:
    """A flag's value, or ``default`` when the flag was left unset (None)."""
    return default if value is None else value


# --------------------------------------------------------------------------- option groups


def add_tracking(parser: argparse.ArgumentParser) -> None:
    """The MLflow store (``--tracking-uri``, as every registry verb takes it; ``--create-store``)
    and ``--data-version``."""
    add_tracking_uri_flag(parser)
    parser.add_argument(
        "--create-store",
        action="store_true",
        help="create a new sqlite MLflow store at --tracking-uri (default: only ./mlflow.db is created)",
    )
    parser.add_argument("--data-version", default="", help="override the data version (default: from the .dvc file)")


def add_local(parser: argparse.ArgumentParser, registry: bool = True) -> None:
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
        "--json", type=optional(output_file), default="", metavar="PATH", help="also write the summary as JSON"
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


def add_cluster(parser: argparse.ArgumentParser, host_required: bool = True) -> None:
    """The Kubeflow Pipelines endpoint, its authentication and the package submitted."""
    parser.add_argument(
        "--host", type=http_url, required=host_required, default=None, help="Kubeflow Pipelines endpoint URL"
    )
    parser.add_argument(
        "--namespace",
        type=optional(k8s_name),
        default=None,
        help="KFP namespace: a multi-user install's Profile namespace (e.g. kubeflow-user-example-com)",
    )
    parser.add_argument(
        "--service-account",
        type=optional(k8s_name),
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


def add_cluster_settings(parser: argparse.ArgumentParser, with_image: bool = True) -> None:
    """What the compiled fine-tune pipeline asks of the cluster: image, accelerator, node
    placement, finetune's resources, Secrets, volume and ConfigMap. A flag left unset (None)
    keeps :class:`pipeline.dags.finetune.CompileOptions`' default (``compile_options``)."""
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
    group.add_argument(
        "--finetune-cpu-limit",
        type=optional(quantity),
        default=None,
        help="finetune's CPU limit ('' for none; default: 8)",
    )
    group.add_argument(
        "--finetune-memory-limit",
        type=optional(quantity),
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
        default=None,
        help="PVC mounted at /mnt/checkpoints on finetune ('' for none; default: $CESSL_CHECKPOINT_PVC "
        "or cessl-checkpoints)",
    )
    group.add_argument(
        "--credentials-secret",
        default=None,
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ('' for none; default: "
        "$CESSL_CREDENTIALS_SECRET or cessl-s3-credentials)",
    )
    group.add_argument(
        "--mlflow-secret",
        default=None,
        help="Secret with the pipeline's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
        "('' for none; default: $CESSL_MLFLOW_SECRET or cessl-mlflow-credentials)",
    )
    group.add_argument(
        "--config-map",
        default=None,
        help="ConfigMap with the MLflow / S3 endpoints ('' for none; default: cessl-pipeline-defaults)",
    )


def add_submission(parser: argparse.ArgumentParser) -> None:
    """Where a submitting verb writes the package it compiles, and KFP's step cache."""
    parser.add_argument(
        "--pipeline-root", type=output_root, default=str(STATE_DIR), help="where the compiled YAML is written"
    )
    parser.add_argument("--no-cache", action="store_true", help="run every step again (no KFP step cache)")


def add_schedule(parser: argparse.ArgumentParser) -> None:
    """A recurring run's cron expression and name."""
    parser.add_argument("--cron", type=cron, required=True, help="cron expression, 5 or 6 fields (KFP: with seconds)")
    parser.add_argument("--job-name", default="cessl-retrain", help="the recurring run's name (default: %(default)s)")


def add_sites(parser: argparse.ArgumentParser) -> None:
    """A hospital network's site registry (``--sites``) and a choice of its sites."""
    parser.add_argument(
        "--sites",
        default=None,
        metavar="FILE",
        help="a hospital network's site registry (sites.yaml): one adapter per site, one run",
    )
    parser.add_argument(
        "--site", action="append", default=None, metavar="NAME", help="with --sites: only this site (repeatable)"
    )


def add_production_model(parser: argparse.ArgumentParser, acts: str) -> None:
    """The production model a verb ``acts`` on (e.g. "watch"): ``NAME``, or ``--site S`` of a
    network (``<NAME>-<S>``, checked against ``--sites``); read by :func:`pipeline.cli.monitor.target_model`."""
    parser.add_argument(
        "name", nargs="?", type=registered_model, default=None, help="production model (default: cessl-ecg with --site)"
    )
    parser.add_argument("--site", default=None, metavar="NAME", help=f"a network site: {acts} <NAME>-<site>")
    parser.add_argument(
        "--sites", default=None, metavar="FILE", help="the site registry (default: sites.yaml if present)"
    )


def add_site_parallelism(parser: argparse.ArgumentParser) -> None:
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


@dataclass(frozen=True)
class ParamsTarget:
    """The verb a ``--params`` file sets flags of, and the dataclass whose fields' constraints
    its parameter flags carry (PipelineParams, or PretrainParams for pre-training)."""

    parser: argparse.ArgumentParser
    params: type = PipelineParams

    def fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.params) if f.metadata.get("cli", True)}


def add_params_options(
    parser: argparse.ArgumentParser, profile: str | None = None, params: type = PipelineParams
) -> None:
    """``--params FILE`` (this verb's flags from a YAML file; ``params``: the dataclass of its
    parameter flags) and, when ``profile`` names the verb's default profile, ``--profile``."""
    parser.add_argument(
        "--params",
        dest=PARAMS_DEST,
        default=None,
        metavar="FILE",
        help="YAML mapping of this command's flags (e.g. 'max-steps: 40'), checked as the flags are; "
        "flags on the command line override it",
    )
    if profile is not None:
        add_profile_flag(parser, profile)
    parser.set_defaults(**{TARGET_DEST: ParamsTarget(parser, params)})


# --------------------------------------------------------------------------- --params FILE


class ParamsFileError(ValueError):
    """A ``--params`` file that cannot be used: one line, ``file[:line]: problem``."""


def read_params_file(path: str) -> list[tuple[str, int, Any]]:
    """The ``(key, line, value)`` entries of a ``--params`` file, read by :mod:`pipeline.core.files`
    (a regular file of at most 1 MiB, safe YAML: merge keys, no tags, bounded nesting and
    aliases, no NUL): a flat mapping (values: scalars, or lists of scalars for a repeatable
    flag); ParamsFileError otherwise."""
    try:
        doc = read_yaml(path)
        return _entries(doc)
    except UserFileError as err:
        raise ParamsFileError(str(err)) from None


def _entries(doc: YamlFile) -> list[tuple[str, int, Any]]:
    import yaml

    root = doc.root
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ParamsFileError(f"{doc.at(root)}: expected a mapping of flag: value")
    entries = []
    for key, key_node, value_node in doc.pairs(root):
        line = line_of(key_node)
        if not isinstance(key, str):
            raise ParamsFileError(f"{doc.at(key_node)}: a key must be a flag's name")
        nested = isinstance(value_node, yaml.MappingNode) or (
            isinstance(value_node, yaml.SequenceNode)
            and any(not isinstance(n, yaml.ScalarNode) for n in value_node.value)
        )
        if nested:
            raise ParamsFileError(f"{doc.at(key_node)}: {key}: expected a value or a list of values")
        try:
            value = doc.value(value_node)
        except UserFileError as err:
            raise ParamsFileError(f"{doc.at(key_node)}: {key}: {err.problem}") from None
        entries.append((key, line, value))
    return entries


def file_defaults(target: ParamsTarget, path: str) -> dict[str, Any]:
    """The values of ``path`` for the verb's flags, by dest, each checked as its flag is."""
    parser, fields = target.parser, target.fields()
    actions = settable_actions(parser)
    seen: dict[str, int] = {}
    values: dict[str, Any] = {}
    for key, line, value in read_params_file(path):
        where = f"{path}:{line}: {key}"
        action = actions.get(key.lstrip("-").replace("-", "_"))
        if action is None:
            close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), list(actions), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ParamsFileError(f"{where}: unknown key, not a flag of {parser.prog}{hint}")
        if action.dest in seen:
            raise ParamsFileError(f"{where}: {action.option_strings[-1]} set twice (first on line {seen[action.dest]})")
        seen[action.dest] = line
        try:
            values[action.dest] = action_value(action, value, fields.get(action.dest))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise ParamsFileError(f"{where}: {err}") from None
    return values


def settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``parser``'s flags a file may set, by each long name and dest (``max_steps``, ``experiment``)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse offers no public list of a parser's actions
        if not action.option_strings or action.dest in (PARAMS_DEST, "help", argparse.SUPPRESS):
            continue
        names = {action.dest} | {s.lstrip("-").replace("-", "_") for s in action.option_strings if s.startswith("--")}
        found.update(dict.fromkeys(names, action))
    return found


def action_value(action: argparse.Action, value: Any, field: dataclasses.Field | None = None) -> Any:
    """A file's ``value`` for ``action``, through the flag's own ``type=`` and ``choices`` and,
    for a pipeline parameter (``field``), the field's constraints."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item) for item in items]
    if type(action) is not argparse._StoreAction or action.nargs is not None:
        raise ValueError("cannot be set from a file")
    converted = _scalar(action, value)
    if field is not None:
        problem = value_problem(field, converted)
        if problem:
            raise ValueError(f"{converted!r}: {problem}")
    return converted


def _scalar(action: argparse.Action, value: Any) -> Any:
    if value is None or isinstance(value, bool | list | dict):
        shown = "no value" if value is None else repr(value)
        raise ValueError(f"expected a value for {action.option_strings[-1]}, got {shown} (quote text such as 'no')")
    text = str(value)
    converted = action.type(text) if callable(action.type) else text
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the verb's ``--params`` file's values as its defaults
    (the command line overrides them; a required flag such as ``--host`` may come from the
    file); a bad file, or a required flag set nowhere, is the parser's one-line error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--params" or arg.startswith("--params=") for arg in argv):
        return parser.parse_args(argv)
    required = [action for action in _optionals(parser) if action.required]
    for action in required:  # the file may set them: checked once it is read
        action.required = False
    args = parser.parse_args(argv)
    target: ParamsTarget | None = getattr(args, TARGET_DEST, None)
    path = getattr(args, PARAMS_DEST, None)
    if target is None or not path:
        return parser.parse_args(argv) if _restore(required) else args
    try:
        target.parser.set_defaults(**file_defaults(target, path))
    except ParamsFileError as err:
        target.parser.error(f"--params {err}")
    args = parser.parse_args(argv)
    missing = [a.option_strings[-1] for a in required if a in target.parser._actions and getattr(args, a.dest) is None]
    if missing:
        target.parser.error(
            f"the following arguments are required: {', '.join(missing)} (on the command line or in {path})"
        )
    return args


def _optionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of ``parser`` and of its sub-commands, at every depth."""
    found = []
    for action in parser._actions:  # argparse offers no public list of a parser's actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _optionals(sub)
        elif action.option_strings:
            found.append(action)
    return found


def _restore(required: list[argparse.Action]) -> bool:
    """Make ``required`` required again; True when there were any."""
    for action in required:
        action.required = True
    return bool(required)
