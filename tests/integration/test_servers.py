"""The real test servers work: S3 checks credentials, MLflow stores artifacts in S3."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

pytestmark = pytest.mark.integration


def test_s3_put_get_roundtrip(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="records/a.txt", Body=b"12-lead")
    body = client.get_object(Bucket=s3_bucket, Key="records/a.txt")["Body"].read()
    assert body == b"12-lead"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["records/a.txt"]


def test_s3_rejects_wrong_and_missing_credentials(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="secret.bin", Body=b"x")
    wrong = s3_server.client(aws_secret_access_key=s3_server.secret_key + "x")
    with pytest.raises(ClientError) as err:
        wrong.get_object(Bucket=s3_bucket, Key="secret.bin")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        wrong.put_object(Bucket=s3_bucket, Key="intruder.bin", Body=b"y")
    with pytest.raises(urllib.error.HTTPError) as anon:  # anonymous GET
        urllib.request.urlopen(f"{s3_server.endpoint_url}/{s3_bucket}/secret.bin", timeout=5)
    assert anon.value.code == 403


def test_s3_env_works_for_a_child_process(s3_server, s3_bucket):
    """`.env()` is all a subprocess (a pipeline step, DVC, ...) needs."""
    code = (
        "import boto3, sys; from botocore.config import Config;"
        "c = boto3.client('s3', config=Config(s3={'addressing_style': 'path'}));"
        f"c.put_object(Bucket='{s3_bucket}', Key='child.txt', Body=b'ok')"
    )
    subprocess.run([sys.executable, "-c", code], env={**_base_env(), **s3_server.env()}, check=True, timeout=60)
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="child.txt")["Body"].read() == b"ok"


def test_credentials_are_hidden_from_repr(s3_server):
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.access_key not in repr(s3_server)


def test_mlflow_run_artifact_lands_in_bucket(mlflow_server, s3_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    # the client needs no S3 credentials: artifacts are proxied by the server
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri, registry_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment("test-servers")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "r", 16)
    client.log_metric(run.info.run_id, "challenge_score", 0.5)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text('{"r": 16}')
    client.log_artifact(run.info.run_id, str(adapter), artifact_path="adapter")
    client.set_terminated(run.info.run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"r": "16"}
    assert stored.data.metrics["challenge_score"] == 0.5

    listed = s3_server.client().list_objects_v2(Bucket=mlflow_server.artifact_bucket).get("Contents", [])
    keys = [o["Key"] for o in listed if run.info.run_id in o["Key"]]
    assert len(keys) == 1 and keys[0].endswith("adapter/adapter_config.json"), keys
    body = s3_server.client().get_object(Bucket=mlflow_server.artifact_bucket, Key=keys[0])["Body"].read()
    assert body == b'{"r": 16}'

    # and back through the tracking server
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="adapter/adapter_config.json",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server.tracking_uri,
    )
    assert Path(local).read_text() == '{"r": 16}'


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}


def test_server_logs_do_not_leak_the_secret(s3_server, mlflow_server):
    for log_file in (s3_server.data_dir / "weed.log", mlflow_server.data_dir / "mlflow.log"):
        assert log_file.exists()
        assert s3_server.secret_key not in log_file.read_text(errors="replace"), log_file
