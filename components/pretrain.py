"""Step: pre-train a backbone on a dataset store, as the ``cessl-pretrain`` pipeline launches it.

The pipeline's launch step (``pipeline.dags.tasks.pretrain_backbone``) hands a
:class:`LaunchSpec` to :func:`launch`, which picks the engine by ``backend``:

- ``local`` (one node; ``kfp.local`` and the tests): this module's own entry point in a
  child process (``python -m components.pretrain SPEC.json``, or ``torch.distributed.run
  --standalone`` for ``nproc_per_node`` > 1). The child's output is streamed line by line to
  this step's log; past ``timeout_s`` it is stopped and the step fails with one clear line,
  as it does when the child dies (a killed worker never leaves the step hanging).
- ``docker`` / ``cluster``: a Kubeflow Trainer ``TrainJob`` through
  ``components.trainjob.run_pretrain_job`` (N nodes x M processes; it waits with the
  timeout, streams the job's logs and deletes the job). Imported only in that branch.

On a cluster the TrainJob's pods cannot see the launch pod's copy of the store (a KFP
artifact), so :func:`stage_store` first copies it onto the shared volume (mounted at the
same path, ``/workspace``, in the launch pod and in the job's nodes), once per store
fingerprint; the job writes the backbone folder and its checkpoints there too. (The docker
backend stages host paths itself.) :func:`copy_backbone` brings the two backbone files
back into the step's output artifact.

The checkpoint folder is keyed on the job's inputs (:meth:`LaunchSpec.checkpoint_key`): a
retried step (or a resubmitted run) with the same store and flags resumes from the last
checkpoint rather than starting over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from components.common import StepError, read_json, sha256_dir, sha256_json
from ml.errors import EXIT_STEP_FAILED, CesslError
from ml.io import atomic_write_text, staged_folder

log = logging.getLogger(__name__)

BACKENDS = ("local", "docker", "cluster")
STORES_DIR = "stores"  # <volume>/stores/<store fingerprint>: the staged store
RUNS_DIR = "pretrain"  # <volume>/pretrain/<checkpoint key>/{checkpoints,backbone}
STOP_GRACE_S = 10.0
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


@dataclass(frozen=True)
class PretrainSettings:
    """The pre-training flags (``cessl backbone pretrain``'s, :class:`ml.train.pretrain.PretrainConfig`'s).

    ``max_steps`` 0: train ``epochs`` epochs; ``lr`` 0: the scaling rule on ``base_lr``.
    """

    config: str = "tiny"
    epochs: int = 50
    max_steps: int = 0
    batch_size: int = 64
    base_lr: float = 1e-3
    lr: float = 0.0
    weight_decay: float = 0.01
    cutmix_alpha: float = 0.75
    seed: int = 0
    checkpoint_every: int = 100
    num_workers: int = 0
    device: str = "auto"

    def cli_args(self) -> list[str]:
        """The settings as ``cessl backbone pretrain`` flags (what a TrainJob's workers run)."""
        args = [
            "--config",
            self.config,
            "--epochs",
            str(self.epochs),
            "--batch-size",
            str(self.batch_size),
            "--base-lr",
            repr(self.base_lr),
            "--weight-decay",
            repr(self.weight_decay),
            "--cutmix-alpha",
            repr(self.cutmix_alpha),
            "--seed",
            str(self.seed),
            "--checkpoint-every",
            str(self.checkpoint_every),
            "--num-workers",
            str(self.num_workers),
            "--device",
            self.device,
        ]
        if self.max_steps:
            args += ["--max-steps", str(self.max_steps)]
        if self.lr:
            args += ["--lr", repr(self.lr)]
        return args


@dataclass(frozen=True)
class LaunchSpec:
    """One pre-training job: what to train on, where to write, on what.

    ``store`` / ``out`` / ``checkpoint_dir``: paths the job's processes see (on a cluster:
    on the checkpoint volume). ``gpus_per_node`` / ``cpu_per_node`` / ``memory_per_node``:
    each node's (TrainJob pod's) request ('' for none). ``image`` / ``runtime`` /
    ``namespace`` / ``checkpoint_pvc``: the TrainJob's (cluster, docker), unused locally.
    """

    store: str
    out: str
    checkpoint_dir: str
    settings: PretrainSettings = field(default_factory=PretrainSettings)
    data_version: str = ""
    nodes: int = 1
    nproc_per_node: int = 1
    backend: str = "local"
    image: str = ""
    runtime: str = "cessl-torch-distributed"
    namespace: str = ""
    timeout_s: int = 86400
    gpus_per_node: int = 0
    cpu_per_node: str = ""
    memory_per_node: str = ""
    checkpoint_pvc: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise StepError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        for name in ("nodes", "nproc_per_node", "timeout_s"):
            if getattr(self, name) < 1:
                raise StepError(f"{name} {getattr(self, name)!r}: must be >= 1")
        if self.backend == "local" and self.nodes != 1:
            raise StepError(f"nodes {self.nodes}: the local backend runs one node (use docker or cluster for more)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["settings"] = PretrainSettings(**dict(data.get("settings") or {}))
        return cls(**values)

    def resources(self) -> dict[str, Any]:
        """Each node's resource requests in the Trainer SDK's spelling (``cpu``, ``memory``, ``gpu``)."""
        requests: dict[str, Any] = {"cpu": self.cpu_per_node, "memory": self.memory_per_node}
        if self.gpus_per_node:
            requests["gpu"] = self.gpus_per_node
        return {k: v for k, v in requests.items() if v}


def checkpoint_key(store_fingerprint: str, settings: PretrainSettings, nodes: int, nproc_per_node: int) -> str:
    """The checkpoint folder's name: a hash of what the result depends on (the store, the
    flags and the world size; a resumed run must keep its global batch)."""
    world = nodes * nproc_per_node
    return sha256_json({"store": store_fingerprint, "settings": asdict(settings), "world_size": world})[:16]


# --------------------------------------------------------------------------- the training itself


def pretrain_step(
    store: Path, out: Path, settings: PretrainSettings, checkpoint_dir: Path, data_version: str = ""
) -> Path | None:
    """Pre-train ``settings.config`` on the labelled records of ``store`` (every class the
    store names) and write the backbone folder ``out`` (rank 0; other ranks return None).
    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same schedule."""
    from ml.data.store import ECGStore, StoreDataset
    from ml.model.pretrained import save_backbone
    from ml.train.pretrain import PretrainConfig, pretrain

    data = ECGStore.open(store)
    classes = list(data.classes)
    if not classes:
        raise StepError(f"{store}: the store names no classes to pre-train on")
    ids = [rid for rid, labelled in zip(data.ids, data.labelled_mask(), strict=True) if labelled]
    if not ids:
        raise StepError(f"{store}: no labelled record to pre-train on")
    config = PretrainConfig(
        backbone=settings.config,
        num_classes=len(classes),
        epochs=settings.epochs,
        max_steps=settings.max_steps or None,
        batch_size=settings.batch_size,
        base_lr=settings.base_lr,
        lr=settings.lr or None,
        weight_decay=settings.weight_decay,
        cutmix_alpha=settings.cutmix_alpha,
        seed=settings.seed,
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_every=settings.checkpoint_every,
        num_workers=settings.num_workers,
        device=settings.device,
        progress=False,
    )
    try:
        result = pretrain(StoreDataset(data, ids, classes), config)
    except ValueError as err:  # e.g. too few records for one batch: the user's to fix
        raise StepError(f"pre-training on {store}: {err}") from err
    if not result.is_main:
        return None
    version = data_version or str(data.meta.get("data_version") or "") or f"store:{data.meta.get('fingerprint', '')}"
    return save_backbone(
        result.state_dict,
        result.config,
        classes,
        out,
        source="pretrain",
        data_version=version,
        store=str(store),
        records=len(ids),
        pretrain_config=config.to_dict(),
        training={"steps": result.steps, "world_size": result.world_size, "lr": result.lr, "losses": result.losses},
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m components.pretrain SPEC.json``: one process (or torchrun rank) of a local job."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the step adds the time
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        log.error("usage: python -m components.pretrain SPEC.json")
        return 2
    spec = LaunchSpec.from_dict(read_json(Path(args[0]), "launch spec"))
    try:
        folder = pretrain_step(
            Path(spec.store), Path(spec.out), spec.settings, Path(spec.checkpoint_dir), spec.data_version
        )
    except (CesslError, OSError) as err:  # the user's to fix: one line, no traceback
        log.error("%s", err)
        return EXIT_STEP_FAILED
    if folder is not None:
        log.info("backbone written to %s", folder)
    return 0


# --------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class LaunchResult:
    """Where the backbone folder is, and how the job went."""

    backbone_dir: Path
    job_name: str
    backend: str
    seconds: float


def _stream(pipe: Any, sink: logging.Logger) -> None:
    for line in iter(pipe.readline, ""):
        sink.info("%s", line.rstrip("\n"))
    pipe.close()


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group (torchrun and its workers), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with_kill = process.poll() is None
        if with_kill:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def local_command(spec_path: Path, nproc_per_node: int) -> list[str]:
    """The child's command line: this module, under ``torch.distributed.run`` for several processes."""
    if nproc_per_node == 1:
        return [sys.executable, "-m", "components.pretrain", str(spec_path)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "components.pretrain",
        str(spec_path),
    ]


def run_local(spec: LaunchSpec, work_dir: Path) -> LaunchResult:
    """The job as a child process on this machine: its output streamed to this log, stopped
    after ``spec.timeout_s`` seconds; a non-zero exit or a timeout is a :class:`StepError`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = atomic_write_text(work_dir / "launch_spec.json", json.dumps(spec.to_dict(), indent=2))
    command = local_command(spec_path, spec.nproc_per_node)
    root = str(Path(__file__).resolve().parents[1])  # the project: `-m components.pretrain` resolves here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
    name = f"local-pretrain-{spec_path.parent.name}"
    log.info("starting %s: %s", name, " ".join(command))
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a timeout stops torchrun's workers too
    )
    reader = threading.Thread(target=_stream, args=(process.stdout, logging.getLogger("cessl.pretrain.job")))
    reader.start()
    try:
        code = process.wait(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise StepError(
            f"pre-training job {name} did not finish within timeout_s={spec.timeout_s}: stopped "
            f"(its checkpoints in {spec.checkpoint_dir} let a rerun resume)"
        ) from None
    finally:
        _stop(process)  # also on SIGTERM of this step (Terminated) or any error here
        reader.join()
    seconds = time.monotonic() - start
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise StepError(f"pre-training job {name} {how} after {seconds:.0f} s (its output is in this step's log above)")
    return LaunchResult(Path(spec.out), name, spec.backend, seconds)


def pretrain_job(spec: LaunchSpec) -> Any:
    """The ``components.trainjob.PretrainJob`` of ``spec`` (docker or cluster backend):
    ``components.trainjob.trainjob_manifest`` of it is the TrainJob the launch step creates."""
    from components.trainjob import PretrainJob

    return PretrainJob(
        store=Path(spec.store),
        out=Path(spec.out),
        pretrain_args=tuple(spec.settings.cli_args()),
        checkpoint_dir=Path(spec.checkpoint_dir),
        nodes=spec.nodes,
        nproc_per_node=spec.nproc_per_node,
        backend=spec.backend,
        runtime=spec.runtime,
        namespace=spec.namespace or None,
        timeout_s=spec.timeout_s,
        resources_per_node=spec.resources(),
        workspace_pvc=spec.checkpoint_pvc or None,
        **({"image": spec.image} if spec.image else {}),
    )


def run_trainjob(spec: LaunchSpec) -> LaunchResult:
    """The job as a Kubeflow Trainer TrainJob (``components.trainjob``; docker or cluster
    backend): it streams the job's logs, waits with the timeout and deletes the job."""
    from components.trainjob import run_pretrain_job

    result = run_pretrain_job(pretrain_job(spec))
    return LaunchResult(Path(result.backbone), result.job_name, spec.backend, result.elapsed_s)


def launch(spec: LaunchSpec, work_dir: Path) -> LaunchResult:
    """Run the job on ``spec.backend`` and wait for it (see the module's notes)."""
    if spec.backend == "local":
        return run_local(spec, work_dir)
    return run_trainjob(spec)


def launch_spec(
    store: str,
    settings: PretrainSettings,
    *,
    root: str,
    store_fingerprint: str = "",
    data_version: str = "",
    **job: Any,
) -> LaunchSpec:
    """The job of the launch step (no I/O): ``store`` as the job sees it, its backbone folder
    and checkpoints under ``<root>/pretrain/<checkpoint key>`` (the same inputs, the same
    folder: a retried step resumes). ``job``: the :class:`LaunchSpec` fields that say where
    and how it runs (nodes, nproc_per_node, backend, image, runtime, namespace, timeout_s,
    gpus_per_node, cpu_per_node, memory_per_node, checkpoint_pvc)."""
    nodes, nproc = int(job.get("nodes", 1)), int(job.get("nproc_per_node", 1))
    work = Path(root) / RUNS_DIR / checkpoint_key(store_fingerprint or store, settings, nodes, nproc)
    return LaunchSpec(
        store=store,
        out=str(work / "backbone"),
        checkpoint_dir=str(work / "checkpoints"),
        settings=settings,
        data_version=data_version,
        **job,
    )


def launch_step(
    store: Path,
    backbone_out: Path,
    settings: PretrainSettings,
    *,
    root: str,
    store_fingerprint: str = "",
    data_version: str = "",
    **job: Any,
) -> LaunchResult:
    """The pipeline's launch step: the job's folders under ``root`` (the shared volume's
    mount on a cluster; a local folder otherwise, a temporary one when ''), the store staged
    there for a cluster TrainJob, the job run and waited for, the backbone's two files
    copied into ``backbone_out``. ``job``: as :func:`launch_spec`'s."""
    backend = str(job.get("backend", "local"))
    if backend == "cluster" and not root:
        raise StepError("backend cluster: the TrainJob needs the shared volume (checkpoint_root is empty)")
    base = root or tempfile.mkdtemp(prefix="cessl-pretrain-")
    if backend == "cluster":  # the job's pods read the store from the shared volume
        store = stage_store(store, Path(base), store_fingerprint)
    spec = launch_spec(
        str(store), settings, root=base, store_fingerprint=store_fingerprint, data_version=data_version, **job
    )
    result = launch(spec, Path(spec.out).parent)
    copy_backbone(result.backbone_dir, backbone_out)
    log.info("pre-training %s (%s backend) done in %.0f s", result.job_name, result.backend, result.seconds)
    return result


# --------------------------------------------------------------------------- the shared volume


def stage_store(store: Path, volume: Path, fingerprint: str) -> Path:
    """``store`` copied to ``<volume>/stores/<fingerprint>`` (atomically, once per fingerprint):
    where every node of a TrainJob reads it. A fingerprint that is not a plain name (or none)
    is replaced by a hash, so the copy never lands outside ``<volume>/stores``."""
    name = fingerprint if _PLAIN_NAME.fullmatch(fingerprint or "") else ""
    name = name or (sha256_json(fingerprint) if fingerprint else sha256_dir(store))[:32]
    target = volume / STORES_DIR / name
    if target.is_dir():
        log.info("store %s already on the shared volume: %s", name, target)
        return target
    with staged_folder(target) as staging:
        shutil.copytree(store, staging, dirs_exist_ok=True)
    log.info("store copied to the shared volume: %s", target)
    return target


def copy_backbone(src: Path, dst: Path) -> Path:
    """The backbone folder's two files (weights, config; not the checkpoints) into ``dst``, verified."""
    from ml.model.pretrained import BACKBONE_CONFIG, BACKBONE_WEIGHTS, read_backbone

    if not (src / BACKBONE_CONFIG).is_file():
        raise StepError(f"the pre-training job ended without a backbone folder in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (BACKBONE_WEIGHTS, BACKBONE_CONFIG):
        shutil.copyfile(src / name, dst / name)
    read_backbone(dst)  # identity and shapes: a damaged copy fails here, not in the registry
    return dst


if __name__ == "__main__":
    sys.exit(main())
