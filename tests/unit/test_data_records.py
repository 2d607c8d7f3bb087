"""The WFDB reader on the real Challenge records, and on format/lead/unit variations."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from ml.data.records import (
    STANDARD_LEADS,
    Reason,
    RecordError,
    ValidationConfig,
    decode_header,
    parse_header,
    read_record,
    read_record_file,
    unit_scale,
)
from ml.data.synth import SynthConfig, header_text, mat_v4_bytes, synthesize_record, to_digital


def _wfdb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb
    return wfdb


def _header_dx(path: Path) -> list[str] | None:
    for line in path.read_text().splitlines():
        if line.startswith("# Dx:"):
            return [c.strip() for c in line.split(":", 1)[1].split(",") if c.strip()]
    return None


def test_real_records_match_wfdb_and_headers(ecg_records_dir):
    wfdb = _wfdb()
    headers = sorted(ecg_records_dir.glob("*.hea"))
    assert len(headers) == 35
    for hea in headers:
        record = read_record_file(hea)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = wfdb.rdrecord(str(hea.with_suffix("")))
        assert reference.sig_name == list(STANDARD_LEADS)
        assert record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
        np.testing.assert_allclose(record.signal, reference.p_signal.T, atol=1e-6)
        assert record.fs == 500.0
        assert record.dx == _header_dx(hea)  # labels exactly as in the header
        assert record.age == float(reference.comments[0].split(":")[1])
        assert record.sex == reference.comments[1].split(":")[1].strip()[0]


def test_ptbxl_lowercase_mv_unit(ecg_records_dir):
    text = (ecg_records_dir / "HR06000.hea").read_text()
    assert "/mv " in text  # the PTB-XL quirk is really in the fixture
    header = parse_header(text, "HR06000.hea")
    assert {s.units for s in header.signals} == {"mv"}
    record = read_record_file(ecg_records_dir / "HR06000.hea")
    assert 0.1 < np.abs(record.signal).max() < 10  # millivolts, not microvolts
    assert record.dx == ["164934002", "426783006"]
    assert unit_scale("mV") == unit_scale("mv") == 1.0 and unit_scale("uV") == unit_scale("µV") == 1e-3


def test_flat_leads_of_real_records_are_noted_not_rejected(ecg_records_dir):
    record = read_record_file(ecg_records_dir / "JS20004.hea")
    assert record.flat_leads == ["V2", "V4", "V6"]
    assert any("flat lead" in n for n in record.notes)
    with pytest.raises(RecordError) as err:
        read_record_file(ecg_records_dir / "JS20004.hea", ValidationConfig(max_flat_leads=2))
    assert err.value.reason is Reason.FLAT_LINE


def _record_files(tmp_path: Path, name: str, digital: np.ndarray, leads, **kw) -> Path:
    rec = synthesize_record(0, SynthConfig(records=1, seed=3))
    text = header_text(name, digital, 500, ["Age: 40", "Sex: Male", "Dx: 426783006"], lead_names=leads, **kw)
    (tmp_path / f"{name}.hea").write_text(text)
    (tmp_path / f"{name}.mat").write_bytes(mat_v4_bytes(digital))
    del rec
    return tmp_path / f"{name}.hea"


def test_leads_are_mapped_by_name_whatever_the_order(tmp_path):
    rec = synthesize_record(1, SynthConfig(records=2, seed=3))
    digital = to_digital(rec.signal)
    order = [11, 3, 0, 7, 1, 9, 2, 10, 4, 8, 5, 6]
    names = [STANDARD_LEADS[i].upper() for i in order]  # "AVR", "V1"...: case does not matter
    hea = _record_files(tmp_path, "shuffled", digital[order], names)
    record = read_record_file(hea)
    np.testing.assert_allclose(record.signal, digital / 1000.0, atol=1e-6)


def test_extra_leads_are_dropped_and_missing_leads_rejected(tmp_path):
    rec = synthesize_record(2, SynthConfig(records=3, seed=3))
    digital = to_digital(rec.signal)
    extra = np.concatenate([digital, digital[:3]])
    hea = _record_files(tmp_path, "extra", extra, [*STANDARD_LEADS, "X", "Y", "Z"])
    record = read_record_file(hea)
    np.testing.assert_allclose(record.signal, digital / 1000.0, atol=1e-6)
    assert "ignored extra lead(s) X, Y, Z" in record.notes
    hea = _record_files(tmp_path, "missing", digital[:10], STANDARD_LEADS[:10])
    with pytest.raises(RecordError, match="missing lead") as err:
        read_record_file(hea)
    assert err.value.reason is Reason.MISSING_LEADS


@pytest.mark.parametrize("fmt", ["16", "212", "80"])
def test_plain_wfdb_dat_records(tmp_path, fmt):
    """``.dat`` records written by wfdb itself: formats 16/80 decoded here, 212 by wfdb."""
    wfdb = _wfdb()
    rec = synthesize_record(4, SynthConfig(records=5, seed=3))
    p_signal = rec.signal.T.astype(np.float64)
    if fmt == "80":
        p_signal = np.clip(p_signal, -0.6, 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wfdb.wrsamp(
            "plain",
            fs=500,
            units=["mV"] * 12,
            sig_name=list(STANDARD_LEADS),
            p_signal=p_signal,
            fmt=[fmt] * 12,
            comments=["Age: 50", "Sex: Female"],
            write_dir=str(tmp_path),
        )
        reference = wfdb.rdrecord(str(tmp_path / "plain"))
    record = read_record_file(tmp_path / "plain.hea")
    np.testing.assert_allclose(record.signal, reference.p_signal.T, atol=1e-6)
    assert record.dx is None and record.sex == "F"  # no Dx line: unlabelled


def test_non_utf8_header_is_read_as_latin1(ecg_records_dir, tmp_path):
    shutil.copy(ecg_records_dir / "E07500.mat", tmp_path / "E07500.mat")
    text = (ecg_records_dir / "E07500.hea").read_text().replace("# Hx: Unknown", "# Hx: ablation réussie")
    (tmp_path / "E07500.hea").write_bytes(text.encode("latin-1"))
    record = read_record_file(tmp_path / "E07500.hea")
    assert any("not UTF-8" in note for note in record.notes)
    assert record.dx == ["67741000119109", "426177001"]
    decoded, notes = decode_header("é".encode(), "x")
    assert decoded == "é" and notes == []


def test_errors_name_the_file(ecg_records_dir):
    data = (ecg_records_dir / "E07501.hea").read_bytes()
    with pytest.raises(RecordError, match=r"somewhere/E07501\.hea: signal file E07501\.mat is missing") as err:
        read_record(data, lambda name: (_ for _ in ()).throw(FileNotFoundError(name)), "somewhere/E07501.hea")
    assert err.value.reason is Reason.UNREADABLE


@pytest.mark.parametrize(("gain", "said"), [("0(0)/mV", "ADC gain 0"), ("0/mV", "ADC gain 0")])
def test_zero_adc_gain_is_uncalibrated_and_quarantined(ecg_records_dir, tmp_path, gain, said):
    """WFDB header(5): a gain of zero (or none) means the signal is uncalibrated; its amplitude
    in mV is unknown, so the record is quarantined, naming the lead and its signal file (ingest
    too), while the other records of the folder are accepted."""
    from ml.data.ingest import IngestConfig, ingest, read_manifest

    src = tmp_path / "src"
    src.mkdir()
    for rid in ("E07500", "E07501"):
        for suffix in (".hea", ".mat"):
            shutil.copy(ecg_records_dir / f"{rid}{suffix}", src / f"{rid}{suffix}")
    lines = (src / "E07501.hea").read_text().splitlines()
    assert lines[7].endswith(" V1") and " 1000.0(0)/mV " in lines[7]  # the real header's V1 line
    lines[7] = lines[7].replace("1000.0(0)/mV", gain)
    (src / "E07501.hea").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=said) as err:
        read_record_file(src / "E07501.hea")
    assert err.value.reason is Reason.BAD_UNITS
    assert "lead V1" in str(err.value) and "E07501.mat" in str(err.value) and "uncalibrated" in str(err.value)
    report = ingest(src, tmp_path / "ing", config=IngestConfig(workers=1), progress=False)
    assert report.accepted == 1 and report.by_reason == {Reason.BAD_UNITS: 1}
    detail = read_manifest(tmp_path / "ing").set_index("id").at["E07501", "detail"]
    assert "lead V1" in detail and "uncalibrated" in detail


def test_zero_adc_gain_of_an_ignored_extra_lead_is_harmless(tmp_path):
    rec = synthesize_record(2, SynthConfig(records=3, seed=3))
    digital = to_digital(rec.signal)
    hea = _record_files(tmp_path, "extra", np.concatenate([digital, digital[:1]]), [*STANDARD_LEADS, "X"])
    lines = hea.read_text().splitlines()
    assert lines[13].endswith(" X")
    lines[13] = lines[13].replace("1000.0(0)/mV", "0(0)/mV")
    hea.write_text("\n".join(lines) + "\n")
    record = read_record_file(hea)
    np.testing.assert_allclose(record.signal, digital / 1000.0, atol=1e-6)
