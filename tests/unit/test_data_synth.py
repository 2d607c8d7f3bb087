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
    SynthConfig,
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
    with pytest.raises(ValueError, match="no synthetic model for QAb"):
        SynthConfig(classes=("QAb",))
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
