"""Step: pre-train a backbone on a dataset store: the one node entry point, and the launch.

Every process of every pre-training job runs :func:`pretrain_on_store` on a
:class:`ml.train.pretrain_config.PretrainRun`: ``cessl backbone pretrain`` in its own process
(and under ``torchrun``), and :func:`main`, ``python -m components.pretrain SPEC.json`` (or
``-``: the JSON on stdin), in the child processes of a local job and in every node of a
Docker or cluster TrainJob (``components.trainjob.cessl_pretrain_node``).

The pipeline's launch step (``pipeline.dags.tasks.pretrain_backbone``) hands a
:class:`components.trainjob.PretrainJob` to :func:`launch_step`, which picks the engine by
``backend``:

- ``local`` (one node; ``kfp.local`` and the tests): :func:`main` in a child process (under
  ``torch.distributed.run --standalone`` for ``nproc_per_node`` > 1). The child's output is
  streamed line by line to this step's log; past ``timeout_s`` it is stopped and the step
  fails with one clear line, as it does when the child dies (a killed worker never leaves
  the step hanging).
- ``docker`` / ``cluster``: a Kubeflow Trainer ``TrainJob`` through
  ``components.trainjob.run_pretrain_job`` (N nodes x M processes; it waits with the
  timeout, streams the job's logs and deletes the job).

On a cluster the TrainJob's pods cannot see the launch pod's copy of the store (a KFP
artifact), so :func:`stage_store` first copies it onto the shared volume (mounted at the
same path, ``/workspace``, in the launch pod and in the job's nodes), once per store
fingerprint; the job writes the backbone folder and its checkpoints there too. (The docker
backend stages host paths itself.) :func:`copy_backbone` brings the two backbone files
back into the step's output artifact.

The checkpoint folder is keyed on the job's inputs (:func:`checkpoint_key`): a retried step
(or a resubmitted run) with the same store and settings resumes from the last checkpoint
rather than starting over.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from components.common import StepError, sha256_dir, sha256_json
from components.trainjob import PretrainJob, run_pretrain_job
from ml.errors import EXIT_STEP_FAILED, EXIT_USAGE, CesslError
from ml.io import atomic_write_text, staged_folder
from ml.train.pretrain_config import PretrainConfig, PretrainRun

if TYPE_CHECKING:
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)

STORES_DIR = "stores"  # <volume>/stores/<store fingerprint>: the staged store
RUNS_DIR = "pretrain"  # <volume>/pretrain/<checkpoint key>/{checkpoints,backbone}
SPEC_FILE = "pretrain_run.json"  # a local job's PretrainRun, next to its folders
STOP_GRACE_S = 10.0
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def checkpoint_key(store_fingerprint: str, config: PretrainConfig, world_size: int) -> str:
    """The checkpoint folder's name: a hash of what the result depends on (the store, the
    training settings and the world size; a resumed run must keep its global batch)."""
    settings = dataclasses.replace(config, checkpoint_dir="", progress=True).to_dict()
    return sha256_json({"store": store_fingerprint, "config": settings, "world_size": world_size})[:16]


# --------------------------------------------------------------------------- the training itself


def store_data_version(store: Any, ids: list[str], classes: list[str]) -> str:
    """The store's recorded data version, else a hash of the records' content and classes."""
    recorded = store.meta.get("data_version")
    if recorded:
        return str(recorded)
    table = store.table.set_index(store.table["id"].astype(str))
    h = hashlib.sha256(
        json.dumps({"classes": classes, "preprocess": store.meta.get("preprocess")}, sort_keys=True).encode()
    )
    column = "content_hash" if "content_hash" in table.columns else None
    for rid in sorted(ids):
        h.update(f"{rid}:{table.at[rid, column] if column else ''}\n".encode())
    return f"store:{h.hexdigest()[:16]}"


def pretrain_on_store(run: PretrainRun) -> Path | None:
    """Pre-train ``run.config.backbone`` on the labelled records of ``run.store`` (``run.classes``,
    or every class the store names) and write the backbone folder ``run.out`` (rank 0; other
    ranks return None). Resumes from ``run.config.checkpoint_dir`` when it holds a checkpoint
    of the same schedule."""
    from ml.data.store import ECGStore, StoreDataset
    from ml.model.pretrained import save_backbone
    from ml.train.pretrain import pretrain

    data = ECGStore.open(run.store)
    classes = list(run.classes or data.classes)
    if not classes:
        raise StepError(f"{run.store}: the store names no classes to pre-train on (pass --classes)")
    ids = [rid for rid, labelled in zip(data.ids, data.labelled_mask(), strict=True) if labelled]
    if not ids:
        raise StepError(f"{run.store}: no labelled record to pre-train on")
    config = dataclasses.replace(run.config, num_classes=len(classes))
    try:
        # a map-style dataset by duck typing (__len__, __getitem__, __getitems__), not a torch subclass
        result = pretrain(cast("Dataset", StoreDataset(data, ids, classes)), config)
    except ValueError as err:  # e.g. too few records for one batch: the user's to fix
        raise StepError(f"pre-training on {run.store}: {err}") from err
    if not result.is_main:
        return None
    return save_backbone(
        result.state_dict,
        result.config,
        classes,
        Path(run.out),
        source="pretrain",
        data_version=run.data_version or store_data_version(data, ids, classes),
        store=run.store,
        records=len(ids),
        pretrain_config=config.to_dict(),
        training={"steps": result.steps, "world_size": result.world_size, "lr": result.lr, "losses": result.losses},
    )


def read_run(source: str) -> PretrainRun:
    """The :class:`PretrainRun` in the JSON file ``source`` (``-``: stdin); StepError naming it."""
    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        return PretrainRun.from_dict(json.loads(text))
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise StepError(f"pre-training spec {where}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    """``python -m components.pretrain SPEC.json`` (``-``: stdin): one process (or torchrun
    rank) of a job, whatever its backend."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the step adds the time
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        log.error("usage: python -m components.pretrain SPEC.json|-")
        return EXIT_USAGE
    try:
        folder = pretrain_on_store(read_run(args[0]))
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


