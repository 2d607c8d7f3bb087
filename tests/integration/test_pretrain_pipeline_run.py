"""The pre-training pipeline ``cessl-pretrain`` in a real ``kfp.local`` run that registers a
backbone in a sqlite MLflow store, and the local launch of a job (a real child process: stopped
at its timeout, its exit code on failure). Its compiled IR, parameters and the local launch:
tests/unit/test_pretrain_pipeline.py."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from pipeline_support import make_store

from components.common import StepError
from components.pretrain import SPEC_FILE, run_local
from components.trainjob import PretrainJob
from ml.train.pretrain_config import PretrainConfig, PretrainRun
from pipeline import cli
from pipeline.dags.pretrain import PRETRAIN_PIPELINE_NAME

# --------------------------------------------------------------------------- the local launch


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("source"))


def _local_job(store: str, tmp_path: Path, timeout_s: int, **config) -> PretrainJob:
    config = {"checkpoint_dir": str(tmp_path / "ckpt")} | config
    return PretrainJob(
        PretrainRun(store, str(tmp_path / "out"), PretrainConfig(**config)), backend="local", timeout_s=timeout_s
    )


def test_a_job_past_its_timeout_is_stopped_with_a_clear_error(tiny_store, tmp_path):
    job = _local_job(str(tiny_store), tmp_path, 3, backbone="tinylight", max_steps=100000, batch_size=8, device="cpu")
    start = time.monotonic()
    with pytest.raises(StepError, match=r"did not finish within timeout_s=3: stopped"):
        run_local(job, tmp_path / "job")
    assert time.monotonic() - start < 3 + 15  # stopped, not waited for
    assert not (tmp_path / "out" / "backbone_config.json").exists()


def test_a_failing_job_fails_the_step_with_its_exit_code(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cessl.pretrain.job")
    job = _local_job(str(tmp_path / "no-store"), tmp_path, 120)
    with pytest.raises(StepError, match=r"exited with code 5 after"):  # EXIT_STEP_FAILED, one line in its log
        run_local(job, tmp_path / "job")
    streamed = [r.getMessage() for r in caplog.records if r.name == "cessl.pretrain.job"]
    assert any("no-store is not a complete dataset store" in line for line in streamed), streamed
    written = PretrainRun.from_dict(json.loads((tmp_path / "job" / SPEC_FILE).read_text()))
    assert written.store == str(tmp_path / "no-store")  # the one dataclass, as JSON
    assert written.config == PretrainConfig(checkpoint_dir=str(tmp_path / "ckpt"), progress=False)


# --------------------------------------------------------------------------- kfp.local end to end


@pytest.mark.slow
def test_local_pipeline_run_registers_a_backbone_that_reads_back(tiny_store, tmp_path, monkeypatch, capsys):
    """`cessl backbone pipeline run` on a synthetic source: ingest -> preprocess -> pretrain
    (a child process, 4 steps of tinylight) -> register in a sqlite MLflow store; the
    registered version downloads and verifies, and carries the run's lineage."""
    from mlflow.tracking import MlflowClient

    from ml.model.pretrained import read_backbone
    from pipeline.registry.backbones import fetch_backbone

    source = tiny_store.parent / "src"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        *("backbone", "pipeline", "run", "--source", str(source), "--backbone-config", "tinylight"),
        *("--max-steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--min-class-count", "2"),
        *("--tracking-uri", uri, "--create-store", "--alias", "candidate"),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "registered backbone models:/cessl-backbone-tinylight/1" in out

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI an earlier test set globally
    version = client.get_model_version("cessl-backbone-tinylight", "1")
    assert version.tags["kind"] == "backbone" and version.tags["config"] == "tinylight"
    assert "candidate" in version.aliases
    run = client.get_run(version.run_id)
    assert run.data.tags["kfp.pipeline_name"] == PRETRAIN_PIPELINE_NAME
    assert client.get_metric_history(version.run_id, "pretrain_loss")[-1].step == 4

    folder = fetch_backbone("models:/cessl-backbone-tinylight/1", tmp_path / "fetched", tracking_uri=uri)
    backbone = read_backbone(folder)
    assert backbone.name == "tinylight" and backbone.identity == version.tags["identity"]
    assert backbone.meta["training"]["steps"] == 4 and backbone.meta["source"] == "pretrain"
    assert not (folder / "checkpoints").exists()  # only the two backbone files are registered

    # the same run again: the cached data steps, the job resumed at its last step, the same weights
    assert cli.main(argv) == 0
    assert "models:/cessl-backbone-tinylight/1" in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'cessl-backbone-tinylight'")) == 1
