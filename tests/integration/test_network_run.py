"""A real local network run (kfp.local, MLflow in a SQLite file in tmp_path) of two tiny
synthetic hospitals plus one whose folder is missing; its second run reuses everything.
`cessl sites`, the compiled network pipeline and the matrix: tests/unit/test_network.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import TINY_TRAINING, cessl, make_backbone, make_hospital
from signing_support import use_signer

from ml.data.dvc import dvc_md5
from ml.data.splits import Splits
from ml.eval.cross_site import EVERYTHING_ROW, HEAD_ONLY_ROW, PLAIN_LORA_ROW
from pipeline.registry.audit import current_user
from pipeline.registry.compare_tracking import TAG_KIND, TAG_PARENT
from pipeline.registry.network_tracking import KIND_NETWORK, TAG_NETWORK, TAG_SITE

TINY = TINY_TRAINING


# --------------------------------------------------------------------------- a real run


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def _site_run_files(client, run_id: str, out: Path) -> tuple[dict, Splits]:
    """A site run's frozen test set (testset.json) and split (splits.json), as logged."""
    testset = json.loads(Path(client.download_artifacts(run_id, "testset/testset.json", str(out))).read_text())
    return testset, Splits.load(client.download_artifacts(run_id, "data/splits.json", str(out)))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three kfp.local network runs (two sites each) and a promotion
