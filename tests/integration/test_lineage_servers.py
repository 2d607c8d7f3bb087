"""Concurrency and lineage against real servers: the atomic duplicate-registration check (two
real processes against one MLflow server) and data versions of S3 sources computed from the
objects. The lock, data add, remotes and run records: tests/integration/test_lineage.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lineage_support import fake_bundle, stub_model_logging
from mlflow.tracking import MlflowClient
from pipeline_support import REPO, make_hospital

TESTS = Path(__file__).resolve().parents[1]  # tests/: lineage_support, for the racing processes


# --------------------------------------------------------------------------- registration


RACER = """
import json, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
import lineage_support
from pipeline.registry import store, tracking
lineage_support.stub_model_logging()
tracking.find_registered = lambda *a: None  # both pass the pre-check: the race is real
bundle = lineage_support.fake_bundle(Path(sys.argv[2]))
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
