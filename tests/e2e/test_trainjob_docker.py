"""Pre-training as a Kubeflow Trainer TrainJob in Docker: `cessl backbone pretrain --nodes 2
--backend docker` pre-trains in two containers of the project image through the SDK's
Docker backend (a private engine, see tests/docker_support.py), and killing one node
container fails the job with a clear error naming the job and the node, not a hang; the
checkpoints it kept resume. The manifests and backends: tests/unit/test_trainjob.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from store_support import write_random_store

from components.trainjob import (
    PretrainJob,
    TrainJobFailedError,
    run_pretrain_job,
)
from ml.train.pretrain_config import PretrainConfig, PretrainRun
from pipeline.cli import main as cessl

CODES = ["164889003", "270492004", "426783006"]


def _write_store(path: Path, n: int = 16) -> None:
    write_random_store(path, n, CODES)


# ------------------------------------------------------------------------ docker: real 2-node job
def _containers_and_networks(docker_engine, job_name: str) -> tuple[str, str]:
    ps = docker_engine.docker("ps", "-a", "--filter", f"name={job_name}", "--format", "{{.Names}}").stdout.strip()
    nets = docker_engine.docker("network", "ls", "--filter", f"name={job_name}", "--format", "{{.Name}}")
    return ps, nets.stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # may build the image first
def test_two_node_docker_trainjob_pretrains_and_cleans_up(docker_engine, cessl_image, tmp_path, monkeypatch):
    from ml.model.pretrained import read_backbone
    from pipeline.registry.backbones import find_backbone

    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    monkeypatch.setenv("CESSL_IMAGE", cessl_image)
    store, out = tmp_path / "store", tmp_path / "bb"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _write_store(store)
    job_name = "cessl-pretrain-test2n"
    code = cessl(
        [
            "backbone", "pretrain", "--store", str(store), "--out", str(out), "--config", "tinylight",
            "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1", "--lr", "1e-3",
            "--nodes", "2", "--backend", "docker", "--job-name", job_name, "--timeout", "600",
            "--register", "--tracking-uri", tracking, "--create-store",
        ]
    )  # fmt: skip
    log_file = out.with_name(out.name + ".trainjob.log")
    assert code == 0, log_file.read_text()[-3000:] if log_file.exists() else "no log"
    backbone = read_backbone(out)
    training = backbone.meta["training"]
    assert training["world_size"] == 2 and training["steps"] == 2
    assert backbone.config.name == "tinylight" and backbone.meta["classes"] == CODES
    assert (out / "checkpoints" / "pretrain_last.pt").is_file()  # read back from the shared folder
    assert find_backbone(backbone.identity, tracking_uri=tracking)[0] == "cessl-backbone-tinylight"  # --register
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
    config = PretrainConfig(
        backbone="tinylight", batch_size=2, max_steps=100000, checkpoint_every=1, checkpoint_dir=str(checkpoints)
    )
    job = PretrainJob(
        PretrainRun(str(store), str(out), config),
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

    resumed = job.with_run(config={"max_steps": step + 1})
    result = run_pretrain_job(resumed)
    assert result.status == "Complete"
    assert read_backbone(out).meta["training"]["steps"] == step + 1
