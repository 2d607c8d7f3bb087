"""A real local network run (kfp.local, MLflow in a SQLite file in tmp_path) of two tiny
synthetic hospitals plus one whose folder is missing; its second run reuses everything.
`cessl sites`, the compiled network pipeline and the matrix: tests/unit/test_network.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import TINY_TRAINING, cessl, make_backbone, make_hospital

from pipeline.registry.compare_tracking import TAG_KIND, TAG_PARENT
from pipeline.registry.network_tracking import KIND_NETWORK, TAG_NETWORK, TAG_SITE

TINY = TINY_TRAINING


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_network_run_registers_each_site_logs_the_matrix_and_survives_a_missing_site(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    make_hospital(tmp_path / "data" / "a", 40, seed=1)
    make_hospital(tmp_path / "data" / "b", 40, seed=2)  # the same record names as site a
    backbone = make_backbone(tmp_path / "backbone")
    for name in ("a", "b", "gone"):
        assert cessl("sites", "add", name, f"data/{name}") == 0
    # a fresh test split each run: with the frozen test set (the default) the run after a model's
    # first registration splits once more (the set froze at that registration), as `cessl run` does
    run = ["run", "--sites", "sites.yaml", "--backbone", backbone, *TINY, "--no-push", "--frozen-testset", "none"]

    assert cessl(*run, "--json", "first.json") == 1  # one site failed, the others registered
    first = json.loads(Path("first.json").read_text())
    status = {s["site"]: s for s in first["sites"]}
    assert status["gone"]["status"] == "failed" and "data folder not found" in status["gone"]["reason"]
    assert status["a"]["status"] == status["b"]["status"] == "registered"
    out = capsys.readouterr().out
    assert "gone" in out and "cessl promote cessl-ecg-a" in out and "cross-site" in out
    assert "cessl serve --sites" in out and "cessl promote --all-sites" in out

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_KIND] == KIND_NETWORK
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cross_site")}
    assert {"cross_site/cross_site.csv", "cross_site/cross_site.md", "cross_site/cross_site.png"} <= artifacts
    cells = {(c["model"], c["target"]) for c in first["cells"]}
    assert cells == {(m, t) for m in ("a", "b", "backbone") for t in ("a", "b")}
    for site in ("a", "b"):
        version = client.get_model_version(f"cessl-ecg-{site}", status[site]["model_version"])
        assert version.tags[TAG_SITE] == site and version.tags[TAG_NETWORK] == first["network_id"]
        assert version.tags["data_version"] == status[site]["data_version"] and version.tags["backbone_id"]
        assert client.get_run(version.run_id).data.tags[TAG_PARENT] == parent.info.run_id
    assert status["a"]["data_version"] != status["b"]["data_version"]

    # unchanged data: every site's steps come from the cache, the registrations are reused
    assert cessl(*run, "--json", "second.json") == 1
    second = {s["site"]: s for s in json.loads(Path("second.json").read_text())["sites"]}
    for site in ("a", "b"):
        assert second[site]["status"] == "reused"
        assert second[site]["model_version"] == status[site]["model_version"]
    task_log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "local_outputs" / "last_network_run.log").read_text())
    executed = re.findall(r"Executing task '([\w-]+)'", task_log)
    assert "register" in executed and "cross-site" in executed, executed  # the uncached steps ran
    assert not {"ingest", "preprocess", "split", "allocate-ranks", "finetune", "evaluate"} & set(executed), executed

    # promotion per site, then new records at site b only: retrain runs b alone
    assert cessl("sites", "remove", "gone") == 0
    assert cessl("promote", "--all-sites") == 0
    for site in ("a", "b"):
        assert (
            str(client.get_model_version_by_alias(f"cessl-ecg-{site}", "champion").version)
            == status[site]["model_version"]
        )
    make_hospital(tmp_path / "data" / "b" / "new-month", 12, seed=3)
    retrain = [
        "retrain",
        "--sites",
        "sites.yaml",
        "--backbone",
        backbone,
        *TINY,
        "--no-push",
        "--frozen-testset",
        "none",
    ]
    assert cessl(*retrain, "--json", "third.json") == 0
    third = {s["site"]: s for s in json.loads(Path("third.json").read_text())["sites"]}
    assert set(third) == {"b"} and third["b"]["status"] == "registered"
    assert third["b"]["data_version"] != status["b"]["data_version"]
    assert int(third["b"]["model_version"]) > int(status["b"]["model_version"])
    assert [str(v.version) for v in client.search_model_versions("name='cessl-ecg-a'")] == [
        status["a"]["model_version"]
    ]
    # nothing changed since: nothing to retrain, no run
    assert cessl("promote", "--site", "b") in (0, 1)  # the gate decides; either way b has a champion
    client.set_registered_model_alias("cessl-ecg-b", "champion", third["b"]["model_version"])
    assert cessl(*retrain, "--json", "fourth.json") == 0
    assert not Path("fourth.json").exists()
