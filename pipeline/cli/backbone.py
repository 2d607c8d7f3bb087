"""``cessl backbone ...``: get a pre-trained backbone (pre-train, import, default), register it.

- ``pretrain``: supervised multi-label pre-training on a labelled dataset store. One
  process, or several with torchrun (DDP)::

      torchrun --standalone --nproc_per_node 2 -m pipeline.cli backbone pretrain --store S --out D

  Its settings and their defaults are ``ml.train.pretrain_config.PretrainConfig``'s; every
  process runs ``components.pretrain.pretrain_on_store`` (here, or in each node of a
  ``--backend docker | cluster`` TrainJob, handed the run as JSON).

- ``import``: the authors' released checkpoints (torch pickles of a state dict; never
  unpickled beyond plain tensors).
- ``default``: the embedded default backbone (built and cached on first use).
- ``show``: print a backbone folder's config; ``fetch``: download a registered backbone.

Every command writes a backbone folder (``backbone.safetensors`` + ``backbone_config.json``,
see ``ml.model.pretrained``); ``--register`` also logs it to MLflow as a version of
``cessl-backbone-<config>`` (tracking URI: ``--tracking-uri``, ``$MLFLOW_TRACKING_URI`` or
``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from components.trainjob import BACKENDS
from ml.train.pretrain_config import PretrainConfig, PretrainRun
from pipeline.core.constraints import (
    alias,
    existing_dir,
    existing_file,
    image,
    job_name,
    k8s_name,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_root,
    positive_float,
    positive_int,
    quantity,
    tracking_uri,
)

log = logging.getLogger("cessl.backbone")

# ml.model.backbone.BACKBONE_CONFIGS (not imported here: building the parser stays torch-free)
SIZES = ("tinylight", "tiny", "base", "medium", "large")


def _classes(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def _add_register_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--register", action="store_true", help="register the backbone in MLflow")
    p.add_argument(
        "--tracking-uri",
        type=tracking_uri,
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--create-store",
        action="store_true",
        help="create a new sqlite MLflow store at --tracking-uri (with --register)",
    )
    p.add_argument("--alias", type=alias, default=None, help="registry alias to point at the version (with --register)")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The :class:`PretrainConfig` fields a user sets, with its defaults (0: not set)."""
    d = PretrainConfig()
    p.add_argument("--config", default=d.backbone, choices=SIZES, help="backbone size")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="epochs (when --max-steps is 0)")
    p.add_argument("--max-steps", type=non_negative_int, default=d.max_steps, help="0: train --epochs epochs")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per process")
    p.add_argument("--base-lr", type=positive_float, default=d.base_lr, help="lr = base_lr x world_size x batch / 1024")
    p.add_argument("--lr", type=non_negative_float, default=d.lr, help="fixed learning rate (0: the scaling rule)")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    p.add_argument("--cutmix-alpha", type=non_negative_float, default=d.cutmix_alpha, help="0 disables Cutmix")
    p.add_argument("--seed", type=non_negative_int, default=d.seed)
    p.add_argument("--checkpoint-dir", type=output_root, default=None, help="default: <out>/checkpoints")
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, help="steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--num-workers", type=non_negative_int, default=d.num_workers, help="DataLoader workers per process")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto, cpu, cuda")
    p.add_argument("--no-progress", action="store_true")


