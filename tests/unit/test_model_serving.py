"""Predicting records with the adapter model: one bad record does not lose the good ones, a
record that fails the signal-quality check is answered unreadable, never with diagnoses, and one
with leads not recorded is predicted with a note.
The logged pyfunc model, outside the checkout and over HTTP:
tests/integration/test_model_serving_mlflow.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import make_model_dirs, p_columns
from quality_support import electrode_off, write_wfdb, zero_lead

from ml.eval.predictor import OK, UNREADABLE, load_predictor, read_wfdb


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
    assert list(table["status"]) == [OK, UNREADABLE, UNREADABLE, OK] and list(table["reason"]) == list(table["error"])
    assert list(table["notes"]) == ["", "", "", ""]
    assert "E07501" in bad["error"].iloc[0] and "not found" in bad["error"].iloc[1]
    assert bad[p_columns(table)].isna().all().all() and list(bad["diagnoses"]) == ["", ""]
    alone = predictor.predict_records([records / "E07500", ecg_records_dir / "HR06000"])
    np.testing.assert_allclose(good[p_columns(table)].to_numpy(), alone[p_columns(alone)].to_numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing"):
        predictor.predict_records([records / "missing"])


def test_a_record_failing_signal_quality_is_unreadable_not_diagnosed(model_dirs, ecg_records_dir, tmp_path):
    """An all-zero record, one with its V3 electrode off, one with four leads not recorded and a
    2-second one, between two good records: those four get status ``unreadable``, the reason,
    NaN probabilities and no diagnoses (whatever the thresholds); the good ones are predicted as
    if alone. A record with a lead not recorded (V3 all zeros) and the real JS20004 (V2, V4 and V6
    not recorded) are predicted, ``ok``, with the note in ``notes`` (``reason`` stays empty)."""
    predictor = load_predictor(*model_dirs)
    predictor.thresholds[:] = 0.0  # every class would be diagnosed for anything that is predicted
    signal, fs = read_wfdb(ecg_records_dir / "E07500")
    faulty = tmp_path / "faulty"
    paths = [
        ecg_records_dir / "E07500",
        write_wfdb(faulty, "zeros", np.zeros((12, 5000)), fs),
        write_wfdb(faulty, "lead_off", electrode_off(signal, "V3"), fs),
        write_wfdb(faulty, "four_missing", zero_lead(signal, "V1", "V2", "V3", "V4"), fs),
        write_wfdb(faulty, "short", signal[:, :1000], fs),
        write_wfdb(faulty, "unrecorded", zero_lead(signal, "V3"), fs),
        ecg_records_dir / "JS20004",
        ecg_records_dir / "HR06000",
    ]
    table = predictor.predict_records(paths)

    assert list(table["status"]) == [OK, UNREADABLE, UNREADABLE, UNREADABLE, UNREADABLE, OK, OK, OK]
    bad = table[table["status"] == UNREADABLE].set_index("record")
    assert bad[p_columns(table)].isna().all().all()
    assert list(bad["diagnoses"]) == list(bad["codes"]) == ["", "", "", ""]
    assert bad.loc["lead_off", "reason"].startswith("signal quality: V3: flat (peak-to-peak 0.0")
    assert bad.loc["zeros", "reason"] == "signal quality: no lead recorded (all 12 are 0 mV throughout)"
    assert bad.loc["four_missing", "reason"] == (
        "signal quality: leads V1, V2, V3, V4 not recorded (all samples 0): at most 3 may be missing"
    )
    assert bad.loc["short", "reason"].startswith("signal quality: too short: 2.00 s")
    assert (bad["error"] == bad["reason"]).all() and (bad["notes"] == "").all()
    good = table[table["status"] == OK].set_index("record")
    assert (good["reason"] == "").all() and (good["error"] == "").all() and all(good["diagnoses"])  # threshold 0
    assert good["notes"].to_dict() == {
        "E07500": "",
        "unrecorded": "signal quality: V3 not recorded (all samples 0)",
        "JS20004": "signal quality: V2, V4, V6 not recorded (all samples 0)",
        "HR06000": "",
    }
    alone = predictor.predict_records([paths[0], paths[-1]])
    np.testing.assert_allclose(
        good.loc[["E07500", "HR06000"], p_columns(table)].to_numpy(), alone[p_columns(alone)].to_numpy(), atol=1e-6
    )
    # only unreadable records: an answer (a table of them), not an error
    only = predictor.predict_records(paths[1:3])
    assert list(only["status"]) == [UNREADABLE, UNREADABLE] and only[p_columns(only)].isna().all().all()
