"""The compiled pipeline: image, GPU request, scheduling constraints, typed artifacts, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.core.params import DEFAULTS, PipelineParams, field_types
from pipeline.dags.finetune import CompileOptions, Toleration
from pipeline.dags.spec import compile_spec, cron6, finetune_spec

IMAGE = "registry.example.org/cessl:1.2.3"
STEPS = (
    "validate",
    "ingest",
    "preprocess",
    "resolve-testset",
    "split",
    "resolve-backbone",
    "allocate-ranks",
    "finetune",
    "evaluate",
    "score-champion",
    "register",
)
UNCACHED = ("resolve-testset", "score-champion", "register")  # read or write the registry


def load(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) compiled with cluster options."""
    path = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    options = CompileOptions(
        image=IMAGE,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=(Toleration.parse("nvidia.com/gpu:NoSchedule"), Toleration.parse("dedicated=ml:NoExecute")),
        checkpoint_pvc="cessl-checkpoints",
        credentials_secret="cessl-s3",
        config_map="cessl-pipeline-defaults",
        image_pull_secrets=("cessl-registry",),
    )
    docs = load(compile_spec(finetune_spec(), path, options))
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
    for executor in (
        "exec-ingest",
        "exec-resolve-backbone",
        "exec-resolve-testset",
        "exec-split",
        "exec-score-champion",
        "exec-register",
    ):
        secret = platform[executor]["secretAsEnv"][0]
        assert secret["secretName"] == "cessl-s3"
        assert secret["optional"] is True  # IRSA / workload identity clusters need no Secret
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_every_step_pulls_with_the_secret_and_has_limits(compiled):
    """A private registry and a Profile namespace with a ResourceQuota (pods need limits)."""
    spec, platform = compiled
    for step in STEPS:
        assert [s["secretName"] for s in platform[f"exec-{step}"]["imagePullSecret"]] == ["cessl-registry"], step
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert {"resourceCpuLimit", "resourceMemoryLimit"} <= set(resources), step
    finetune = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert (finetune["resourceCpuLimit"], finetune["resourceMemoryLimit"]) == ("8", "16Gi")


def test_only_accelerator_tasks_require_a_gpu(compiled, tmp_path):
    """finetune (given a GPU) checks that its image can use it (ml.train.gpu); no other step does,
    nor finetune compiled without an accelerator or for a local run."""
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    env = {e["name"]: e["value"] for e in executors["exec-finetune"]["container"]["env"]}
    assert env == {"CESSL_REQUIRE_GPU": "1", "CESSL_IMAGE": IMAGE}
    for step in STEPS:
        if step != "finetune":
            assert "env" not in executors[f"exec-{step}"]["container"], step
    for options in (CompileOptions(image=IMAGE, accelerator_type=""), CompileOptions.local(IMAGE)):
        other, *_ = load(compile_spec(finetune_spec(), tmp_path / "p.yaml", options))
        assert "env" not in other["deploymentSpec"]["executors"]["exec-finetune"]["container"]


def test_mlflow_identity_comes_from_its_own_secret(compiled):
    """The pipeline's MLflow user (an authenticated server) from a separate Secret, in every
    step that gets the S3 credentials; never in the compiled spec itself."""
    spec, platform = compiled
    secret = CompileOptions().mlflow_secret
    with_s3 = [name for name, executor in platform.items() if executor.get("secretAsEnv")]
    assert "exec-register" in with_s3 and "exec-score-champion" in with_s3
    for name in with_s3:
        refs = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in platform[name]["secretAsEnv"]}
        assert refs[secret] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, name
    assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps(spec)


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
    assert _outputs(spec, "finetune") == {
        "adapter": "system.Model",
        "curves": "system.Artifact",
        "train_metrics": "system.Metrics",
    }
    assert _outputs(spec, "evaluate") == {
        "test_metrics": "system.Metrics",
        "roc": "system.ClassificationMetrics",
        "report": "system.HTML",
        "evaluation": "system.Artifact",
        "confusion": "system.Markdown",
    }
    assert _outputs(spec, "score-champion") == {"champion_evaluation": "system.Artifact"}
    assert _outputs(spec, "register") == {"registration": "system.Markdown"}


