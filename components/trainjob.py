"""Pre-training as a Kubeflow Trainer ``TrainJob``, through the Kubeflow Python SDK.

One entry point, :func:`run_pretrain_job`, for every backend of ``kubeflow.trainer``'s
``TrainerClient``:

- ``docker``: the SDK's container backend runs one container per node of the project
  image on a per-job Docker network; ``torchrun`` joins them (static rendezvous on node 0).
  The SDK bind-mounts ``~/.kubeflow/trainer/containers/<job name>`` as ``/workspace`` in
  every node: that folder is the shared volume. The store is hard-linked into it, the
  checkpoints of an earlier (interrupted) job are copied in, and the backbone folder and
  the checkpoints are read back from it after the job.
- ``cluster``: a ``TrainJob`` on the cluster's Trainer (``KubernetesBackendConfig``),
  referencing our ``TrainingRuntime`` ``cessl-torch-distributed`` (namespaced: it follows
  the overlay's namespace, its pods pull with the overlay's Secret)
  (``deploy/trainer/``), whose nodes mount the shared ``ReadWriteMany`` volume at
  ``/workspace``: ``store``, ``out`` and ``checkpoint_dir`` are paths on that volume.

What runs in every node is :func:`cessl_pretrain_node`: the SDK ships its *source text*
(``inspect.getsource``), so it is a self-contained top-level function; it hands the job's
:class:`ml.train.pretrain_config.PretrainRun` (JSON, on stdin) to the one node entry point,
``python -m components.pretrain -``, in torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR), so the nodes do exactly what a local run does (DistributedSampler shards,
global BatchNorm, rank-0 atomic checkpoints, resume).

The job's logs stream into a log file and this module's logger; the wait has a timeout;
the job is deleted at the end whatever happened; a failed or timed-out job raises
:class:`TrainJobFailedError` naming the job, the failed node(s) and the log file.

:func:`trainjob_manifest` is the ``TrainJob`` object the cluster backend creates, built
with the SDK's own functions and API models (the Trainer's ``kubeflow_trainer_api``), for
review and schema checks without a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import CesslError, ParameterError, ServiceUnavailableError, StepFailedError
from ml.io import staged_folder
from ml.train.pretrain_config import PretrainRun

log = logging.getLogger("cessl.trainjob")

BACKENDS = ("local", "docker", "cluster")
RUNTIME_NAME = "cessl-torch-distributed"
RUNTIME_FILE = Path(__file__).resolve().parents[1] / "deploy" / "trainer" / f"{RUNTIME_NAME}.yaml"
DEFAULT_IMAGE = "localhost:5000/cessl:0.1.0"
WORKSPACE = "/workspace"  # the SDK's constants.WORKSPACE_PATH; the runtime's shared volume
WORKSPACE_VOLUME = "workspace"  # the runtime's volume name (deploy/trainer/cessl-torch-distributed.yaml)
NODE_CONTAINER = "node"
JOB_LABELS = {"app.kubernetes.io/part-of": "cessl", "app.kubernetes.io/component": "pretrain"}
JOB_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")  # DNS-1035 label (a TrainJob's name)
MIN_TRAINJOB_TIMEOUT_S = 10  # docker / cluster: the SDK polls the job every 2 s
_FAILED_NODE = re.compile(r"^\s*(?P<step>node-\d+): status=(?P<status>\w+), exit_code=(?P<code>\S+)", re.M)


class TrainJobFailedError(StepFailedError):
    """A TrainJob failed or did not finish in time (the message names the job, the failed
    node(s) and the log file)."""


@dataclass(frozen=True)
class PretrainJob:
    """One pre-training job: the run every process does, on how many processes, where.

    run: the store, the backbone folder, the checkpoint folder (``run.config.checkpoint_dir``;
    '' : none kept, ``<out>/checkpoints`` on a cluster) and the training settings. Its
    paths: ``local``: this machine's; ``docker``: host paths (staged into the job's shared
    folder and read back); ``cluster``: paths on the shared volume the nodes mount at
    ``/workspace`` (the step that reads ``out`` mounts it too).
    nodes x nproc_per_node processes; on the cluster ``nproc_per_node > 1`` means one
    process per GPU (``resources_per_node["gpu"]``), the SDK's container backend runs one
    process per node on CPU; ``local`` is one node (``torchrun --standalone`` for several
    processes, ``components.pretrain.run_local``).
    resources_per_node: ``{"cpu": 4, "memory": "16Gi", "gpu": 1}`` (the SDK's spelling).
    workspace_pvc: the shared volume's PersistentVolumeClaim (cluster; None: the runtime's).
    """

    run: PretrainRun
    nodes: int = 1
    nproc_per_node: int = 1
    backend: str = "docker"
    image: str = DEFAULT_IMAGE
    runtime: str = RUNTIME_NAME
    namespace: str | None = None
    timeout_s: int = 3600
    resources_per_node: dict[str, Any] = field(default_factory=dict)
    workspace_pvc: str | None = None
    name: str | None = None  # None: cessl-pretrain-<random>
    log_path: Path | None = None  # None: <out>.trainjob.log
    env: dict[str, str] = field(default_factory=dict)
    docker_host: str | None = None  # None: $DOCKER_HOST or the default socket
    pull_policy: str = "IfNotPresent"
    runtime_source: str | None = None  # docker: runtime YAML (None: deploy/trainer's)

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r}: must be one of {', '.join(BACKENDS)}")
        if self.nodes < 1 or self.nproc_per_node < 1:
            problems.append(f"nodes {self.nodes} x nproc_per_node {self.nproc_per_node}: both must be >= 1")
        if self.backend == "local" and self.nodes != 1:
            problems.append(f"nodes {self.nodes}: the local backend is this machine (one node); use docker or cluster")
        if self.backend == "docker" and self.nproc_per_node != 1:
            problems.append(
                f"nproc_per_node {self.nproc_per_node}: the SDK's container backend runs one process per node "
                "on CPU; use more nodes"
            )
        gpus = self.resources_per_node.get("gpu")
        if self.backend == "cluster" and self.nproc_per_node > 1 and str(gpus) != str(self.nproc_per_node):
            problems.append(
                f"nproc_per_node {self.nproc_per_node}: on the cluster one process runs per GPU; "
                f"resources_per_node gpu is {gpus}"
            )
        minimum = 1 if self.backend == "local" else MIN_TRAINJOB_TIMEOUT_S
        if self.timeout_s < minimum:
            problems.append(f"timeout_s {self.timeout_s}: must be >= {minimum} s")
        if self.name is not None and not JOB_NAME.match(self.name):
            problems.append(f"name {self.name!r}: must be a DNS-1035 label (lower-case letters, digits, '-')")
        if problems:
            raise ParameterError("; ".join(problems))

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def store(self) -> Path:
        return Path(self.run.store)

    @property
    def out(self) -> Path:
        return Path(self.run.out)

    @property
    def checkpoint_dir(self) -> Path | None:
        return Path(self.run.config.checkpoint_dir) if self.run.config.checkpoint_dir else None

    def with_run(self, **changes: Any) -> PretrainJob:
        """This job with its run's fields changed (``config``: a dict of config changes)."""
        config = dataclasses.replace(self.run.config, **changes.pop("config", {}))
        return dataclasses.replace(self, run=dataclasses.replace(self.run, config=config, **changes))

    def job_name(self) -> str:
        return self.name or f"cessl-pretrain-{uuid.uuid4().hex[:8]}"

    def job_log_path(self) -> Path:
        return self.log_path or self.out.with_name(self.out.name + ".trainjob.log")


