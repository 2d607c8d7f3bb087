"""Pre-training as a Kubeflow Trainer TrainJob (components/trainjob.py, deploy/trainer/).

- The TrainJob the cluster backend would create and our ClusterTrainingRuntime validate
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
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_deploy import K8S_VERSION, _crd_errors

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
from pipeline.cli import main as cessl

CODES = ["164889003", "270492004", "426783006"]
REPO = Path(__file__).resolve().parents[1]


def _write_store(path: Path, n: int = 16) -> None:
    from ml.data.store import StoreWriter, join_codes, write_rows

    rng = np.random.default_rng(1)
    labels = [[c for c in CODES if rng.random() < 0.4] for _ in range(n)]
    with StoreWriter(path, n, 6144) as writer:
        write_rows(writer.signals_path, writer.data_offset, 0, rng.standard_normal((n, 12, 6144)).astype(np.float32))
        table = pd.DataFrame(
            {
                "id": [f"R{i:03d}" for i in range(n)],
                "labels": [join_codes(c) for c in labels],
                "labelled": [True] * n,
                "content_hash": [f"h{i}" for i in range(n)],
            }
        )
        writer.commit(table, {"classes": CODES})


def _cluster_job(**overrides) -> PretrainJob:
    settings = {
        "store": Path("/workspace/stores/code15"),
        "out": Path("/workspace/backbones/medium"),
        "pretrain_args": ("--config", "medium", "--max-steps", "1000", "--batch-size", "64", "--seed", "3"),
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
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": RUNTIME_NAME,
    }
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
    argv = ast.literal_eval(call.keywords[0].value)["argv"]
    assert argv[:6] == [
        "--store",
        "/workspace/stores/code15",
        "--out",
        "/workspace/backbones/medium",
        "--checkpoint-dir",
        "/workspace/backbones/medium/checkpoints",
    ]
    assert "--max-steps" in argv and "1000" in argv


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
        ({"pretrain_args": ("--out", "/elsewhere")}, "--out are set by the job"),
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


def test_node_function_is_self_contained():
    """The SDK ships the node function's source alone: it may use only the standard library."""
    import inspect

    tree = ast.parse(inspect.getsource(cessl_pretrain_node))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported <= {"os", "subprocess", "sys"}
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


# ------------------------------------------------------------------------ docker: real 2-node job
def _containers_and_networks(docker_engine, job_name: str) -> tuple[str, str]:
    ps = docker_engine.docker("ps", "-a", "--filter", f"name={job_name}", "--format", "{{.Names}}").stdout.strip()
    nets = docker_engine.docker("network", "ls", "--filter", f"name={job_name}", "--format", "{{.Name}}")
    return ps, nets.stdout.strip()


@pytest.mark.slow
def test_two_node_docker_trainjob_pretrains_and_cleans_up(docker_engine, cessl_image, tmp_path, monkeypatch):
    from ml.model.pretrained import read_backbone

    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    monkeypatch.setenv("CESSL_IMAGE", cessl_image)
    store, out = tmp_path / "store", tmp_path / "bb"
    _write_store(store)
    job_name = "cessl-pretrain-test2n"
    code = cessl(
        [
            "backbone", "pretrain", "--store", str(store), "--out", str(out), "--config", "tinylight",
            "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1", "--lr", "1e-3",
            "--nodes", "2", "--backend", "docker", "--job-name", job_name, "--timeout", "600",
        ]
    )  # fmt: skip
    log_file = out.with_name(out.name + ".trainjob.log")
    assert code == 0, log_file.read_text()[-3000:] if log_file.exists() else "no log"
    backbone = read_backbone(out)
    training = backbone.meta["training"]
    assert training["world_size"] == 2 and training["steps"] == 2
    assert backbone.config.name == "tinylight" and backbone.meta["classes"] == CODES
    assert (out / "checkpoints" / "pretrain_last.pt").is_file()  # read back from the shared folder
    text = log_file.read_text()
    assert "rank 0 of 2" in text and "rank 1 of 2" in text  # both nodes' logs streamed
    assert _containers_and_networks(docker_engine, job_name) == ("", "")
    assert not (Path.home() / ".kubeflow" / "trainer" / "containers" / job_name).exists()


@pytest.mark.slow
def test_killed_node_fails_the_job_clearly_and_its_checkpoints_resume(docker_engine, cessl_image, tmp_path):
    from ml.model.pretrained import read_backbone
    from ml.train.checkpoint import load_checkpoint

    store, out, checkpoints = tmp_path / "store", tmp_path / "bb", tmp_path / "ckpt"
    _write_store(store)
    job_name = "cessl-pretrain-testkill"
    job = PretrainJob(
        store=store,
        out=out,
        checkpoint_dir=checkpoints,
        pretrain_args=(
            "--config",
            "tinylight",
            "--batch-size",
            "2",
            "--max-steps",
            "100000",
            "--checkpoint-every",
            "1",
        ),
        nodes=2,
        backend="docker",
        image=cessl_image,
        docker_host=docker_engine.host,
        timeout_s=600,
        name=job_name,
    )
    shared = Path.home() / ".kubeflow" / "trainer" / "containers" / job_name / "checkpoints" / "pretrain_last.pt"
    killed: list[str] = []

    def kill_node_1_once_training(name: str) -> None:
        def kill() -> None:
            deadline = time.monotonic() + 300
            while not shared.exists() and time.monotonic() < deadline:  # rank 0 checkpointed: training
                time.sleep(0.5)
            docker_engine.docker("kill", f"{name}-node-1", check=False)
            killed.append(name)

        threading.Thread(target=kill, daemon=True).start()

    start = time.monotonic()
    with pytest.raises(TrainJobFailedError) as failed:
        run_pretrain_job(job, on_started=kill_node_1_once_training)
    message = str(failed.value)
    assert killed and job_name in message and "node-1" in message and str(job.job_log_path()) in message
    assert time.monotonic() - start < 400  # the SDK saw the dead node: no wait for the timeout
    assert _containers_and_networks(docker_engine, job_name) == ("", "")
    step = load_checkpoint(checkpoints / "pretrain_last.pt")["step"]  # kept on the host for a resume
    assert step >= 1 and not out.exists()

    resumed = dataclasses.replace(job, pretrain_args=(*job.pretrain_args[:-4], "--max-steps", str(step + 1)))
    result = run_pretrain_job(resumed)
    assert result.status == "Complete"
    assert read_backbone(out).meta["training"]["steps"] == step + 1
