"""Ingestion: every record accepted or quarantined with its reason; incremental re-runs."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from quality_support import clip_lead, electrode_off, write_wfdb, zero_lead

from ml.data.ingest import (
    ACCEPTED,
    MANIFEST_COLUMNS,
    QUARANTINE_FILE,
    QUARANTINED,
    IngestConfig,
    ingest,
    load_record,
    read_manifest,
)
from ml.data.records import Reason, read_record_file
from ml.data.sources import LocalSource, record_key
from ml.data.synth import SynthConfig, generate, inject_faults

SERIAL = IngestConfig(workers=1)


@pytest.fixture(scope="module")
def faulty_hospital(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hospital")
    generate(root, SynthConfig(records=40, seed=11, unlabelled_fraction=0.25), workers=1, progress=False)
    expected = inject_faults(root, seed=11)
    return root, expected


def test_every_fault_gets_its_reason_and_nothing_is_lost(faulty_hospital, tmp_path):
    root, expected = faulty_hospital
    report = ingest(root, tmp_path, config=IngestConfig(workers=2, chunk_size=8, min_parallel=0), progress=False)
    manifest = read_manifest(tmp_path)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    n_files = len(list(root.rglob("*.hea")))
    assert report.seen == len(manifest) == n_files == 40 + len(expected)
    assert report.seen == report.accepted + report.quarantined
    assert report.read == report.seen and report.reused == 0
    by_key = manifest.set_index("key")
    for key, outcome in expected.items():
        row = by_key.loc[key]
        if outcome == ACCEPTED:
            assert row["status"] == ACCEPTED, (key, row["reason"], row["detail"])
        else:
            assert (row["status"], row["reason"]) == (QUARANTINED, outcome), (key, row["detail"])
            assert row["detail"].startswith(str(root)) or "s3://" in row["detail"], row["detail"]
    # every quarantine reason of the issue is exercised
    assert {v for v in expected.values() if v != ACCEPTED} == {r.value for r in Reason} - {"unsupported"}
    # the regular synthetic records are all accepted
    regular = manifest[manifest["id"].str.startswith("S")]
    assert (regular["status"] == ACCEPTED).all()
    assert report.by_reason == manifest[manifest["status"] == QUARANTINED]["reason"].value_counts().to_dict()


def test_manifest_fields_for_accepted_variants(faulty_hospital, tmp_path):
    root, _ = faulty_hospital
    ingest(root, tmp_path, config=SERIAL, progress=False)
    m = read_manifest(tmp_path).set_index("id")
    assert m.loc["F_fs_257", "fs"] == 257.0 and m.loc["F_fs_1000", "length"] == 10000
    assert not m.loc["F_no_dx", "labelled"] and not m.loc["F_empty_dx", "labelled"]
    row = m.loc["F_unscored_codes"]  # valid SNOMED CT codes the Challenge does not score: accepted
    assert (row["status"], row["unscored"], row["unknown"]) == (ACCEPTED, "55827005,251187003", "")
    assert row["dx"].endswith("55827005,251187003")
    assert "not UTF-8" in m.loc["F_latin1_header", "notes"]
    assert "ignored extra lead(s)" in m.loc["F_extra_leads", "notes"]
    # same name, other content, other folder: two records, both accepted; an identical copy is not
    assert m.loc["F_duplicate", "status"] == m.loc["zz_resubmitted/F_duplicate", "status"] == ACCEPTED
    assert m.loc["F_copy", "status"] == ACCEPTED
    copy = m.loc["zz_resubmitted/F_copy"]
    assert (copy["status"], copy["reason"]) == (QUARANTINED, "duplicate_id")
    assert copy["detail"].endswith(f"identical copy of F_copy ({root}/F_copy.hea)")
    # the same signal whatever the unit spelling / lead order
    base = load_record(str(root), "F_units_uV.hea")
    assert base.signal.shape == (12, 5000) and np.abs(base.signal).max() < 10
    unlabelled = m[(m["status"] == ACCEPTED) & ~m["labelled"]]
    assert len(unlabelled) >= 5  # 25% of the regular records have no # Dx, plus the two faults


def test_quarantine_report_lists_every_quarantined_record(faulty_hospital, tmp_path):
    root, expected = faulty_hospital
    report = ingest(root, tmp_path, config=SERIAL, progress=False)
    text = (tmp_path / QUARANTINE_FILE).read_text()
    assert f"Seen **{report.seen}** = accepted **{report.accepted}** + quarantined **{report.quarantined}**" in text
    for key, outcome in expected.items():
        if outcome != ACCEPTED:
            assert f"| {key} | {outcome} |" in text
    # the two reasons a record that reads fine can still be quarantined for, named in the detail
    detail = read_manifest(tmp_path).set_index("id")["detail"]
    assert re.fullmatch(  # V3's electrode off: the amplifier's offset and noise, a near-flat line
        rf"{re.escape(str(root))}/F_lead_off\.hea: signal quality: V3: flat \(peak-to-peak 0\.0\d\d mV < 0\.05 mV: "
        r"an electrode off\?\)",
        detail["F_lead_off"],
    ), detail["F_lead_off"]
    assert detail["F_unknown_label"].startswith(f"{root}/F_unknown_label.hea: # Dx token(s) 'AFIB' are not SNOMED CT")
    assert report.unknown_codes == {"AFIB": 1}
    assert "| AFIB | 1 |" in text and "1 tokens that are not SNOMED CT codes (quarantined as unknown_label)" in text


def test_signal_quality_and_unknown_labels_are_quarantined_not_learnt(tmp_path, ecg_records_dir):
    """Real records ingested with faults injected: an electrode off (a near-flat lead) and a clipped
    lead fail the signal-quality check, # Dx tokens that are not SNOMED CT concept ids (text, an
    abbreviation, a code with a wrong check digit) are unknown labels; valid SNOMED CT codes
    outside the scored classes are kept, and so is a record with a lead not recorded (all zeros),
    with a note. Every record is accounted for."""
    src = tmp_path / "src"
    x = read_record_file(ecg_records_dir / "E07500.hea").signal
    write_wfdb(src, "clean", x, 500.0, dx=["426783006", "67741000119109"])  # an unscored extension concept
    write_wfdb(src, "unrecorded", zero_lead(x, "V5"), 500.0)
    write_wfdb(src, "lead_off", electrode_off(x, "V5"), 500.0)
    write_wfdb(src, "clipped", clip_lead(x, "aVF"), 500.0)
    write_wfdb(src, "text_dx", x, 500.0, dx=["426783006", "AFIB"])
    write_wfdb(src, "abbreviation", x, 500.0, dx=["AF"])
    write_wfdb(src, "typo", x, 500.0, dx=["164889004"])  # 164889003 (AF) with its last digit wrong
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.quarantined) == (7, 2, 5)
    assert report.by_reason == {"signal_quality": 2, "unknown_label": 3}
    m = read_manifest(tmp_path / "ing").set_index("id")
    assert (m.loc["clean", "status"], m.loc["clean", "unscored"]) == (ACCEPTED, "67741000119109")
    # a lead not recorded: accepted, the reader's "flat lead(s) V5" note replaced by the check's
    assert (m.loc["unrecorded", "status"], m.loc["unrecorded", "notes"]) == (
        ACCEPTED,
        "signal quality: V5 not recorded (all samples 0)",
    )
    assert "signal quality: V5: flat (peak-to-peak 0.0" in m.loc["lead_off", "detail"]
    assert "signal quality: aVF: clipped: " in m.loc["clipped", "detail"]
    assert "'AFIB' are not SNOMED CT concept ids" in m.loc["text_dx", "detail"]
    assert "'AF' (did you mean 164889003, AF?)" in m.loc["abbreviation", "detail"]
    assert "'164889004'" in m.loc["typo", "detail"]
    # what the header says is still in the manifest; nothing of it is learnt
    assert m.loc["text_dx", "labels"] == "426783006" and m.loc["text_dx", "unknown"] == "AFIB"
    assert report.unknown_codes == {"AFIB": 1, "AF": 1, "164889004": 1}
    text = (tmp_path / "ing" / QUARANTINE_FILE).read_text()
    assert "## Accepted with signal-quality notes" in text
    assert "| unrecorded | unrecorded.hea | signal quality: V5 not recorded (all samples 0) |" in text
    # ingesting the same folder with the check off (IngestConfig(quality=None)): the signals are
    # accepted, with the reader's notes only
    lenient = ingest(src, tmp_path / "ing2", config=IngestConfig(workers=1, quality=None), progress=False)
    assert lenient.by_reason == {"unknown_label": 3}
    assert read_manifest(tmp_path / "ing2").set_index("id").loc["unrecorded", "notes"] == "flat lead(s) V5"


def test_the_real_fixture_records_through_ingestion(tmp_path, ecg_records_dir):
    """The 35 real records are all accepted; the two whose V2, V4 and V6 are all zeros (not
    recorded) with the note, in the manifest and in quarantine.md."""
    report = ingest(ecg_records_dir, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.by_reason) == (35, 35, {})
    m = read_manifest(tmp_path / "ing").set_index("id")
    noted = m[m["notes"].str.contains("signal quality: ", regex=False)]
    assert sorted(noted.index) == ["JS20004", "JS20008"]
    assert (noted["notes"] == "signal quality: V2, V4, V6 not recorded (all samples 0)").all()
    text = (tmp_path / "ing" / QUARANTINE_FILE).read_text()
    for name in ("JS20004", "JS20008"):
        assert f"| {name} | {name}.hea | signal quality: V2, V4, V6 not recorded (all samples 0) |" in text


def test_incremental_rerun_reads_only_new_records(tmp_path, spy_reads):
    src = tmp_path / "src"
    generate(src, SynthConfig(records=30, seed=4), workers=1, progress=False)
    first = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (first.read, first.reused, first.accepted) == (30, 0, 30)

    opened = spy_reads(LocalSource)
    generate(src / "batch2", SynthConfig(records=5, seed=4, start=30), workers=1, progress=False)
    second = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (second.seen, second.read, second.reused, second.accepted) == (35, 5, 30, 35)
    assert sorted({k.rsplit(".", 1)[0] for k in opened}) == [f"batch2/S{i:05d}" for i in range(30, 35)]

    # a touched file (new mtime, same bytes) is hashed again but not parsed
    opened.clear()
    os.utime(src / "S00003.hea", (1, 1))
    third = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (third.read, third.reused) == (0, 35)
    assert sorted(opened) == ["S00003.hea", "S00003.mat"]
    assert len(read_manifest(tmp_path / "ing")) == 35


def test_changed_record_is_read_again_and_duplicates_across_sources(tmp_path):
    a = tmp_path / "a"
    generate(a, SynthConfig(records=4, seed=1), workers=1, progress=False)
    ingest(a, tmp_path / "ing", config=SERIAL, progress=False)
    # same file, new content
    shutil.copy(a / "S00001.mat", a / "S00000.mat")
    report = ingest(a, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.read == 1 and report.by_reason == {"header_signal_mismatch": 1}
    # another hospital reusing a record id (other content): kept, under its own site
    b = tmp_path / "b"
    generate(b, SynthConfig(records=1, seed=99, start=2), workers=1, progress=False)
    report = ingest(b, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-b")
    assert report.by_reason == {} and report.accepted == 1 and report.site == "hospital-b"
    manifest = read_manifest(tmp_path / "ing")
    assert len(manifest) == 5 and set(manifest["source"]) == {str(a), str(b)}
    assert sorted(record_key(s, i) for s, i in zip(manifest["site"], manifest["id"], strict=True)) == [
        "S00000",
        "S00001",
        "S00002",
        "S00003",
        "hospital-b/S00002",
    ]


def test_moved_and_removed_records(tmp_path):
    src = tmp_path / "src"
    generate(src, SynthConfig(records=6, seed=8), workers=1, progress=False)
    ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    (src / "moved").mkdir()
    for suffix in (".hea", ".mat"):
        (src / f"S00001{suffix}").rename(src / "moved" / f"S00001{suffix}")
        (src / f"S00002{suffix}").unlink()
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.read) == (5, 5, 0)  # the move is recognised by its hash
    manifest = read_manifest(tmp_path / "ing")
    assert sorted(manifest["key"]) == ["S00000.hea", "S00003.hea", "S00004.hea", "S00005.hea", "moved/S00001.hea"]
    # a copy of an accepted record appearing elsewhere is a duplicate, the original stays accepted
    shutil.copytree(src / "moved", src / "again")
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.by_reason == {"duplicate_id": 1} and report.read == 0
    assert report.duplicates == {"again/S00001.hea": "moved/S00001"}
    row = read_manifest(tmp_path / "ing").set_index("key").loc["again/S00001.hea"]
    assert row["detail"] == f"{src}/again/S00001.hea: identical copy of moved/S00001 ({src}/moved/S00001.hea)"
    assert "| again/S00001.hea | moved/S00001 |" in (tmp_path / "ing" / QUARANTINE_FILE).read_text()
    assert ingest(src, tmp_path / "ing", config=SERIAL, progress=False).read == 0  # nothing new
    # when the owner goes, the copy takes over the id (its own outcome comes back by hash)
    shutil.rmtree(src / "moved")
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.read) == (5, 5, 0)


def test_symlink_out_of_the_source_is_refused(tmp_path, ecg_records_dir):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ecg_records_dir / "E07500.hea", src)
    shutil.copy(ecg_records_dir / "E07500.mat", src)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(ecg_records_dir / "E07501.hea", outside)
    (src / "E07501.hea").symlink_to(outside / "E07501.hea")
    shutil.copy(ecg_records_dir / "E07502.hea", src)  # a header whose signal file points outside
    shutil.copy(ecg_records_dir / "E07502.mat", outside)
    (src / "E07502.mat").symlink_to(outside / "E07502.mat")
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.accepted == 1 and report.by_reason == {"unsafe_path": 2}
    details = read_manifest(tmp_path / "ing").set_index("id")["detail"]
    assert "symbolic link out of the source folder" in details["E07501"]
    assert "resolves outside the source folder" in details["E07502"]
