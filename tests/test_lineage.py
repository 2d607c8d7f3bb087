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
from mlflow.tracking import MlflowClient
from test_pipeline_support import REPO, cessl, cessl_process, make_hospital, make_repo

from components.locking import LockHeld, exclusive

TESTS = Path(__file__).resolve().parent


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
        line = next(x for x in out.splitlines() if "in use by" in x)
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


def fake_bundle(tmp: Path, source: str = "s3://hospital/ecg", data_version: str = "d" * 32 + ".dir"):
    """A registration bundle with fixed contents (same fingerprint for every caller)."""
    from components.register import Registration
    from ml.data.splits import Splits

    splits = Splits(test=["a", "b"], train=["c"], valid=["d"], unlabelled=[], classes=["1", "2"])
    model = tmp / "model"  # stands for the backbone and adapter folders (their digests are version tags)
    model.mkdir(exist_ok=True)
    (model / "weights").write_text("w")
    tags = {"data_version": data_version, "git_commit": "0123abc+dirty", "test_split_hash": splits.test_split_hash}
    return Registration(
        params={"method": "cessl", "r": 8, "source": source},
        tags=tags | {"method": "cessl"},  # a production method: the version becomes the challenger
        test_metrics={"macro_f_beta": 0.5},
        curves=[{"step": 1, "train_loss": 1.0}],
        rank_map={"layer": 8},
        classes=["1", "2"],
        backbone_dir=model,
        adapter_dir=model,
        splits=splits,
        fingerprint="race-" + data_version[:8],
        run_name="race",
        data_version=data_version,
        git_commit="0123abc+dirty",
    )


def stub_model_logging(monkeypatch=None) -> None:
    """Log a trivial pyfunc instead of the adapter model (no trained model needed here)."""
    import mlflow

    from pipeline.registry import pyfunc_model

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    def log_stub(backbone_dir, adapter_dir, classes, registered_model_name):
        assert registered_model_name is None  # registration is log_and_register's, with its tags
        return mlflow.pyfunc.log_model(name="model", python_model=Echo())

    if monkeypatch is not None:
        monkeypatch.setattr(pyfunc_model, "log_adapter_model", log_stub)
    else:
        pyfunc_model.log_adapter_model = log_stub


RACER = """
import json, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
import test_lineage
from pipeline.registry import store, tracking
test_lineage.stub_model_logging()
tracking.find_registered = lambda *a: None  # both pass the pre-check: the race is real
bundle = test_lineage.fake_bundle(Path(sys.argv[2]))
config = store.TrackingConfig(sys.argv[1], "race", "race-model")
while time.time() < float(sys.argv[3]):
    time.sleep(0.01)
result = tracking.log_and_register(bundle, config, {{"kfp.run_id": sys.argv[4]}})
print("RESULT " + json.dumps({{"version": result.version, "run_id": result.run_id, "reused": result.reused}}))
"""


@pytest.mark.integration
def test_two_processes_registering_one_fingerprint_leave_one_version(mlflow_server, tmp_path, monkeypatch):
    code = RACER.format(repo=str(REPO), tests=str(TESTS))
    start_at = time.time() + 8  # both import mlflow first, then start together
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, mlflow_server.tracking_uri, str(tmp_path), str(start_at), f"kfp-{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-4000:] for o in outputs)
    results = [json.loads(o.rsplit("RESULT ", 1)[1]) for o in outputs]

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri, registry_uri=mlflow_server.tracking_uri)
    versions = client.search_model_versions("name = 'race-model'")
    assert len(versions) == 1, [(v.version, v.tags) for v in versions]
    (kept,) = versions
    assert {r["version"] for r in results} == {str(kept.version)}
    assert sorted(r["reused"] for r in results) == [False, True]  # one registered, the other reused it
    assert {r["run_id"] for r in results} == {kept.run_id}
    assert client.get_model_version_by_alias("race-model", "challenger").version == kept.version
    # the loser's run is withdrawn (deleted), marked as a duplicate of the winner
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id], run_view_type=3)  # ViewType.ALL
    losers = [r for r in runs if r.info.run_id != kept.run_id]
    assert len(losers) == 1 and losers[0].info.lifecycle_stage == "deleted"
    assert losers[0].data.tags["cessl.duplicate_of"] == f"race-model/{kept.version}"

    # a third registration of the same inputs: the plain pre-check reuses it
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.tracking import log_and_register

    stub_model_logging(monkeypatch)
    again = log_and_register(fake_bundle(tmp_path), TrackingConfig(mlflow_server.tracking_uri, "race", "race-model"))
    assert again.reused and again.version == str(kept.version)


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


def _upload(client, bucket: str, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes()
            )


@pytest.mark.integration
def test_an_s3_source_gets_its_data_version_from_its_objects(s3_server, s3_bucket, tmp_path, monkeypatch):
    from components.ingest import ingest_step
    from ml.data.dvc import dir_md5, objects_version, source_version
    from pipeline.registry.lineage import source_data_version

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    hospital = make_hospital(tmp_path / "hospital", records=6, seed=8)
    client = s3_server.client()
    _upload(client, s3_bucket, hospital, "site/2024")
    uri = f"s3://{s3_bucket}/site/2024"

    v1 = source_version(uri)
    assert v1 == dir_md5(hospital) == source_data_version(uri)  # DVC's md5 of the same files
    first = ingest_step(uri, tmp_path / "m1", tmp_path / "q1.md", state_dir=tmp_path / "state")
    assert first.source_version == v1

    # an object is rewritten with other bytes: a new version, and ingest sees the new objects
    header = sorted(hospital.glob("*.hea"))[0]
    header.write_text(header.read_text() + "# note: re-exported\n")
    _upload(client, s3_bucket, hospital, "site/2024")
    v2 = source_version(uri)
    assert v2 != v1 and v2 == dir_md5(hospital)
    second = ingest_step(uri, tmp_path / "m2", tmp_path / "q2.md", state_dir=tmp_path / "state")
    assert second.source_version == v2 and second.read == 1  # the changed record read again
    # an object added: another version
    client.put_object(Bucket=s3_bucket, Key="site/2024/notes.txt", Body=b"x")
    assert source_version(uri) not in (v1, v2)
    # multipart-style ETags are not md5s: a named content digest, not a fake DVC md5
    multi = objects_version([("a.hea", 10, "0" * 32 + "-2")])
    assert multi.startswith("etags:") and len(multi) <= 36


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