@dataclass(frozen=True)
class PretrainJobResult:
    """What a finished job left: its name, backend, final status, backbone folder, log."""

    job_name: str
    backend: str
    status: str
    backbone: Path
    log_path: Path
    elapsed_s: float = 0.0


def node_resources(gpus: int = 0, cpu: str = "", memory: str = "") -> dict[str, Any]:
    """A node's resource requests in the Trainer SDK's spelling (``cpu``, ``memory``, ``gpu``;
    0 and '' : none)."""
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory, "gpu": gpus}
    return {k: v for k, v in requests.items() if v}


# --- what runs in every node ------------------------------------------------------------
def cessl_pretrain_node(spec: dict, workdir: str) -> None:
    """Run the job's pre-training ``spec`` (a ``PretrainRun`` as JSON) in this torchrun
    worker's environment: ``python -m components.pretrain -`` with the spec on stdin.

    Shipped to the nodes as source text by the Kubeflow SDK (``inspect.getsource``): keep
    it self-contained (imports inside, standard library only). The command inherits
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK, so it joins the job's
    process group as one rank; its exit status is the worker's.
    """
    import json
    import os
    import subprocess
    import sys

    rank = os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    print(f"cessl node: rank {rank} of {world} on {os.uname().nodename}", flush=True)
    command = [sys.executable, "-m", "components.pretrain", "-"]
    code = subprocess.run(command, cwd=workdir, input=json.dumps(spec), text=True, check=False).returncode
    if code != 0:
        print(f"cessl node: rank {rank} failed with exit status {code}", flush=True)
        raise SystemExit(code)


