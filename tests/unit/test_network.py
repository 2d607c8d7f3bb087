"""The hospital network: `cessl sites`, the compiled network pipeline and the cross-site
matrix. A real local network run: tests/integration/test_network_run.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from pipeline_support import cessl

from ml.eval.challenge import challenge_score, load_weights, scored_codes, to_scored_classes
from ml.eval.cross_site import (
    EVERYTHING_ROW,
    HEAD_ONLY_ROW,
    CrossSiteMatrix,
    PairedComparison,
    everything_cell,
    paired_comparison,
    score_cell,
)
from ml.eval.metrics import thresholded_metrics
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
    assert cessl("sites", "add", "a", "s3://bucket/a") == 0  # what a cluster's pods read
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
    scored = to_scored_classes(labels, target_classes, load_weights())  # the records' every diagnosis
    model_classes = ["164889003", "999", "426783006"]
    cell = score_cell("m", "t", probs, model_classes, [0.5] * 3, labels, target_classes, scored)
    assert cell.n_classes == 2 and cell.n_records == 30
    assert cell.macro_f_beta == pytest.approx(1.0)
    # the Challenge score is the official one: the model never outputs Z, which the records have
    assert labels[:, 2].any() and cell.challenge_score < 1.0
    assert cell.challenge_score == pytest.approx(
        challenge_score(scored, scored_codes(), (probs > 0.5).astype(int), model_classes)
    )
    perfect = score_cell("p", "t", labels.astype(float), target_classes, [0.5] * 3, labels, target_classes, scored)
    assert perfect.challenge_score == pytest.approx(1.0)
    none = score_cell("m", "t", probs, ["1", "2", "3"], [0.5] * 3, labels, ["4", "5", "6"], np.zeros((30, 26)))
    assert none.n_classes == 0 and math.isnan(none.macro_f_beta)
    matrix = CrossSiteMatrix((cell, none))
    assert "| m |" in matrix.markdown() and matrix.csv().count("\n") == 3


def test_the_reference_row_predicts_every_class_of_the_target_for_every_record():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    target_classes = ["426783006", "164889003", "59118001"]
    scored = to_scored_classes(labels, target_classes, load_weights())
    cell = everything_cell("t", labels, target_classes, scored)
    assert (cell.model, cell.n_classes, cell.n_records) == (EVERYTHING_ROW, 3, 4)
    assert cell.macro_f_beta == pytest.approx(thresholded_metrics(labels, np.ones_like(labels))["macro_f_beta"])
    assert cell.challenge_score == pytest.approx(
        challenge_score(scored, scored_codes(), np.ones_like(labels), target_classes)
    )


def test_a_cell_carries_the_macro_auroc_of_the_shared_classes_with_its_interval():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(60, 2))
    classes = ["426783006", "164889003"]
    scored = to_scored_classes(labels, classes, load_weights())
    ranked = labels + 0.1 * rng.random(labels.shape)  # ranks every positive above every negative
    cell = score_cell("m", "t", ranked, classes, [0.5, 0.5], labels, classes, scored)
    assert cell.macro_auroc == pytest.approx(1.0) and cell.macro_auroc_high == pytest.approx(1.0)
    noise = score_cell("m", "t", rng.random(labels.shape), classes, [0.5, 0.5], labels, classes, scored)
    assert noise.macro_auroc_low < 0.5 < noise.macro_auroc_high  # chance, and its interval says so
    assert everything_cell("t", labels, classes, scored).macro_auroc == pytest.approx(0.5)


def test_the_paired_comparison_decides_only_when_its_interval_excludes_zero():
    """The adapter against the head-only baseline on the same records: a clear win is said, a
    difference within the noise is "insufficient evidence", never a silent verdict."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(120, 3))
    flip = rng.random(labels.shape)
    good = np.where(flip < 0.05, 1 - labels, labels)  # 5% of the calls wrong
    poor = np.where(flip < 0.40, 1 - labels, labels)  # 40% wrong
    won = paired_comparison("hospital-a", HEAD_ONLY_ROW, labels, good, poor)
    assert won.low > 0 and won.verdict == f"the adapter beat {HEAD_ONLY_ROW}" and won.n_records == 120
    lost = paired_comparison("hospital-a", HEAD_ONLY_ROW, labels, poor, good)
    assert lost.high < 0 and lost.verdict.startswith(f"{HEAD_ONLY_ROW} beat")
    other = good.copy()
    other[:4, 0] = 1 - other[:4, 0]  # all but as good: 4 calls of one class differ
    tie = paired_comparison("hospital-a", HEAD_ONLY_ROW, labels, good, other)
    assert tie.low < 0 < tie.high and "insufficient evidence" in tie.verdict and "120 records" in tie.verdict
    assert tie.difference == pytest.approx(
        thresholded_metrics(labels, good)["macro_f_beta"] - thresholded_metrics(labels, other)["macro_f_beta"]
    )
    one = paired_comparison("hospital-a", HEAD_ONLY_ROW, labels[:1], good[:1], poor[:1])
    assert one.verdict.startswith("insufficient evidence")
    assert (won.differing_records, tie.differing_records) == (int((good != poor).any(1).sum()), 4)
    # an adapter that decides as the baseline on every record (its fine-tune kept the head-only
    # start): said so, not an interval of zeros read as "insufficient evidence"
    same = paired_comparison("hospital-a", HEAD_ONLY_ROW, labels, good, good.copy())
    assert same.differing_records == 0 and "the same decisions on all 120 records" in same.verdict
    older = {k: v for k, v in tie.to_dict().items() if k != "differing_records"}  # recorded before the field
    assert PairedComparison.from_dict(older).differing_records == -1 and "spans 0" in tie.verdict
    matrix = CrossSiteMatrix((), (won, tie))
    again = CrossSiteMatrix.from_records([], matrix.comparison_records())
    assert again.comparisons == (won, tie) and isinstance(again.comparisons[0], PairedComparison)
    assert "hospital-a: CE-SSL adapter - head-only" in matrix.markdown()


# --------------------------------------------------------------------------- a real run
