"""Signal quality (ml/data/quality.py): the real records pass with margin (leads not recorded with a
note), every fault fails with a reason naming the lead and the problem, and the thresholds keep the margins their comments claim.
Ingestion's quarantine: tests/unit/test_data_ingest.py; ``cessl predict``:
tests/unit/test_model_serving.py; ``cessl serve``: tests/unit/test_serve.py and
tests/integration/test_serve_http.py."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from quality_support import SIGNAL_FAULTS, constant_lead, dropout, electrode_off, swap_la_ra, write_wfdb, zero_lead

from ml.data.preprocess import PreprocessConfig
from ml.data.quality import (
    MODEL_BAND_HZ,
    MODEL_WINDOW_S,
    STRUCTURAL_CHECKS,
    QualityConfig,
    check_record,
    check_signal,
    longest_run,
    noise_fraction,
    robust_amplitude,
)
from ml.data.quality import bandpass as band_limited
from ml.data.records import STANDARD_LEADS, ECGRecord, RecordError, read_record_file
from ml.data.synth import site_config, synthesize_record

# Two Chapman-Shaoxing records hold V2, V4 and V6 at exactly 0 mV for their whole 10 s: leads not recorded.
NOT_RECORDED = {"JS20004": ["V2", "V4", "V6"], "JS20008": ["V2", "V4", "V6"]}


@pytest.fixture(scope="module")
def real(ecg_records_dir: Path) -> dict[str, ECGRecord]:
    return {p.stem: read_record_file(p) for p in sorted(ecg_records_dir.glob("*.hea"))}


def test_every_real_record_passes_those_with_unrecorded_leads_with_a_note(real, ecg_records_dir):
    """Read by the project's reader and by wfdb (its own names for the leads, float64 mV): the
    same verdicts. All 35 pass; the two whose three leads are all zeros (not recorded) with a note
    naming them, the others with nothing to say."""
    assert len(real) == 35
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wfdb under pandas 3
        import wfdb
    for name, record in real.items():
        ours = check_record(record)
        theirs = wfdb.rdrecord(str(ecg_records_dir / name))
        by_wfdb = check_signal(theirs.p_signal.T, theirs.fs, theirs.sig_name)
        assert by_wfdb.to_dict() == ours.to_dict(), name
        assert ours.ok and ours.summary() == "ok", (name, ours.summary())
        if name in NOT_RECORDED:
            assert list(ours.missing) == NOT_RECORDED[name]
            assert ours.notes == ("V2, V4, V6 not recorded (all samples 0)",)
        else:
            assert ours.notes == ours.missing == (), name
    # a site that allows fewer missing leads refuses them, naming them
    strict = check_record(real["JS20004"], QualityConfig(max_missing_leads=2))
    assert strict.record_reasons == ("leads V2, V4, V6 not recorded (all samples 0): at most 2 may be missing",)
    assert not strict.ok and not strict.lead_reasons and not strict.notes


def test_a_lead_not_recorded_is_a_note_an_electrode_off_a_fault(real):
    """On a real record (E07500): one, two or three leads at exactly 0 mV throughout (any but I and
    II) pass with the note; four fail, and so does lead I or II alone. An electrode that came off
    (a near-flat line with noise, a constant level other than 0 mV, a 3-s dropout) fails."""
    x = real["E07500"].signal.astype(np.float64)
    assert check_signal(x, 500.0).notes == ()
    for leads, note in (
        (("V3",), "V3 not recorded (all samples 0)"),
        (("aVF", "V1"), "aVF, V1 not recorded (all samples 0)"),
        (("III", "aVR", "aVL"), "III, aVR, aVL not recorded (all samples 0)"),
    ):
        result = check_signal(zero_lead(x, *leads), 500.0)
        assert result.ok and result.notes == (note,) and result.missing == leads, result.summary()
    for leads in (("V1", "V2", "V3", "V4"), ("I",), ("II",), ("I", "II")):
        result = check_signal(zero_lead(x, *leads), 500.0)
        assert not result.ok and not result.notes and result.missing == leads
        assert result.record_reasons[0].startswith(
            f"lead{'s' if len(leads) > 1 else ''} {', '.join(leads)} not recorded"
        )
    assert (
        "at most 3 may be missing, and leads I and II must be recorded"
        in check_signal(zero_lead(x, "I", "V1", "V2", "V3"), 500.0).summary()
    )
    off = check_signal(electrode_off(x, "V3"), 500.0)
    assert not off.ok and not off.missing and list(off.lead_reasons) == ["V3"]
    assert re.fullmatch(r"flat \(peak-to-peak 0\.0\d\d mV < 0\.05 mV: an electrode off\?\)", off.lead_reasons["V3"])
    assert check_signal(constant_lead(x, "V3", -0.2), 500.0).lead_reasons == {
        "V3": "flat (a constant -0.200 mV throughout: an electrode off or an amplifier at a rail)"
    }
    assert check_signal(dropout(x, "V3"), 500.0).lead_reasons["V3"].startswith("flat for 3.00 s from 2.00 s")
    # a lead not recorded beside a faulty one: the fault decides, the missing lead is named too
    both = check_signal(zero_lead(electrode_off(x, "V5"), "V2"), 500.0)
    assert not both.ok and list(both.lead_reasons) == ["V5"] and both.notes == ("V2 not recorded (all samples 0)",)


def test_the_real_records_keep_a_margin_of_two_to_every_threshold(real):
    """What the comments of QualityConfig claim: the worst real value is at most half (or, for
    lower bounds, at least twice) each threshold."""
    config = QualityConfig()
    leads = [(r.signal[j].astype(np.float64), r.fs) for r in real.values() for j in range(12)]
    live = [(x, fs) for x, fs in leads if np.any(x)]  # every lead but the 6 not recorded
    assert len(live) == 35 * 12 - 6
    assert min(np.ptp(x) for x, _ in live) > 2 * config.flat_ptp_mv
    assert max(longest_run(np.diff(x) == 0)[0] / fs for x, fs in live) < config.max_flat_run_s / 2
    rail_runs = [max(longest_run(x == x.max())[0], longest_run(x == x.min())[0]) / fs for x, fs in live]
    assert max(rail_runs) < config.max_rail_run_s / 2
    assert max(float(np.mean((x == x.max()) | (x == x.min()))) for x, _ in live) < config.max_rail_fraction / 2
    amplitudes = [robust_amplitude(band_limited(r.signal.astype(np.float64), r.fs)) for r in real.values()]
    assert max(float(a.max()) for a in amplitudes) < config.max_amplitude_mv / 2
    assert min(float(a.max()) for a in amplitudes) > 2 * config.min_record_amplitude_mv
    noise = [noise_fraction(r.signal.astype(np.float64), r.fs) for r in real.values()]
    assert max(float(np.nanmax(n[np.isfinite(n)])) for n in noise if n is not None) < config.max_noise_fraction / 2


@pytest.mark.parametrize("fault", sorted(SIGNAL_FAULTS))
def test_each_fault_fails_with_its_reason(real, fault):
    """A real record (E07500, which passes) with one fault injected fails, and the reason says
    which lead and what (or what of the record)."""
    inject, rate, phrase = SIGNAL_FAULTS[fault]
    record = real["E07500"]
    assert check_record(record).ok
    result = check_signal(inject(record.signal.astype(np.float64)), rate(record.fs))
    assert not result.ok, fault
    assert phrase in result.summary(), (fault, result.summary())


def test_an_all_zero_record_fails_as_not_recorded():
    result = check_signal(np.zeros((12, 5000)), 500.0)
    assert not result.ok and not result.lead_reasons and result.missing == tuple(STANDARD_LEADS)
    assert result.record_reasons == ("no lead recorded (all 12 are 0 mV throughout)",)
    assert result.to_dict()["record"] == ["no lead recorded (all 12 are 0 mV throughout)"]


def test_lead_reversal_is_flagged_only_when_clear(real):
    """LA/RA swapped: flagged where lead I's QRS turns clearly negative and aVR's clearly positive
    (about a third of the real records: the rule is conservative); never on the records as
    recorded, nor on an inverted chest lead (which no limb-lead swap explains)."""
    swapped = {name: check_record(ECGRecord(**{**vars(r), "signal": swap_la_ra(r.signal)})) for name, r in real.items()}
    flagged = [name for name, q in swapped.items() if any("reversed" in reason for reason in q.record_reasons)]
    assert len(flagged) >= 10 and "E07500" in flagged
    assert not any("reversed" in " ".join(check_record(r).record_reasons) for r in real.values())
    inverted = real["E07500"].signal.copy()
    inverted[STANDARD_LEADS.index("V4")] *= -1
    assert check_signal(inverted, 500.0).ok


def test_synthetic_hospitals_pass_but_their_disconnected_electrodes(real):
    """Every site profile (noise, wander, mains, 250/500/1000 Hz, an inverted V4) passes; the
    records whose device fault is a flat lead (an electrode off: offset and noise, not zeros)
    fail for that lead."""
    failed_for = {}
    for site in range(4):
        config = site_config(site, 24, seed=5)
        for k in range(24):
            record = synthesize_record(k, config)
            result = check_signal(record.signal, record.fs)
            if record.lead_fault.endswith(":flat"):
                lead = record.lead_fault.split(":")[0]
                assert list(result.lead_reasons) == [lead], result.summary()
                assert result.lead_reasons[lead].startswith("flat (peak-to-peak 0.0") and not result.missing
                failed_for[site] = lead
            else:
                assert result.ok, (site, k, record.lead_fault, result.summary())
    assert failed_for == {2: "V4", 3: "V2"}


def test_missing_leads_and_lead_names(real):
    x = real["E07500"].signal
    result = check_signal(x[:11], 500.0, STANDARD_LEADS[:11])
    assert result.record_reasons == ("missing lead(s) V6",)
    upper = check_signal(x, 500.0, [name.upper() for name in STANDARD_LEADS])  # "AVR": the same lead
    assert upper.ok
    missing = np.array(x, dtype=np.float64)
    missing[5] = np.nan
    assert check_signal(missing, 500.0).lead_reasons == {"aVF": "missing (no finite sample)"}
    with pytest.raises(ValueError, match=r"signal of shape \(5000, 12\): expected \(leads, samples\) with 12 leads"):
        check_signal(x.T, 500.0)


def test_the_window_the_duration_bound_refers_to():
    preprocess = PreprocessConfig()
    assert preprocess.length / preprocess.fs == MODEL_WINDOW_S
    assert (preprocess.low_hz, preprocess.high_hz) == MODEL_BAND_HZ
    assert 0 < QualityConfig().min_duration_s < 10.0 < MODEL_WINDOW_S  # a 10-s Challenge record passes


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="min_fs < max_fs"):
        QualityConfig(min_fs=500.0, max_fs=100.0)
    with pytest.raises(ValueError, match="within"):
        QualityConfig(max_noise_fraction=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        QualityConfig(max_missing_leads=-1)


def test_a_faulty_wfdb_record_reads_structurally_then_fails_quality(real, tmp_path):
    """What ``cessl predict`` and ``cessl serve`` read: the file and header checks only (an
    all-zero record is a flat line to the strict reader), then this check gives the reasons."""
    zeros = write_wfdb(tmp_path, "zeros", np.zeros((12, 5000)), 500.0)
    with pytest.raises(RecordError, match="12 of 12 leads are flat"):
        read_record_file(zeros)
    assert check_record(read_record_file(zeros, STRUCTURAL_CHECKS)).record_reasons == (
        "no lead recorded (all 12 are 0 mV throughout)",
    )
    lead_off = write_wfdb(tmp_path, "lead_off", electrode_off(real["E07500"].signal), 500.0)
    result = check_record(read_record_file(lead_off))
    assert list(result.lead_reasons) == ["V3"] and result.lead_reasons["V3"].startswith("flat (peak-to-peak 0.0")
    # a lead not recorded survives the WFDB round trip as exact zeros: a note
    unrecorded = write_wfdb(tmp_path, "unrecorded", zero_lead(real["E07500"].signal, "V3"), 500.0)
    assert check_record(read_record_file(unrecorded)).notes == ("V3 not recorded (all samples 0)",)
