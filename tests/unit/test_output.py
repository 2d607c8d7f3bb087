"""Output a person can read and copy: 80 columns without a cut ID, runnable "next:" commands,
no library warnings (a real `cessl` process: tests/integration/test_cli_real_processes.py) or download bars, the site in a network task's logs and run names, class
names in the gate's texts."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from pipeline.cli.registry import _table
from pipeline.cli.run import RunSummary, next_steps, print_summary, records_tested
from pipeline.cli.shell import cessl_command, program, runnable
from pipeline.core.logsafe import (
    PROJECT_ROOT,
    QUIET_PROGRESS_ENV,
    WARNINGS_LOGGER,
    name_task_logs,
    quiet_progress_bars,
    route_warnings,
)
from pipeline.registry.network_tracking import site_run_name
from pipeline.registry.policy import Comparison, GateConfig, class_label, verdict

WIDTH = 80
BIN = Path(sys.executable).parent
RUN_ID = "91877f8d22c54b0e9a1f3c2d4e5f6a7b"
COMMIT = "91877f8d22c54b0e9a1f3c2d4e5f6a7b8c9d0e1f"
MODEL = "cessl-ecg-experiments-hospital-north-east"
DATA_VERSION = "md5:0f343b0931126a20f133d67c2b018a3b.dir"
URI = "sqlite:////home/someone/projects/ce-ssl/local_outputs/state/mlflow/mlflow.db"
AF, RBBB = "164889003", "59118001"


def render(draw) -> str:
    out = io.StringIO()
    draw(Console(file=out, width=WIDTH, color_system=None))
    return out.getvalue()


# metric: (challenger's value, low, high), (champion's): as the run logs them (metrics.json)
INTERVALS = {
    "challenge_score": ((0.412, 0.231, 0.587), (0.388, 0.203, 0.566)),
    "macro_auroc": ((0.81, 0.74, 0.88), (0.8, 0.72, 0.87)),
    "macro_map": ((0.634, 0.52, 0.75), (0.612, 0.5, 0.73)),
    "macro_f_beta": ((0.5, 0.3125, 0.6875), (0.4, 0.2, 0.6)),
    "macro_g_beta": ((0.321, 0.18, 0.47), (0.3, 0.16, 0.45)),
    "macro_f_beta_positive_classes": ((0.55, 0.36, 0.74), (0.45, 0.25, 0.65)),
}


def logged(side: int) -> dict[str, float]:
    """The metrics of one side (0 challenger, 1 champion) with their ``_low`` / ``_high``."""
    out = {"n_classes_without_positives": 1.0}
    for metric, sides in INTERVALS.items():
        value, low, high = sides[side]
        out |= {metric: value, f"{metric}_low": low, f"{metric}_high": high}
    return out


def summary() -> RunSummary:
    return RunSummary(
        data_version=DATA_VERSION,
        git_commit=COMMIT,
        model_name=MODEL,
        model_version="12",
        run_id=RUN_ID,
        tracking_uri=URI,
        rank_map={"encoder.blocks.11.attention.query_key_value": 16},
        test_metrics=logged(0),
        champion_metrics=logged(1),
        aliases=["challenger"],
        seconds=12.0,
        schedule="200 epochs = 400 steps",
        n_quarantined=3,
        n_test=300,
    )


def test_run_summary_fits_80_columns_and_keeps_every_id_whole(monkeypatch):
    monkeypatch.setenv("PATH", str(BIN))
    text = render(lambda console: print_summary(summary(), console))
    for whole in (RUN_ID, COMMIT, f"{MODEL} v12 [challenger]", DATA_VERSION, URI):
        assert whole in text, whole
    assert "…" not in text
    # only a line holding one word wider than the console may pass its edge
    assert all(len(line) <= WIDTH or URI in line for line in text.splitlines())
    # every metric with its 95% interval over the test records (and their number), for both
    # models, on the metric's own row; no _low/_high rows
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 4}
    for metric, sides in INTERVALS.items():
        for value, low, high in sides:
            assert f"{value:.3f} [{low:.3f}, {high:.3f}]" in rows[metric], metric
    assert "_low" not in text and "_high" not in text
    assert "95% jackknife-t interval over 300 test records" in text
    assert rows["n_classes_without_positives"].split("│")[2].strip() == "1.000"  # a count of the split: none
    # the number of test records comes from the run's logged split sizes
    assert records_tested({"split_sizes": '{"test": 300, "train": 40}'}) == 300
    assert records_tested({}) is None and records_tested({"split_sizes": "not json"}) is None
    # the metrics table says how its macro means count a class with no positive test record
    assert "counting 0" in " ".join(text.split()) and "official" in text


def test_run_summary_says_when_the_gate_cannot_decide(monkeypatch):
    """The split's power check, tagged on the run, ends up in the summary (only when too few)."""
    import json

    from ml.eval.power import PowerConfig, label_power_check
    from pipeline.cli.run import gate_warning

    monkeypatch.setenv("PATH", str(BIN))
    few = label_power_check(np.eye(7, 3, dtype=np.int64), PowerConfig())
    assert gate_warning({}) == "" and gate_warning({"gate_power": "{not json"}) == ""
    warning = gate_warning({"gate_power": json.dumps(few.to_json())})
    assert warning == f"cannot decide: {few.describe()}"
    many = label_power_check(np.tile(np.eye(3, dtype=np.int64), (2000, 1)), PowerConfig())
    assert gate_warning({"gate_power": json.dumps(many.to_json())}) == ""
    text = render(lambda console: print_summary(dataclasses.replace(summary(), gate_warning=warning), console))
    assert "champion gate" in text and "cannot decide: 7 labelled test records, too few" in " ".join(text.split())
    assert all(len(line) <= WIDTH or URI in line for line in text.splitlines())