def _node_spec(job: PretrainJob, store: str, out: str, checkpoints: str) -> dict[str, Any]:
    """The JSON every node hands to the node entry point: the job's run at the nodes' paths."""
    node = job.with_run(store=store, out=out, config={"checkpoint_dir": checkpoints, "progress": False}).run
    return dict(json.loads(node.to_json()))


# --- the SDK request (shared by the cluster backend and the manifest) --------------------
def _custom_trainer(job: PretrainJob, spec: dict[str, Any]):
    from kubeflow.trainer import CustomTrainer

    resources = {key: str(value) for key, value in job.resources_per_node.items()}  # quantities
    return CustomTrainer(
        func=cessl_pretrain_node,
        func_args={"spec": spec, "workdir": WORKSPACE},
        num_nodes=job.nodes,
        resources_per_node=resources or None,
        image=job.image,
        env={"PYTHONUNBUFFERED": "1", **job.env},
    )


def _workspace_patch(job: PretrainJob):
    """The RuntimePatch pointing the runtime's shared volume at ``workspace_pvc`` (None: keep)."""
    if not job.workspace_pvc:
        return None
    from kubeflow.trainer.options import (
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainingRuntimeSpecPatch,
    )

    volume = {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": job.workspace_pvc}}
    pod = PodTemplatePatch(spec=PodSpecPatch(volumes=[volume]))
    node = ReplicatedJobPatch(name="node", template=JobTemplatePatch(spec=JobSpecPatch(template=pod)))
    return RuntimePatch(
        training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[node]))
        )
    )


def _cluster_options(job: PretrainJob, name: str) -> list:
    from kubeflow.trainer.options import ActiveDeadlineSeconds, Labels, Name

    options: list = [Name(name), Labels(dict(JOB_LABELS)), ActiveDeadlineSeconds(int(job.timeout_s))]
    patch = _workspace_patch(job)
    if patch is not None:
        options.append(patch)
    return options


def _cluster_spec(job: PretrainJob) -> dict[str, Any]:
    checkpoints = job.checkpoint_dir or job.out / "checkpoints"
    return _node_spec(job, str(job.store), str(job.out), str(checkpoints))


def _cluster_runtime(name: str):
    """The runtime as the SDK's Kubernetes backend reads ours from the cluster: a torch
    TrainingRuntime of the job's namespace (command: the SDK's torchrun entry script)."""
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types

    trainer = types.RuntimeTrainer(
        trainer_type=types.TrainerType.CUSTOM_TRAINER, framework="torch", image=DEFAULT_IMAGE
    )
    trainer.set_command(constants.TORCH_COMMAND)
    return types.Runtime(name=name, trainer=trainer, kind=types.RuntimeKind.TRAINING_RUNTIME)


def trainjob_manifest(job: PretrainJob, name: str | None = None) -> dict[str, Any]:
    """The ``TrainJob`` (trainer.kubeflow.org/v1alpha1) the cluster backend creates for ``job``.

    Built the way the SDK's Kubernetes backend builds it (``get_trainer_cr_from_custom_trainer``,
    the same options, the ``kubeflow_trainer_api`` models), without contacting a cluster.
    """
    from kubeflow.trainer.backends.kubernetes import utils as k8s_utils
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.options.kubernetes import _patch_to_dict
    from kubeflow_trainer_api import models

    name = name or job.job_name()
    runtime = _cluster_runtime(job.runtime)
    trainer_cr = k8s_utils.get_trainer_cr_from_custom_trainer(runtime, _custom_trainer(job, _cluster_spec(job)))
    patch = _workspace_patch(job)
    spec = models.TrainerV1alpha1TrainJobSpec(
        runtimeRef=models.TrainerV1alpha1RuntimeRef(name=runtime.name, kind=runtime.kind.value),
        trainer=trainer_cr,
        runtimePatches=[models.TrainerV1alpha1RuntimePatch.from_dict(_patch_to_dict(patch))] if patch else None,
        activeDeadlineSeconds=int(job.timeout_s),
    )
    train_job = models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=job.namespace, labels=dict(JOB_LABELS)
        ),  # the SDK sends the namespace in the URL, not the body
        spec=spec,
    )
    return train_job.to_dict()


