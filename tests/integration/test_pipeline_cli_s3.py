"""`cessl submit | schedule | retrain` against a KFP endpoint.

No Kubeflow Pipelines API server can run on these machines, so ``kfp.Client`` is replaced
by a recorder of the calls the commands make; everything else (compiling the package,
reading the data version from data.dvc, the MLflow champion) is real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pipeline_support import cessl, make_repo

from pipeline.cli import preflight
from pipeline.cli import run as run_command

HOST = "http://kfp.example.org"


@dataclass
class RecordingClient:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any):
        self.calls.append(("run", {"pipeline_file": pipeline_file, **kwargs}))
        return SimpleNamespace(run_id="run-1")

    def create_experiment(self, name: str, **kwargs: Any):
        self.calls.append(("experiment", {"name": name, **kwargs}))
        return SimpleNamespace(experiment_id="exp-1")

    def create_recurring_run(self, **kwargs: Any):
        self.calls.append(("recurring", kwargs))
        return SimpleNamespace(recurring_run_id="job-1")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("cli") / "project", records=16, seed=41)


@pytest.fixture()
def kfp_client(monkeypatch, repo) -> RecordingClient:
    client = RecordingClient()
    hosts = []
    monkeypatch.setattr(run_command, "_client", lambda args: hosts.append(args.host) or client)
    monkeypatch.setattr(preflight, "check_kfp_host", lambda host, timeout=5.0: host)  # no KFP server here
    monkeypatch.chdir(repo)
    client.hosts = hosts
    return client


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
