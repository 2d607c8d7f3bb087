"""The ``cessl-pretrain`` pipeline's parameters: one dataclass, as :mod:`pipeline.core.params` is the fine-tune's.

Every field is a KFP pipeline parameter of the compiled pipeline (all JSON types) and, unless
``cli=False``, a flag of ``cessl backbone pipeline run | submit``; its constraints live in
the field's metadata (:func:`pipeline.core.params.param`) and are checked by
:meth:`PretrainParams.validate` on the command line and again by the pipeline's first step.

Which settings are parameters and which are compile options (``pipeline.dags.pretrain``): what
the *TrainJob* gets (nodes, processes and GPUs per node, CPU / memory per node, its image,
runtime, namespace, timeout, and the name of the shared checkpoint volume) is read by the
launch step at run time, so a run can change it without recompiling. What KFP itself
places on the pipeline's own pods must be known at compile time: their image, resources,
the Secret and ConfigMap they read, and whether the launch step mounts a volume at all.

No kfp here: the validate step imports this module inside the container.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from components.trainjob import BACKENDS, RUNTIME_NAME
from ml.errors import ParameterError
from ml.train.pretrain_config import PretrainConfig
from pipeline.core.constraints import flag_name, typed
from pipeline.core.params import BACKBONE_NAMES, coerce_flag_value, param

# deploy/trainer/pretrain-workspace-pvc.yaml: ReadWriteMany, since the launch step and every
# node of the TrainJob mount it at once, on different machines (not finetune's ReadWriteOnce
# cessl-checkpoints)
DEFAULT_PVC = "cessl-pretrain-workspace"
PVC_ENV = "CESSL_PRETRAIN_PVC"
LOCAL_ONLY = ("state_dir", "checkpoint_root", "tracking_uri")
TRAINING = PretrainConfig()  # the training settings' defaults are the loop's own


@dataclass(frozen=True)
class PretrainParams:
    """A pre-training run's choices. These defaults are the cluster's (``cessl backbone
    pipeline submit``); ``cessl backbone pipeline run`` starts from :data:`LOCAL_DEFAULTS`."""

    source: str = param("data", "folder or s3://bucket/prefix of the source corpus's WFDB records", check="source")
    data_version: str = param("", "data version (part of ingest's cache key)", cli=False, flag="--data-version")
    git_commit: str = param("", "git commit of the code", cli=False)
    min_class_count: int = param(200, "classes: diagnoses with >= N labelled records", minimum=1)
    backbone_config: str = param(TRAINING.backbone, "backbone size to pre-train", choices=BACKBONE_NAMES)
    epochs: int = param(TRAINING.epochs, "epochs (when --max-steps is 0)", minimum=1)
    max_steps: int = param(TRAINING.max_steps, "stop after this many steps (0: train --epochs epochs)", minimum=0)
    batch_size: int = param(TRAINING.batch_size, "batch size per process", minimum=1)
    base_lr: float = param(TRAINING.base_lr, "lr = base_lr x world size x batch size / 1024", exclusive_minimum=0)
    lr: float = param(TRAINING.lr, "fixed learning rate (0: the scaling rule)", minimum=0)
    weight_decay: float = param(TRAINING.weight_decay, "AdamW weight decay", minimum=0)
    cutmix_alpha: float = param(TRAINING.cutmix_alpha, "Cutmix Beta(alpha, alpha); 0 disables it", minimum=0)
    seed: int = param(TRAINING.seed, "seed of the initialisation, the data order and Cutmix", minimum=0)
    checkpoint_every: int = param(
        TRAINING.checkpoint_every, "checkpoint every N steps (a retried job resumes there)", minimum=1
    )
    device: str = param(TRAINING.device, "device of each process", choices=("auto", "cpu", "cuda"))
    nodes: int = param(1, "TrainJob nodes (pods)", minimum=1)
    nproc_per_node: int = param(1, "processes per node (one per GPU)", minimum=1)
    gpus_per_node: int = param(1, "GPUs each node requests (0: CPU only; else = --nproc-per-node)", minimum=0)
    cpu_per_node: str = param("8", "CPU request of each node ('' for none)", check="quantity_or_empty")
    memory_per_node: str = param("32Gi", "memory request of each node ('' for none)", check="quantity_or_empty")
    backend: str = param("cluster", "where the job runs: local (one node, this pod), docker, cluster", choices=BACKENDS)
    trainer_image: str = param("", "image of the TrainJob's nodes ('' = the pipeline's image)", check="image_or_empty")
    runtime: str = param(RUNTIME_NAME, "Trainer (Cluster)TrainingRuntime of the job", check="k8s_name")
    trainjob_namespace: str = param(
        "", "namespace of the TrainJob ('' = the pipeline run's own)", check="k8s_name_or_empty"
    )
    timeout_s: int = param(86400, "fail the launch step (and stop the job) after this many seconds", minimum=10)
    checkpoint_pvc: str = param(
        os.environ.get(PVC_ENV, DEFAULT_PVC),
        "PersistentVolumeClaim shared by the launch step and the job's nodes (store, checkpoints, backbone)",
        check="k8s_name_or_empty",
    )
    alias: str = param("", "registry alias pointed at the new backbone version ('' for none)", check="alias_or_empty")
    tracking_uri: str = param("", "MLflow tracking URI", cli=False, flag="--tracking-uri", check="tracking_uri")
    checkpoint_root: str = param(
        "", "where the job's store copy, checkpoints and backbone go (the volume's mount)", cli=False
    )
    state_dir: str = param("", "ingest's and preprocess's incremental state", cli=False, flag="--state-dir")

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """Every field's problem with its constraints, then the fields' combinations."""
        from pipeline.core.constraints import field_problems

        found = [p for f in dataclasses.fields(self) if (p := field_problems(f, getattr(self, f.name)))]
        if not found:
            found += self._combination_problems()
        return found

    def _combination_problems(self) -> list[str]:
        found = []
        if self.backend == "local" and self.nodes != 1:
            found.append(f"--nodes {self.nodes}: the local backend runs one node (docker or cluster for more)")
        if self.backend == "docker" and self.nproc_per_node != 1:
            found.append(
                f"--nproc-per-node {self.nproc_per_node}: the docker backend runs one process per node (more --nodes)"
            )
        if self.gpus_per_node and self.gpus_per_node != self.nproc_per_node:
            found.append(
                f"--gpus-per-node {self.gpus_per_node}: one process per GPU, so it must equal "
                f"--nproc-per-node ({self.nproc_per_node}) or be 0"
            )
        if self.backend == "cluster" and not self.checkpoint_pvc:
            found.append("--checkpoint-pvc '': a cluster TrainJob shares the store and checkpoints on that volume")
        return found

    def validate(self) -> PretrainParams:
        """``self``, or :class:`ParameterError` listing every problem in one line."""
        problems = self.problems()
        if problems:
            raise ParameterError("invalid pre-training parameters: " + "; ".join(problems))
        return self

    def arguments(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PretrainParams:
        return dataclasses.replace(self, **changes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def describe(self) -> str:
        """The job in words, e.g. ``"tiny on 2 nodes x 4 processes (8 GPUs), 50 epochs, cluster"``."""
        gpus = f" ({self.nodes * self.gpus_per_node} GPUs)" if self.gpus_per_node else " (CPU)"
        schedule = f"{self.max_steps} steps" if self.max_steps else f"{self.epochs} epochs"
        return (
            f"{self.backbone_config} on {self.nodes} node(s) x {self.nproc_per_node} process(es){gpus}, "
            f"{schedule}, {self.backend} backend"
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PretrainParams:
        """Parameters from a mapping whose values may be text (KFP renders a ``dict``
        parameter's numbers as ``"7.0"``); unknown keys are an error."""
        types = field_types()
        unknown = set(values) - set(types)
        if unknown:
            raise ParameterError(f"unknown pre-training parameters {sorted(unknown)}")
        coerced, problems = {}, []
        for name, value in values.items():
            try:
                coerced[name] = coerce_flag_value(value, types[name])
            except (TypeError, ValueError) as err:
                problems.append(f"{flag_name(_FIELDS[name])} {value!r}: {err}")
        if problems:
            raise ParameterError("invalid pre-training parameters: " + "; ".join(problems))
        return cls(**coerced)


_FIELDS = {f.name: f for f in dataclasses.fields(PretrainParams)}
DEFAULTS = PretrainParams()
# `cessl backbone pipeline run`: one process on this machine's CPU, no volume, no GPU.
LOCAL_DEFAULTS = DEFAULTS.replace(
    backend="local", gpus_per_node=0, cpu_per_node="", memory_per_node="", checkpoint_pvc="", device="cpu"
)


def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(PretrainParams)
    return {f.name: hints[f.name] for f in dataclasses.fields(PretrainParams)}


def cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(PretrainParams) if f.metadata["cli"]]


def add_pretrain_flags(parser: argparse.ArgumentParser, defaults: PretrainParams) -> None:
    """One flag per command-line parameter, with ``defaults``' values (ranges checked by validate)."""
    group = parser.add_argument_group("pre-training pipeline parameters")
    types = field_types()
    for f in cli_fields():
        group.add_argument(
            flag_name(f),
            dest=f.name,
            type=typed(types[f.name]),
            default=getattr(defaults, f.name),
            choices=f.metadata["choices"],
            help=f"{f.metadata['help']} (default: %(default)s)",
        )


def params_from_args(args: argparse.Namespace, base: PretrainParams) -> PretrainParams:
    """``base`` with the generated flags' values (all checked together: one message)."""
    values = {f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name, None) is not None}
    fields = dataclasses.fields(PretrainParams)
    merged = {f.name: values.get(f.name, getattr(base, f.name)) for f in fields}
    return PretrainParams(**merged)
