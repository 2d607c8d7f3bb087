"""The pre-training pipeline ``cessl-pretrain``: its compiled IR (real kfp compiler), its
parameters' checks and the local launch (timeout, a failing job). A real ``kfp.local`` run:
tests/integration/test_pretrain_pipeline_run.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from pipeline_support import make_store

from components.pretrain import JobFolders, stage_store
from components.trainjob import PretrainJob, node_resources
from ml.errors import EXIT_USAGE, ParameterError
from ml.train.pretrain_config import PretrainConfig, PretrainRun
from pipeline import cli
from pipeline.core.pretrain_params import DEFAULTS, LOCAL_DEFAULTS, PretrainParams, cli_fields, field_types
from pipeline.dags.finetune import CompileOptions, ResourceRequest
from pipeline.dags.pretrain import PRETRAIN_PIPELINE_NAME, WORKSPACE_MOUNT
from pipeline.dags.spec import compile_spec, pretrain_spec

IMAGE = "registry.example.org/cessl:2.0.0"
STEPS = ("validate-pretrain", "ingest", "preprocess", "pretrain-backbone", "register-backbone")
JOB_PARAMS = (
    "nodes",
    "nproc_per_node",
    "gpus_per_node",
    "cpu_per_node",
    "memory_per_node",
    "trainer_image",
    "runtime",
    "trainjob_namespace",
    "timeout_s",
    "checkpoint_pvc",
    "backend",
)


def load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) compiled with cluster options."""
    path = tmp_path_factory.mktemp("compile") / "pretrain.yaml"
    options = CompileOptions(
        image=IMAGE,
        accelerator_type="",
        tolerations=(),
        step_resources=ResourceRequest(cpu="2", memory="8Gi"),
        checkpoint_pvc="cessl-pretrain-volume",
        credentials_secret="cessl-s3",
        config_map="cessl-pipeline-defaults",
        finetune_retries=3,
    )
    return load(compile_spec(pretrain_spec(), path, options))


def test_every_step_runs_the_project_image_and_installs_nothing(compiled):
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == PRETRAIN_PIPELINE_NAME
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == set(STEPS)
    for name, executor in executors.items():
        assert executor["container"]["image"] == IMAGE, name
        assert "pip install" not in " ".join(executor["container"]["command"]), name


def test_every_parameter_is_a_pipeline_parameter_with_the_compiled_defaults(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(field_types())
    kinds = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}
    for name, kind in field_types().items():
        assert params[name]["parameterType"] == kinds[kind], name
    assert params["trainer_image"]["defaultValue"] == IMAGE  # the TrainJob runs the pipeline's image
    assert params["checkpoint_pvc"]["defaultValue"] == "cessl-pretrain-volume"
    assert params["checkpoint_root"]["defaultValue"] == WORKSPACE_MOUNT
    assert params["backend"]["defaultValue"] == "cluster"
    assert params["gpus_per_node"]["defaultValue"] == DEFAULTS.gpus_per_node
    assert params["nodes"]["defaultValue"] == 1


def test_the_dag_runs_validate_ingest_preprocess_pretrain_register_in_order(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEPS)
    assert "dependentTasks" not in tasks["validate-pretrain"]
    assert tasks["ingest"]["dependentTasks"] == ["validate-pretrain"]
    assert tasks["preprocess"]["dependentTasks"] == ["ingest"]
    assert tasks["pretrain-backbone"]["dependentTasks"] == ["preprocess"]
    assert tasks["register-backbone"]["dependentTasks"] == ["pretrain-backbone"]
    store = tasks["pretrain-backbone"]["inputs"]["artifacts"]["store"]["taskOutputArtifact"]
    assert store == {"outputArtifactKey": "store", "producerTask": "preprocess"}
    backbone = tasks["register-backbone"]["inputs"]["artifacts"]["backbone"]["taskOutputArtifact"]
    assert backbone == {"outputArtifactKey": "backbone", "producerTask": "pretrain-backbone"}
    outputs = spec["root"]["outputDefinitions"]["parameters"]
    assert set(outputs) == {"model_name", "model_version", "run_id"}


