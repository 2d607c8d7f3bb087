"""`cessl submit` of an S3 source (a real S3 server) versions it by its objects; the KFP
client is a recorder (no Kubeflow Pipelines API server runs here). The other submit,
schedule and retrain cases: tests/unit/test_pipeline_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pipeline_support import RecordingClient, cessl, make_repo, record_kfp_calls

HOST = "http://kfp.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("cli") / "project", records=16, seed=41)


@pytest.fixture()
def kfp_client(monkeypatch, repo) -> RecordingClient:
    return record_kfp_calls(monkeypatch, repo)


def _spec(path: str) -> dict:
    return next(yaml.safe_load_all(Path(path).read_text()))


@pytest.mark.integration
def test_submit_versions_an_s3_source_by_its_objects(kfp_client, s3_server, s3_bucket, monkeypatch, tmp_path):
    from pipeline_support import make_hospital

    from ml.data.dvc import data_version, dir_md5

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    hospital = make_hospital(tmp_path / "hospital", records=4, seed=12)
    client = s3_server.client()
    for path in sorted(hospital.iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"ward/{path.name}", Body=path.read_bytes())
    assert cessl("submit", "--host", HOST, "--source", f"s3://{s3_bucket}/ward") == 0
    ((_, call),) = kfp_client.calls
    assert call["arguments"]["data_version"] == dir_md5(hospital) != data_version(Path.cwd())
    assert _spec(call["pipeline_file"])["root"]["dag"]["tasks"]["ingest"]["cachingOptions"]["enableCache"] is True
