"""Backbones in the MLflow registry (a real tracking server): register, fetch, find, and
`cessl backbone import --register`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone
from pipeline.cli import main as cessl
from pipeline.registry.backbones import (
    backbone_model_name,
    fetch_backbone,
    find_backbone,
    register_backbone,
)


def _random_backbone(folder: Path, seed: int, source: str = "pretrain") -> Path:
    torch.manual_seed(seed)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    state = ECGTransformer(config).state_dict()
    return save_backbone(state, config, CODE15_CLASSES, folder, source=source, data_version=f"test-{seed}")


def test_register_fetch_and_find(mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = mlflow_server.tracking_uri
    a = _random_backbone(tmp_path / "a", seed=101)
    b = _random_backbone(tmp_path / "b", seed=102)
    id_a, id_b = read_backbone(a).identity, read_backbone(b).identity

    reg_a = register_backbone(a, tracking_uri=uri)
    assert reg_a.model_name == backbone_model_name("tinylight") == "cessl-backbone-tinylight"
    assert not reg_a.reused and reg_a.identity == id_a
    version = MlflowClient(uri, uri).get_model_version(reg_a.model_name, reg_a.version)
    assert version.tags["identity"] == id_a and version.tags["config"] == "tinylight"
    assert version.tags["data_version"] == "test-101" and version.tags["source"] == "pretrain"

    again = register_backbone(a, tracking_uri=uri)
    assert again.reused and again.version == reg_a.version

    reg_b = register_backbone(b, tracking_uri=uri, alias="candidate")
    assert int(reg_b.version) > int(reg_a.version)

    got_b = fetch_backbone("models:/cessl-backbone-tinylight@candidate", tmp_path / "fetched_b", tracking_uri=uri)
    assert read_backbone(got_b).identity == id_b
    got_a = fetch_backbone(reg_a.model_uri, tmp_path / "fetched_a", tracking_uri=uri)
    state_a = read_backbone(got_a).state
    assert torch.equal(state_a["classifier.1.weight"], read_backbone(a).state["classifier.1.weight"])

    assert find_backbone(id_a, tracking_uri=uri) == (reg_a.model_name, reg_a.version)
    assert find_backbone("0" * 64, tracking_uri=uri) is None


def test_cli_import_register(mlflow_server, reference_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = mlflow_server.tracking_uri
    out = tmp_path / "imported"
    assert (
        cessl(
            [
                "backbone",
                "import",
                str(reference_dir / "golden_tinylight_r0.pt"),
                "--config",
                "tinylight",
                "--out",
                str(out),
                "--register",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "registered as models:/cessl-backbone-tinylight/" in printed
    identity = read_backbone(out).identity
    assert find_backbone(identity, tracking_uri=uri)[0] == "cessl-backbone-tinylight"
