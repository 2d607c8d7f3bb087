"""Pre-training as a Kubeflow Trainer TrainJob (components/trainjob.py, deploy/trainer/).

- The TrainJob the cluster backend would create and our TrainingRuntime validate
  strictly against the CRD schemas vendored from the Trainer release (deploy/crds); the
  runtime is what the SDK's own loader reads.
- `cessl backbone pretrain --nodes 2 --backend docker` pre-trains in two containers of
  the project image through the SDK's Docker backend (a private engine, see
  tests/docker_support.py), and killing one node container fails the job with a clear
  error naming the job and the node, not a hang; the checkpoints it kept resume.
"""

from __future__ import annotations

import ast
import copy
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_deploy import K8S_VERSION, _crd_errors

from components import trainjob
from components.trainjob import (
    DEFAULT_IMAGE,
    RUNTIME_FILE,
    RUNTIME_NAME,
    PretrainJob,
    TrainJobFailedError,
    cessl_pretrain_node,
    run_pretrain_job,
    trainjob_manifest,
)
from ml.errors import EXIT_USAGE, ParameterError
from ml.train.pretrain_config import PretrainConfig, PretrainRun
from pipeline.cli import main as cessl


def _cluster_job(out: str = "/workspace/backbones/medium", **overrides) -> PretrainJob:
    config = PretrainConfig(backbone="medium", max_steps=1000, batch_size=64, seed=3)
    settings = {
        "run": PretrainRun("/workspace/stores/code15", str(out), config),
        "nodes": 4,
        "nproc_per_node": 2,
        "backend": "cluster",
        "namespace": "kubeflow-user-example-com",
        "resources_per_node": {"gpu": 2, "cpu": 8, "memory": "32Gi"},
        "workspace_pvc": "code15-workspace",
        "timeout_s": 7200,
    }
    return PretrainJob(**(settings | overrides))


# ------------------------------------------------------------------------ manifests / schemas
def test_trainjob_manifest_is_valid_against_the_vendored_crd():
    manifest = trainjob_manifest(_cluster_job(), name="cessl-pretrain-medium")
    assert (manifest["apiVersion"], manifest["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert not _crd_errors(manifest), _crd_errors(manifest)
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"kind": "TrainingRuntime", "name": RUNTIME_NAME}
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["image"] == DEFAULT_IMAGE
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "32Gi"}
    assert spec["activeDeadlineSeconds"] == 7200
    volumes = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert volumes["template"]["spec"]["template"]["spec"]["volumes"] == [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": "code15-workspace"}}
    ]
    # the command is the SDK's torchrun entry script around our node function's source
    script = trainer["command"][-1]
    assert "torchrun" in script and "def cessl_pretrain_node(" in script
    body = script[script.index("def cessl_pretrain_node(") : script.index("\nEOM")]
    tree = ast.parse(body)  # the shipped source parses on its own and calls the function
    call = tree.body[-1].value
    spec = ast.literal_eval(call.keywords[0].value)["spec"]  # the run as JSON, no flags
    node = PretrainRun.from_dict(spec)
    assert (node.store, node.out) == ("/workspace/stores/code15", "/workspace/backbones/medium")
    assert node.config.checkpoint_dir == "/workspace/backbones/medium/checkpoints"
    assert node.config == PretrainConfig(
        backbone="medium",
        max_steps=1000,
        batch_size=64,
        seed=3,
        checkpoint_dir="/workspace/backbones/medium/checkpoints",
        progress=False,
    )


def test_trainjob_validation_catches_mistakes():
    """Negative controls for the strict schema check: a typo, a wrong type, no runtimeRef."""
    manifest = trainjob_manifest(_cluster_job(), name="cessl-pretrain-x")
    typo = copy.deepcopy(manifest)
    typo["spec"]["trainer"]["numNode"] = 2
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["trainer"]["numNodes"] = "four"
    no_runtime = copy.deepcopy(manifest)
    del no_runtime["spec"]["runtimeRef"]
    for broken in (typo, wrong_type, no_runtime):
        assert _crd_errors(broken)


