"""Step 8's process hygiene, progress and readable names: whether a process is alive (a task
that dies with its run under `sh`: tests/integration/test_cli_real_processes.py), the
live progress line reaches the terminal, the run summary says what happened and what next,
and per-class tables, plots, the confusion summary and predict CSVs name the diagnoses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from ml.eval.metrics import confusion_markdown, per_class_table
from ml.eval.predictor import predictions_table
from ml.train.callbacks import PROGRESS_PREFIX, ProgressLine
from pipeline.cli.run import RunSummary, print_summary
from pipeline.core.process import alive
from pipeline.dags.finetune import TASK_PROGRESS_PREFIX, _ProgressTee

REPO = Path(__file__).resolve().parents[2]
AF, RBBB = "164889003", "59118001"  # atrial fibrillation, right bundle branch block


def summary(**overrides) -> RunSummary:
    values = dict(
        data_version="abc123",
        git_commit="deadbeef",
        model_name="cessl-ecg",
        model_version="3",
        run_id="r1",
        tracking_uri="sqlite:///tmp/mlflow.db",
        rank_map={"blocks.0.attn": 8},
        test_metrics={"macro_auroc": 0.81},
        champion_metrics={},
        aliases=["challenger"],
        seconds=12.0,
        n_quarantined=4,
        reused=True,
        report_uri="file:///tmp/art/evaluation/report.html",
    )
    values.update(overrides)
    return RunSummary(**values)


def printed(s: RunSummary) -> str:
    out = io.StringIO()
    print_summary(s, Console(file=out, width=200, color_system=None))
    return out.getvalue()


@pytest.mark.parametrize("has_key", [False, True], ids=["no-signing-key", "signing-key"])
def test_summary_shows_aliases_quarantine_reuse_and_next_steps(monkeypatch, tmp_path, has_key):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # cessl on PATH: printed as `cessl`
    monkeypatch.setenv("CESSL_CONFIG_DIR", str(tmp_path))  # the key (or its absence) is this test's own
    monkeypatch.delenv("CESSL_SIGNING_KEY", raising=False)
    if has_key:
        (tmp_path / "signing-key.pem").write_text("a key\n")
    text = printed(summary())
    assert "cessl-ecg v3 [challenger]" in text
    assert "quarantined records  4\n" in text
    assert "reused an identical earlier registration" in text
    expected = [
        "mlflow ui --backend-store-uri sqlite:///tmp/mlflow.db",
        "evaluation report: file:///tmp/art/evaluation/report.html",
        *([] if has_key else ["cessl access keygen"]),  # promotions are signed: without a key, make one first
        "cessl promote cessl-ecg --tracking-uri sqlite:///tmp/mlflow.db",
    ]
    assert [line.strip() for line in text.strip().splitlines()[-len(expected) :]] == expected


def test_summary_of_a_champion_does_not_suggest_promoting_it():
    text = printed(summary(aliases=["champion", "challenger"], reused=False, n_quarantined=None))
    assert "[champion, challenger]" in text and "cessl promote" not in text
    assert "quarantined" not in text and "reused" not in text


def test_progress_line_is_throttled_and_has_eta():
    now = [0.0]
    out = io.StringIO()
    progress = ProgressLine(100, stream=out, interval=10.0, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = float(step)  # 1 s a step
        progress.on_step(step, {"loss": 0.5})
    progress.on_validation(10, {"macro_map": 0.25, "loss": 0.4})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # step 1 (first), then the validation; the steps between are throttled
    assert all(line.startswith(PROGRESS_PREFIX) for line in lines)
    assert "step 10/100" in lines[-1] and "loss 0.5000" in lines[-1] and "valid mAP 0.2500" in lines[-1]
    assert "ETA 1m30s" in lines[-1]  # 90 steps left at 1 s a step
    assert "ETA" not in lines[0]  # not from one step


def test_tee_forwards_task_progress_lines_to_the_terminal():
    assert TASK_PROGRESS_PREFIX == PROGRESS_PREFIX
    sink, terminal = io.StringIO(), io.StringIO()
    tee = _ProgressTee(sink, terminal)
    tee.write("some task log line\n    " + PROGRESS_PREFIX + "fine-tune: step 4/20 | lo")
    tee.write("ss 0.1\nother\n")
    assert terminal.getvalue() == "  fine-tune: step 4/20 | loss 0.1\n"
    assert PROGRESS_PREFIX in sink.getvalue() and "some task log line" in sink.getvalue()


def test_alive():
    assert alive(os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not alive(dead.pid)


def per_class():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    p = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.6, 0.2]])
    return per_class_table(y, p, [0.5, 0.5], [AF, RBBB])


def test_per_class_table_names_the_diagnoses():
    table = per_class()
    assert list(table["abbreviation"]) == ["AF", "RBBB"]
    assert "fibrillation" in table["name"][0].lower()
    assert list(table.loc[0, ["tp", "fp", "fn", "tn"]]) == [2, 1, 0, 1]


def test_confusion_markdown_has_one_row_per_class():
    rows = [line for line in confusion_markdown(per_class()).splitlines() if line.startswith(("| 1", "| 5"))]
    assert len(rows) == 2 and "| AF |" in rows[0] and "| 2 | 1 | 0 | 1 |" in rows[0]


def test_predict_csv_has_each_class_threshold():
    table = predictions_table(["r1"], np.array([[0.7, 0.2]]), [AF, RBBB], [[AF]], thresholds=[0.3, 0.6])
    assert table.loc[0, f"threshold_{AF}"] == pytest.approx(0.3)
    assert table.loc[0, f"threshold_{RBBB}"] == pytest.approx(0.6)
    assert table.loc[0, "diagnoses"] == "AF"


def test_kfp_progress_messages_pass_the_orchestrator_filter():
    import logging

    from pipeline.dags.finetune import _KfpOrchestratorNoise

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("root", logging.INFO, f"/x/kfp{os.sep}local/task_dispatcher.py", 1, message, (), None)

    noise = _KfpOrchestratorNoise()
    assert noise.filter(record("Executing task \x1b[96m'ingest'\x1b[0m"))
    assert noise.filter(record("Task \x1b[96m'ingest'\x1b[0m cache hit"))
    assert not noise.filter(record("resolved loop input item 3"))


# --------------------------------------------------------------------------- Docker runner
