"""Synthetic hospitals: deterministic bytes, real WFDB, learnable class features, speed."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from ml.data.labels import LabelMapping
from ml.data.records import STANDARD_LEADS, read_record_file
from ml.data.synth import (
    DEFAULT_CLASSES,
    DIPOLE_TO_LEAD,
    IRBBB,
    MORPHOLOGY_PROB,
    NSIVCB,
    NSR,
    PRWP,
    QAB,
    R_W,
    RP_W,
    SynthConfig,
    _render_dipole,
    _wave_parameters,
    generate,
    synthesize_record,
)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_deterministic_bytes_whatever_the_batching(tmp_path):
    config = SynthConfig(records=24, seed=42, unlabelled_fraction=0.3)
    generate(tmp_path / "a", config, faults=True, workers=1, chunk_size=5, progress=False)
    generate(tmp_path / "b", config, faults=True, workers=2, chunk_size=7, progress=False)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    generate(tmp_path / "c", SynthConfig(records=24, seed=43), workers=1, progress=False)
    assert (tmp_path / "a" / "S00003.mat").read_bytes() != (tmp_path / "c" / "S00003.mat").read_bytes()
    # record i does not depend on how many records the hospital has
    assert np.array_equal(
        synthesize_record(5, config).signal,
        synthesize_record(5, SynthConfig(records=6, seed=42, unlabelled_fraction=0.3)).signal,
    )
    text = (tmp_path / "a" / "S00000.hea").read_text()
    assert text.splitlines()[0] == "S00000 12 500 5000"  # no date/time in the record line


def test_records_are_challenge_format_wfdb(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb
    config = SynthConfig(records=6, seed=1, unlabelled_fraction=0.5)
    summary = generate(tmp_path, config, workers=1, progress=False)
    assert summary.records == 6
    for i in range(6):
        expected = synthesize_record(i, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = wfdb.rdrecord(str(tmp_path / expected.record_id))
        assert rec.sig_name == list(STANDARD_LEADS) and rec.fs == 500 and rec.units == ["mV"] * 12
        np.testing.assert_allclose(rec.p_signal.T, expected.signal, atol=0.0006)  # 1 uV steps
        ours = read_record_file(tmp_path / f"{expected.record_id}.hea")
        assert ours.dx == (expected.labels if expected.labelled else None)
        np.testing.assert_allclose(ours.signal, rec.p_signal.T, atol=1e-6)


def test_labels_follow_the_requested_classes():
    mapping = LabelMapping.from_csv()
    config = SynthConfig(records=300, seed=3, classes=("AF", "PVC", "LAD"))
    assert config.classes == ("164889003", "17338001", "39732003")
    seen = set()
    for i in range(300):
        seen.update(synthesize_record(i, config).labels)
    assert seen == set(config.classes)
    with pytest.raises(ValueError, match="no synthetic model for AFL"):
        SynthConfig(classes=("AFL",))
    assert mapping.abbreviations(DEFAULT_CLASSES) == [
        "NSR",
        "SB",
        "STach",
        "AF",
        "IAVB",
        "LBBB",
        "RBBB",
        "PVC",
        "LQRSV",
        "TInv",
    ]


def test_morphology_findings_draw_from_their_own_stream():
    """Adding the morphology classes to a hospital changes exactly the records that draw one:
    every other record keeps its labels and its signal, sample for sample."""
    base = SynthConfig(records=60, seed=7, classes=(NSR, "PVC", "LQRSV"))
    extended = SynthConfig(records=60, seed=7, classes=(*base.classes, *MORPHOLOGY_PROB))
    changed = 0
    for i in range(60):
        a, b = synthesize_record(i, base), synthesize_record(i, extended)
        found = [c for c in b.labels if c in MORPHOLOGY_PROB]
        assert b.labels[: len(a.labels)] == a.labels
        if found:
            changed += 1
            assert not np.array_equal(a.signal, b.signal)
        else:
            assert np.array_equal(a.signal, b.signal)
    assert 10 <= changed <= 45


def _beat(labels: list[str], seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One noise-free beat's 12 leads (12, n), its wave parameters drawn with ``labels``."""
    rng, morphology = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 0, 2])
    off, sig, amp = _wave_parameters(rng, labels, np.zeros(1, int), 0.8, morphology)
    t = np.arange(500) / 500.0
    leads = DIPOLE_TO_LEAD @ _render_dipole(t, np.array([0.5]), off, sig, amp, 500.0)
    return leads, sig, amp


def test_each_morphology_finding_changes_the_beat_the_way_it_reads():
    lead = {name: j for j, name in enumerate(STANDARD_LEADS)}
    normal, sig0, amp0 = _beat([NSR])
    qrs = slice(200, 300)  # R at sample 250 (0.5 s)

    # incomplete RBBB: a terminal R' toward V1, the QRS as narrow as before
    irbbb, sig1, amp1 = _beat([NSR, IRBBB])
    assert not amp0[RP_W].any() and np.linalg.norm(amp1[RP_W]) > 0.1
    assert sig1[R_W] == pytest.approx(sig0[R_W])
    assert irbbb[lead["V1"], 260:290].max() > normal[lead["V1"], 260:290].max() + 0.05

    # non-specific conduction delay: a wider QRS (0.112-0.128 s instead of 0.08-0.10 s)
    _, sig2, _ = _beat([NSR, NSIVCB])
    assert sig2[R_W, 0] / 0.11 >= 0.112 > sig0[R_W, 0] / 0.11

    # poor R-wave progression: smaller R waves across V2-V4
    prwp, _, _ = _beat([NSR, PRWP])
    for name in ("V2", "V3", "V4"):
        assert prwp[lead[name], qrs].max() < normal[lead[name], qrs].max()

    # pathological Q waves: a deeper initial deflection in some lead, before the R
    qab, _, _ = _beat([NSR, QAB])
    onset = slice(225, 250)
    assert (qab[:, onset].min(axis=1) < normal[:, onset].min(axis=1) - 0.1).any()
