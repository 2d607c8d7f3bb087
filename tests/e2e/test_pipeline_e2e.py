"""End to end against real servers: `cessl run` on a small synthetic hospital, logged to a real
MLflow tracking server whose artifacts live on a real S3 server; a second run on a new data
version; the champion gate; predict with the champion; rollback; retrain's no-op."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import SMALL_RUN, add_records, cessl, make_backbone, make_repo
from signing_support import use_signer

from pipeline.registry.audit import current_user
from pipeline.registry.lineage import DATASET_CONTEXT as DATA_CONTEXT
from pipeline.registry.testsets import DATASET_CONTEXT as TESTSET_CONTEXT
from pipeline.registry.tracking import CHALLENGER, CHAMPION

NAME = "cessl-e2e"  # the production model: promote copies candidates into it
CANDIDATES = NAME + "-candidates"  # where the pipeline registers (and froze the test set)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two runs, the gate, predict, rollback


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def alias(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(NAME, name).version)


def test_run_second_version_gate_predict_rollback(tmp_path, mlflow_server, s3_server, monkeypatch, ecg_records_dir):
    from ml.data.dvc import data_version

    repo = make_repo(tmp_path / "project", records=120, seed=11)
    backbone = make_backbone(tmp_path / "backbone")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    use_signer(monkeypatch, tmp_path / "signing", current_user())  # promote and rollback sign
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri, registry_uri=mlflow_server.tracking_uri)
    run_args = [*SMALL_RUN, "--backbone", backbone, "--model-name", NAME, "--experiment", "e2e"]

    # -- first data version ------------------------------------------------------------
    assert cessl("run", *run_args, "--json", "first.json") == 0
    first = json.loads(Path("first.json").read_text())
    assert first["data_version"] == data_version(repo) and first["model_version"] == "1"
    assert first["schedule"] == "8 steps"  # cessl run: max_steps mode
    run = client.get_run(first["run_id"])
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert (params["method"], params["r"], params["labelled_ratio"], params["max_steps"]) == ("cessl", "8", "0.3", "8")
    assert params["backbone"] == str(backbone) and params["backbone_config"] == "tinylight"
    assert tags["data_version"] == data_version(repo) and tags["git_commit"]
    # lineage: the KFP run (kfp.local fills the placeholders), the data as a dataset input
    assert tags["kfp.pipeline_name"] == "cessl-finetune" and tags["kfp.run_id"] and "{{" not in tags["kfp.run_id"]
    assert tags["kfp.run_name"].startswith("cessl-finetune")
    inputs = {
        tag.value: d.dataset for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"
    }
    assert inputs[DATA_CONTEXT].digest == data_version(repo)  # the data the run trained on
    assert inputs[TESTSET_CONTEXT].name == f"{CANDIDATES}-testset-v1"  # the test set it froze
    assert {"test_macro_f_beta", "test_macro_map", "test_macro_auroc", "test_ranking_loss"} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_macro_map")] == [0, 4, 8]  # step 0 too
    assert set(first["rank_map"].values()) <= {8, 4}

    paths = artifact_paths(client, run.info.run_id)
    for expected in (
        "rank_map.json",
        "data_version.json",
        "evaluation/per_class.csv",
        "evaluation/roc.png",
        "evaluation/pr.png",
        "evaluation/report.html",
        "training/curves.jsonl",
        "data/quarantine.md",
    ):
        assert expected in paths, expected
    objects = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket)["Contents"]]
    assert any(run.info.run_id in key and key.endswith("rank_map.json") for key in objects), "artifacts not on S3"

    version = client.get_model_version_by_alias(CANDIDATES, CHALLENGER)
    assert str(version.version) == "1"
    assert version.tags["data_version"] == data_version(repo) and version.tags["test_split_hash"]
    info = mlflow.models.get_model_info(f"models:/{CANDIDATES}/1")
    # the input tensor is documented in the metadata (the signature has no input schema: see ml.eval.serving)
    assert json.loads(info.metadata["input_tensor"])[0]["tensor-spec"]["shape"] == [-1, 12, -1]
    assert info.signature.params.to_dict()[0]["name"] == "sample_rate"

    assert cessl("promote", NAME) == 0  # the first champion
    assert alias(client, CHAMPION) == "1"
    assert cessl("retrain", *run_args) == 0  # same data version as the champion: nothing to do
    assert len(client.search_model_versions(f"name = '{CANDIDATES}'")) == 1

    # -- second data version -------------------------------------------------------------
    new_version = add_records(repo, 40, seed=12, start=120)
    assert new_version != first["data_version"]
    assert cessl("run", *run_args, "--json", "second.json") == 0
    second = json.loads(Path("second.json").read_text())
    assert second["model_version"] == "2" and second["data_version"] == new_version
    assert set(second["champion_metrics"]) == set(second["test_metrics"]), "champion not scored on the new split"

    challenger, champion = second["test_metrics"]["macro_f_beta"], second["champion_metrics"]["macro_f_beta"]
    # score_champion kept the champion's per-record predictions and the paired bootstrap.
    second_paths = artifact_paths(client, second["run_id"])
    assert {"champion/predictions.npz", "champion/paired_bootstrap.json"} <= second_paths
    rc = cessl("promote", NAME)
    decision = client.get_model_version(CANDIDATES, "2").tags
    comparison = json.loads(decision["promotion_comparison"])
    assert comparison["challenger_value"] == pytest.approx(challenger)
    assert comparison["champion_value"] == pytest.approx(champion)
    assert comparison["ci_low"] <= comparison["estimate"] <= comparison["ci_high"]
    assert comparison["n_records"] > 0 and comparison["interval"] == "jackknife-t" and comparison["attempt"] == 1
    if rc == 0:
        assert decision["promotion_decision"] == "promoted" and comparison["ci_low"] > 0
    else:  # refused, or (exit 7) too few records to decide either way: never a silent impossibility
        outcome = {1: "refused", 7: "insufficient evidence"}[rc]
        assert decision["promotion_decision"] == outcome and alias(client, CHAMPION) == "1"
        assert cessl("promote", NAME, "--force", "--reason", "e2e: exercise the forced path") == 0
        assert client.get_model_version(CANDIDATES, "2").tags["promotion_decision"] == "forced"
    assert alias(client, CHAMPION) == "2"

    # -- predict with the champion, then roll back ------------------------------------------
    out = tmp_path / "predictions.csv"
    records = [ecg_records_dir / "E07500", repo / "data" / "hospital_a" / "S00001"]
    assert cessl("predict", "--model", f"models:/{NAME}@{CHAMPION}", *records, "-o", out) == 0
    table = pd.read_csv(out)
    assert list(table["record"]) == ["E07500", "S00001"]
    classes = version.tags["classes"].split(",")
    assert [c for c in table.columns if c.startswith("p_")] == [f"p_{c}" for c in classes] and "diagnoses" in table
    assert cessl("predict", "--model", f"models:/{NAME}@{CHAMPION}", records[0], "-o", tmp_path / "p.json") == 0
    assert json.loads((tmp_path / "p.json").read_text())["records"][0]["record"] == "E07500"

    assert cessl("rollback", NAME) == 0
    assert alias(client, CHAMPION) == "1"
    from pipeline.registry.audit import history

    actions = [e.action for e in history(client, NAME)]
    assert actions[0] == "promote" and actions[-1] == "rollback"
    # the pipeline's side is recorded under its candidates model: v1's registration froze the test set
    pipeline_actions = [e.action for e in history(client, CANDIDATES)]
    assert pipeline_actions[:2] == ["challenger", "testset_freeze"] and pipeline_actions.count("challenger") == 2
    # The champion is on the old data again: retrain runs, every step comes from the cache
    # and the identical registration is reused, not duplicated.
    assert cessl("retrain", *run_args) == 0
    assert len(client.search_model_versions(f"name = '{CANDIDATES}'")) == 2
