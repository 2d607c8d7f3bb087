"""`cessl monitor` on a real MLflow (SQLite) registry with a tiny registered champion
(``tests/promote_support.py``: a ``tinylight`` backbone and adapter, synthetic WFDB records):
the reference from the champion's lineage (its run's split and source) or a folder, the
report logged to ``cessl-monitor``, the exit codes, the retraining recorded on drift."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from promote_support import CLASSES, signed_champion

from ml.data.synth import SynthConfig, generate
from ml.errors import EXIT_INSUFFICIENT
from pipeline import cli
from pipeline.cli.monitor import EXPERIMENT, PLOT_ARTIFACT, REPORT_ARTIFACT
from pipeline.registry.audit import history
from pipeline.registry.policy import drift_since_champion
from pipeline.registry.signing import find_trust
from pipeline.registry.tracking import CHAMPION
from pipeline.registry.verify import verify_model

MODEL = "monitor-ecg"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A store whose MODEL has a signed champion (``promote_support.signed_champion``: its run
    logged the split of the 16 records) and 12 recent records that are all unreadable."""
    root = tmp_path_factory.mktemp("monitor")
    world = signed_champion(root, MODEL)
    # recent records whose lead II electrode is off in every record: all unreadable
    broken = root / "broken"
    generate(
        broken,
        SynthConfig(
            records=12,
            classes=tuple(CLASSES),
            seed=5,
            fs=250.0,
            duration_s=8.0,
            lead_fault="II:flat",
            lead_fault_fraction=1.0,
        ),
    )
    return world | {"broken": broken}


def monitor_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], order_by=["attribute.start_time DESC"])