IR_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}


def test_pipeline_parameters_are_the_pipeline_params_fields(compiled):
    """The pipeline's signature is generated from PipelineParams: same names, types and defaults
    (checkpoint_root defaults to the checkpoint volume's mount when there is one)."""
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = DEFAULTS.replace(checkpoint_root="/mnt/checkpoints").arguments()
    assert set(params) == set(expected)
    for name, kind in field_types().items():
        assert params[name]["parameterType"] == IR_TYPES[kind], name
        assert params[name]["defaultValue"] == expected[name], name


def test_defaults_come_from_the_ml_dataclasses():
    from ml.model.lora import LoRAConfig
    from ml.model.rank_allocation import RankAllocationConfig
    from ml.train.config import TrainConfig
    from ml.train.methods import DEFAULT_METHOD

    assert (DEFAULTS.r, DEFAULTS.p) == (LoRAConfig().r, LoRAConfig().p)
    assert DEFAULTS.compress == RankAllocationConfig().compress
    train = TrainConfig()
    assert (DEFAULTS.max_steps, DEFAULTS.val_every, DEFAULTS.seed, DEFAULTS.lr) == (
        train.max_steps,
        train.val_every,
        train.seed,
        train.lr,
    )
    assert DEFAULTS.method == DEFAULT_METHOD
    run = DEFAULTS.replace(r=8, p=0.1, compress=0.5, labelled_ratio=0.01, max_steps=20, method="lora")
    assert (run.lora_config().r, run.lora_config().p, run.allocation_config().compress) == (8, 0.1, 0.5)
    config = run.train_config()
    assert (config.method, config.max_steps, config.batch_size) == ("lora", 20, 16)  # the paper's rule below 2%
    assert DEFAULTS.replace(batch_size=8).train_config().batch_size == 8


def test_the_defaults_say_which_schedule_they_use():
    """Cluster defaults: the paper's 200 epochs; the local demo: max_steps mode (quick)."""
    from ml.train.config import EPOCHS
    from pipeline.cli.run import DEMO_PARAMS

    assert DEFAULTS.epochs == EPOCHS == 200 and DEFAULTS.schedule() == "200 epochs"
    assert DEFAULTS.train_config().epochs == 200
    assert DEFAULTS.train_config().resolve_steps(130).max_steps == 2 * 200  # 130 records, batch 64
    assert DEMO_PARAMS.epochs == 0 and DEMO_PARAMS.schedule() == f"{DEMO_PARAMS.max_steps} steps"
    demo = DEMO_PARAMS.train_config()
    assert demo.epochs is None and demo.resolve_steps(130).max_steps == DEMO_PARAMS.max_steps
    with pytest.raises(ValueError, match="epochs"):
        DEFAULTS.replace(epochs=-1)
    assert PipelineParams.from_mapping({"epochs": "0.0"}).epochs == 0


def test_run_summary_states_the_schedule_from_the_logged_config():
    from pipeline.cli.run import DEMO_PARAMS, schedule_of

    assert schedule_of({"train.max_steps": "400", "train.epochs": "200"}, DEFAULTS) == "200 epochs = 400 steps"
    assert schedule_of({"train.max_steps": "150", "train.epochs": "null"}, DEMO_PARAMS) == "150 steps"
    assert schedule_of({"train.max_steps": "150", "train.method": "head-only"}, DEMO_PARAMS) == "no gradient step"
    assert schedule_of({}, DEFAULTS) == "200 epochs"


def test_finetune_receives_the_schedule(compiled):
    spec, _ = compiled
    inputs = spec["root"]["dag"]["tasks"]["finetune"]["inputs"]["parameters"]
    assert inputs["epochs"]["componentInputParameter"] == "epochs"
    assert spec["root"]["inputDefinitions"]["parameters"]["epochs"]["defaultValue"] == 200