def run_local(job: PretrainJob, work_dir: Path) -> LaunchResult:
    """The job as a child process on this machine: its output streamed to this log, stopped
    after ``job.timeout_s`` seconds; a non-zero exit or a timeout is a :class:`StepError`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run = job.with_run(config={"progress": False}).run  # a log, not a terminal: no progress bar
    spec_path = atomic_write_text(work_dir / SPEC_FILE, run.to_json())
    command = local_command(spec_path, job.nproc_per_node)
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
        code = process.wait(timeout=job.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise StepError(
            f"pre-training job {name} did not finish within timeout_s={job.timeout_s}: stopped "
            f"(its checkpoints in {job.checkpoint_dir} let a rerun resume)"
        ) from None
    finally:
        _stop(process)  # also on SIGTERM of this step (Terminated) or any error here
        reader.join()
    seconds = time.monotonic() - start
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise StepError(f"pre-training job {name} {how} after {seconds:.0f} s (its output is in this step's log above)")
    return LaunchResult(job.out, name, job.backend, seconds)


def run_trainjob(job: PretrainJob) -> LaunchResult:
    """The job as a Kubeflow Trainer TrainJob (``components.trainjob``; docker or cluster
    backend): it streams the job's logs, waits with the timeout and deletes the job."""
    result = run_pretrain_job(job)
    return LaunchResult(result.backbone, result.job_name, job.backend, result.elapsed_s)


def launch(job: PretrainJob, work_dir: Path) -> LaunchResult:
    """Run the job on ``job.backend`` and wait for it (see the module's notes)."""
    if job.backend == "local":
        return run_local(job, work_dir)
    return run_trainjob(job)


@dataclass(frozen=True)
class JobFolders:
    """Where the launch step puts a job's files: ``<root>/pretrain/<checkpoint key>/{backbone,
    checkpoints}`` and, for a cluster job, the store's copy ``<root>/stores/<fingerprint>``.

    root: the shared volume's mount on a cluster; a local folder otherwise ('' : a temporary
    one). store_fingerprint: the store's content hash ('' : its path stands for it).
    """

    root: str = ""
    store_fingerprint: str = ""

    def place(self, job: PretrainJob) -> PretrainJob:
        """``job`` with its backbone folder and checkpoints under :attr:`root` (no I/O): the same
        store, settings and world size, the same folder, so a retried step resumes."""
        key = checkpoint_key(self.store_fingerprint or job.run.store, job.run.config, job.world_size)
        work = Path(self.root) / RUNS_DIR / key
        return job.with_run(out=str(work / "backbone"), config={"checkpoint_dir": str(work / "checkpoints")})


def launch_step(job: PretrainJob, backbone_out: Path, folders: JobFolders) -> LaunchResult:
    """The pipeline's launch step: ``job`` (its store: the step's input) placed under
    ``folders.root`` (a temporary folder when ''), the store staged there for a cluster
    TrainJob, the job run and waited for, the backbone's two files copied into ``backbone_out``."""
    if job.backend == "cluster" and not folders.root:
        raise StepError("backend cluster: the TrainJob needs the shared volume (checkpoint_root is empty)")
    folders = dataclasses.replace(folders, root=folders.root or tempfile.mkdtemp(prefix="cessl-pretrain-"))
    if job.backend == "cluster":  # the job's pods read the store from the shared volume
        staged = stage_store(job.store, Path(folders.root), folders.store_fingerprint)
        job = job.with_run(store=str(staged))
    job = folders.place(job)
    result = launch(job, job.out.parent)
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
