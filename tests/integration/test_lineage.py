"""Concurrency and lineage: the project lock of local runs, the atomic duplicate-registration
check (two real processes against one MLflow server), data versions of S3 sources computed
from the objects, `cessl data add` committing data.dvc, DVC remotes and push, and what an
MLflow run records about its data, code and KFP run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lineage_support import fake_bundle, stub_model_logging
from mlflow.tracking import MlflowClient
from pipeline_support import REPO, cessl, cessl_process, make_hospital, make_repo

from components.locking import LockHeld, exclusive

# --------------------------------------------------------------------------- helpers


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(autouse=True)
def _git_identity(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "cessl-test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@cessl.invalid")


def git_repo(path: Path, records: int = 6, seed: int = 3) -> Path:
    """A git repository with ``data/`` tracked by DVC and everything committed."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("project\n")
    make_repo(path, records=records, seed=seed)
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "data v1")
    return path


HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from components.locking import exclusive
with exclusive(sys.argv[1], command="cessl run (test holder)"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """A helper process holding the lock at ``path`` (as a running `cessl run` would)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# --------------------------------------------------------------------------- the project lock


def test_a_second_run_fails_fast_naming_the_holder_and_a_dead_holder_is_recovered(tmp_path, caplog):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "A0001.hea").write_text("A0001 12 500 5000\n")  # passes the checks before the lock
    lock = project / ".cache" / "cessl" / "run.lock"
    holder = hold_lock(lock)
    try:
        start = time.monotonic()
        proc = cessl_process(["run", "--no-demo-data"], project, {}, tmp_path / "second.log")
        assert proc.wait(timeout=120) == 2
        out = (tmp_path / "second.log").read_text()
        line = next((x for x in out.splitlines() if "in use by" in x), None)
        assert line is not None, out
        assert f"pid {holder.pid}" in line and "since" in line and "--wait-lock" in line, out
        # before any work: no data generated, no MLflow store, no task outputs
        assert sorted(p.name for p in project.iterdir()) == [".cache", "data"], list(project.iterdir())
        assert [p.name for p in (project / "data").iterdir()] == ["A0001.hea"]
        assert time.monotonic() - start < 60

        # --wait-lock: waits that long for the holder, then gives up with the same line
        start = time.monotonic()
        with pytest.raises(LockHeld, match=f"pid {holder.pid}.*waited 1 s"), exclusive(lock, wait=1.0):
            pass
        assert time.monotonic() - start >= 1.0
        assert "run.lock" in str(lock) and json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the flock
        holder.wait()
    caplog.set_level(logging.INFO, logger="components.locking")
    with exclusive(lock, command="next run") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with exclusive(lock):  # re-entrant in one process (retrain runs `run` under its lock)
            pass
    assert any(f"pid {holder.pid}" in r.message and "no longer running" in r.message for r in caplog.records)
    assert lock.read_text() == ""  # released cleanly


def test_wait_lock_waits_for_the_holder_to_finish(tmp_path):
    lock = tmp_path / "run.lock"
    holder = hold_lock(lock)
    try:
        subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
        start = time.monotonic()
        with exclusive(lock, wait=60):
            assert time.monotonic() - start >= 0.5
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- registration


def test_the_run_records_dataset_git_commit_and_kfp_run(tmp_path, monkeypatch):
    from components.common import sha256_dir
    from pipeline.registry.lineage import lineage_tags
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.tracking import log_and_register

    stub_model_logging(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = "0123456789abcdef0123456789abcdef.dir"
    bundle = fake_bundle(tmp_path, source=str(tmp_path / "data"), data_version=version)
    tags = lineage_tags("0123abc+dirty", "run-uuid-1", "cessl-finetune-20240101", "cessl-finetune")
    result = log_and_register(bundle, TrackingConfig.resolve(uri, "lineage", "lineage-model"), tags)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    (data,) = [d for d in run.inputs.dataset_inputs if d.dataset.digest == version]
    assert json.loads(data.dataset.source)["uri"] == str(tmp_path / "data") and data.dataset.name == "data"
    assert [t.value for t in data.tags if t.key == "mlflow.data.context"] == ["training"]
    assert run.data.tags["mlflow.source.git.commit"] == "0123abc"  # the standard tag: a bare hash
    assert run.data.tags["git_commit"] == "0123abc+dirty"
    assert (run.data.tags["kfp.run_id"], run.data.tags["kfp.pipeline_name"]) == ("run-uuid-1", "cessl-finetune")
    assert run.data.tags["kfp.run_name"] == "cessl-finetune-20240101"
    mv = client.get_model_version("lineage-model", result.version)
    assert mv.tags["kfp.run_id"] == "run-uuid-1" and mv.tags["pipeline_fingerprint"] == bundle.fingerprint
    assert mv.tags["cessl.digest.adapter"] == sha256_dir(tmp_path / "model")  # checked by cessl promote
    # unresolved placeholders (a component called outside KFP) are not recorded
    assert lineage_tags("abc", "{{$.pipeline_job_uuid}}") == {"mlflow.source.git.commit": "abc"}


def test_the_dag_passes_the_kfp_run_to_register():
    from kfp import dsl

    from pipeline.dags.finetune import PIPELINE_NAME, build_pipeline

    spec = build_pipeline().pipeline_spec
    inputs = spec.root.dag.tasks["register"].inputs.parameters
    assert inputs["kfp_run_id"].runtime_value.constant.string_value == dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert inputs["kfp_run_name"].runtime_value.constant.string_value == dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    assert inputs["kfp_pipeline_name"].runtime_value.constant.string_value == PIPELINE_NAME
    # ingest's cache key holds the data version: new data, new ingest
    assert "data_version" in spec.root.dag.tasks["ingest"].inputs.parameters


# --------------------------------------------------------------------------- S3 data versions


# --------------------------------------------------------------------------- data add, remotes, push


def test_data_add_commits_data_dvc_or_gives_the_command_on_a_dirty_tree(tmp_path, monkeypatch, caplog):
    repo = git_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    make_hospital(tmp_path / "new_site", records=3, seed=9, start=100)
    assert cessl("data", "add", tmp_path / "new_site") == 0
    from ml.data.dvc import data_version

    version = data_version(repo)
    assert version in _git(repo, "log", "-1", "--format=%s") and "3 records" in _git(repo, "log", "-1", "--format=%s")
    assert _git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    from pipeline.registry.lineage import git_commit

    assert not git_commit(repo).endswith("+dirty")

    # another change in the tree: data.dvc is not committed, the exact command is given
    (repo / "README.md").write_text("edited\n")
    make_hospital(tmp_path / "third_site", records=2, seed=10, start=200)
    head = _git(repo, "rev-parse", "HEAD")
    assert cessl("data", "add", tmp_path / "third_site") == 1
    assert _git(repo, "rev-parse", "HEAD") == head
    (message,) = [r.getMessage() for r in caplog.records if "not committed" in r.getMessage()]
    assert "README.md" in message and data_version(repo) in message
    command = message.split("commit data.dvc alone with: ", 1)[1]
    assert command.startswith("git add data.dvc")
    subprocess.run(command, shell=True, cwd=repo, check=True)
    assert _git(repo, "status", "--porcelain", "--untracked-files=no").strip() == "M README.md"
    assert data_version(repo) in _git(repo, "log", "-1", "--format=%s")


def test_data_remote_add_and_the_run_push_to_a_folder_remote(tmp_path, monkeypatch, caplog):
    from ml.data.dvc import data_version, default_remote
    from pipeline.registry.lineage import push_data_version

    repo = git_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    caplog.set_level(logging.INFO)
    version = data_version(repo)
    assert not push_data_version(repo / "data", version, repo)  # no default remote: said, not pushed

    remote = tmp_path / "remote"
    assert cessl("data", "remote", "add", "backup", remote, "--default") == 0
    assert default_remote(repo) == "backup"
    assert "backup" in (repo / ".dvc" / "config").read_text()
    assert push_data_version(repo / "data", version, repo)
    md5 = version.removesuffix(".dir")
    assert (remote / "files" / "md5" / md5[:2] / (md5[2:] + ".dir")).is_file()  # DVC's layout
    assert len(list((remote / "files" / "md5").rglob("*"))) > 6

    # a version data.dvc does not record is not pushed (warning), nor is a failing push silent
    assert not push_data_version(repo / "data", "f" * 32 + ".dir", repo)
    (tmp_path / "blocker").mkdir()  # `remote add` checks the folder's parent exists ...
    assert cessl("data", "remote", "add", "broken", tmp_path / "blocker" / "sub", "--default") == 0
    (tmp_path / "blocker").rmdir()  # ... and then it is a file
    (tmp_path / "blocker").write_text("a file where the remote's folder should be")
    caplog.clear()
    assert not push_data_version(repo / "data", version, repo)
    assert any("NOT pushed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # s3 remotes take their endpoint
    assert cessl("data", "remote", "add", "s3store", "s3://bucket/dvc", "--endpoint-url", "http://127.0.0.1:9") == 0
    assert "endpointurl = http://127.0.0.1:9" in (repo / ".dvc" / "config").read_text()
