"""The frozen test set end to end: a retrain after `cessl data add` never scores a model on
its training records (real local runs). The split, the registry and the gate:
tests/unit/test_testset.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import cessl
from signing_support import use_signer

from ml.data.splits import Splits

# --------------------------------------------------------------------------- the registry


# --------------------------------------------------------------------------- end to end


def run_artifact(client, run_id: str, path: str, tmp: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(tmp)))


def version_split(client, model: str, version: str, tmp: Path) -> Splits:
    run_id = client.get_model_version(model, version).run_id
    return Splits.load(run_artifact(client, run_id, "data/splits.json", tmp / f"v{version}"))


def scored_ids(client, model: str, version: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(the challenger's, the champion's) per-record prediction ids of a version's run."""
    run_id = client.get_model_version(model, version).run_id
    out = []
    for path in ("evaluation/predictions.npz", "champion/predictions.npz"):
        with np.load(run_artifact(client, run_id, path, tmp / f"p{version}{path[0]}")) as data:
            out.append([str(i) for i in data["ids"]])
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # kfp.local runs before and after the data changes
def test_retrain_after_data_add_never_scores_a_model_on_its_training_records(tmp_path, monkeypatch):
    """run -> v1 (freezes the test set) -> champion -> new records -> run -> v2 on the frozen set;
    refresh -> run -> v3 on a redrawn set the champion never trained on."""
    from mlflow.tracking import MlflowClient
    from pipeline_support import SMALL_RUN, add_records, make_backbone, make_repo

    from ml.data.dvc import file_md5
    from pipeline.registry import testsets
    from pipeline.registry.audit import history
    from pipeline.registry.tracking import candidates_model_name

    production = "cessl-frozen-e2e"
    name = candidates_model_name(production)  # the pipeline's versions and the frozen test set live there
    repo = make_repo(tmp_path / "project", records=120, seed=11)
    backbone = make_backbone(tmp_path / "backbone")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CESSL_USER", "dr-e2e")
    use_signer(monkeypatch, tmp_path / "signing", "dr-e2e")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_args = [*SMALL_RUN, "--backbone", backbone, "--model-name", production, "--experiment", "frozen"]

    assert cessl("run", *run_args) == 0
    v1 = version_split(client, name, "1", tmp_path)
    pointer = testsets.current(client, name)
    assert (pointer.version, pointer.status, pointer.n_records) == (1, "frozen", len(v1.test))
    frozen = testsets.download(client, pointer, tmp_path / "frozen.json")
    assert set(frozen.records) == set(v1.test) and frozen.records == v1.test_hashes
    exported = repo / "testsets" / f"{name}.json"  # the DVC-versioned copy next to data.dvc
    assert file_md5(exported) == pointer.md5
    assert f"md5: {pointer.md5}" in (repo / "testsets" / f"{name}.json.dvc").read_text()
    assert cessl("promote", production) == 0  # v1 is the champion (copied as the production model's v1)

    add_records(repo, 40, seed=12, start=120)  # a new data version
    assert cessl("run", *run_args) == 0
    v2 = version_split(client, name, "2", tmp_path)
    frozen_ids = set(frozen.records)
    assert set(v2.test) == frozen_ids, "all frozen records are still there: the test set is the frozen one"
    assert not (set(v2.train) | set(v2.valid) | set(v2.unlabelled)) & frozen_ids, "v2 trained on the test set"
    trained_v1 = set(v1.train) | set(v1.valid) | set(v1.unlabelled)
    assert not trained_v1 & set(v2.test), "the champion scored on its training records"
    new_records = (set(v2.train) | set(v2.valid) | set(v2.unlabelled)) - trained_v1 - set(v1.test)
    assert new_records and not new_records & set(v2.test)
    challenger_ids, champion_ids = scored_ids(client, name, "2", tmp_path)
    assert challenger_ids == champion_ids and set(champion_ids) == frozen_ids, "both scored on the same frozen set"
    tags = client.get_model_version(name, "2").tags
    assert tags[testsets.TAG_VERSION] == "1" and tags["compared_champion_version"] == "1"
    # the gate decides on the frozen set: promoted (0), refused (1) or, on a set too small to
    # decide either way, insufficient evidence (7)
    assert cessl("promote", production) in (0, 1, 7)
    comparison = json.loads(client.get_model_version(name, "2").tags["promotion_comparison"])
    assert comparison["n_records"] == len(frozen_ids) and "not comparable" not in comparison["basis"]
    champion = client.get_model_version_by_alias(production, "champion").tags["cessl.source_candidate"].split("/")[-1]

    # -- an explicit refresh: recorded; the gate waits for a run on the new set --------------
    assert cessl("testset", "refresh", production, "--reason", "cardiology asked for a larger test set") == 0
    assert [e.action for e in history(client, name)].count("testset_refresh") == 1
    assert cessl("promote", production) == 1
    assert "refreshed" in client.get_model_version(name, "2").tags["promotion_comparison"]
    assert cessl("run", *run_args) == 0
    v3 = version_split(client, name, "3", tmp_path)
    pointer = testsets.current(client, name)
    assert (pointer.version, pointer.status, pointer.reason) == (2, "frozen", "cardiology asked for a larger test set")
    assert set(testsets.download(client, pointer, tmp_path / "f2.json").records) == set(v3.test)
    trained_by_champion = version_split(client, name, champion, tmp_path / "c")
    assert not set(v3.test) & (
        set(trained_by_champion.train) | set(trained_by_champion.valid) | set(trained_by_champion.unlabelled)
    ), "the redrawn test set holds records the champion trained on"
    challenger_ids, champion_ids = scored_ids(client, name, "3", tmp_path)
    assert challenger_ids == champion_ids and set(champion_ids) == set(v3.test), "champion re-scored on the new set"
    assert client.get_model_version(name, "3").tags[testsets.TAG_VERSION] == "2"
    assert file_md5(exported) == pointer.md5  # the DVC copy follows the new version
    cessl("promote", production)
    comparison = json.loads(client.get_model_version(name, "3").tags["promotion_comparison"])
    assert "not comparable" not in comparison["basis"] and comparison["n_records"] == len(v3.test)