def test_the_launch_step_gets_the_trainjob_settings_from_the_run(compiled):
    """Nodes, GPUs, resources, image, runtime, timeout and the claim reach the launch step
    as pipeline parameters (a run changes them without recompiling)."""
    spec, _ = compiled
    inputs = spec["root"]["dag"]["tasks"]["pretrain-backbone"]["inputs"]["parameters"]
    for name in JOB_PARAMS:
        assert inputs[name] == {"componentInputParameter": name}, name
    component = spec["components"]["comp-pretrain-backbone"]["inputDefinitions"]["parameters"]
    assert component["nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert component["gpus_per_node"]["parameterType"] == "NUMBER_INTEGER"


def test_no_pipeline_step_requests_a_gpu_and_each_has_its_resources(compiled):
    """The GPUs are the TrainJob's nodes': the launch pod only creates and watches the job."""
    spec, _ = compiled
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        assert "accelerator" not in resources, name
        assert resources["resourceCpuRequest"] == "2" and resources["resourceMemoryRequest"] == "8Gi", name


def test_the_volume_secret_and_config_map_go_to_the_right_steps(compiled):
    _, platform = compiled
    launch = platform["exec-pretrain-backbone"]
    (mount,) = launch["pvcMount"]
    assert mount["mountPath"] == WORKSPACE_MOUNT
    assert mount["pvcNameParameter"] == {"componentInputParameter": "checkpoint_pvc"}  # the run's claim
    for name in ("exec-validate-pretrain", "exec-ingest", "exec-preprocess", "exec-register-backbone"):
        assert "pvcMount" not in platform.get(name, {}), name
    for name in ("exec-ingest", "exec-register-backbone"):  # S3 source, MLflow artifacts and registry login
        secrets = {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in platform[name]["secretAsEnv"]}
        assert secrets == {
            "cessl-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
            CompileOptions().mlflow_secret: {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
        }
    for name in ("exec-validate-pretrain", "exec-preprocess", "exec-pretrain-backbone"):
        assert "secretAsEnv" not in platform.get(name, {}), name
    for name in (f"exec-{step}" for step in STEPS):
        (config_map,) = platform[name]["configMapAsEnv"]
        assert config_map["configMapName"] == "cessl-pipeline-defaults"
        assert "MLFLOW_TRACKING_URI" in {e["envVar"] for e in config_map["keyToEnv"]}


def test_the_launch_and_register_steps_are_never_cached_and_the_launch_retries(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["pretrain-backbone"]["cachingOptions"] == {}
    assert tasks["register-backbone"]["cachingOptions"] == {}
    assert tasks["ingest"]["cachingOptions"] == {"enableCache": True}
    assert tasks["preprocess"]["cachingOptions"] == {"enableCache": True}
    assert tasks["pretrain-backbone"]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks["pretrain-backbone"]["taskInfo"]["name"] == "pretrain"


def test_without_a_volume_nothing_is_mounted_and_the_job_runs_in_the_launch_pod(tmp_path):
    options = CompileOptions(image=IMAGE, accelerator_type="", tolerations=(), checkpoint_pvc="")
    spec, platform = load(compile_spec(pretrain_spec(), tmp_path / "p.yaml", options))
    assert all("pvcMount" not in executor for executor in platform.values())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["backend"]["defaultValue"] == "local"
    assert params["checkpoint_pvc"]["defaultValue"] == ""


def test_cessl_backbone_pipeline_compile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    argv = ["backbone", "pipeline", "compile", "-o", "out/pretrain.yaml", "--image", IMAGE]
    assert cli.main([*argv, "--checkpoint-pvc", "shared-rwx", "--credentials-secret", "s3"]) == 0
    spec, platform = load(tmp_path / "out" / "pretrain.yaml")
    assert spec["pipelineInfo"]["name"] == PRETRAIN_PIPELINE_NAME
    assert spec["root"]["inputDefinitions"]["parameters"]["checkpoint_pvc"]["defaultValue"] == "shared-rwx"
    assert platform["exec-register-backbone"]["secretAsEnv"][0]["secretName"] == "s3"


def test_submit_passes_the_trainjob_settings_as_run_arguments(tiny_store, tmp_path, monkeypatch):
    """`cessl backbone pipeline submit`: the package compiled with the image, the job's shape
    as run arguments, no local path. (No KFP API server runs here: the client records the
    call, as in test_pipeline_cli.)"""
    from types import SimpleNamespace

    from pipeline.cli import preflight
    from pipeline.cli import run as run_command

    calls: list[dict] = []

    class Recorder:
        def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs):
            calls.append({"pipeline_file": pipeline_file, **kwargs})
            return SimpleNamespace(run_id="run-1")

    monkeypatch.setattr(run_command, "kfp_client", lambda args: Recorder())
    monkeypatch.setattr(preflight, "check_kfp_host", lambda host, timeout=5.0: host)
    monkeypatch.chdir(tmp_path)
    argv = [
        *("backbone", "pipeline", "submit", "--host", "http://kfp.example.org", "--image", IMAGE),
        *("--source", str(tiny_store.parent / "src"), "--backbone-config", "medium"),
        *("--nodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4", "--memory-per-node", "128Gi"),
        *("--checkpoint-pvc", "shared-rwx", "--timeout-s", "7200", "--run-name", "pretrain-medium"),
    ]
    assert cli.main(argv) == 0
    (call,) = calls
    assert call["run_name"] == "pretrain-medium"
    args = call["arguments"]
    assert (args["nodes"], args["nproc_per_node"], args["gpus_per_node"]) == (2, 4, 4)
    assert (args["memory_per_node"], args["checkpoint_pvc"], args["timeout_s"]) == ("128Gi", "shared-rwx", 7200)
    assert args["backend"] == "cluster" and args["data_version"].endswith(".dir")
    assert not {"state_dir", "checkpoint_root", "tracking_uri", "trainer_image"} & set(args)  # the compiled defaults
    spec, platform = load(Path(call["pipeline_file"]))
    assert spec["pipelineInfo"]["name"] == PRETRAIN_PIPELINE_NAME
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert platform["exec-pretrain-backbone"]["pvcMount"][0]["mountPath"] == WORKSPACE_MOUNT
    assert spec["root"]["inputDefinitions"]["parameters"]["trainer_image"]["defaultValue"] == IMAGE


# --------------------------------------------------------------------------- parameters


def bad_values(field: dataclasses.Field) -> list[str]:
    """Values that break the field's constraints (from its metadata)."""
    meta, kind = field.metadata, field_types()[field.name]
    step = 1 if kind is int else 0.5
    values = [meta[k] - step for k in ("minimum",) if meta.get(k) is not None]
    values += [meta[k] for k in ("exclusive_minimum",) if meta.get(k) is not None]
    texts = [str(int(v)) if kind is int else repr(float(v)) for v in values]
    texts += {int: ["1.5", "many"], float: ["nan", "lots"], str: []}[kind]
    if meta.get("choices"):
        texts.append("no-such-choice")
    texts += {
        "source": ["ftp://host/records"],
        "quantity_or_empty": ["0", "lots"],
        "image_or_empty": ["Not An Image"],
        "k8s_name": ["Bad_Name"],
        "k8s_name_or_empty": ["Bad_Name"],
        "alias_or_empty": ["x@y"],
    }.get(meta.get("check") or "", [])
    return texts


PARAM_CASES = [
    pytest.param(verb, f.metadata["flag"] or "--" + f.name.replace("_", "-"), value, id=f"{verb} {f.name} {value}")
    for verb in ("run", "submit")
    for f in cli_fields()
    for value in bad_values(f)
]


def run_cli(argv: list[str]) -> int:
    """``cessl`` in this process; the parser's own errors (SystemExit) as their exit code."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


@pytest.mark.parametrize(("verb", "flag", "value"), PARAM_CASES)
def test_a_bad_parameter_is_one_line_naming_its_flag_before_any_work(verb, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = ["--host", "http://127.0.0.1:9"] if verb == "submit" else []
    assert run_cli(["backbone", "pipeline", verb, *extra, f"{flag}={value}"]) == EXIT_USAGE
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, no store created


def test_every_problem_in_one_message_and_the_combinations():
    with pytest.raises(ParameterError) as err:
        PretrainParams(nodes=0, timeout_s=1, cpu_per_node="lots")
    message = str(err.value)
    assert "--nodes 0" in message and "--timeout-s 1" in message and "--cpu-per-node 'lots'" in message
    with pytest.raises(ParameterError, match="--nodes 2: the local backend runs one node"):
        LOCAL_DEFAULTS.replace(nodes=2)
    with pytest.raises(ParameterError, match="--gpus-per-node 1: one process per GPU"):
        DEFAULTS.replace(nproc_per_node=4)
    with pytest.raises(ParameterError, match="docker backend runs one process per node"):
        LOCAL_DEFAULTS.replace(backend="docker", nproc_per_node=2)
    with pytest.raises(ParameterError, match="a cluster TrainJob shares"):
        DEFAULTS.replace(checkpoint_pvc="")
    assert DEFAULTS.replace(nodes=4, nproc_per_node=8, gpus_per_node=8).world_size == 32


def test_the_validate_step_reads_kfp_rendered_values():
    """KFP renders a dict parameter's numbers as text ("2.0"): read back exactly."""
    rendered = {k: (str(float(v)) if isinstance(v, int) else v) for k, v in DEFAULTS.arguments().items()}
    assert PretrainParams.from_mapping(rendered) == DEFAULTS
    with pytest.raises(ParameterError, match="unknown pre-training parameters"):
        PretrainParams.from_mapping({"nodez": 2})


# --------------------------------------------------------------------------- the local launch


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("source"))


def test_the_local_backend_is_one_node():
    with pytest.raises(ParameterError, match="nodes 2: the local backend is this machine"):
        PretrainJob(PretrainRun("s", "o"), backend="local", nodes=2)
    assert node_resources(gpus=2, cpu="4") == {"cpu": "4", "gpu": 2}


def test_the_store_is_staged_on_the_volume_once_and_never_outside_it(tiny_store, tmp_path):
    volume = tmp_path / "volume"
    first = stage_store(tiny_store, volume, "abc123")
    assert first == volume / "stores" / "abc123"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in tiny_store.iterdir())
    (first / "marker").write_text("kept")  # a second call reuses the copy
    assert stage_store(tiny_store, volume, "abc123") == first and (first / "marker").exists()
    escaped = stage_store(tiny_store, volume, "../../etc")
    assert escaped.parent == volume / "stores" and escaped.name != "etc"
    unnamed = stage_store(tiny_store, volume, "")
    assert unnamed.parent == volume / "stores" and len(unnamed.name) == 32


