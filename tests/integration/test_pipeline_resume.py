"""A `cessl run` killed during finetune and started again: the finished steps come from the
KFP cache, finetune continues from its checkpoint, and exactly one model version is registered."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from pipeline_support import SMALL_RUN, cessl_process, make_backbone, make_repo

from ml.model.adapter import CheckpointError
from ml.train.checkpoint import load_checkpoint
from pipeline.core.process import RUN_PID_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # START_TIMEOUT_S + RUN_TIMEOUT_S and more

NAME = "cessl-resume"
CANDIDATES = NAME + "-candidates"  # where the pipeline registers (promote copies into NAME)
MAX_STEPS, VAL_EVERY, KILL_AFTER = 20, 4, 8
START_TIMEOUT_S, RUN_TIMEOUT_S = 420, 600
ORPHAN_TIMEOUT_S = 10


def checkpoint_step(checkpoints: Path) -> int:
    """The step of the newest finetune checkpoint (``last.pt``: what a resumed run starts from).

    Read from the checkpoint itself, not from ``curves.jsonl``: a validation's curve row is
    written before its checkpoint, so a kill between the two leaves a row one checkpoint ahead
    (the resumed run truncates it)."""
    steps = [0]
    for last in checkpoints.glob("*/last.pt"):
        try:
            steps.append(int(load_checkpoint(last)["step"]))
        except (OSError, CheckpointError):  # replaced between the listing and the read
            continue
    return max(steps)


def wait_for(proc, predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"cessl run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def run_processes(run_pid: int) -> list[psutil.Process]:
    """The live processes a local run started (its tasks carry its pid in $CESSL_RUN_PID)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_PID_ENV) == str(run_pid) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def checkpoint_state(checkpoints: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoints.rglob("*") if p.is_file()}


def test_killed_run_resumes_and_registers_once(tmp_path):
    """kill -9 of `cessl run` alone (not its process group): its task processes die within
    seconds and stop writing the checkpoint folder; the next run resumes from it."""
    repo = make_repo(tmp_path / "project", records=100, seed=21)
    backbone = make_backbone(tmp_path / "backbone")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    args = [
        "run",
        *SMALL_RUN,
        "--max-steps",
        MAX_STEPS,
        "--val-every",
        VAL_EVERY,
        "--backbone",
        backbone,
        "--model-name",
        NAME,
        "--tracking-uri",
        uri,
    ]
    checkpoints = repo / ".cache" / "cessl" / "checkpoints"

    first_log = tmp_path / "first.log"
    proc = cessl_process(args, repo, {}, first_log)
    try:
        wait_for(
            proc,
            lambda: checkpoint_step(checkpoints) >= KILL_AFTER,
            START_TIMEOUT_S,
            f"a finetune checkpoint at step {KILL_AFTER}",
            first_log,
        )
        os.kill(proc.pid, signal.SIGKILL)  # `cessl run` alone: its tasks must die with it
        proc.wait(timeout=60)
        assert wait_until(lambda: not run_processes(proc.pid), ORPHAN_TIMEOUT_S), run_processes(proc.pid)
        before = checkpoint_state(checkpoints)
        time.sleep(3)
        assert checkpoint_state(checkpoints) == before, "the checkpoint folder still changes after the kill"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for orphan in run_processes(proc.pid):  # do not leave them to other tests
            orphan.kill()
    killed_at = checkpoint_step(checkpoints)
    assert KILL_AFTER <= killed_at < MAX_STEPS
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert not client.search_registered_models(f"name = '{CANDIDATES}'"), "registered before the kill"

    second_log = tmp_path / "second.log"
    proc = cessl_process([*args, "--json", tmp_path / "summary.json"], repo, {}, second_log)
    try:
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, second_log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    progress = second_log.read_text()
    assert "fine-tune (" in progress and "ETA" in progress  # the live progress line
    for step in ("ingest", "preprocess", "split", "resolve-backbone", "allocate-ranks"):
        assert f"Task {step} cache hit" in progress, step
    task_log = (repo / "local_outputs" / "last_run.log").read_text()
    assert "resuming fine-tuning from" in task_log and f"at step {killed_at}" in task_log, task_log[-6000:]

    versions = client.search_model_versions(f"name = '{CANDIDATES}'")
    assert [str(v.version) for v in versions] == ["1"]
    run_id = json.loads((tmp_path / "summary.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, MAX_STEPS + 1))
    assert [m.step for m in client.get_metric_history(run_id, "valid_macro_map")] == list(
        range(0, MAX_STEPS + 1, VAL_EVERY)  # validated at step 0 too
    )
