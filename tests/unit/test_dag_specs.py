"""The four DAGs as pipeline specs: every parameter described in the KFP run form, and
compile / submit / schedule refusing or warning about values of this machine."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from components.compare import CompareGrid
from pipeline import cli
from pipeline.cli import preflight
from pipeline.cli import run as run_command
from pipeline.core.params import DEFAULTS, PipelineParams
from pipeline.core.pretrain_params import PretrainParams
from pipeline.core.sites import Site, SiteRegistry, save_sites
from pipeline.dags.compare import CompareSettings
from pipeline.dags.finetune import CompileOptions, args_docstring, parameter_help
from pipeline.dags.local_values import check_local_values, is_local_image, local_values
from pipeline.dags.network import NetworkSettings, site_items
from pipeline.dags.spec import (
    ClusterRun,
    ClusterTarget,
    compare_spec,
    compile_spec,
    finetune_spec,
    network_spec,
    pretrain_spec,
    submit,
)

IMAGE = "registry.example.org/cessl:1.0.0"
HOST = "http://kfp.example.org"


def _specs():
    items = site_items([Site("a", "s3://bucket/a")], DEFAULTS)
    return {
        "finetune": (finetune_spec(), PipelineParams),
        "network": (network_spec(NetworkSettings(sites=tuple(items))), PipelineParams),
        "compare": (compare_spec(CompareSettings(CompareGrid(("cessl", "lora"), (0.1,), (0,)))), PipelineParams),
        "pretrain": (pretrain_spec(), PretrainParams),
    }


@pytest.mark.parametrize("name", ["finetune", "network", "compare", "pretrain"])
def test_every_parameter_of_every_compiled_dag_has_its_description(name, tmp_path):
    spec, params_type = _specs()[name]
    path = compile_spec(spec, tmp_path / spec.package, CompileOptions(image=IMAGE))
    ir = next(yaml.safe_load_all(path.read_text()))
    assert ir["pipelineInfo"]["name"] == spec.name
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert parameters, "a DAG without parameters"
    undescribed = [p for p, definition in parameters.items() if not definition.get("description", "").strip()]
    assert not undescribed, f"{name}: parameters without a description: {undescribed}"
    helps = parameter_help(params_type)  # written once: the flag's help text is the run form's
    for parameter, definition in parameters.items():
        if parameter in helps:
            assert definition["description"] == " ".join(helps[parameter].split()), parameter


def test_a_pipeline_parameter_without_a_description_is_refused():
    signature = inspect.Signature([inspect.Parameter("mystery", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    with pytest.raises(ValueError, match="mystery"):
        args_docstring(signature, {"mystery": " "})


# --------------------------------------------------------------------------- local values


def test_local_images_are_told_from_a_registry_image():
    assert is_local_image("localhost:5000/cessl:0.1.0")
    assert is_local_image("127.0.0.1:5000/cessl:1") and is_local_image("localhost/cessl:1")
    assert is_local_image("[::1]:5000/cessl:1")
    assert not is_local_image(IMAGE) and not is_local_image("cessl:0.1.0")
    assert not is_local_image("localhost.example.org/cessl:1")


def test_a_site_source_of_this_laptop_is_refused_a_mounted_one_warned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "network" / "a").mkdir(parents=True)
    mounted = Path("/proc/self")  # exists here, outside the home and the project
    sites = [
        {"name": "a", "source": str(tmp_path / "network" / "a")},  # in the project
        {"name": "b", "source": "network/b"},  # relative
        {"name": "c", "source": str(mounted)},  # a volume that may be mounted in the pods too
        {"name": "d", "source": "/cluster/only/ecg"},  # not on this machine: the cluster's
        {"name": "e", "source": "s3://bucket/e"},
    ]
    found = {value.where: value for value in local_values({"sites": sites}, "net.yaml")}
    assert set(found) == {"net.yaml: sites[a].source", "net.yaml: sites[b].source", "net.yaml: sites[c].source"}
    assert found["net.yaml: sites[a].source"].refused and found["net.yaml: sites[b].source"].refused
    assert not found["net.yaml: sites[c].source"].refused
    with pytest.raises(ValueError) as refused:
        check_local_values({"sites": sites}, "net.yaml")
    message = str(refused.value)
    assert "\n" not in message and "sites[a].source" in message and "sites[b].source" in message
    assert "s3://bucket/prefix" in message


def test_a_single_source_and_a_local_image_are_warned_not_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    values = {"source": "data", "trainer_image": "localhost:5000/cessl:0.1.0"}
    check_local_values(values, images=["localhost:5000/cessl:0.1.0"])  # no exception
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # the image once, though two settings name it
    assert any(line.startswith("--source 'data': a relative path") for line in lines)
    assert any("--image" in line and "localhost:5000/cessl:0.1.0" in line for line in lines)


def test_a_tracking_store_of_this_machine_is_warned(caplog):
    caplog.set_level(logging.WARNING)
    for uri in ("sqlite:///mlflow.db", "http://localhost:5000", "http://127.0.0.1:5000", "mlruns"):
        assert [v.where for v in local_values({"tracking_uri": uri})] == ["--tracking-uri"], uri
    for uri in ("", "https://mlflow.example.org", "http://mlflow.cessl.svc:5000"):
        assert local_values({"tracking_uri": uri}) == [], uri
    check_local_values({"tracking_uri": "sqlite:///mlflow.db"})  # warned, not refused
    assert "--tracking-uri 'sqlite:///mlflow.db'" in caplog.text


# --------------------------------------------------------------------------- the commands


def _demo_sites(root: Path) -> Path:
    (root / "network" / "hospital-a").mkdir(parents=True)
    sites_file = root / "sites.yaml"
    save_sites(SiteRegistry((Site("hospital-a", str(root / "network" / "hospital-a")),), sites_file), sites_file)
    return sites_file


def test_compile_refuses_to_bake_a_laptop_site_folder_into_cluster_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _demo_sites(tmp_path)
    assert cli.main(["compile", "--sites", "sites.yaml", "-o", "net.yaml", "--image", IMAGE]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cessl: error:")]
    assert len(errors) == 1 and "sites.yaml: sites[hospital-a].source" in errors[0], errors
    assert not (tmp_path / "net.yaml").exists(), "nothing written"


def test_compile_warns_about_an_image_of_this_machine(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "-o", str(out), "--image", "localhost:5000/cessl:0.1.0"]) == 0
    assert out.exists()
    assert "--image (or $CESSL_IMAGE) 'localhost:5000/cessl:0.1.0'" in caplog.text


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any):
        self.calls.append({"pipeline_file": pipeline_file, **kwargs})
        return SimpleNamespace(run_id="run-1")


def test_submit_sites_refuses_a_laptop_folder_before_the_server_is_asked(tmp_path, monkeypatch, capsys):
    client = RecordingClient()
    monkeypatch.setattr(run_command, "kfp_client", lambda args: client)
    monkeypatch.setattr(preflight, "check_kfp_host", lambda host, timeout=5.0: host)
    monkeypatch.chdir(tmp_path)
    _demo_sites(tmp_path)
    argv = ["submit", "--host", HOST, "--sites", "sites.yaml", "--image", IMAGE, "--pipeline-root", "out"]
    assert cli.main(argv) == 2
    assert "sites.yaml: sites[hospital-a].source" in capsys.readouterr().err
    assert not client.calls and not (tmp_path / "out").exists()


def test_submit_sends_any_spec_with_its_own_run_name(tmp_path):
    client = RecordingClient()
    target = ClusterTarget(client=client, host=HOST, experiment="x", namespace="team", caching=False)
    package = compile_spec(pretrain_spec(), tmp_path / "p.yaml", CompileOptions(image=IMAGE))
    run = ClusterRun({"source": "s3://b/p"}, CompileOptions(image=IMAGE), tmp_path, package=package)
    assert submit(pretrain_spec(), target, run) == "run-1"
    (call,) = client.calls
    assert call["run_name"].startswith("cessl-pretrain-") and call["pipeline_file"] == str(package)
    assert (call["experiment_name"], call["namespace"], call["enable_caching"]) == ("x", "team", False)
    assert call["arguments"] == {"source": "s3://b/p"}