def test_network_summary_fits_80_columns_and_runs_its_next_steps(monkeypatch, tmp_path):
    from pipeline.cli.sites import FAILED, REGISTERED, NetworkSummary, SiteOutcome, print_network_summary

    monkeypatch.setenv("PATH", str(tmp_path))  # `make demo`: .venv/bin is not on PATH
    monkeypatch.chdir(tmp_path)  # outside the venv's folder: its scripts are printed by absolute path
    sites = [
        SiteOutcome("hospital-north-east", "/data/a", REGISTERED, "", DATA_VERSION, 40, 2, MODEL, "3", RUN_ID),
        SiteOutcome("gone", "/data/gone", FAILED, "data folder not found: /data/gone"),
    ]
    summary = NetworkSummary("20261207-014900-1a2b3c", RUN_ID, URI, sites, sites_file="sites.yaml")
    text = render(lambda console: print_network_summary(summary, console))
    for whole in (DATA_VERSION, f"{MODEL} v3", RUN_ID, "data folder not found: /data/gone"):
        assert whole in text, whole
    assert all(len(line) <= WIDTH or URI in line for line in text.splitlines())
    assert f"{BIN / 'cessl'} promote {MODEL} --tracking-uri {URI}" in text
    assert f"{BIN / 'cessl'} promote --all-sites --sites sites.yaml" in text


def test_audit_history_fits_80_columns_and_keeps_every_id_whole():
    reason = "lower bound 0.0123 of the interval exceeds the margin 0 " * 3
    rows = [
        {
            "#": seq,
            "when": "2026-12-07T01:02:03Z",
            "who": "release-manager@hospital.example",
            "action": "promote",
            "versions": "challenger=v12, champion=v11",
            "numbers": "challenger_value 0.5123, champion_value 0.4987, ci_low 0.0012, n_records 300",
            "reason": reason,
        }
        for seq in (1, 2)
    ]
    columns = ("#", "when", "who", "action", "versions", "numbers", "reason")
    text = render(lambda console: _table(f"{MODEL}: audit log", columns, rows, console))
    assert all(len(line) <= WIDTH for line in text.splitlines())
    for whole in (MODEL, "release-manager@hospital.example", "challenger=v12,", "2026-12-07T01:02:03Z"):
        assert whole in text, whole
    assert " ".join(text.split()).count(" ".join(reason.split())) == 2  # wrapped between words only
    # a table where it fits
    one = [{"name": MODEL, "aliases": "champion=v3"}]
    narrow = render(lambda console: _table("models", ("name", "aliases"), one, console))
    assert "┃ name" in narrow and MODEL in narrow


def test_next_steps_run_as_printed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # the environment not activated: no cessl on PATH
    monkeypatch.chdir(tmp_path)  # outside the venv's folder: its scripts are printed by absolute path
    lines = next_steps(summary())
    assert lines[0] == f"{BIN / 'mlflow'} ui --backend-store-uri {URI}"
    assert lines[-1] == f"{BIN / 'cessl'} promote {MODEL} --tracking-uri {URI}"
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{tmp_path}")  # activated: the short names run
    assert next_steps(summary())[-1] == f"cessl promote {MODEL} --tracking-uri {URI}"
    assert runnable("evaluation report: file:///x") == "evaluation report: file:///x"


def test_a_printed_command_names_the_program_as_it_was_started(monkeypatch, tmp_path):
    script = tmp_path / "venv" / "bin" / "cessl"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert program("cessl", "pipeline.cli", str(script)) == "venv/bin/cessl"  # relative to here: copyable
    monkeypatch.setenv("PATH", str(script.parent))
    assert program("cessl", "pipeline.cli", str(script)) == "cessl"
    monkeypatch.setattr(sys, "argv", ["/somewhere/pipeline/cli/__init__.py"])
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bare" / "python"))
    assert cessl_command() == "bare/python -m pipeline.cli"


