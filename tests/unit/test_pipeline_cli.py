"""`cessl submit | schedule | retrain` against a KFP endpoint.

No Kubeflow Pipelines API server can run on these machines, so ``kfp.Client`` is replaced
by a recorder of the calls the commands make; everything else (compiling the package,
reading the data version from data.dvc, the MLflow champion) is real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from pipeline_support import RecordingClient, cessl, make_repo, record_kfp_calls

from pipeline.registry.tracking import CHAMPION

HOST = "http://kfp.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("cli") / "project", records=16, seed=41)


@pytest.fixture()
def kfp_client(monkeypatch, repo) -> RecordingClient:
    return record_kfp_calls(monkeypatch, repo)


def _spec(path: str) -> dict:
    return next(yaml.safe_load_all(Path(path).read_text()))


def test_submit_compiles_and_passes_the_data_version(kfp_client, repo):
    from ml.data.dvc import data_version

    assert (
        cessl(
            "submit",
            "--host",
            HOST,
            "--run-name",
            "nightly",
            "--kfp-experiment",
            "hospital-a",
            "--source",
            "s3://ecg/hospital-a",
            "--image",
            "reg.example.org/cessl:9",
            "--max-steps",
            "500",
            "--tracking-uri",
            "http://mlflow:5000",
        )
        == 0
    )
    ((kind, call),) = kfp_client.calls
    assert kind == "run" and kfp_client.hosts == [HOST]
    assert (call["run_name"], call["experiment_name"]) == ("nightly", "hospital-a")
    args = call["arguments"]
    assert args["source"] == "s3://ecg/hospital-a" and args["max_steps"] == 500
    # s3://ecg cannot be listed from here: never the local data.dvc's version of other data;
    # ingest computes the version from the listing and, unversioned, is not served from cache.
    assert args["data_version"] == "" != data_version(repo)
    assert not _spec(call["pipeline_file"])["root"]["dag"]["tasks"]["ingest"]["cachingOptions"].get("enableCache")
    assert args["tracking_uri"] == "http://mlflow:5000" and "state_dir" not in args
    assert "checkpoint_root" not in args  # the compiled default: the checkpoint PVC's mount
    spec = _spec(call["pipeline_file"])
    container = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]
    assert container["image"] == "reg.example.org/cessl:9"
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"


def test_schedule_creates_a_recurring_run_that_lists_the_source_each_time(kfp_client):
    assert (
        cessl(
            "schedule", "--host", HOST, "--cron", "0 3 * * 1", "--job-name", "weekly", "--source", "s3://ecg/hospital-a"
        )
        == 0
    )
    kinds = [kind for kind, _ in kfp_client.calls]
    assert kinds == ["experiment", "recurring"]
    job = kfp_client.calls[1][1]
    assert job["cron_expression"] == "0 0 3 * * 1" and job["job_name"] == "weekly"
    assert job["experiment_id"] == "exp-1" and job["max_concurrency"] == 1 and job["no_catchup"] is True
    assert job["params"]["data_version"] == ""  # the data found at run time decides
    tasks = _spec(job["pipeline_package_path"])["root"]["dag"]["tasks"]
    assert not tasks["ingest"]["cachingOptions"].get("enableCache", False)
    assert tasks["preprocess"]["cachingOptions"]["enableCache"] is True


def test_retrain_submits_only_when_the_data_changed(kfp_client, repo, tmp_path, monkeypatch):
    from ml.data.dvc import data_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.create_registered_model("retrain-test")
    champion = mlflow.create_model_version("retrain-test", source="file:///nowhere", tags={"data_version": "old"})
    mlflow.set_registered_model_alias("retrain-test", CHAMPION, champion.version)
    argv = ["retrain", "--host", HOST, "--model-name", "retrain-test", "--source", "data"]

    assert cessl(*argv) == 0
    assert [kind for kind, _ in kfp_client.calls] == ["run"]
    assert kfp_client.calls[0][1]["arguments"]["data_version"] == data_version(repo)

    mlflow.set_model_version_tag("retrain-test", champion.version, "data_version", data_version(repo))
    assert cessl(*argv) == 0
    assert len(kfp_client.calls) == 1, "no new run: the champion was trained on this data version"


def test_retrain_on_a_cluster_submits_the_cluster_defaults(kfp_client, tmp_path, monkeypatch):
    """Not the demo's (150 steps instead of 200 epochs, tiny backbone, 30% labels, classes of 10 records): what submit sends."""
    from pipeline.cli.run import DEMO_PARAMS
    from pipeline.core.params import DEFAULTS

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # no champion yet
    # --create-store: the store does not exist yet (without it, a mistyped store path is refused)
    assert cessl("retrain", "--host", HOST, "--model-name", "cluster-retrain", "--seed", "3", "--create-store") == 0
    assert cessl("submit", "--host", HOST, "--model-name", "cluster-retrain", "--seed", "3") == 0
    (_, retrained), (_, submitted) = kfp_client.calls
    assert retrained["arguments"] == submitted["arguments"]
    arguments = retrained["arguments"]
    for name in ("epochs", "max_steps", "backbone_config", "labelled_ratio", "min_class_count", "batch_size"):
        assert arguments[name] == getattr(DEFAULTS, name) != getattr(DEMO_PARAMS, name), name
    assert (arguments["seed"], arguments["model_name"]) == (3, "cluster-retrain")


def test_main_maps_only_known_errors_to_exit_2(monkeypatch):
    from components.common import StepError
    from pipeline import cli
    from pipeline.cli import registry as registry_command
    from pipeline.registry.policy import RegistryError

    def failing(error: Exception):
        def cmd(args) -> int:
            raise error

        return cmd

    for error in (
        StepError("store not found"),
        RegistryError("no challenger"),
        ValueError("bad flag"),
        FileNotFoundError("no data"),
    ):
        monkeypatch.setattr(registry_command, "cmd_rollback", failing(error))
        assert cli.main(["rollback", "some-model"]) == 2, error
    monkeypatch.setattr(registry_command, "cmd_rollback", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["rollback", "some-model"])
