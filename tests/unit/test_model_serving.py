"""The registered pyfunc model is deployable: it loads outside this checkout (its code is
logged with it), installs anywhere (plain PyPI requirements), predicts every input its
documentation names, and ``mlflow models serve`` answers a real HTTP request with the
probabilities of ``cessl predict``. Also: one bad record does not lose the good ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from ml.eval.predictor import load_predictor
from ml.model.adapter import AdapterMeta, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone
from pipeline.registry.pyfunc_model import log_adapter_model

# SNOMED codes of the Challenge (AF, IAVB, RBBB, SNR): diagnoses get their abbreviations.
CLASSES = ["164889003", "270492004", "59118001", "426783006"]
MODEL_NAME = "serving-test"


def _p_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("p_")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tinylight backbone and an adapter with non-zero LoRA weights (no training)."""
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(7)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    backbone = save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")
    state = read_backbone(backbone).state
    model = ECGTransformer(backbone_config("tinylight", len(CLASSES)), LoRAConfig(r=4))
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "lora")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    meta = AdapterMeta(backbone_id=state_dict_identity(state), classes=CLASSES, thresholds=[0.3, 0.5, 0.5, 0.7])
    adapter = save_adapter(model.eval(), root / "adapter", meta)
    return backbone, adapter


@pytest.fixture(scope="module")
def registered(model_dirs, tmp_path_factory) -> tuple[str, str]:
    """``(tracking_uri, model_uri)``: the model logged and registered in a SQLite store."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_adapter_model(*model_dirs, classes=CLASSES, registered_model_name=MODEL_NAME)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return uri, f"models:/{MODEL_NAME}/{info.registered_model_version}"


def test_a_bad_record_does_not_lose_the_good_ones(model_dirs, ecg_records_dir, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    for name in ("E07500", "E07501"):
        for path in ecg_records_dir.glob(f"{name}.*"):
            shutil.copy(path, records)
    (records / "E07501.mat").write_bytes(b"not a MATLAB file")  # corrupt signal file
    predictor = load_predictor(*model_dirs)
    paths = [records / "E07500", records / "E07501", records / "missing", ecg_records_dir / "HR06000"]
    table = predictor.predict_records(paths)

    assert list(table["record"]) == ["E07500", "E07501", "missing", "HR06000"]
    good, bad = table[table["error"] == ""], table[table["error"] != ""]
    assert list(good["record"]) == ["E07500", "HR06000"] and list(bad["record"]) == ["E07501", "missing"]
    assert "E07501" in bad["error"].iloc[0] and "not found" in bad["error"].iloc[1]
    assert bad[_p_columns(table)].isna().all().all() and list(bad["diagnoses"]) == ["", ""]
    alone = predictor.predict_records([records / "E07500", ecg_records_dir / "HR06000"])
    np.testing.assert_allclose(good[_p_columns(table)].to_numpy(), alone[_p_columns(alone)].to_numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing"):
        predictor.predict_records([records / "missing"])