def _pretrain_run(args: argparse.Namespace) -> PretrainRun:
    """The run these flags describe (checkpoints in ``<out>/checkpoints`` unless --checkpoint-dir)."""
    config = PretrainConfig.from_values(
        vars(args)
        | {
            "backbone": args.config,
            "checkpoint_dir": str(args.checkpoint_dir or args.out / "checkpoints"),
            "resume": not args.no_resume,
            "progress": not args.no_progress,
        }
    )
    return PretrainRun(str(args.store), str(args.out), config, tuple(args.classes or ()), args.data_version)


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """Where the pre-training runs: here (``local``), or as a Kubeflow Trainer TrainJob
    (``docker``: the SDK's container backend on this machine; ``cluster``: the cluster's
    Trainer), see components.trainjob."""
    g = p.add_argument_group("distributed (Kubeflow Trainer TrainJob)")
    g.add_argument("--nodes", type=positive_int, default=1, help="training nodes (docker: containers)")
    g.add_argument("--nproc-per-node", type=positive_int, default=1, help="processes per node (cluster: one per GPU)")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: this process (torchrun for several); docker/cluster: a TrainJob",
    )
    g.add_argument("--image", type=image, default=None, help="node image (default: $CESSL_IMAGE or the project's)")
    g.add_argument("--namespace", type=k8s_name, default=None, help="cluster: the TrainJob's namespace")
    g.add_argument(
        "--timeout", type=positive_int, default=3600, help="seconds to wait for the TrainJob before failing it"
    )
    g.add_argument("--job-name", type=job_name, default=None, help="TrainJob name (default: cessl-pretrain-<random>)")
    g.add_argument(
        "--workspace-pvc",
        type=k8s_name,
        default=None,
        help="cluster: the shared volume's claim (default: the runtime's cessl-pretrain-workspace)",
    )
    g.add_argument("--gpus-per-node", type=positive_int, default=None, help="cluster: GPUs per node")
    g.add_argument("--cpu-per-node", type=quantity, default=None, help="cluster: CPU per node (4, 500m)")
    g.add_argument("--memory-per-node", type=quantity, default=None, help="cluster: memory per node (16Gi)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sizes = SIZES
    parser = subparsers.add_parser(
        "backbone",
        help="pre-trained backbones: pre-train, import, embedded default, register",
        description="Get a pre-trained backbone folder (backbone.safetensors + backbone_config.json).",
    )
    sub = parser.add_subparsers(dest="backbone_command", required=True, metavar="ACTION")

    p = sub.add_parser("pretrain", help="supervised pre-training on a labelled dataset store (torchrun for DDP)")
    p.add_argument("--store", type=existing_dir, required=True, help="dataset store (cessl data preprocess)")
    p.add_argument("--out", type=output_dir, required=True, help="backbone folder to write")
    p.add_argument("--classes", type=_classes, default=None, help="comma-separated codes (default: the store's)")
    p.add_argument("--data-version", default="", help="recorded data version (default: hash of the records used)")
    _add_training_options(p)
    _add_job_options(p)
    _add_register_options(p)
    p.set_defaults(func=_checking_register(_pretrain))

    p = sub.add_parser("import", help="import a released reference checkpoint (.pt state dict)")
    p.add_argument("path", type=existing_file, help="checkpoint file")
    p.add_argument("--config", required=True, choices=sizes, help="backbone size the checkpoint holds")
    p.add_argument("--out", type=output_dir, required=True, help="backbone folder to write")
    p.add_argument(
        "--classes",
        type=_classes,
        default=None,
        help="names of the checkpoint's classifier.1 rows (default: CODE-15%% for 6 classes)",
    )
    p.add_argument("--data-version", default=None, help="what the checkpoint was trained on (free text)")
    _add_register_options(p)
    p.set_defaults(func=_checking_register(_import))

    p = sub.add_parser("default", help="the embedded default backbone: build once, cache, print its folder")
    p.add_argument("--config", default="tiny", choices=("tiny", "tinylight"), help="size (tiny or tinylight)")
    p.add_argument(
        "--cache-dir",
        type=output_root,
        default=None,
        help="cache root (default: $CESSL_CACHE/backbones or ~/.cache/cessl/backbones)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    _add_register_options(p)
    p.set_defaults(func=_checking_register(_default))

    p = sub.add_parser(
        "show",
        help="print a backbone folder's config and what was verified (identity, shapes, dtypes, finite, BN variances)",
    )
    p.add_argument("path", type=existing_dir)
    p.set_defaults(func=_show)

    from pipeline.cli.verbs import add_pretrain_pipeline_commands

    add_pretrain_pipeline_commands(sub)  # cessl backbone pipeline compile | submit | run (cessl-pretrain)

    p = sub.add_parser("fetch", help="download a registered backbone (models:/cessl-backbone-tiny/1, ...@alias)")
    p.add_argument("model", help="models:/<name>/<version>, models:/<name>@<alias>, or cessl-backbone-<config>")
    p.add_argument("--out", type=output_dir, required=True)
    p.add_argument("--tracking-uri", type=tracking_uri, default="")
    p.set_defaults(func=_fetch)


def _checking_register(command):
    """``command``, after checking the tracking store when it will ``--register`` (before any work)."""

    def run(args: argparse.Namespace) -> int:
        if args.register:
            from pipeline.cli.preflight import check_tracking

            check_tracking(args.tracking_uri, writes=True, create=args.create_store)
        return command(args)

    return run


def _maybe_register(args: argparse.Namespace, folder: Path) -> None:
    if not args.register:
        return
    from pipeline.registry.backbones import register_backbone

    reg = register_backbone(folder, tracking_uri=args.tracking_uri, alias=args.alias)
    state = "already registered as" if reg.reused else "registered as"
    print(f"{state} {reg.model_uri} (run {reg.run_id})")


_CLUSTER_ONLY = ("namespace", "workspace_pvc", "gpus_per_node", "cpu_per_node", "memory_per_node")


def _pretrain_job(args: argparse.Namespace):
    """The TrainJob for these flags (refusing combinations that do not go together)."""
    from components.trainjob import PretrainJob, node_resources
    from ml.errors import ParameterError
    from pipeline.dags.tasks import default_image

    if args.backend != "cluster":
        given = [f"--{d.replace('_', '-')}" for d in _CLUSTER_ONLY if getattr(args, d) is not None]
        if given:
            raise ParameterError(f"{', '.join(given)}: only with --backend cluster")
    one_per_process = args.nproc_per_node if args.backend == "cluster" and args.nproc_per_node > 1 else 0
    resources = node_resources(args.gpus_per_node or one_per_process, args.cpu_per_node, args.memory_per_node)
    try:
        return PretrainJob(
            _pretrain_run(args),
            nodes=args.nodes,
            nproc_per_node=args.nproc_per_node,
            backend=args.backend,
            image=args.image or default_image(),
            namespace=args.namespace,
            timeout_s=args.timeout,
            resources_per_node=resources,
            workspace_pvc=args.workspace_pvc,
            name=args.job_name,
        )
    except ParameterError as err:
        raise ParameterError(f"backbone pretrain: {err}") from None


def _pretrain(args: argparse.Namespace) -> int:
    if args.backend != "local":
        return _pretrain_as_trainjob(args)
    if args.nodes > 1 or args.nproc_per_node > 1:
        from ml.errors import ParameterError

        raise ParameterError(
            f"--nodes {args.nodes} --nproc-per-node {args.nproc_per_node} --backend local: local is this process; "
            "use --backend docker (a TrainJob in containers) or `torchrun --standalone --nproc-per-node N "
            "-m pipeline.cli backbone pretrain ...`"
        )
    return _pretrain_here(args)


def _pretrain_as_trainjob(args: argparse.Namespace) -> int:
    from components.trainjob import run_pretrain_job

    job = _pretrain_job(args)
    result = run_pretrain_job(job)
    print(result.backbone)
    if result.backbone.is_dir():  # cluster: only where this machine mounts the shared volume
        _maybe_register(args, result.backbone)
    elif args.register:
        log.warning("%s is on the TrainJob's shared volume, not here: not registered", result.backbone)
    return 0


def _pretrain_here(args: argparse.Namespace) -> int:
    from components.pretrain import pretrain_on_store

    folder = pretrain_on_store(_pretrain_run(args))
    if folder is None:
        return 0  # rank 0 writes the folder
    print(folder)
    _maybe_register(args, folder)
    return 0


def _import(args: argparse.Namespace) -> int:
    from ml.model.pretrained import import_reference_checkpoint

    folder = import_reference_checkpoint(
        args.path, args.config, args.out, classes=args.classes, data_version=args.data_version
    )
    print(folder)
    _maybe_register(args, folder)
    return 0


def _default(args: argparse.Namespace) -> int:
    from ml.train.default_backbone import ensure_default_backbone

    folder = ensure_default_backbone(args.cache_dir, name=args.config, force=args.force)
    print(folder)
    _maybe_register(args, folder)
    return 0


def _show(args: argparse.Namespace) -> int:
    from ml.model.pretrained import read_backbone

    backbone = read_backbone(args.path)  # refuses a damaged, modified or invalid folder
    meta = backbone.meta
    meta = {k: v for k, v in meta.items() if k != "training"} | {
        "training_steps": (meta.get("training") or {}).get("steps"),
        # what read_backbone verified: identity, names and shapes, dtypes, finiteness, BN variances
        "verified": backbone.checks,
    }
    print(json.dumps(meta, indent=2))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_tracking
    from pipeline.registry.backbones import fetch_backbone

    if args.model.startswith("models:/") or "://" not in args.model:
        check_tracking(args.tracking_uri, writes=False)
    print(fetch_backbone(args.model, args.out, tracking_uri=args.tracking_uri))
    return 0