def test_runtime_is_valid_hardened_and_read_by_the_sdk():
    import kubernetes_validate
    from kubeflow.trainer.backends.container.runtime_loader import get_training_runtime_from_sources

    runtime = yaml.safe_load(RUNTIME_FILE.read_text())
    assert not _crd_errors(runtime), _crd_errors(runtime)
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # torchrun with the Trainer's PET_* rendezvous
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec = node["template"]["spec"]["template"]["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod_spec["securityContext"]["runAsNonRoot"] and pod_spec["securityContext"]["runAsUser"] == 10001
    container = pod_spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/workspace"] == "workspace" and container["workingDir"] in mounts
    assert {v["name"]: v for v in pod_spec["volumes"]}["workspace"]["persistentVolumeClaim"]
    sdk = get_training_runtime_from_sources(RUNTIME_NAME, [str(RUNTIME_FILE)])  # what the docker backend uses
    assert (sdk.name, sdk.trainer.framework, sdk.trainer.image) == (RUNTIME_NAME, "torch", DEFAULT_IMAGE)
    pvc = yaml.safe_load((RUNTIME_FILE.parent / "pretrain-workspace-pvc.yaml").read_text())
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    assert (
        pvc["metadata"]["name"]
        == {v["name"]: v for v in pod_spec["volumes"]}["workspace"]["persistentVolumeClaim"]["claimName"]
    )
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"backend": "docker", "nproc_per_node": 2, "resources_per_node": {}}, "one process per node"),
        ({"backend": "local"}, "the local backend is this machine"),
        ({"resources_per_node": {"gpu": 1}}, "one process runs per GPU"),
        ({"name": "Bad_Name"}, "DNS-1035"),
        ({"timeout_s": 5}, "timeout_s 5: must be >= 10 s"),
    ],
)
def test_pretrain_job_refuses_what_cannot_run(overrides, fragment):
    with pytest.raises(ParameterError, match=fragment):
        _cluster_job(**overrides)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--backend", "docker", "--nproc-per-node", "2"], "one process per node"),
        (["--nodes", "2"], "local is this process"),
        (["--backend", "docker", "--namespace", "team-a"], "--namespace: only with --backend cluster"),
        (["--backend", "cluster", "--job-name", "Not_A_Name"], "--job-name"),
    ],
)
def test_cli_refuses_flag_combinations_before_any_work(tmp_path, capsys, flags, fragment):
    store = tmp_path / "store"
    store.mkdir()
    try:
        code = cessl(["backbone", "pretrain", "--store", str(store), "--out", str(tmp_path / "bb"), *flags])
    except SystemExit as exit_:  # argparse: a flag's own value
        code = exit_.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "bb").exists()


def test_docker_backend_checks_the_store_before_the_engine(tmp_path, capsys, monkeypatch):
    """A folder that is no dataset store is named as such, not hidden behind Docker's answer."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    store = tmp_path / "store"
    store.mkdir()
    code = cessl(["backbone", "pretrain", "--store", str(store), "--out", str(tmp_path / "bb"), "--backend", "docker"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{store} is not a complete dataset store" in err and "Docker" not in err


def test_node_function_is_self_contained():
    """The SDK ships the node function's source alone: it may use only the standard library."""
    import inspect

    tree = ast.parse(inspect.getsource(cessl_pretrain_node))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"json", "os", "subprocess", "sys"}
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


