"""The run's parameters: one dataclass, the single source of the pipeline's defaults.

:class:`PipelineParams` is what a run chooses (the KFP pipeline's parameters, all JSON
types). The model and training defaults are those of the ``ml`` dataclasses
(:class:`~ml.model.lora.LoRAConfig`, :class:`~ml.model.rank_allocation.RankAllocationConfig`,
:class:`~ml.train.config.TrainConfig`, :data:`~ml.train.methods.DEFAULT_METHOD`), written
below as plain values because every ``ml`` module imports torch and the command line must
build without it (``tests/unit/test_params_defaults.py`` pins each value to its ``ml``
source). Each field carries its help text (and choices) in ``dataclasses.field(metadata=...)``,
from which the command line's flags (:func:`add_param_flags`) and the KFP pipeline's
signature (``pipeline.dags.finetune``) are generated. The builders (:meth:`PipelineParams.lora_config`,
:meth:`~PipelineParams.allocation_config`, :meth:`~PipelineParams.train_config`) turn the
flat parameters back into the ml dataclasses the steps take (importing ``ml`` then).

Profiles (:data:`PROFILES`): ``cluster`` (:data:`DEFAULTS`, the paper's schedule) and
``local`` (:data:`DEMO_PARAMS`, a run that finishes in minutes on two CPU cores) differ
only in :data:`PROFILE_FIELDS`; ``--profile`` picks one (:func:`params_from_args`).

No kfp, no torch here: the step bodies import this module inside the container, and
every ``cessl`` start-up imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ml.errors import ParameterError
from pipeline.core.constraints import MAX_RANK, MAX_SEED, typed

if typing.TYPE_CHECKING:
    from ml.model.lora import LoRAConfig
    from ml.model.rank_allocation import RankAllocationConfig
    from ml.train.config import TrainConfig

# The ml side's names and defaults (pinned to their sources by tests/unit/test_params_defaults.py).
BACKBONE_NAMES: tuple[str, ...] = ("tinylight", "tiny", "base", "medium", "large")  # ml.model.backbone.BACKBONE_CONFIGS
METHOD_NAMES: tuple[str, ...] = ("cessl", "lora", "full", "fixmatch", "head-only")  # ml.train.methods.METHOD_NAMES
DEFAULT_METHOD = "cessl"  # ml.train.methods.DEFAULT_METHOD
PRECISION_CHOICES: tuple[str, ...] = ("fp32", "bf16", "auto")  # ml.train.precision.PRECISION_CHOICES
HEAD_INITS: tuple[str, ...] = ("random", "linear-probe")  # ml.train.config.HEAD_INITS
EPOCHS = 200  # ml.train.config.EPOCHS: the paper's schedule


@dataclass(frozen=True)
class MlDefaults:
    """The defaults of the ml dataclasses that are pipeline parameters."""

    r: int = 16  # LoRAConfig.r
    p: float = 0.2  # LoRAConfig.p
    compress: float = 0.6  # RankAllocationConfig.compress
    seed: int = 0  # TrainConfig.seed
    max_steps: int = 1000  # TrainConfig.max_steps
    lr: float = 1e-3  # TrainConfig.lr
    val_every: int = 50  # TrainConfig.val_every
    precision: str = "fp32"  # TrainConfig.precision
    head_init: str = "linear-probe"  # TrainConfig.head_init


_ML = MlDefaults()

# Parameters that only make sense on the machine that starts the run (paths, endpoints):
# never logged as run parameters, and left to the compiled defaults on a cluster.
LOCAL_ONLY = ("state_dir", "cache_dir", "checkpoint_root", "tracking_uri")
# Parameters that are lineage or bookkeeping rather than choices of the experiment.
NOT_LOGGED = (*LOCAL_ONLY, "data_version", "git_commit", "model_name", "experiment_name")


def param(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    check: str | None = None,
) -> Any:
    """A :class:`PipelineParams` field: its default, its constraints and how the command line offers it.

    ``flag``: the option string (default ``--<name-with-dashes>``; also the name the
    validation messages use); ``cli=False``: no generated flag (set by the commands from
    other options, e.g. the data version). ``minimum`` / ``maximum`` (inclusive),
    ``exclusive_minimum`` / ``exclusive_maximum``, ``choices`` and ``check`` (a named check
    of :data:`pipeline.core.constraints.STRING_CHECKS`, e.g. ``"source"``) are the field's
    constraints: :meth:`PipelineParams.validate` and the KFP ``validate`` step read them.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "choices": choices,
            "cli": cli,
            "minimum": minimum,
            "maximum": maximum,
            "exclusive_minimum": exclusive_minimum,
            "exclusive_maximum": exclusive_maximum,
            "check": check,
        },
    )


