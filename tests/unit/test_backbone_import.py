"""Importing released reference checkpoints: goldens, refusal of unsafe pickles, strict keys."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.model.adapter import CheckpointError, state_dict_identity
from ml.model.backbone import ECGTransformer
from ml.model.pretrained import (
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    build_backbone,
    import_reference_checkpoint,
    read_backbone,
    read_backbone_meta,
)
from pipeline.cli import main as cessl

# raw pickle.dumps files use protocol 4; torch's weights-only unpickler warns about that
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.mark.parametrize("cfg", ["tinylight", "tiny"])
def test_import_golden_reproduces_reference_logits(cfg: str, reference_dir: Path, tmp_path: Path) -> None:
    folder = import_reference_checkpoint(reference_dir / f"golden_{cfg}_r0.pt", cfg, tmp_path / cfg)
    backbone = read_backbone(folder)
    state, config, meta = backbone.state, backbone.config, backbone.meta
    assert config.name == cfg and config.num_classes == 19  # the goldens carry 19 classes
    assert meta["source"] == "import" and meta["identity"] == state_dict_identity(state)
    assert meta["classes"] == [f"class_{i}" for i in range(19)]
    original = torch.load(reference_dir / f"golden_{cfg}_r0.pt", weights_only=True)
    assert all(torch.equal(original[k], state[k]) for k in original)

    model = build_backbone(folder)
    x = torch.from_numpy(np.load(reference_dir / "golden_input.npy"))
    with torch.no_grad():
        logits = model(x).numpy()
    expected = np.load(reference_dir / f"golden_{cfg}_r0_logits.npy")
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


class _Payload:
    """Pickles to a call of os.system: what a malicious "checkpoint" would run on load."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_import_refuses_a_malicious_pickle(container: str, reference_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    state = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    evil = {**state, "classifier.1.bias": _Payload(sentinel)}
    path = tmp_path / "released.pt"
    if container == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(path, "tinylight", tmp_path / "out")
    assert str(path) in str(err.value)
    assert "not a plain tensor state dict; refusing to unpickle" in str(err.value)
    assert not sentinel.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out" / BACKBONE_WEIGHTS).exists()


def test_import_refuses_non_tensor_entries(reference_dir: Path, tmp_path: Path) -> None:
    state = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    path = tmp_path / "extra.pt"
    torch.save({**state, "epoch": 50, "note": "hello"}, path)  # allow-listed types, still not tensors
    with pytest.raises(CheckpointError, match="not tensors"):
        import_reference_checkpoint(path, "tinylight", tmp_path / "out")


def test_import_accepts_wrappers_and_ddp_prefix(reference_dir: Path, tmp_path: Path) -> None:
    state = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 49}, path)
    folder = import_reference_checkpoint(path, "tinylight", tmp_path / "out")
    assert read_backbone_meta(folder)["identity"] == state_dict_identity(state)


def test_strict_key_check_names_every_difference(reference_dir: Path, tmp_path: Path) -> None:
    state = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    state.pop("encoder_layers.1.bn1.running_var")
    state["encoder_layers.0.conv9.weight"] = torch.zeros(1)
    state["transformer_layers.0.fc1.weight"] = torch.zeros(128, 64)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(path, "tinylight", tmp_path / "out")
    message = str(err.value)
    assert str(path) in message and "tinylight" in message
    assert "missing: ['encoder_layers.1.bn1.running_var']" in message
    assert "unexpected: ['encoder_layers.0.conv9.weight']" in message
    assert "transformer_layers.0.fc1.weight: expected (256, 64), got (128, 64)" in message


def test_import_with_the_wrong_config_lists_mismatches(reference_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(reference_dir / "golden_tinylight_r0.pt", "tiny", tmp_path / "out")
    message = str(err.value)
    assert "missing: ['transformer_layers.1." in message  # tiny has 4 transformer layers
    assert "encoder_layers.0.conv1.conv.weight: expected (128, 12, 1, 9), got (64, 12, 1, 9)" in message


def test_modified_backbone_folder_is_refused(reference_dir: Path, tmp_path: Path) -> None:
    folder = import_reference_checkpoint(reference_dir / "golden_tinylight_r0.pt", "tinylight", tmp_path / "b")
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / BACKBONE_WEIGHTS))
    state["classifier.1.bias"] = state["classifier.1.bias"] + 1.0
    save_file(state, str(folder / BACKBONE_WEIGHTS))
    with pytest.raises(CheckpointError, match="identity"):
        read_backbone(folder)


def test_cli_import_and_show(reference_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
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
            ]
        )
        == 0
    )
    assert (out / BACKBONE_WEIGHTS).is_file() and (out / BACKBONE_CONFIG).is_file()
    assert cessl(["backbone", "show", str(out)]) == 0
    assert '"source": "import"' in capsys.readouterr().out

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": _Payload(tmp_path / "pwned")}))
    assert (
        cessl(["backbone", "import", str(evil), "--config", "tinylight", "--out", str(tmp_path / "x")]) == 4
    )  # a bad file
    assert not (tmp_path / "pwned").exists()


def test_classes_default_to_code15_for_a_six_class_head(reference_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    from ml.model.backbone import backbone_config

    state = ECGTransformer(backbone_config("tinylight", 6)).state_dict()
    path = tmp_path / "code15.pt"
    torch.save(state, path)
    backbone = read_backbone(import_reference_checkpoint(path, "tinylight", tmp_path / "out"))
    config, meta = backbone.config, backbone.meta
    assert config.num_classes == 6
    assert meta["classes"] == ["1dAVb", "RBBB", "LBBB", "SB", "AF", "ST"]