# ------------------------------------------------------------------------ cluster: the SDK's requests
class _TrainerApi:
    """A Kubernetes API server answering what the SDK's Kubernetes backend asks (our
    TrainingRuntime; TrainJob create/get/delete; its pods and their logs) on a free
    port, over real HTTP: it records what the SDK sends. The TrainJob reports ``Failed``
    with node-1's pod failed, as the Trainer does when a node is lost."""

    def __init__(self, namespace: str, fails: bool = True) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.namespace, self.created, self.deleted, self.fails = namespace, [], [], fails
        runtime = yaml.safe_load(RUNTIME_FILE.read_text())
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?")[0]
                trainjobs = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{api.namespace}/trainjobs/"
                if (
                    path
                    == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{api.namespace}/trainingruntimes/{RUNTIME_NAME}"
                ):
                    return self._send(200, runtime)
                if path.startswith(trainjobs) and api.created:
                    job = copy.deepcopy(api.created[-1])
                    job["metadata"] |= {"namespace": api.namespace, "creationTimestamp": "2026-01-01T00:00:00Z"}
                    condition = {"type": "Failed", "status": "True", "reason": "JobSetFailed"}
                    if api.fails:  # else no condition: running for ever
                        job["status"] = {"conditions": [condition | {"lastTransitionTime": "2026-01-01T00:01:00Z"}]}
                    return self._send(200, job)
                if path == f"/api/v1/namespaces/{api.namespace}/pods" and api.created:
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": api.pods()})
                if path.endswith("/log"):
                    return self._send(200, "cessl node: rank 0 of 2\nlost rank 1\n")
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.created.append(body)
                self._send(201, body)

            def do_DELETE(self):
                api.deleted.append(self.path)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def pods(self) -> list[dict]:
        name = self.created[-1]["metadata"]["name"]
        return [
            {
                "metadata": {
                    "name": f"{name}-node-0-{i}-x",
                    "namespace": self.namespace,
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": {
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": str(i),
                    },
                },
                "spec": {"containers": [{"name": "node", "image": DEFAULT_IMAGE}]},
                "status": {"phase": phase},
            }
            for i, phase in enumerate(("Running", "Failed" if self.fails else "Running"))
        ]

    def kubeconfig(self, path: Path) -> Path:
        host, port = self.server.server_address[:2]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": f"http://{host}:{port}"}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": self.namespace}}],
            "current-context": "c",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_cluster_backend_creates_the_manifest_and_reports_a_lost_node(tmp_path, monkeypatch):
    """Through the SDK's Kubernetes backend: the TrainJob it POSTs is trainjob_manifest's
    (and schema-valid); a Failed job raises naming the job, the node and the log; deleted."""
    job = _cluster_job(name="cessl-pretrain-lost", out=tmp_path / "bb", timeout_s=60)
    with _TrainerApi(job.namespace) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        with pytest.raises(TrainJobFailedError) as failed:
            run_pretrain_job(job)
    message = str(failed.value)
    assert "cessl-pretrain-lost" in message and "node-1" in message and str(job.job_log_path()) in message
    manifest = trainjob_manifest(job)
    assert manifest["metadata"].pop("namespace") == job.namespace  # the SDK puts it in the URL
    assert api.created == [manifest]  # exactly what the cluster backend created
    assert not _crd_errors(api.created[0])
    assert api.deleted == [
        f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{job.namespace}/trainjobs/cessl-pretrain-lost"
    ]
    assert "lost rank 1" in job.job_log_path().read_text()


def test_cluster_job_that_does_not_finish_times_out_and_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(trainjob, "MIN_TRAINJOB_TIMEOUT_S", 3)  # the behaviour, not the production floor
    job = _cluster_job(name="cessl-pretrain-slow", out=tmp_path / "bb", timeout_s=3)
    with _TrainerApi(job.namespace, fails=False) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        start = time.monotonic()
        with pytest.raises(TrainJobFailedError, match="cessl-pretrain-slow did not finish within 3 s"):
            run_pretrain_job(job)
    assert time.monotonic() - start < 30
    assert [p.rsplit("/", 1)[-1] for p in api.deleted] == ["cessl-pretrain-slow"]


def test_cluster_backend_unreachable_is_one_clear_line(tmp_path, capsys, monkeypatch):
    with _TrainerApi("team-a") as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the server is gone: connection refused
    store = tmp_path / "store"
    store.mkdir()
    code = cessl(["backbone", "pretrain", "--store", str(store), "--out", str(tmp_path / "bb"), "--backend", "cluster"])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Kubernetes API server http://127.0.0.1:" in err and "does not answer" in err and "Traceback" not in err


# ------------------------------------------------------------------------ docker: real 2-node job