# --- running a job ----------------------------------------------------------------------
def _docker_adapter_class():
    """The SDK's Docker adapter, with two fixes for images like ours (built lazily: the
    ``docker`` package is imported only for the docker backend).

    - The SDK gives a node its command but keeps the image's ENTRYPOINT (ours is
      ``cessl``): the entrypoint becomes ``/usr/bin/env``, as for KFP's local runner
      (``pipeline.dags.finetune``) and as on a cluster, where a container's command replaces it.
    - The SDK runs ``bash -lc``: a login shell re-reads /etc/profile, which on Debian
      images resets PATH and hides the venv's ``torchrun``; ``bash -c`` keeps the image's PATH.
    """
    from kubeflow.trainer.backends.container.adapters.docker import DockerClientAdapter

    class CesslDockerAdapter(DockerClientAdapter):
        def create_and_start_container(
            self,
            image: str,
            command: list[str],
            name: str,
            network_id: str,
            environment: dict[str, str],
            labels: dict[str, str],
            volumes: dict[str, dict[str, str]],
            working_dir: str,
        ) -> str:
            command = list(command)
            if command[:2] == ["bash", "-lc"]:
                command[1] = "-c"
            container = self.client.containers.run(
                image=image,
                command=tuple(command),
                entrypoint=["/usr/bin/env"],
                name=name,
                detach=True,
                working_dir=working_dir,
                network=network_id,
                environment=environment,
                labels=labels,
                volumes=volumes,
                auto_remove=False,
            )
            return container.id

    return CesslDockerAdapter


def _client(job: PretrainJob):
    """The TrainerClient for ``job.backend`` (docker: our runtime file, our adapter)."""
    from kubeflow.trainer import ContainerBackendConfig, KubernetesBackendConfig, TrainerClient, TrainingRuntimeSource

    if job.backend == "docker":
        source = job.runtime_source or str(RUNTIME_FILE)
        if not Path(source.removeprefix("file://")).exists():
            raise ParameterError(f"runtime source {source}: no such file (the {job.runtime} TrainingRuntime)")
        config = ContainerBackendConfig(
            container_runtime="docker",
            container_host=job.docker_host,
            pull_policy=job.pull_policy,
            auto_remove=False,  # run_pretrain_job reads the job's folder back after delete_job, then removes it
            runtime_source=TrainingRuntimeSource(sources=[source]),
        )
        try:
            client = TrainerClient(backend_config=config)
        except (RuntimeError, ImportError) as err:
            raise ServiceUnavailableError(
                f"Docker engine {job.docker_host or os.environ.get('DOCKER_HOST') or 'default socket'}: "
                f"does not answer ({str(err).splitlines()[0]})"
            ) from err
        client.backend._adapter = _docker_adapter_class()(job.docker_host)  # type: ignore[attr-defined]
        return client
    if job.backend == "cluster":
        # $KUBECONFIG read now (the kubernetes package reads it once, at import)
        kubeconfig = os.environ.get("KUBECONFIG") or None
        if kubeconfig and os.pathsep in kubeconfig:
            kubeconfig = None  # a list: the kubernetes package merges it itself
        try:
            cluster = KubernetesBackendConfig(namespace=job.namespace, config_file=kubeconfig)
            return TrainerClient(backend_config=cluster)
        except Exception as err:  # kube config missing, API server unreachable, no Trainer CRDs
            raise ServiceUnavailableError(f"Kubernetes (Kubeflow Trainer): {str(err).splitlines()[0]}") from err
    raise ParameterError(
        f"backend {job.backend!r}: run_pretrain_job runs docker or cluster TrainJobs; the local backend is "
        "components.pretrain's (this process, or torchrun --standalone)"
    )


def _check_store(store: Path) -> None:
    """``store`` is a complete dataset store on this machine (ParameterError naming it if not)."""
    from ml.data.store import ECGStore

    try:
        ECGStore.open(store)
    except (OSError, ValueError) as err:
        raise ParameterError(str(err).splitlines()[0]) from err


