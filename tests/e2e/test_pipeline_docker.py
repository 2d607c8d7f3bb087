"""The demo DAG in containers of the project image (kfp.local.DockerRunner on a real Docker engine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import SMALL_RUN, cessl, make_backbone, make_repo

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]  # may build the image

NAME = "cessl-docker"


def test_dag_runs_in_the_project_image(tmp_path, docker_engine, cessl_image, monkeypatch):
    repo = make_repo(tmp_path / "project", records=80, seed=31)
    backbone = make_backbone(tmp_path / "backbone")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    uri = f"sqlite:///{repo / 'mlflow.db'}"

    rc = cessl(
        "run",
        *SMALL_RUN,
        "--max-steps",
        "4",
        "--val-every",
        "2",
        "--runner",
        "docker",
        "--image",
        cessl_image,
        "--backbone",
        backbone,
        "--tracking-uri",
        uri,
        "--model-name",
        NAME,
        "--json",
        "summary.json",
    )
    task_log = (repo / "local_outputs" / "last_run.log").read_text()
    assert rc == 0, task_log[-4000:]
    tasks = task_log.count("Executing task")
    assert tasks >= 10 and task_log.count(f"Found image '{cessl_image}'") == tasks, "every step runs in the image"
    assert "Pulling image" not in task_log and "pip install" not in task_log

    summary = json.loads(Path("summary.json").read_text())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME + "-candidates", "challenger")  # the pipeline registers there
    assert str(version.version) == summary["model_version"] == "1"
    assert {"macro_f_beta", "macro_map"} <= set(summary["test_metrics"])
    adapter = next((repo / "local_outputs").glob("*/finetune/adapter/adapter_model.safetensors"))
    assert adapter.stat().st_uid == os.getuid(), "containers write as the calling user"
