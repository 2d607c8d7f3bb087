"""Bad model files: every weights file read gives a CheckpointError naming the file and the
problem (never a raw SafetensorError / KeyError / UnpicklingError), and weights no model
should hold (integer, bool, NaN/Inf, non-positive BatchNorm variances) are refused on import
and on every read; a constant-output model is refused by the evaluate step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.common import StepError
from components.evaluate import check_outputs_vary
from ml.errors import CesslError
from ml.model.adapter import ADAPTER_WEIGHTS, AdapterMeta, CheckpointError, load_adapter, read_weights, save_adapter
from ml.model.backbone import ECGTransformer
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import BACKBONE_CONFIG, BACKBONE_WEIGHTS, import_reference_checkpoint, read_backbone
from ml.train.checkpoint import load_checkpoint
from pipeline.cli import main as cessl


@pytest.fixture(scope="module")
def golden_state(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)


@pytest.fixture
def imported(reference_dir: Path, tmp_path: Path) -> Path:
    return import_reference_checkpoint(reference_dir / "golden_tinylight_r0.pt", "tinylight", tmp_path / "backbone")


def test_checkpoint_error_is_a_cessl_error() -> None:
    assert issubclass(CheckpointError, CesslError) and issubclass(CheckpointError, ValueError)


# --- unreadable files ----------------------------------------------------------------------------
def test_truncated_backbone_safetensors(imported: Path) -> None:
    weights = imported / BACKBONE_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_backbone(imported)
    assert str(weights) in str(err.value) and "truncated" in str(err.value)
    weights.write_bytes(data[:5])  # not even the header length
    with pytest.raises(CheckpointError, match="shorter than the 8-byte"):
        read_backbone(imported)


def test_pickle_renamed_safetensors(imported: Path, golden_state) -> None:
    weights = imported / BACKBONE_WEIGHTS
    torch.save(golden_state, weights)  # a torch zip archive under the safetensors name
    with pytest.raises(CheckpointError) as err:
        read_backbone(imported)
    assert str(weights) in str(err.value) and "not a readable safetensors file" in str(err.value)


@pytest.mark.parametrize("content", [b"hello, this is not a checkpoint\n", b"x", b"", b"PK\x03\x04garbage"])
def test_text_or_garbage_named_pt(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "released.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(path, "tinylight", tmp_path / "out")
    assert str(path) in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never the advice to turn the check off
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)  # the training checkpoints go through the same reader


def test_pt_holding_a_plain_tensor_or_list(tmp_path: Path) -> None:
    for i, obj in enumerate((torch.zeros(3), [torch.zeros(3)], {"a": [1, 2]})):
        path = tmp_path / f"odd{i}.pt"
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match=str(path)):
            read_weights(path)


def test_damaged_adapter_weights(golden_state, imported: Path, tmp_path: Path) -> None:
    backbone = read_backbone(imported)
    model = ECGTransformer(backbone.config, LoRAConfig(r=2))
    model.load_state_dict(backbone.state, strict=False)
    mark_trainable(model, "lora")
    adapter = save_adapter(model, tmp_path / "adapter", AdapterMeta(backbone.identity, backbone.classes))
    load_adapter(adapter, backbone.state)  # intact: loads
    weights = adapter / ADAPTER_WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        load_adapter(adapter, backbone.state)
    tensors = load_file(_restore(weights, good))
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=f"{key}: .* NaN"):
        load_adapter(adapter, backbone.state)


def _restore(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --- weights no model should hold -----------------------------------------------------------------
BAD_WEIGHTS = {
    "int32": ("transformer_layers.0.fc1.weight", lambda t: t.to(torch.int32), "dtype torch.int32"),
    "int64": ("classifier.1.bias", lambda t: t.to(torch.int64), "dtype torch.int64"),
    "bool": ("classifier.1.weight", lambda t: t > 0, "dtype bool"),
    "nan": ("transformer_layers.0.fc1.weight", lambda t: t.index_fill(0, torch.tensor([0, 3]), float("nan")), "NaN"),
    "inf": ("classifier.1.bias", lambda t: t.index_fill(0, torch.tensor([1]), float("inf")), "1 Inf"),
    "bn_var_negative": ("encoder_layers.1.bn1.running_var", lambda t: t.index_fill(0, torch.tensor([2]), -1.0), "<= 0"),
    "bn_var_zero": ("encoder_layers.0.bn2.running_var", torch.zeros_like, "<= 0"),
    "batches_float": ("encoder_layers.0.bn1.num_batches_tracked", lambda t: t.float(), "integer buffer"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_import_refuses_bad_weights(case: str, golden_state, tmp_path: Path) -> None:
    name, change, reason = BAD_WEIGHTS[case]
    state = dict(golden_state)
    state[name] = change(state[name])
    path = tmp_path / f"{case}.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(path, "tinylight", tmp_path / "out")
    message = str(err.value)
    assert str(path) in message and name in message and reason in message, message
    assert not (tmp_path / "out").exists(), "nothing is written for refused weights"


def test_read_backbone_refuses_nan_weights_written_behind_its_back(imported: Path) -> None:
    """A folder whose weights AND recorded identity were rewritten (the identity check passes)."""
    from ml.model.adapter import state_dict_identity

    weights = imported / BACKBONE_WEIGHTS
    state = load_file(str(weights))
    state["classifier.1.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    meta = json.loads((imported / BACKBONE_CONFIG).read_text())
    meta["identity"] = state_dict_identity(state)
    (imported / BACKBONE_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight: 1 NaN"):
        read_backbone(imported)


def test_cli_import_nan_weights_is_refused_and_show_reports_checks(
    golden_state, reference_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    state = dict(golden_state)
    state["transformer_layers.0.fc1.weight"] = torch.full_like(state["transformer_layers.0.fc1.weight"], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    assert (
        cessl(["backbone", "import", str(bad), "--config", "tinylight", "--out", str(tmp_path / "x")]) == 4
    )  # a bad file
    err = capsys.readouterr().err + caplog.text  # the CLI's error line (logged)
    assert "transformer_layers.0.fc1.weight" in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()

    out = tmp_path / "good"
    good = reference_dir / "golden_tinylight_r0.pt"
    assert cessl(["backbone", "import", str(good), "--config", "tinylight", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cessl(["backbone", "show", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    verified = shown["verified"]
    assert verified["identity_verified"] == shown["identity"]
    assert verified["tensors"] == len(golden_state) and verified["finite"] is True
    n_bn = sum(k.endswith("running_var") for k in golden_state)
    assert verified["dtypes"] == {"float32": len(golden_state) - n_bn, "int64": n_bn}  # num_batches_tracked
    assert verified["batchnorm_variances_positive"] == n_bn > 0

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / BACKBONE_WEIGHTS).read_bytes()
    (truncated / BACKBONE_WEIGHTS).write_bytes(data[:1000])
    assert cessl(["backbone", "show", str(truncated)]) == 4  # a bad file
    err = capsys.readouterr().err + caplog.text
    assert str(truncated / BACKBONE_WEIGHTS) in err and "Traceback" not in err


# --- constant outputs -----------------------------------------------------------------------------
def test_constant_outputs_are_refused() -> None:
    rng = np.random.default_rng(0)
    check_outputs_vary(rng.random((20, 5)), "m")  # a real model's outputs: fine
    check_outputs_vary(np.full((1, 5), 0.3), "m")  # one record: nothing to compare
    one_class_varies = np.full((20, 5), 0.5)
    one_class_varies[3, 2] = 0.51
    check_outputs_vary(one_class_varies, "m")
    with pytest.raises(StepError, match="constant-output model"):
        check_outputs_vary(np.tile(rng.random(5), (20, 1)), "adapter-dir")
    with pytest.raises(StepError, match="same probabilities"):
        check_outputs_vary(np.full((20, 5), 0.5) + rng.normal(0, 1e-9, (20, 5)), "adapter-dir")
    with pytest.raises(StepError, match="NaN/Inf"):
        check_outputs_vary(np.full((20, 5), np.nan), "adapter-dir")