def _copy_tree(src: Path, dst: Path, link: bool, skip_hidden: bool = False) -> None:
    """Copy ``src`` to ``dst``; ``link``: hard links where the filesystem allows (no data copy);
    ``skip_hidden``: leave out hidden files (an atomic write a stopped node left half done)."""

    def copy(a: str, b: str) -> object:
        if link:
            try:
                os.link(a, b)
                return b
            except OSError:
                pass
        return shutil.copy2(a, b)

    ignore = shutil.ignore_patterns(".*") if skip_hidden else None
    shutil.copytree(src, dst, copy_function=copy, dirs_exist_ok=True, ignore=ignore)


def _image_user(client, image: str) -> tuple[int, int] | None:
    """The numeric uid:gid the image runs as (None: root or a name)."""
    try:
        user = client.backend._adapter.client.images.get(image).attrs["Config"].get("User") or ""
    except Exception:
        return None
    uid, _, gid = user.partition(":")
    if uid.isdigit() and int(uid) != 0:
        return int(uid), int(gid) if gid.isdigit() else int(uid)
    return None


def _make_writable(path: Path, owner: tuple[int, int] | None) -> None:
    """Let the node containers' user write ``path`` (a folder we created for the job)."""
    if owner and os.geteuid() == 0:
        os.chown(path, *owner)
    else:
        path.chmod(0o777)


def _stage_docker_workspace(job: PretrainJob, name: str, client) -> Path:
    """The job's shared folder (the SDK's per-job workdir): the store (hard links), an
    earlier job's checkpoints, and writable folders for the outputs."""
    from kubeflow.trainer.backends.container import utils as container_utils

    workdir = Path(container_utils.create_workdir(name))
    _copy_tree(job.store, workdir / "store", link=True)
    owner = _image_user(client, job.image)
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    if job.checkpoint_dir and job.checkpoint_dir.is_dir():
        _copy_tree(job.checkpoint_dir, checkpoints, link=False, skip_hidden=True)
        log.info("TrainJob %s resumes from the checkpoints in %s", name, job.checkpoint_dir)
    for path in (workdir, checkpoints, *checkpoints.rglob("*")):
        _make_writable(path, owner)
    return workdir


def _collect_docker_outputs(job: PretrainJob, workdir: Path, complete: bool) -> None:
    """Read the backbone folder (on success: first, so a new ``out`` appears whole) and the
    checkpoints (always: a later job resumes from them) back from the job's folder."""
    if complete:
        produced = workdir / "backbone"
        if not produced.is_dir():
            raise StepFailedError(f"TrainJob finished without writing a backbone folder ({produced})")
        with staged_folder(job.out) as target:
            _copy_tree(produced, target, link=False)
    checkpoints = workdir / "checkpoints"
    if job.checkpoint_dir and checkpoints.is_dir() and any(checkpoints.iterdir()):
        with staged_folder(job.checkpoint_dir) as target:
            _copy_tree(checkpoints, target, link=False, skip_hidden=True)


