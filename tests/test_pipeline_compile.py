"""The compiled pipeline: image, GPU request, scheduling constraints, typed artifacts, caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.commands.run import cron6
from pipeline.dag import CompileOptions, Toleration, compile_pipeline

IMAGE = "registry.example.org/cessl:1.2.3"
STEPS = ("ingest", "preprocess", "split", "resolve-backbone", "allocate-ranks", "finetune", "evaluate", "register")


def load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) compiled with cluster options."""
    path = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    options = CompileOptions(
        image=IMAGE, node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=(Toleration.parse("nvidia.com/gpu:NoSchedule"), Toleration.parse("dedicated=ml:NoExecute")),
        checkpoint_pvc="cessl-checkpoints", credentials_secret="cessl-s3", config_map="cessl-pipeline-defaults",
    )
    docs = load(compile_pipeline(path, options))
    assert len(docs) == 2, "expected the pipeline spec and the kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_step_uses_the_project_image(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == set(STEPS)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE, name
        command = " ".join(container["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_finetune_requests_a_gpu_with_scheduling_constraints(compiled):
    spec, platform = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert resources["resourceCpuRequest"] == "4" and resources["resourceMemoryRequest"] == "16Gi"
    finetune = platform["exec-finetune"]
    assert finetune["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in finetune["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"} in finetune["tolerations"]
    assert finetune["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
    assert spec["root"]["inputDefinitions"]["parameters"]["checkpoint_root"]["defaultValue"] == "/mnt/checkpoints"
    for other in ("exec-ingest", "exec-evaluate", "exec-register"):
        assert "accelerator" not in spec["deploymentSpec"]["executors"][other]["container"].get("resources", {})
    assert spec["root"]["dag"]["tasks"]["finetune"]["retryPolicy"]["maxRetryCount"] == 2


def test_credentials_come_from_a_secret(compiled):
    _, platform = compiled
    for executor in ("exec-ingest", "exec-resolve-backbone", "exec-register"):
        secret = platform[executor]["secretAsEnv"][0]
        assert secret["secretName"] == "cessl-s3"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_endpoints_come_from_the_config_map(compiled):
    _, platform = compiled
    for step in STEPS:
        config_map = platform[f"exec-{step}"]["configMapAsEnv"][0]
        assert config_map["configMapName"] == "cessl-pipeline-defaults", step
        assert {k["envVar"] for k in config_map["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"}


def test_defaults_name_the_deployment_objects():
    options = CompileOptions()
    assert (options.credentials_secret, options.checkpoint_pvc) == ("cessl-s3-credentials", "cessl-checkpoints")


def _outputs(spec: dict, component: str) -> dict[str, str]:
    artifacts = spec["components"][f"comp-{component}"]["outputDefinitions"].get("artifacts", {})
    return {name: a["artifactType"]["schemaTitle"] for name, a in artifacts.items()}


def test_component_outputs_are_typed_artifacts(compiled):
    spec, _ = compiled
    assert _outputs(spec, "ingest") == {"manifest": "system.Dataset", "quarantine_report": "system.Markdown"}
    assert _outputs(spec, "preprocess") == {"store": "system.Dataset"}
    assert _outputs(spec, "split") == {"splits": "system.Dataset"}
    assert _outputs(spec, "resolve-backbone") == {"backbone_model": "system.Model"}
    assert _outputs(spec, "allocate-ranks") == {"rank_map": "system.Artifact", "rank_metrics": "system.Metrics"}
    assert _outputs(spec, "finetune") == {"adapter": "system.Model", "curves": "system.Artifact",
                                          "train_metrics": "system.Metrics"}
    assert _outputs(spec, "evaluate") == {"test_metrics": "system.Metrics", "roc": "system.ClassificationMetrics",
                                          "report": "system.HTML", "evaluation": "system.Artifact"}
    assert _outputs(spec, "register") == {"registration": "system.Markdown"}


def test_pipeline_parameters_and_dag(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("source", "backbone", "backbone_config", "labelled_ratio", "r", "compress", "p", "method", "seed",
                 "max_steps", "model_name", "data_version", "tracking_uri"):
        assert name in params, name
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "preprocess", "split", "resolve-backbone", "allocate-ranks", "finetune",
                          "evaluate", "register"}
    assert set(tasks["finetune"]["dependentTasks"]) == {"preprocess", "split", "resolve-backbone", "allocate-ranks"}
    assert "finetune" in tasks["evaluate"]["dependentTasks"] and "evaluate" in tasks["register"]["dependentTasks"]
    for name in STEPS[:-1]:
        assert tasks[name]["cachingOptions"].get("enableCache") is True, name
    assert not tasks["register"]["cachingOptions"].get("enableCache", False)


def test_local_options_leave_cluster_settings_out(tmp_path):
    spec, *rest = load(compile_pipeline(tmp_path / "local.yaml", CompileOptions.local("img:1")))
    assert not rest, "no kubernetes platform spec for local runs"
    resources = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"].get("resources", {})
    assert "accelerator" not in resources


def test_cli_compile(tmp_path, monkeypatch):
    out = tmp_path / "cessl_pipeline.yaml"
    monkeypatch.setenv("CESSL_IMAGE", IMAGE)
    assert cli.main(["compile", "-o", str(out), "--node-selector", "pool=gpu", "--toleration", "gpu=yes:NoSchedule",
                     "--accelerator-type", "nvidia.com/gpu", "--accelerator-limit", "2"]) == 0
    spec, platform = load(out)
    container = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]
    assert container["image"] == IMAGE
    assert container["resources"]["accelerator"]["resourceCount"] == "2"
    finetune = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"]
    assert finetune["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert finetune["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}]
    assert cli.main(["compile", "-o", str(out), "--no-gpu"]) == 0
    spec, *_ = load(out)
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-finetune"]["container"].get("resources", {})


def test_toleration_and_cron_parsing():
    assert Toleration.parse("nvidia.com/gpu") == Toleration("nvidia.com/gpu", None, None)
    assert Toleration.parse("k=v:NoSchedule").operator == "Equal"
    with pytest.raises(ValueError, match="unknown effect"):
        Toleration.parse("k=v:Sometimes")
    assert cron6("0 3 * * 1") == "0 0 3 * * 1"
    assert cron6("0 0 3 * * 1") == "0 0 3 * * 1"
    with pytest.raises(ValueError):
        cron6("daily")