def _cluster_job(nodes: int = 2, **shape) -> PretrainJob:
    run = PretrainRun("/workspace/stores/fp", "", PretrainConfig(backbone="medium", epochs=3))
    shape = {"resources_per_node": {"gpu": 4}} | shape
    return PretrainJob(run, nodes=nodes, nproc_per_node=4, backend="cluster", **shape)


def test_the_cluster_job_reads_and_writes_on_the_shared_volume():
    folders = JobFolders(WORKSPACE_MOUNT, store_fingerprint="fp")
    placed = folders.place(_cluster_job(workspace_pvc="shared"))
    out, checkpoints = placed.run.out, placed.run.config.checkpoint_dir
    assert out.startswith(f"{WORKSPACE_MOUNT}/pretrain/") and out.endswith("/backbone")
    assert Path(checkpoints).parent == Path(out).parent
    again = folders.place(_cluster_job(workspace_pvc="shared"))
    assert again.run.config.checkpoint_dir == checkpoints  # a retried step resumes there
    other = folders.place(_cluster_job(nodes=4, workspace_pvc="shared"))
    assert other.run.config.checkpoint_dir != checkpoints  # another global batch: another schedule
    assert placed.run.config.max_steps == 0 and placed.run.config.lr == 0  # not set: epochs, the scaling rule


def test_the_trainjob_the_launch_step_creates():
    """The TrainJob of a cluster run (``components.trainjob.trainjob_manifest`` of the launch
    step's job): nodes, GPUs and resources per node, image, the claim, the volume paths."""
    trainjob = pytest.importorskip("components.trainjob")
    job = _cluster_job(
        image=IMAGE,
        namespace="team-a",
        timeout_s=7200,
        resources_per_node=node_resources(gpus=4, cpu="32", memory="128Gi"),
        workspace_pvc="shared-rwx",
    )
    spec = JobFolders(WORKSPACE_MOUNT, store_fingerprint="fp").place(job)
    manifest = trainjob.trainjob_manifest(spec, name="cessl-pretrain-test")
    assert manifest["kind"] == "TrainJob" and manifest["metadata"]["namespace"] == "team-a"
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == IMAGE
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "4"}
    assert manifest["spec"]["activeDeadlineSeconds"] == 7200
    assert "'shared-rwx'" in json.dumps(manifest).replace('"', "'")
    command = " ".join(trainer["command"])
    for path in (spec.run.store, spec.run.out, spec.run.config.checkpoint_dir):
        assert path in command
