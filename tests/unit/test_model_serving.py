"""Predicting records with the adapter model: one bad record does not lose the good ones.
The logged pyfunc model, outside the checkout and over HTTP:
tests/integration/test_model_serving_mlflow.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import make_model_dirs, p_columns

from ml.eval.predictor import load_predictor


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return make_model_dirs(tmp_path_factory.mktemp("model"))


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
    assert bad[p_columns(table)].isna().all().all() and list(bad["diagnoses"]) == ["", ""]
    alone = predictor.predict_records([records / "E07500", ecg_records_dir / "HR06000"])
    np.testing.assert_allclose(good[p_columns(table)].to_numpy(), alone[p_columns(alone)].to_numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing"):
        predictor.predict_records([records / "missing"])