def test_network_run_registers_each_site_logs_the_matrix_and_survives_a_missing_site(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for who in ("AUTHOR", "COMMITTER"):  # data add commits the site's .dvc file
        monkeypatch.setenv(f"GIT_{who}_NAME", "cessl-test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@cessl.invalid")
    _git("init", "-q")
    Path(".gitignore").write_text("/data/*\n!/data/*.dvc\n")
    _git("add", ".gitignore")
    _git("commit", "-q", "-m", "the code")
    head = _git("rev-parse", "HEAD")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    use_signer(monkeypatch, tmp_path / "signing", current_user())  # promote signs its decisions
    make_hospital(tmp_path / "data" / "hospital-a", 40, seed=1)
    make_hospital(tmp_path / "data" / "hospital-b", 40, seed=2)  # the same record names as site a
    backbone = make_backbone(tmp_path / "backbone")
    assert cessl("sites", "add", "hospital-a", "data/hospital-a") == 0
    assert cessl("sites", "add", "hospital-b", "data/hospital-b", "--labelled-ratio", "0.6") == 0
    (tmp_path / "data" / "gone").mkdir()  # `sites add` checks the folder exists: it goes missing after
    assert cessl("sites", "add", "gone", "data/gone") == 0
    (tmp_path / "data" / "gone").rmdir()
    # a fresh test split each run: with the frozen test set (the default) the run after a model's
    # first registration splits once more (the set froze at that registration), as `cessl run` does
    run = ["run", "--sites", "sites.yaml", "--backbone", backbone, *TINY, "--no-push", "--frozen-testset", "none"]

    assert cessl(*run, "--json", "first.json") == 1  # one site failed, the others registered
    first = json.loads(Path("first.json").read_text())
    status = {s["site"]: s for s in first["sites"]}
    assert status["gone"]["status"] == "failed" and "data folder not found" in status["gone"]["reason"]
    assert status["hospital-a"]["status"] == status["hospital-b"]["status"] == "registered"
    out = capsys.readouterr().out
    assert "gone" in out and "cessl promote cessl-ecg-hospital-a" in out and "cross-site" in out
    assert "cessl serve --sites" in out and "cessl promote --all-sites" in out

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_KIND] == KIND_NETWORK
    assert parent.data.tags["git_commit"] == parent.data.tags["mlflow.source.git.commit"] == head
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cross_site")}
    assert {"cross_site/cross_site.csv", "cross_site/cross_site.md", "cross_site/cross_site.png"} <= artifacts
    cells = {(c["model"], c["target"]) for c in first["cells"]}
    # the references on each site's own test split: the head-only baseline, the site's plain LoRA
    # adapter, the backbone ablation, predict-everything
    rows = ("hospital-a", "hospital-b", HEAD_ONLY_ROW, PLAIN_LORA_ROW, "backbone", EVERYTHING_ROW)
    assert cells == {(m, t) for m in rows for t in ("hospital-a", "hospital-b")}
    # each site's CE-SSL adapter against both baselines, paired on its own test records, with a verdict
    compared = {(c["site"], c["baseline"]): c for c in first["comparisons"]}
    assert set(compared) == {(s, b) for s in ("hospital-a", "hospital-b") for b in (HEAD_ONLY_ROW, PLAIN_LORA_ROW)}
    for c in compared.values():
        assert c["low"] <= c["difference"] <= c["high"] and c["metric"] == "macro_f_beta" and c["verdict"]
        assert c["n_records"] == next(x["n_records"] for x in first["cells"] if x["target"] == c["site"])
    assert "CE-SSL adapter - lora" in " ".join(out.split())
    for cell in first["cells"]:  # each metric with its 95% interval over the target's test records
        for metric in ("challenge_score", "macro_f_beta"):
            assert cell[f"{metric}_low"] <= cell[metric] <= cell[f"{metric}_high"], cell
    assert "[95% CI]" in out and "head-only" in out
    for site, ratio in (("hospital-a", 0.5), ("hospital-b", 0.6)):
        version = client.get_model_version(f"cessl-ecg-{site}-candidates", status[site]["model_version"])
        assert version.tags[TAG_SITE] == site and version.tags[TAG_NETWORK] == first["network_id"]
        assert version.tags["data_version"] == status[site]["data_version"] and version.tags["backbone_id"]
        site_run = client.get_run(version.run_id)
        assert site_run.data.tags[TAG_PARENT] == parent.info.run_id
        assert site_run.info.run_name.startswith(f"{site}-")  # the MLflow run names its site
        # lineage is what ran: the site's real name keys its records, the logged parameters are
        # the split's own, the commit is the code's and the dataset is the site's source
        assert site_run.data.tags["git_commit"] == site_run.data.tags["mlflow.source.git.commit"] == head
        testset, splits = _site_run_files(client, version.run_id, tmp_path / "files" / site)
        assert testset["records"] and all(key.startswith(f"{site}/S000") for key in testset["records"])
        assert all(i.startswith(f"{site}/") for i in splits.test + splits.train + splits.valid + splits.unlabelled)
        logged = site_run.data.params
        assert float(logged["labelled_ratio"]) == splits.params["labelled_ratio"] == ratio
        assert int(logged["seed"]) == splits.params["seed"] and logged["source"] == str(
            (tmp_path / "data" / site).resolve()
        )
        (dataset,) = [
            d.dataset for d in site_run.inputs.dataset_inputs if d.dataset.digest == version.tags["data_version"][:36]
        ]
        assert json.loads(dataset.source)["uri"] == logged["source"] and dataset.name == site
    assert status["hospital-a"]["data_version"] != status["hospital-b"]["data_version"]

    # unchanged data: every site's steps come from the cache, the registrations are reused
    assert cessl(*run, "--json", "second.json") == 1
    second = {s["site"]: s for s in json.loads(Path("second.json").read_text())["sites"]}
    for site in ("hospital-a", "hospital-b"):
        assert second[site]["status"] == "reused"
        assert second[site]["model_version"] == status[site]["model_version"]
    task_log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "local_outputs" / "last_network_run.log").read_text())
    executed = re.findall(r"Executing task '([\w-]+)'", task_log)
    assert "[site hospital-a] " in task_log and "[site hospital-b] " in task_log  # each site's task lines name it
    assert "register" in executed and "cross-site" in executed, executed  # the uncached steps ran
    trained = {"ingest", "preprocess", "split", "allocate-ranks", "finetune", "evaluate"}
    steps = {re.sub(r"-\d+$", "", name.removeprefix("baseline-")) for name in executed}  # a site's baseline chain too
    assert not steps & trained, executed

    # promotion per site, then new records at hospital-b only (`data add --site`: its own
    # DVC version, committed): retrain runs hospital-b alone
    assert cessl("sites", "remove", "gone") == 0
    assert cessl("promote", "--all-sites") == 0
    for site in ("hospital-a", "hospital-b"):  # each champion: a copy of the site's candidate in its production model
        champion = client.get_model_version_by_alias(f"cessl-ecg-{site}", "champion")
        assert champion.tags["cessl.source_candidate"] == f"cessl-ecg-{site}-candidates/{status[site]['model_version']}"
    make_hospital(tmp_path / "incoming", 12, seed=3, start=100)
    assert cessl("data", "add", "incoming", "--site", "hospital-b") == 0
    assert (tmp_path / "data" / "hospital-b.dvc").is_file() and not (tmp_path / "data" / "hospital-a.dvc").exists()
    assert "data/hospital-b.dvc" in _git("show", "--name-only", "--format=", "HEAD")
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
    assert set(third) == {"hospital-b"} and third["hospital-b"]["status"] == "registered"
    assert third["hospital-b"]["data_version"] != status["hospital-b"]["data_version"]
    assert third["hospital-b"]["data_version"] == dvc_md5(tmp_path / "data" / "hospital-b.dvc")
    assert int(third["hospital-b"]["model_version"]) > int(status["hospital-b"]["model_version"])
    assert [str(v.version) for v in client.search_model_versions("name='cessl-ecg-hospital-a-candidates'")] == [
        status["hospital-a"]["model_version"]
    ]
    # nothing changed since: nothing to retrain, no run
    newest = f"cessl-ecg-hospital-b-candidates/{third['hospital-b']['model_version']}"
    assert cessl("promote", "--site", "hospital-b") in (0, 1)  # the gate decides; then b's newest is made champion
    champion = client.get_model_version_by_alias("cessl-ecg-hospital-b", "champion")
    if champion.tags.get("cessl.source_candidate") != newest:
        assert cessl("promote", "--site", "hospital-b", "--force", "--reason", "the newest data") == 0
    assert cessl(*retrain, "--json", "fourth.json") == 0
    assert not Path("fourth.json").exists()