def test_unchanged_records_against_the_lineage_reference_are_no_drift(world, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.json"
    code = cli.main(
        [
            "monitor",
            MODEL,
            "--recent",
            str(world["records"]),
            "--min-recent",
            "10",
            "--min-reference",
            "10",
            "--tracking-uri",
            world["uri"],
            "--trust-file",
            world["trust"],
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["decision"] == "no drift" and doc["n_reference"] == 16 and doc["n_recent"] == 16
    assert "NO DRIFT" in out and all(len(line) <= 80 for line in out.splitlines())
    run = monitor_runs(world["client"])[0]
    assert run.data.tags["decision"] == "no drift" and "split of run" in run.data.params["reference"]
    assert run.data.metrics["n_recent"] == 16 and "mmd2_p_value" in run.data.metrics
    names = {a.path for a in world["client"].list_artifacts(run.info.run_id, "drift")}
    assert names == {REPORT_ARTIFACT, PLOT_ARTIFACT}


def test_too_few_records_are_insufficient_evidence(world, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        [
            "monitor",
            MODEL,
            "--recent",
            str(world["records"]),
            "--reference",
            str(world["records"]),
            "--tracking-uri",
            world["uri"],
            "--trust-file",
            world["trust"],
        ]
    )
    assert code == EXIT_INSUFFICIENT
    run = monitor_runs(world["client"])[0]
    assert run.data.tags["decision"] == "insufficient evidence" and "need >= 30" in run.data.tags["reasons"]


def test_unreadable_recent_records_are_drift_and_the_retraining_is_recorded(world, monkeypatch, tmp_path, capfd):
    """A drift records the request in the run and the audit log, then triggers `cessl retrain` (a
    child process): here the site's data version is the champion's, so it retrains nothing and
    names the drift."""
    monkeypatch.chdir(tmp_path)
    world["client"].set_model_version_tag(MODEL, "1", "data_version", "v-champion")
    retrain_args = ["--source", str(world["records"]), "--data-version", "v-champion"]
    code = cli.main(
        [
            "monitor",
            MODEL,
            "--recent",
            str(world["broken"]),
            "--reference",
            str(world["records"]),
            "--min-recent",
            "10",
            "--min-reference",
            "10",
            "--retrain-on-drift",
            *[f"--retrain-arg={a}" for a in retrain_args],
            *world["store"],
        ]
    )
    captured = capfd.readouterr()  # the child's output too
    assert code == 1, captured
    tags = monitor_runs(world["client"])[0].data.tags
    assert tags["decision"] == "drift" and tags["retrain_requested"] == "true"
    assert "signal quality: 12 of 12" in tags["retrain_reason"]
    assert tags["retrain_command"] == " ".join(
        ["cessl retrain --model-name", MODEL, "--tracking-uri", world["uri"], *retrain_args]
    )
    # the triggered retrain ran: the data is the champion's, so nothing to retrain, and it says why
    assert tags["retrain_exit"] == "0", captured.err
    assert "trained on data version v-champion already: nothing to retrain" in captured.err
    assert "1 drift report(s) since its champion's decision" in captured.err
    # the drift is in the production model's audit log (chained, unsigned: not a decision), and the
    # log still verifies; `cessl retrain` names it until a retraining answers it
    run_id = monitor_runs(world["client"])[0].info.run_id
    entry = history(world["client"], MODEL)[-1]
    assert entry.action == "drift" and not entry.signature and entry.versions == {"champion": "1"}
    assert entry.metrics["monitor_run"] == run_id and entry.metrics["retrain_requested"] is True
    assert "signal quality: 12 of 12" in entry.reason
    assert verify_model(world["client"], MODEL, find_trust(world["trust"])).ok
    pending = drift_since_champion(world["client"], MODEL)
    assert f"audit entry #{entry.seq}, monitor run {run_id}" in pending and pending.startswith("1 drift report(s)")


def test_a_model_without_champion_and_a_missing_folder_are_one_line_errors(world, tmp_path, capsys):
    store = ["--tracking-uri", world["uri"], "--trust-file", world["trust"]]
    assert cli.main(["monitor", "nobody", "--recent", str(world["records"]), *store]) == 2
    assert "'nobody' has no champion" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["monitor", MODEL, "--recent", str(tmp_path / "empty"), *store]) == 2
    assert f"{tmp_path / 'empty'}: no WFDB records (*.hea) in it" in capsys.readouterr().err


def test_a_champion_moved_outside_a_signed_decision_is_refused(world, tmp_path, capsys):
    """The monitor watches the verified champion, as `cessl predict` serves it: an alias moved by
    a plain MLflow call (a version no decision made champion) is refused in one line."""
    client = world["client"]
    signed = client.get_model_version_by_alias(MODEL, CHAMPION).version
    moved = client.copy_model_version(f"models:/{MODEL}/{signed}", MODEL).version
    client.set_registered_model_alias(MODEL, CHAMPION, moved)
    capsys.readouterr()  # MLflow's own lines about the copy
    try:
        store = ["--tracking-uri", world["uri"], "--trust-file", world["trust"]]
        assert cli.main(["monitor", MODEL, "--recent", str(world["records"]), *store]) == 1
        err = capsys.readouterr().err
        assert f"is v{moved}, but the last valid signed decision names v{signed}" in err and err.count("\n") == 1
    finally:
        client.set_registered_model_alias(MODEL, CHAMPION, signed)


def test_all_sites_monitors_each_site_of_the_registry_and_reports_the_worst(world, tmp_path, caplog):
    """One scheduled job for the network: every site on <--recent>/<site>; a site that cannot be
    monitored (no champion) is logged, the others are still monitored, the exit code is the worst."""
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="pipeline.cli.monitor")
    recent = tmp_path / "recent"
    shutil.copytree(world["records"], recent / "ecg")  # MODEL is site "ecg" of the network "monitor"
    (recent / "other").mkdir()
    shutil.copytree(world["records"], recent / "other" / "records")
    sites = tmp_path / "sites.yaml"
    sites.write_text(
        f"version: 1\nsites:\n  ecg:\n    source: {world['records']}\n  other:\n    source: {world['records']}\n"
    )
    argv = ["monitor", "monitor", "--all-sites", "--sites", str(sites), "--recent", str(recent)]
    code = cli.main([*argv, "--min-recent", "10", "--min-reference", "10", *world["store"]])
    assert code == 2, caplog.text  # "other" has no champion: its error is the worst answer
    assert "other: " in caplog.text and "'monitor-other' has no champion" in caplog.text
    assert "monitored 2 sites: ecg no drift, other error" in caplog.text
    run = monitor_runs(world["client"])[0]
    assert run.data.params["recent"] == f"{recent}/ecg" and run.data.tags["site"] == "ecg"
