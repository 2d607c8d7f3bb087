"""The hospital network: `cessl sites`, the compiled network pipeline, the cross-site matrix,
and a real local network run (kfp.local, MLflow in a SQLite file in tmp_path) of two tiny
synthetic hospitals plus one whose folder is missing; its second run reuses everything."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from signing_support import use_signer
from test_pipeline_support import TINY_TRAINING, cessl, make_backbone, make_hospital

from ml.data.dvc import dvc_md5
from ml.data.splits import Splits
from ml.eval.cross_site import CrossSiteMatrix, score_cell
from pipeline.core.params import DEFAULTS
from pipeline.core.sites import Site, load_sites
from pipeline.dags.finetune import CompileOptions
from pipeline.dags.network import (
    ITEM_KEYS,
    NETWORK_PIPELINE_NAME,
    NetworkSettings,
    site_items,
)
from pipeline.dags.spec import compile_spec, network_spec
from pipeline.registry.audit import current_user
from pipeline.registry.compare_tracking import TAG_KIND, TAG_PARENT
from pipeline.registry.network_tracking import KIND_NETWORK, TAG_NETWORK, TAG_SITE

TINY = TINY_TRAINING


# --------------------------------------------------------------------------- cessl sites


def test_sites_add_list_remove_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "a").mkdir(parents=True)
    assert cessl("sites", "add", "hospital-a", "data/a", "--labelled-ratio", "0.2", "--method", "fixmatch") == 0
    assert cessl("sites", "add", "hospital-b", "s3://bucket/b", "--description", "the other one") == 0
    registry = load_sites(tmp_path / "sites.yaml")
    assert registry.names == ["hospital-a", "hospital-b"]
    a = registry.get("hospital-a")
    assert a.source == str((tmp_path / "data" / "a").resolve())
    assert dict(a.overrides) == {"labelled_ratio": 0.2, "method": "fixmatch"}
    # written relative to the file's folder (the file moves with its data)
    assert yaml.safe_load((tmp_path / "sites.yaml").read_text())["sites"]["hospital-a"]["source"] == "data/a"

    capsys.readouterr()
    assert cessl("sites", "list") == 0
    out = capsys.readouterr().out
    assert "hospital-a" in out and "labelled_ratio=0.2" in out and "s3://bucket/b" in out

    assert cessl("sites", "add", "hospital-a", "data/a") == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert cessl("sites", "add", "hospital-a", "data/a", "--replace", "-r", "4") == 0
    assert dict(load_sites(tmp_path / "sites.yaml").get("hospital-a").overrides) == {"r": 4}

    assert cessl("sites", "remove", "hospital-b", "--file", "sites.yaml") == 0
    assert load_sites(tmp_path / "sites.yaml").names == ["hospital-a"]
    assert cessl("sites", "remove", "hospital-z") == 2
    assert "no site named 'hospital-z'" in capsys.readouterr().err


def test_sites_bad_input_is_one_line_naming_the_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cessl("sites", "add", "Hospital_A", "data/a") == 2
    assert "must be a DNS label" in capsys.readouterr().err
    with pytest.raises(SystemExit) as parsed:  # checked by the parser, with the parameter's own limits
        cessl("sites", "add", "hospital-a", "data/a", "--labelled-ratio", "1.5")
    assert parsed.value.code == 2 and "--labelled-ratio" in capsys.readouterr().err
    assert not (tmp_path / "sites.yaml").exists()  # nothing written

    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsites:\n  hospital-a:\n    source: data/a\n    lr: -1\n    colour: red\n")
    assert cessl("sites", "--file", str(bad), "list") == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{bad}:5: site 'hospital-a'" in err and f"{bad}:6: site 'hospital-a': unknown key 'colour'" in err
    assert cessl("sites", "--file", str(tmp_path / "none.yaml"), "list") == 2
    assert "no such site registry" in capsys.readouterr().err


# --------------------------------------------------------------------------- compiled


def test_compiled_network_loops_over_the_sites_parameter(tmp_path):
    sites = [Site("a", "/data/a"), Site("b", "s3://bucket/b", {"labelled_ratio": 0.2, "method": "fixmatch"})]
    items = site_items(sites, DEFAULTS, "/state")
    assert [i["model_name"] for i in items] == ["cessl-ecg-a", "cessl-ecg-experiments-b"]
    assert items[1]["labelled_ratio"] == 0.2 and items[1]["state_dir"] == "/state/sites/b"
    assert all(set(i) == set(ITEM_KEYS) for i in items)

    path = compile_spec(
        network_spec(NetworkSettings(sites=tuple(items))), tmp_path / "network.yaml", CompileOptions(image="img:1")
    )
    spec = next(yaml.safe_load_all(path.read_text()))  # the pipeline spec, then the platform's
    assert spec["pipelineInfo"]["name"] == NETWORK_PIPELINE_NAME
    root = spec["root"]
    assert root["inputDefinitions"]["parameters"]["sites"]["parameterType"] == "LIST"
    assert root["inputDefinitions"]["parameters"]["sites"]["defaultValue"] == items
    assert "source" not in root["inputDefinitions"]["parameters"]  # a site's, not the network's
    top = root["dag"]["tasks"]
    assert {"validate", "resolve-backbone", "start-network", "cross-site", "for-loop-1"} <= set(top)
    loop = top["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--sites"
    body = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert {"ingest", "preprocess", "split", "allocate-ranks", "finetune", "evaluate", "register"} <= set(body)
    assert "resolve-backbone" not in body  # the backbone is resolved once
    # records are keyed by the site's real name: the loop item's "name" field, not the loop
    # channel's own name (`site.name` is the string "sites-loop-item")
    site_input = body["ingest"]["inputs"]["parameters"]["site"]
    assert site_input["parameterExpressionSelector"] == 'parseJson(string_value)["name"]'
    assert site_input["componentInputParameter"] == "pipelinechannel--sites-loop-item"
    for task in ("ingest", "finetune"):  # their log lines name the site
        assert "site" in body[task]["inputs"]["parameters"], task
    cross = spec["components"]["comp-cross-site"]["inputDefinitions"]["artifacts"]
    assert all(cross[name].get("isArtifactList") for name in ("stores", "splits", "adapters", "registrations"))
    # finetune of every site asks for the GPU
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-finetune"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_compile_cli_writes_the_network_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cessl("sites", "add", "a", "data/a") == 0
    assert cessl("compile", "--sites", "sites.yaml", "-o", "net.yaml", "--image", "img:1") == 0
    spec = next(yaml.safe_load_all((tmp_path / "net.yaml").read_text()))
    assert [s["name"] for s in spec["root"]["inputDefinitions"]["parameters"]["sites"]["defaultValue"]] == ["a"]


# --------------------------------------------------------------------------- the matrix


def test_cross_site_cell_scores_the_classes_model_and_target_share():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(30, 3))  # the target's classes: X, Y, Z
    # the model predicts Y, W, X (perfectly on X and Y); the target does not label W, nor the model Z
    probs = np.stack([labels[:, 1], rng.random(30), labels[:, 0]], axis=1).astype(float)
    target_classes = ["426783006", "164889003", "59118001"]
    cell = score_cell("m", "t", probs, ["164889003", "999", "426783006"], [0.5] * 3, labels, target_classes)
    assert cell.n_classes == 2 and cell.n_records == 30
    assert cell.macro_f_beta == pytest.approx(1.0)
    none = score_cell("m", "t", probs, ["1", "2", "3"], [0.5] * 3, labels, ["4", "5", "6"])
    assert none.n_classes == 0 and math.isnan(none.macro_f_beta)
    matrix = CrossSiteMatrix((cell, none))
    assert "| m |" in matrix.markdown() and matrix.csv().count("\n") == 3


# --------------------------------------------------------------------------- a real run


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def _site_run_files(client, run_id: str, out: Path) -> tuple[dict, Splits]:
    """A site run's frozen test set (testset.json) and split (splits.json), as logged."""
    testset = json.loads(Path(client.download_artifacts(run_id, "testset/testset.json", str(out))).read_text())
    return testset, Splits.load(client.download_artifacts(run_id, "data/splits.json", str(out)))


@pytest.mark.slow
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
    assert cessl("sites", "add", "gone", "data/gone") == 0
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
    assert cells == {(m, t) for m in ("hospital-a", "hospital-b", "backbone") for t in ("hospital-a", "hospital-b")}
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
    assert not {"ingest", "preprocess", "split", "allocate-ranks", "finetune", "evaluate"} & set(executed), executed

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