def test_register_gets_the_run_parameters_as_one_mapping(compiled):
    spec, _ = compiled
    register = spec["root"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    kfp_run = {"kfp_run_id", "kfp_run_name", "kfp_pipeline_name"}  # lineage tags (tests/integration/test_lineage.py)
    assert set(register) == {"params"} | kfp_run | {k for k in register if k.startswith("pipelinechannel--")}
    mapping = register["params"]["runtimeValue"]["constant"]
    assert set(mapping) == set(DEFAULTS.arguments())
    assert "ingest-data_version" in mapping["data_version"], "the data version ingest settled on"


def test_register_parameters_survive_kfp_rendering_them_as_text():
    from pipeline.core.params import PipelineParams

    text = {k: str(float(v)) if isinstance(v, int) else str(v) for k, v in DEFAULTS.arguments().items()}
    assert PipelineParams.from_mapping(text) == DEFAULTS
    with pytest.raises(ValueError, match="unknown"):
        PipelineParams.from_mapping({"rank": 3})


def test_pipeline_dag(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS)
    assert set(tasks["finetune"]["dependentTasks"]) == {"preprocess", "split", "resolve-backbone", "allocate-ranks"}
    assert "finetune" in tasks["evaluate"]["dependentTasks"]
    assert "evaluate" in tasks["score-champion"]["dependentTasks"], "the champion of when the new model is ready"
    assert {"evaluate", "score-champion"} <= set(tasks["register"]["dependentTasks"])
    for name in STEPS:
        cached = tasks[name]["cachingOptions"].get("enableCache", False)
        assert cached is (name not in UNCACHED), name


def test_local_options_leave_cluster_settings_out(tmp_path):
    spec, *rest = load(compile_spec(finetune_spec(), tmp_path / "local.yaml", CompileOptions.local("img:1")))
    assert not rest, "no kubernetes platform spec for local runs"
    resources = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"].get("resources", {})
    assert "accelerator" not in resources


def test_cli_compile(tmp_path, monkeypatch):
    out = tmp_path / "cessl_pipeline.yaml"
    monkeypatch.setenv("CESSL_IMAGE", IMAGE)
    assert (
        cli.main(
            [
                "compile",
                "-o",
                str(out),
                "--node-selector",
                "pool=gpu",
                "--toleration",
                "gpu=yes:NoSchedule",
                "--accelerator-type",
                "nvidia.com/gpu",
                "--accelerator-limit",
                "2",
            ]
        )
        == 0
    )
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


def test_building_a_dag_never_walks_the_whole_stack(monkeypatch, tmp_path):
    """kfp's task setters find their caller without ``inspect.stack()`` (pipeline/dags/kfp_speedup.py):
    it cost ~9 s of every compile."""
    import inspect

    def walk(*args, **kwargs):
        raise AssertionError("inspect.stack() called while building the DAG")

    monkeypatch.setattr(inspect, "stack", walk)
    compile_spec(finetune_spec(), tmp_path / "p.yaml", CompileOptions())  # resources, GPU, tolerations: every setter
    assert (tmp_path / "p.yaml").stat().st_size > 0


def test_a_setter_on_a_task_without_a_container_is_kfps_error_naming_the_setter():
    from types import SimpleNamespace

    from kfp.dsl.pipeline_task import PipelineTask

    import pipeline.dags.tasks  # noqa: F401  (installs the cheaper lookup)

    def set_cpu_limit(task) -> None:  # as kfp's setters call it
        PipelineTask._ensure_container_spec_exists(task)

    set_cpu_limit(SimpleNamespace(container_spec=object()))  # a single-step component: fine
    with pytest.raises(ValueError, match=r"^set_cpu_limit can only be used on single-step components, not pipelines"):
        set_cpu_limit(SimpleNamespace(container_spec=None))  # a pipeline used as a component