class _LogStreamer:
    """Follows the job's logs (all nodes, in order) into a file and the logger, in a
    daemon thread: it never holds up the wait, and deleting the job ends it."""

    def __init__(self, client, name: str, path: Path, lines: bool = False) -> None:
        self.client, self.name, self.path = client, name, path
        self.lines = lines  # the Kubernetes backend yields lines without their newline
        self.thread = threading.Thread(target=self._run, name=f"logs-{name}", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as out:
                for chunk in self.client.get_job_logs(self.name, follow=True):
                    out.write(chunk + "\n" if self.lines and not chunk.endswith("\n") else chunk)
                    out.flush()
                    for line in chunk.splitlines():
                        if line.strip():
                            log.info("[%s] %s", self.name, line)
        except Exception as err:  # the job was deleted under the stream, or the engine went away
            log.debug("log stream of %s ended: %s", self.name, err)

    def stop(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)


def _failed_nodes(message: str, client, name: str) -> str:
    """``node-1 (exit 137), ...``: from the SDK's failure report, else the job's steps."""
    nodes = [
        f"{m['step']} (exit {m['code']})"
        for m in _FAILED_NODE.finditer(message)
        if m["status"] not in ("running",) and m["code"] not in ("0", "None")
    ]
    if not nodes:
        try:
            nodes = [s.name for s in client.get_job(name).steps if s.status == "Failed"]
        except Exception:
            nodes = []
    return ", ".join(nodes) or "unknown node"


def _start_error(name: str, job: PretrainJob, client, err: BaseException) -> CesslError:
    """Why the job could not be created, from the SDK's error and what caused it (the SDK
    wraps an unreachable API server or a refused permission in a generic RuntimeError)."""
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    cause: BaseException | None = err
    while cause is not None:
        status = getattr(cause, "status", None)
        reason = getattr(cause, "reason", None)
        if isinstance(status, int) and reason:  # kubernetes ApiException
            return TrainJobFailedError(f"TrainJob {name} could not start: {what} ({status} {reason})")
        if isinstance(cause, OSError) or type(cause).__name__ in ("MaxRetryError", "NewConnectionError"):
            where = job.docker_host or os.environ.get("DOCKER_HOST") or "the Docker engine"
            if job.backend == "cluster":
                api = getattr(getattr(client.backend, "custom_api", None), "api_client", None)
                where = f"Kubernetes API server {getattr(getattr(api, 'configuration', None), 'host', '')}".strip()
            return ServiceUnavailableError(f"{where}: does not answer; TrainJob {name} not created ({what})")
        cause = cause.__cause__ or cause.__context__
    return TrainJobFailedError(f"TrainJob {name} could not start: {what}")


def run_pretrain_job(job: PretrainJob, *, on_started: Callable[[str], None] | None = None) -> PretrainJobResult:
    """Pre-train as a TrainJob on ``job.backend``; wait (with ``job.timeout_s``) streaming its
    logs; delete it; return where the backbone folder is.

    Raises TrainJobFailedError (a node failed, or the job timed out), ServiceUnavailableError
    (no Docker engine / cluster), ParameterError (bad job). ``on_started(job name)`` is called
    once the job is created (tests use it to interfere).
    """
    from kubeflow.trainer.constants import constants

    name = job.job_name()
    log_path = job.job_log_path()
    if job.backend == "docker":  # the user's store before the engine: a wrong folder says so
        _check_store(job.store)
    client = _client(job)
    workdir: Path | None = None
    start = time.monotonic()
    status = "Unknown"
    streamer: _LogStreamer | None = None
    created = False
    try:
        if job.backend == "docker":
            workdir = _stage_docker_workspace(job, name, client)
            spec = _node_spec(job, f"{WORKSPACE}/store", f"{WORKSPACE}/backbone", f"{WORKSPACE}/checkpoints")
            options: list = []
            from kubeflow.trainer.options import Name

            options.append(Name(name))
        else:
            spec = _cluster_spec(job)
            options = _cluster_options(job, name)
        trainer = _custom_trainer(job, spec)
        log.info(
            "TrainJob %s: %d node(s) x %d process(es) on %s (image %s); log %s",
            name,
            job.nodes,
            job.nproc_per_node,
            job.backend,
            job.image,
            log_path,
        )
        try:
            runtime = client.get_runtime(job.runtime)
            client.train(runtime=runtime, trainer=trainer, options=options)
        except (RuntimeError, ValueError, TimeoutError) as err:
            raise _start_error(name, job, client, err) from err
        created = True
        if on_started:
            on_started(name)
        streamer = _LogStreamer(client, name, log_path, lines=job.backend == "cluster")
        streamer.start()
        try:
            final = client.wait_for_job_status(
                name, status={constants.TRAINJOB_COMPLETE}, timeout=int(job.timeout_s), polling_interval=2
            )
            status = final.status
        except TimeoutError as err:
            status = "Timeout"
            raise TrainJobFailedError(
                f"TrainJob {name} did not finish within {job.timeout_s} s (deleted); log: {log_path}"
            ) from err
        except (RuntimeError, ValueError) as err:  # ValueError: its containers vanished
            status = constants.TRAINJOB_FAILED
            nodes = _failed_nodes(str(err), client, name)
            raise TrainJobFailedError(f"TrainJob {name} failed on {nodes}; log: {log_path}") from err
    finally:
        if created:  # stops and removes the node containers (and the network)
            try:
                client.delete_job(name)
            except Exception as err:
                log.warning("TrainJob %s: delete failed: %s", name, err)
        if streamer is not None:
            streamer.stop()
        if workdir is not None:  # the nodes are gone: read the shared folder back, then drop it
            complete = status == constants.TRAINJOB_COMPLETE
            try:
                _collect_docker_outputs(job, workdir, complete=complete)
            except OSError as err:
                if complete:
                    raise
                log.warning(
                    "TrainJob %s: could not keep its checkpoints: %s", name, err
                )  # the error that ended it wins
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - start
    log.info("TrainJob %s %s in %.0f s; backbone %s", name, status, elapsed, job.out)
    return PretrainJobResult(name, job.backend, status, job.out, log_path, elapsed)
