"""Reading a version's calibration from a verified audit log (:mod:`pipeline.registry.calibration`):
the last signed ``calibrate`` entry for that version wins, another version's never applies, and
an entry whose calibration does not match its digest or the model's classes is refused."""

from __future__ import annotations

import numpy as np
import pytest

from ml.eval.calibration import CalibrationConfig, calibrate
from pipeline.registry.audit import AuditEntry, evidence_digest
from pipeline.registry.calibration import (
    CALIBRATE,
    EVIDENCE_KEY,
    CalibrationMismatchError,
    calibration_entry,
    calibration_of,
    calibration_payload,
)

CLASSES = ["164889003", "426783006"]  # AF, NSR


def a_calibration(seed: int, alpha: float = 0.1):
    rng = np.random.default_rng(seed)
    labels = rng.random((200, 2)) < 0.3
    probs = np.clip(labels * 0.5 + rng.random((200, 2)) * 0.5, 0, 1)
    return calibrate(probs, labels, CLASSES, [0.5, 0.5], CalibrationConfig(target_miss_rate=alpha, critical=("AF",)))


def entry(version: str, calibration, seq: int, **overrides) -> AuditEntry:
    payload = calibration_payload(calibration)
    fields = {
        "model": "m",
        "action": CALIBRATE,
        "versions": {"calibrated": version},
        "reason": "r",
        "metrics": {"calibration": payload},
        "who": "alice",
        "seq": seq,
        "evidence": {EVIDENCE_KEY: evidence_digest(payload)},
    }
    return AuditEntry(**(fields | overrides))


def test_the_last_calibration_of_the_version_is_read_and_other_versions_are_not():
    first, second, other = a_calibration(0), a_calibration(1, alpha=0.2), a_calibration(2)
    log = [entry("1", first, 1), entry("2", other, 2), entry("1", second, 3)]
    assert calibration_of(log, "1", CLASSES) == second
    assert calibration_of(log, "2", CLASSES) == other
    assert calibration_of(log, "3", CLASSES) is None and calibration_entry(log, "3") is None
    assert calibration_entry(log, "1").seq == 3
    promote = AuditEntry(model="m", action="promote", versions={"calibrated": "4"}, reason="", seq=4)
    assert calibration_of([*log, promote], "4", CLASSES) is None  # only calibrate entries count


def test_a_calibration_that_does_not_match_its_digest_or_the_classes_is_refused():
    good, other = a_calibration(0), a_calibration(1, alpha=0.2)
    swapped = entry("1", good, 1, metrics={"calibration": calibration_payload(other)})
    with pytest.raises(CalibrationMismatchError, match="does not match its signed digest"):
        calibration_of([swapped], "1", CLASSES)
    with pytest.raises(CalibrationMismatchError, match="the model predicts"):
        calibration_of([entry("1", good, 1)], "1", list(reversed(CLASSES)))
    broken = {"schema_version": 99}
    unusable = entry("1", good, 1, metrics={"calibration": broken}, evidence={EVIDENCE_KEY: evidence_digest(broken)})
    with pytest.raises(CalibrationMismatchError, match="not a usable calibration"):
        calibration_of([unusable], "1", CLASSES)