def test_library_warnings_become_debug_records_and_the_projects_stay_warnings(caplog, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    route_warnings()
    caplog.set_level(logging.DEBUG, logger=WARNINGS_LOGGER)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        library = "/usr/lib/python3/site-packages/mlflow/pyfunc/utils/data_validation.py"
        warnings.warn_explicit("\x1b[33mAdd type hints to the `predict` method\x1b[0m", UserWarning, library, 187)
        warnings.warn_explicit("a project warning", UserWarning, str(PROJECT_ROOT / "ml" / "x.py"), 1)
    levels = {r.getMessage().split(" (")[0]: r.levelno for r in caplog.records}
    assert levels == {
        "UserWarning: Add type hints to the `predict` method": logging.DEBUG,
        "UserWarning: a project warning": logging.WARNING,
    }


def test_download_bars_are_off(monkeypatch, tmp_path, capsys):
    import mlflow

    for name in QUIET_PROGRESS_ENV:
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "artifacts"
    folder.mkdir()
    for k in range(3):
        (folder / f"f{k}.txt").write_text("x")

    mlflow.artifacts.download_artifacts(artifact_uri=folder.as_uri(), dst_path=str(tmp_path / "a"))
    assert "Downloading artifacts" in capsys.readouterr().err  # the library's default
    quiet_progress_bars()
    mlflow.artifacts.download_artifacts(artifact_uri=folder.as_uri(), dst_path=str(tmp_path / "b"))
    assert "Downloading artifacts" not in capsys.readouterr().err


def test_a_site_task_names_its_site_in_every_log_line():
    root = logging.getLogger()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root.addHandler(handler)
    try:
        name_task_logs("site hospital-a")
        name_task_logs("site hospital-a")  # once, however often it is called
        logging.getLogger("cessl.ingest").warning("%d records quarantined", 2)
    finally:
        root.removeHandler(handler)
    assert out.getvalue() == "[site hospital-a] 2 records quarantined\n"
    assert site_run_name("hospital-a", "cessl-r8-1a2b3c4d") == "hospital-a-cessl-r8-1a2b3c4d"


def test_the_gate_names_classes_with_their_codes():
    assert class_label(AF) == f"AF ({AF})" and class_label("c0") == "c0"
    comparison = Comparison(
        metric="macro_f_beta",
        challenger_version="2",
        challenger_value=0.6,
        champion_version="1",
        champion_value=0.5,
        margin=0.0,
        basis="paired bootstrap",
        comparable=True,
        estimate=0.1,
        ci_low=0.05,
        ci_high=0.15,
        confidence=0.95,
        n_records=300,
        n_resamples=300,
        class_drops={AF: 0.2, RBBB: 0.01},
    )
    assert f"largest class drop 0.2000 (AF ({AF}))" in comparison.describe()
    passed, why = verdict(comparison, GateConfig(), True, "cessl")
    assert not passed and f"AF ({AF}) -0.2000" in why and RBBB not in why


@pytest.mark.parametrize("verb", ["promote", "rollback"])
def test_promote_and_rollback_take_the_same_targets(verb):
    from pipeline.cli import build_parser

    args = build_parser().parse_args([verb, "base", "--site", "a", "--site", "b", "--sites", __file__])
    assert (args.name, args.site, args.all_sites, args.sites) == ("base", ["a", "b"], False, __file__)


def test_network_next_steps_promote_the_production_model_and_say_to_make_a_key(monkeypatch, tmp_path):
    """A site registers into ``<model>-candidates``; promote takes the production name (it copies
    the candidate over). Without a signing key, the first step is to make one."""
    from pipeline.cli.sites import REGISTERED, NetworkSummary, SiteOutcome, next_steps

    monkeypatch.setenv("CESSL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("CESSL_SIGNING_KEY", raising=False)
    site = SiteOutcome(
        "hospital-a", "/data/a", REGISTERED, "", DATA_VERSION, 40, 0, "cessl-ecg-hospital-a-candidates", "1", RUN_ID
    )
    lines = next_steps(NetworkSummary("n", RUN_ID, URI, [site], sites_file="sites.yaml"), "")
    promotes = [line for line in lines if " promote cessl-ecg-" in line]
    assert promotes and all(line.endswith("promote cessl-ecg-hospital-a") for line in promotes)
    keygen = [i for i, line in enumerate(lines) if "access keygen" in line]
    assert keygen and keygen[0] < lines.index(promotes[0])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "signing-key.pem").write_text("a key")
    assert not any("access keygen" in line for line in next_steps(NetworkSummary("n", RUN_ID, URI, [site]), ""))


def test_a_password_in_the_tracking_uri_is_never_printed_in_a_summary(monkeypatch, tmp_path):
    """The run and network summaries (printed, not logged) mask a URI's password as the logs do;
    their next steps carry the masked URI (credentials come from the environment)."""
    from pipeline.cli.sites import REGISTERED, NetworkSummary, SiteOutcome, print_network_summary

    secret = "s3cr3t-Passw0rd"
    uri = f"https://release-manager:{secret}@mlflow.hospital.example"
    monkeypatch.chdir(tmp_path)
    sites = [SiteOutcome("hospital-a", "/data/a", REGISTERED, "", DATA_VERSION, 40, 2, MODEL, "3", RUN_ID)]
    network = render(lambda console: print_network_summary(NetworkSummary("n1", RUN_ID, uri, sites), console))
    run = dataclasses.replace(summary(), tracking_uri=uri)
    single = render(lambda console: print_summary(run, console)) + "\n".join(next_steps(run))
    for text in (network, single):
        assert secret not in text and "mlflow.hospital.example" in text and "***" in text
