"""Bad data files, on the real Challenge records: a header using another record's signal
file is re-checked when that file changes; preprocess survives a bad record; a negative ADC
gain is refused; non-ASCII record names are fine; orphan signal files are reported; and
``cessl predict`` refuses a symbolic link out of the record's folder, as ingestion does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml.data.ingest import ACCEPTED, QUARANTINE_FILE, QUARANTINED, IngestConfig, ingest, load_record, read_manifest
from ml.data.paths import UnsafePathError, resolve_inside, unsafe_key_problem
from ml.data.preprocess import preprocess
from ml.data.records import Reason, RecordError, read_record_file
from ml.data.store import ECGStore
from ml.errors import CesslError
from ml.eval.predictor import Predictor, read_wfdb
from ml.model.backbone import ECGTransformer, backbone_config

SERIAL = IngestConfig(workers=1)


def _copy(src: Path, dst: Path, *records: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for r in records:
        for suffix in (".hea", ".mat"):
            shutil.copy(src / f"{r}{suffix}", dst)


def _rename_record(folder: Path, old: str, new: str, signal_file: str | None = None) -> None:
    """``old`` -> ``new`` (header and signal file), the header rewritten to name ``signal_file``."""
    text = (folder / f"{old}.hea").read_text()
    text = text.replace(f"{old}.mat", signal_file or f"{new}.mat").replace(old, new, 1)
    (folder / f"{old}.hea").unlink()
    (folder / f"{new}.hea").write_text(text, encoding="utf-8")
    if signal_file is None:
        (folder / f"{old}.mat").rename(folder / f"{new}.mat")
    else:
        (folder / f"{old}.mat").unlink()


def test_record_errors_are_cessl_errors() -> None:
    assert issubclass(RecordError, CesslError)


# --- a header naming another record's signal file --------------------------------------------------
def test_changed_signal_file_of_another_record_is_reingested(ecg_records_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(ecg_records_dir, src, "E07500", "E07501", "E07502")
    _copy(ecg_records_dir, tmp_path / "spare", "E07501")
    _rename_record(src, "E07502", "SHARED", signal_file="E07501.mat")  # header of E07502's shape...
    # ...but the header must match E07501.mat's samples: take E07501's header under another name
    (src / "SHARED.hea").write_text((src / "E07501.hea").read_text().replace("E07501 12", "SHARED 12", 1))
    first = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert first.accepted == 3, read_manifest(tmp_path / "ing")[["key", "detail"]]
    manifest = read_manifest(tmp_path / "ing").set_index("id")
    assert "E07501.mat:" in manifest.at["SHARED", "stamp"]  # the stamp covers the file it was read from
    assert first.orphans == {}  # E07501.mat is no orphan: headers name it

    # E07501.mat changes (another recording's samples, same size): both records using it are read again
    data = (ecg_records_dir / "E07500.mat").read_bytes()
    (src / "E07501.mat").write_bytes(data)
    stale = read_manifest(tmp_path / "ing")
    second = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert second.read == 2 and second.reused == 1
    after = read_manifest(tmp_path / "ing").set_index("id")
    for rid in ("E07501", "SHARED"):
        assert (after.at[rid, "status"], after.at[rid, "reason"]) == (QUARANTINED, Reason.HEADER_MISMATCH), rid
    assert after.at["SHARED", "content_hash"] != manifest.at["SHARED", "content_hash"]

    # preprocess from the manifest written before the change: it does not die, it leaves
    # the two changed records out and writes the store for the other one
    classes = [c for c in stale.set_index("id").at["E07500", "labels"].split(",") if c][:1]
    store = preprocess(stale, tmp_path / "store", classes=classes, workers=1, progress=False)
    assert store.ids == ["E07500"]
    quarantined = {q["id"]: q for q in json.loads((tmp_path / "store" / "store.json").read_text())["quarantined"]}
    assert set(quarantined) == {"E07501", "SHARED"}
    assert all(q["reason"] == "changed_since_ingest" for q in quarantined.values())
    assert "changed since it was ingested" in quarantined["SHARED"]["detail"]
    assert ECGStore.open(tmp_path / "store").read([0]).shape == (1, 12, 6144)

    # load_record itself refuses the changed bytes with a CesslError
    row = stale.set_index("id").loc["SHARED"]
    with pytest.raises(CesslError, match="changed since it was ingested"):
        load_record(str(src), row["key"], expected_hash=row["content_hash"], stamp=row["stamp"])


def test_preprocess_survives_a_removed_and_a_damaged_record(ecg_records_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(ecg_records_dir, src, "E07500", "E07501", "E07502", "E07503")
    ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    manifest = read_manifest(tmp_path / "ing")
    (src / "E07501.mat").unlink()
    (src / "E07502.mat").write_bytes(b"MATLAB garbage")
    classes = sorted({c for v in manifest["labels"] for c in v.split(",") if c})[:2]
    store = preprocess(manifest, tmp_path / "store", classes=classes, workers=1, progress=False)
    assert store.ids == ["E07500", "E07503"] and len(store) == 2
    assert np.isfinite(store.read([0, 1])).all() and np.abs(store.read([0, 1])).sum() > 0
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    reasons = {q["id"]: q["reason"] for q in meta["quarantined"]}
    assert reasons == {"E07501": "unreadable", "E07502": "changed_since_ingest"}
    assert meta["n_records"] == 2

    for rid in ("E07500", "E07503"):  # nothing usable left: one clear error, no store half-written
        (src / f"{rid}.mat").unlink()
    with pytest.raises(RecordError, match="none of the 4 accepted records"):
        preprocess(manifest, tmp_path / "store2", classes=classes, workers=1, progress=False)
    assert not (tmp_path / "store2").exists()


# --- header values and names ---------------------------------------------------------------------
def test_negative_adc_gain_is_quarantined(ecg_records_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(ecg_records_dir, src, "E07500", "E07501")
    lines = (src / "E07501.hea").read_text().splitlines()
    lines[3] = lines[3].replace(" 1000.0(0)/mV", " -1000.0(0)/mV")
    (src / "E07501.hea").write_text("\n".join(lines) + "\n")
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.accepted == 1 and report.by_reason == {Reason.BAD_HEADER: 1}
    detail = read_manifest(tmp_path / "ing").set_index("id").at["E07501", "detail"]
    assert "E07501.hea" in detail and "ADC gain '-1000.0(0)/mV'" in detail and "negative" in detail
    with pytest.raises(RecordError, match="negative"):
        read_record_file(src / "E07501.hea")


def test_zero_adc_gain_is_uncalibrated_and_refused(ecg_records_dir: Path, tmp_path: Path) -> None:
    """WFDB: a zero gain means "uncalibrated" (tests/unit/test_data_records.py: ingest quarantines it)."""
    _copy(ecg_records_dir, tmp_path, "E07500")
    text = (tmp_path / "E07500.hea").read_text()
    (tmp_path / "E07500.hea").write_text(text.replace("1000.0(0)/mV", "0(0)/mV"))
    with pytest.raises(RecordError, match=r"ADC gain 0.*uncalibrated") as err:
        read_record_file(tmp_path / "E07500.hea")
    assert err.value.reason is Reason.BAD_UNITS


@pytest.mark.parametrize("name", ["Müller_001", "心电_01", "patient ä-1".replace(" ", "_")])
def test_non_ascii_record_names_are_accepted(name: str, ecg_records_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(ecg_records_dir, src, "E07500", "E07501")
    _rename_record(src, "E07501", name)
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.by_reason) == (2, 2, {})
    manifest = read_manifest(tmp_path / "ing").set_index("id")
    assert manifest.at[name, "status"] == ACCEPTED and manifest.at[name, "key"] == f"{name}.hea"
    assert read_wfdb(src / name)[0].shape == (12, 5000)
    assert unsafe_key_problem(f"site/{name}.hea") is None


@pytest.mark.parametrize("key", ["../x.mat", "/etc/passwd", "a\\b.mat", "a\x00.mat", "a\nb.mat", "a/%2e%2e/b", "."])
def test_only_traversal_absolute_and_control_characters_are_unsafe(key: str, tmp_path: Path) -> None:
    assert unsafe_key_problem(key)
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, key)


# --- orphans -----------------------------------------------------------------------------------
def test_orphans_and_unlisted_entries_are_in_the_report(ecg_records_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy(ecg_records_dir, src, "E07500")
    shutil.copy(ecg_records_dir / "E07501.mat", src / "lonely.mat")
    (src / "site2").mkdir()
    (src / "site2" / "E09999.dat").write_bytes(b"\x00" * 24)
    (src / "README.txt").write_text("not a record")  # not a signal file: not listed
    (src / "dangling.mat").symlink_to(tmp_path / "nowhere.mat")
    (tmp_path / "elsewhere").mkdir()
    (src / "linked_site").symlink_to(tmp_path / "elsewhere")
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.seen == report.accepted == 1
    assert report.orphans == {
        "dangling.mat": "broken symbolic link",
        "linked_site": "symbolic link to a folder (not followed)",
        "lonely.mat": "signal file without a header (not read)",
        "site2/E09999.dat": "signal file without a header (not read)",
    }
    text = (tmp_path / "ing" / QUARANTINE_FILE).read_text()
    assert "## Orphans/unreadable" in text and "| lonely.mat | signal file without a header (not read) |" in text
    assert json.loads((tmp_path / "ing" / "ingest_report.json").read_text())["orphans"] == report.orphans


# --- symbolic links out of the record's folder -------------------------------------------------------
@pytest.fixture
def escaping(ecg_records_dir: Path, tmp_path: Path) -> Path:
    """records/: E07500 (fine), E07501 whose .mat links outside, E07502 whose .hea links outside."""
    records, outside = tmp_path / "records", tmp_path / "outside"
    _copy(ecg_records_dir, records, "E07500")
    _copy(ecg_records_dir, outside, "E07501", "E07502")
    shutil.copy(ecg_records_dir / "E07501.hea", records)
    (records / "E07501.mat").symlink_to(outside / "E07501.mat")
    (records / "E07502.hea").symlink_to(outside / "E07502.hea")
    shutil.copy(ecg_records_dir / "E07502.mat", records)
    return records


def test_predict_refuses_symlinks_out_of_the_record_folder(escaping: Path, tmp_path: Path) -> None:
    assert read_wfdb(escaping / "E07500")[0].shape == (12, 5000)
    with pytest.raises(ValueError, match="resolves outside the record's folder"):
        read_wfdb(escaping / "E07501")
    with pytest.raises(UnsafePathError, match="resolves outside the record's folder"):
        read_wfdb(escaping / "E07502.hea")

    classes = ["a", "b"]
    predictor = Predictor(
        model=ECGTransformer(backbone_config("tinylight", 2)).eval(),
        classes=classes,
        thresholds=np.full(2, 0.5),
        backbone_id="test",
    )
    table = predictor.predict_records([escaping / "E07501", escaping / "E07500", escaping / "E07502"]).set_index(
        "record"
    )
    assert table.at["E07500", "error"] == "" and np.isfinite(table.loc["E07500", ["p_a", "p_b"]].to_numpy(float)).all()
    for rid in ("E07501", "E07502"):
        assert "outside the record's folder" in table.at[rid, "error"]

    # ingestion refuses the same two (the same check)
    report = ingest(escaping, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.accepted == 1 and report.by_reason == {Reason.UNSAFE_PATH: 2}
