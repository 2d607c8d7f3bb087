"""`cessl compare` end to end with kfp.local and a real MLflow store (SQLite in tmp_path): a
2 methods (CE-SSL and the head-only baseline) x 1 labelled ratio x 2 seeds grid on a small
synthetic hospital; the parent run, its child runs, and the table checked against the child
runs' own metrics."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import TINY_TRAINING, cessl, make_backbone, make_repo

from components.compare import COLUMNS
from ml.model.backbone import ECGTransformer, backbone_config
from pipeline.registry.compare_tracking import CELL_PREDICTIONS, KIND_CELL, KIND_COMPARISON, TAG_KIND, TAG_PARENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # a kfp.local grid of fine-tunes

METHODS = ("cessl", "head-only")  # head-only: no gradient step, the cheapest cell there is
GRID = ["--methods", ",".join(METHODS), "--ratios", "0.3", "--seeds", "0,1"]
SMALL = TINY_TRAINING


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_compare_logs_a_parent_run_with_a_child_per_cell_and_the_table(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "project", records=100, seed=21)
    backbone = make_backbone(tmp_path / "backbone")
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    assert cessl("compare", *GRID, *SMALL, "--backbone", backbone, "--json", "compare.json") == 0
    summary = json.loads(Path("compare.json").read_text())
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_KIND] == KIND_COMPARISON
    assert (parent.data.params["methods"], parent.data.params["seeds"], parent.data.params["n_cells"]) == (
        "cessl,head-only",
        "0,1",
        "4",
    )

    children = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'")
    assert len(children) == 4
    cells = {
        (c.data.params["method"], float(c.data.params["labelled_ratio"]), int(c.data.params["seed"])) for c in children
    }
    assert cells == {(m, 0.3, s) for m in METHODS for s in (0, 1)}
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags[TAG_KIND] == KIND_CELL
        assert child.data.params["train.max_steps"] == "4" and child.data.params["max_steps"] == "4"
        assert {"test_macro_f_beta", "test_macro_map", "trainable_params", "total_params"} <= set(child.data.metrics)
        assert {"test_macro_f_beta_low", "test_challenge_score_high"} <= set(child.data.metrics)  # with intervals
        if child.data.params["method"] == "cessl":
            assert child.data.metrics["ms_per_step"] > 0 and child.data.metrics["peak_memory_mb"] >= 0
        else:  # the head-only baseline takes no training step: nothing to time per step
            assert child.data.metrics["steps"] == 0 and child.data.tags["schedule"] == "no gradient step"
            assert not {"ms_per_step", "peak_memory_mb"} & set(child.data.metrics)
    # Same split for the methods of one seed, one test split for every cell; the head-only
    # baseline trains the classifier alone.
    for seed in (0, 1):
        fingerprints = {c.data.tags["split_fingerprint"] for c in children if c.data.params["seed"] == str(seed)}
        assert len(fingerprints) == 1
    assert len({c.data.tags["split_fingerprint"] for c in children}) == 2  # the seeds train on different records
    assert len({c.data.tags["test_split_hash"] for c in children}) == 1  # ... and are tested on the same ones
    head_only = next(c for c in children if c.data.params["method"] == "head-only")
    with np.load(client.download_artifacts(head_only.info.run_id, CELL_PREDICTIONS, str(tmp_path / "h"))) as saved:
        n_classes = saved["labels"].shape[1]
    classifier = ECGTransformer(backbone_config("tinylight", n_classes)).classifier
    assert head_only.data.metrics["trainable_params"] == sum(p.numel() for p in classifier.parameters())
    assert not client.search_registered_models(), "comparison cells must not register models"

    # The table: mean +- std over the two seeds of each method, recomputed from the child runs.
    table = pd.DataFrame(summary["table"])
    assert sorted(table["method"]) == sorted(METHODS) and set(table["n_seeds"]) == {2}
    rows = {row["method"]: row for row in summary["table"]}
    assert (rows["cessl"]["reads"], rows["head-only"]["reads"]) == ("labelled + unlabelled", "labelled")
    share = head_only.data.metrics["trainable_params"] / head_only.data.metrics["total_params"]
    assert rows["head-only"]["trainable_share"] == pytest.approx(share) and 0 < share < 1
    assert rows["head-only"]["n_ms_per_step"] == 0 and rows["cessl"]["n_ms_per_step"] == 2
    for _, row in table.iterrows():
        runs = [c for c in children if c.data.params["method"] == row["method"]]
        for column in COLUMNS:
            key = column if column in ("ms_per_step", "peak_memory_mb", "trainable_params") else f"test_{column}"
            values = [c.data.metrics[key] for c in runs if key in c.data.metrics]
            if len(values) < 2:
                continue
            assert row[f"{column}_mean"] == pytest.approx(statistics.mean(values)), column
            assert row[f"{column}_std"] == pytest.approx(statistics.stdev(values)), column
        assert not math.isnan(row["macro_f_beta_mean"])

    paths = artifact_paths(client, parent.info.run_id)
    assert {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"} <= paths
    assert "comparison/paired.csv" in paths  # head-only - cessl on the shared test records, with its interval
    paired = pd.read_csv(client.download_artifacts(parent.info.run_id, "comparison/paired.csv", str(tmp_path)))
    (row,) = paired.to_dict("records")
    assert summary["paired"] == [pytest.approx(row)]  # printed and in --json as well
    assert (row["method"], row["reference"], row["n_seeds"]) == ("head-only", "cessl", 2)
    for metric in ("macro_f_beta", "macro_g_beta"):
        assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]
    markdown = Path(
        client.download_artifacts(parent.info.run_id, "comparison/comparison.md", str(tmp_path))
    ).read_text()
    assert "| cessl | 30% | 2 |" in markdown and "+-" in markdown and "peak MB (cpu peak RSS growth)" in markdown
    assert "## Paired differences against cessl" in markdown and "| head-only | 30% | 2 |" in markdown
