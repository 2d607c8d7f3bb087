"""`cessl data ...` from a folder of records to splits, as a user runs it."""

from __future__ import annotations

import json

import pytest

from ml.data.ingest import read_manifest
from ml.data.splits import Splits
from ml.data.store import ECGStore
from pipeline.cli import main


def test_synth_ingest_preprocess_split(tmp_path, capsys):
    hosp, ing, store, splits = tmp_path / "h", tmp_path / "ing", tmp_path / "store", tmp_path / "splits.json"
    assert (
        main(
            [
                "data",
                "synth",
                str(hosp),
                "--records",
                "40",
                "--classes",
                "NSR,AF,RBBB,PVC",
                "--seed",
                "3",
                "--unlabelled-fraction",
                "0.2",
                "--faults",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 40 and set(summary["labels"]) == {"426783006", "164889003", "59118001", "17338001"}
    assert main(["data", "ingest", str(hosp), str(ing), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(ing)
    n_ok = int((manifest["status"] == "accepted").sum())
    assert f"seen {len(manifest)} = accepted {n_ok} + quarantined {len(manifest) - n_ok}" in out
    assert main(["data", "preprocess", str(ing), str(store), "--min-count", "5", "--workers", "1"]) == 0
    assert len(ECGStore.open(store)) == n_ok
    assert main(["data", "split", str(store), str(splits), "--labelled-ratio", "0.5", "--seed", "1"]) == 0
    parts = Splits.load(splits)
    assert sum(parts.sizes().values()) == n_ok and parts.params["seed"] == 1


def test_errors_are_reported_not_raised(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:  # a missing source: the parser's one-line error
        main(["data", "ingest", str(tmp_path / "nope"), str(tmp_path / "ing")])
    assert err.value.code == 2 and "nope: folder not found" in capsys.readouterr().err
    assert not (tmp_path / "ing").exists()
    assert main(["data", "synth", str(tmp_path / "x"), "--classes", "AFL"]) == 2
    assert main(["data", "version", "--repo", str(tmp_path)]) == 2


@pytest.mark.parametrize("step", ["synth", "ingest", "preprocess", "split", "add", "demo-data", "version"])
def test_help(step, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", step, "--help"])
    assert exit_.value.code == 0
    assert "usage: cessl data" in capsys.readouterr().out