@dataclass(frozen=True)
class PipelineParams:
    """The run's choices: the DAG's parameters (all JSON types).

    Empty strings mean "the component's own default" (e.g. ``tracking_uri`` -> the
    ``MLFLOW_TRACKING_URI`` of the component's environment).

    Schedule: these defaults (the cluster's) are the paper's, ``epochs`` = 200 (steps =
    complete labelled batches per epoch x 200); ``epochs`` = 0 trains exactly ``max_steps``
    steps (the local profile, :data:`DEMO_PARAMS`, does that).
    """

    source: str = param("data", "folder or s3://bucket/prefix of WFDB records", check="source")
    data_version: str = param(
        "", "DVC md5 of the data (part of the cache key of ingest)", cli=False, flag="--data-version"
    )
    git_commit: str = param("", "git commit of the code", cli=False)
    backbone: str = param(
        "default",
        "'default', a backbone folder/checkpoint, s3://..., or models:/cessl-backbone-<config>/<version>",
        check="non_empty",
    )
    backbone_config: str = param("tinylight", "backbone size", choices=BACKBONE_NAMES)
    labelled_ratio: float = param(
        0.05, "fraction of the non-test records that keep their labels", exclusive_minimum=0, exclusive_maximum=1
    )
    test_ratio: float = param(
        0.1,
        "fraction of the labelled records held out as the test split (the evaluation's and the gate's records: "
        "a larger one tells smaller differences apart)",
        exclusive_minimum=0,
        exclusive_maximum=1,
    )
    r: int = param(
        _ML.r,
        "LoRA rank r (r_low = (r // 4) * 2 for the least important layers)",
        flag="-r",
        minimum=1,
        maximum=MAX_RANK,
    )
    compress: float = param(_ML.compress, "compress ratio c of the one-shot rank allocation", minimum=0, maximum=1)
    p: float = param(_ML.p, "random deactivation probability", flag="-p", minimum=0, exclusive_maximum=1)
    method: str = param(DEFAULT_METHOD, "training method", choices=METHOD_NAMES)
    head_init: str = param(
        _ML.head_init,
        "the classifier's start before the first gradient step: random, or linear-probe (LP-FT: the head-only "
        "linear probe fitted on the labelled records' frozen backbone features); head-only is that probe anyway",
        choices=HEAD_INITS,
    )
    seed: int = param(_ML.seed, "seed of the split, the initialisation and the training", minimum=0, maximum=MAX_SEED)
    epochs: int = param(
        EPOCHS,
        "schedule: train N epochs, steps = complete labelled batches per epoch x N (the paper: 200); "
        "0: train --max-steps steps",
        minimum=0,
    )
    max_steps: int = param(_ML.max_steps, "fine-tuning steps when --epochs is 0 (quick runs)", minimum=1)
    batch_size: int = param(0, "labelled batch size (0: the paper's rule, 64 or 16 below 2%% labels)", minimum=0)
    lr: float = param(_ML.lr, "learning rate", exclusive_minimum=0)
    val_every: int = param(_ML.val_every, "validate (and checkpoint) every N steps", minimum=1)
    precision: str = param(
        _ML.precision,
        "fine-tuning precision: fp32, bf16 (autocast, float32 master weights) or auto (bf16 on a GPU that has it)",
        choices=PRECISION_CHOICES,
    )
    frozen_testset: str = param(
        "",
        "test set: '' the registered model's frozen one (frozen at its first registration; "
        "cessl testset refresh changes it), 'none' a freshly drawn one",
        choices=("", "none"),
    )
    model_name: str = param(
        "",
        "MLflow registered model name (default: cessl-ecg; <that>-experiments for a non-production method)",
        check="model_name",
    )
    tracking_uri: str = param("", "MLflow tracking URI", cli=False, flag="--tracking-uri", check="tracking_uri")
    experiment_name: str = param("cessl", "MLflow experiment", flag="--experiment", check="non_empty")
    checkpoint_root: str = param(
        "", "finetune checkpoints: <root>/<hash of the step's inputs>", cli=False, flag="--checkpoint-root"
    )
    min_class_count: int = param(200, "classes: scored diagnoses with >= N labelled records", minimum=1)
    state_dir: str = param(
        "", "ingest's and preprocess's incremental state (records seen before)", cli=False, flag="--state-dir"
    )
    cache_dir: str = param("", "backbone download cache", cli=False, flag="--backbone-cache")

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """Every field's problem with its constraints (types, ranges, choices, syntax), one
        entry per field, naming its flag; empty when all are valid."""
        from pipeline.core.constraints import field_problems

        return [problem for f in dataclasses.fields(self) if (problem := field_problems(f, getattr(self, f.name)))]

    def validate(self) -> PipelineParams:
        """``self`` when every field is valid, else :class:`ml.errors.ParameterError` listing
        ALL the problems in one line."""
        problems = self.problems()
        if problems:
            raise ParameterError("invalid parameters: " + "; ".join(problems))
        return self

    def arguments(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PipelineParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PipelineParams:
        """Parameters from a mapping whose values may be text (KFP renders the values of a
        ``dict`` parameter as strings, integers as ``"7.0"``); unknown keys are an error."""
        types = field_types()
        unknown = set(values) - set(types)
        if unknown:
            raise ParameterError(f"unknown pipeline parameters {sorted(unknown)}")
        coerced, problems = {}, []
        for name, value in values.items():
            try:
                coerced[name] = coerce_flag_value(value, types[name])
            except (TypeError, ValueError) as err:
                problems.append(f"{flag_of(name)} {value!r}: {err}")
        if problems:
            raise ParameterError("invalid parameters: " + "; ".join(problems))
        return cls(**coerced)

    def logged(self) -> dict[str, Any]:
        """The experiment's choices, as MLflow run parameters (no paths, endpoints or lineage)."""
        return {k: v for k, v in self.arguments().items() if k not in NOT_LOGGED}

    # ------------------------------------------------------------------ the ml dataclasses

    @property
    def resolved_batch_size(self) -> int:
        """``batch_size``, or the paper's rule for ``labelled_ratio`` when it is 0."""
        from ml.train.config import batch_size_for_label_ratio

        return self.batch_size or batch_size_for_label_ratio(self.labelled_ratio)

    def lora_config(self) -> LoRAConfig:
        from ml.model.lora import LoRAConfig

        return LoRAConfig(r=self.r, p=self.p)

    def allocation_config(self) -> RankAllocationConfig:
        from ml.model.rank_allocation import RankAllocationConfig

        return RankAllocationConfig(compress=self.compress)

    @property
    def uses_epochs(self) -> bool:
        """True: the schedule is ``epochs`` epochs; False: ``max_steps`` steps."""
        return self.epochs > 0

    def schedule(self) -> str:
        """The schedule in words, e.g. ``"200 epochs"`` or ``"150 steps"``."""
        return f"{self.epochs} epochs" if self.uses_epochs else f"{self.max_steps} steps"

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The fine-tuning schedule (batch size resolved); ``overrides`` for other TrainConfig fields.

        ``epochs`` 0 is :class:`TrainConfig`'s ``max_steps`` mode (``epochs=None``); in epochs
        mode the step count follows from the labelled split (:meth:`TrainConfig.resolve_steps`).
        """
        from ml.train.config import TrainConfig

        return TrainConfig(
            method=self.method,
            lr=self.lr,
            max_steps=self.max_steps,
            epochs=self.epochs if self.uses_epochs else None,
            batch_size=self.resolved_batch_size,
            val_every=self.val_every,
            seed=self.seed,
            precision=self.precision,
            head_init=self.head_init,
            **overrides,
        )


_FIELDS = {f.name: f for f in dataclasses.fields(PipelineParams)}
DEFAULTS = PipelineParams()

# The local profile (`cessl run`'s defaults): the demo hospital, the tiny default backbone and
# a schedule that finishes in minutes on two CPU cores: max_steps mode (epochs=0, 150 steps),
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
LOCAL, CLUSTER = "local", "cluster"
PROFILES: dict[str, PipelineParams] = {LOCAL: DEMO_PARAMS, CLUSTER: DEFAULTS}
# The parameters whose defaults differ between the profiles (what --profile changes).
PROFILE_FIELDS: tuple[str, ...] = tuple(
    name for name in _FIELDS if len({getattr(profile, name) for profile in PROFILES.values()}) > 1
)


def field_types() -> dict[str, type]:
    """Each parameter's type (str, int or float)."""
    hints = typing.get_type_hints(PipelineParams)
    return {f.name: hints[f.name] for f in dataclasses.fields(PipelineParams)}


def flag_of(name: str) -> str:
    """The option string that sets field ``name`` (``--labelled-ratio``, ``-r``)."""
    from pipeline.core.constraints import flag_name

    return flag_name(_FIELDS[name])


def coerce_flag_value(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected {kind.__name__}, got a boolean")
    if kind is int and isinstance(value, str | float):
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not number.is_integer():
            raise ValueError("expected an integer")
        return int(number)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    return kind(value)


# --------------------------------------------------------------------------- command line


def cli_fields(exclude: Collection[str] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(PipelineParams) if f.metadata["cli"] and f.name not in exclude]


def add_param_flags(
    parser: argparse.ArgumentParser, defaults: PipelineParams | None = DEFAULTS, exclude: Collection[str] = ()
) -> None:
    """One flag per command-line parameter (but ``exclude``); its help shows ``defaults``'
    value (None: the command's defaults depend on other options, e.g. ``retrain --host``:
    both profiles' values where they differ). An unset flag stays None: :func:`params_from_args`
    takes its value from the profile (``--profile``) or the command's own base."""
    group = parser.add_argument_group("pipeline parameters")
    types = field_types()
    for f in cli_fields(exclude):
        group.add_argument(
            flag_of(f.name),
            dest=f.name,
            type=typed(types[f.name]),
            default=None,
            choices=f.metadata["choices"],
            help=f"{f.metadata['help']} ({_shown_default(f.name, defaults)})",
        )


def _shown_default(name: str, defaults: PipelineParams | None) -> str:
    if defaults is not None:
        return f"default: {_escaped(getattr(defaults, name))}"
    values = {profile: _escaped(getattr(params, name)) for profile, params in PROFILES.items()}
    if len(set(values.values())) == 1:
        return f"default: {values[LOCAL]}"
    return "default: " + ", ".join(f"{value} ({profile})" for profile, value in values.items())


def _escaped(value: Any) -> str:
    """``value`` as argparse help text shows it (``%`` doubled)."""
    return (repr(value) if value == "" else str(value)).replace("%", "%%")


def add_profile_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """``--profile local|cluster``: the defaults of the parameters that differ between a
    local and a cluster run (:data:`PROFILE_FIELDS`)."""
    differ = ", ".join(f"--{name.replace('_', '-')}" for name in PROFILE_FIELDS)
    parser.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=None,
        help=f"the defaults of {differ}: local (minutes on a laptop) or cluster (the paper's schedule); "
        f"default: {default}",
    )


def params_from_args(
    args: argparse.Namespace, base: PipelineParams = DEFAULTS, exclude: Collection[str] = ()
) -> PipelineParams:
    """``base`` (its :data:`PROFILE_FIELDS` from ``--profile`` when given) with the values
    of the generated flags (but ``exclude``) that are set, on the command line or in the
    ``--params`` file."""
    profile = getattr(args, "profile", None)
    if profile:
        base = base.replace(**{name: getattr(PROFILES[profile], name) for name in PROFILE_FIELDS})
    values = {f.name: getattr(args, f.name, None) for f in cli_fields(exclude)}
    return base.replace(**{name: value for name, value in values.items() if value is not None})


def flag_type(name: str) -> Any:
    """An argparse ``type=`` with field ``name``'s type and range, for commands that offer a
    pipeline parameter outside :func:`add_param_flags` (e.g. ``cessl method-demo -r``)."""
    from pipeline.core.constraints import number

    meta, kind = _FIELDS[name].metadata, field_types()[name]
    bounds = {k: meta.get(k) for k in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")}
    return number(kind, **bounds, name=name)
