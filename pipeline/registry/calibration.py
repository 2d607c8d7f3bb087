"""A model version's calibration as an audited, signed registry change (no retraining).

``cessl calibrate`` fits the calibrated answers of :mod:`ml.eval.calibration` (per class:
present / absent / refer, with a conformal miss-rate bound for the critical classes) on a
calibration split and records them here: one **signed** ``calibrate`` entry in the model's
audit log (:mod:`pipeline.registry.audit`), made by a release manager (the same permission and
key as a promotion). The entry carries the whole calibration (``metrics["calibration"]``), its
digest (``evidence["calibration"]``), the version it is for (``versions["calibrated"]``), what
it was fitted on (records, their source, the refer rate there) and the champion unchanged: it is a
decision about how a version answers, never about which version is champion.

Reading (:func:`signed_calibration`) happens only on a **verified** log (chain, signatures, head and
anchor checked by :mod:`pipeline.registry.verify`): the last ``calibrate`` entry for the version
served wins, its digest is recomputed from the calibration it holds, and its classes must be
the model's. A version tag (``cessl.calibration``) names that entry for people browsing the
registry; nothing trusts it. A version never calibrated answers with its fitted thresholds
(present / absent), as before; a new champion starts uncalibrated (calibration is per
version: a different model's probabilities need their own), a rollback finds the restored
version's calibration again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ml.eval.calibration import CalibrationSet
from pipeline.registry.audit import AuditEntry, evidence_digest, record
from pipeline.registry.decision_lock import decision_lock
from pipeline.registry.policy import RegistryError, decider, verified_state
from pipeline.registry.tracking import tagged_classes

if TYPE_CHECKING:
    from pipeline.registry.signing import Signer, Trust

log = logging.getLogger(__name__)

CALIBRATE = "calibrate"  # the audit action (pipeline.registry.audit.DECISIONS)
TAG_CALIBRATION = "cessl.calibration"  # on the version: {"seq", "digest"} of its entry (a pointer, not trusted)
EVIDENCE_KEY = "calibration"


class CalibrationMismatchError(RegistryError):
    """A signed calibration entry whose digest or classes do not match what it claims."""


@dataclass(frozen=True)
class CalibrationFit:
    """What a calibration was fitted on (recorded beside it in the signed entry)."""

    records: int  # readable, labelled calibration records
    unreadable: int
    source: str  # where they came from (a folder, or the champion's test split of run R)
    refer_rate: float  # share of calibration records with at least one class answered "refer"
    observed_miss: dict[str, float]  # per critical class: misses / positives on the calibration split


def calibration_payload(calibration: CalibrationSet) -> dict[str, Any]:
    """The calibration as the JSON object the entry holds (and its digest covers)."""
    return json.loads(calibration.to_json())


def record_calibration(
    client,
    name: str,
    version: str,
    calibration: CalibrationSet,
    fit: CalibrationFit,
    reason: str = "",
    signer: Signer | None = None,
    trust: Trust | None = None,
) -> AuditEntry:
    """Record ``calibration`` for ``name`` v``version`` as a signed ``calibrate`` decision (the
    caller must hold the release manager's permission and key); the entry recorded."""
    by = decider(client, name, CALIBRATE, signer, trust)  # before any change
    with decision_lock(client, name, by.who):
        state = verified_state(client, name, by.trust)
        classes = tagged_classes(client.get_model_version(name, version))
        if classes and classes != calibration.codes:
            raise RegistryError(
                f"{name} v{version} predicts {classes}; the calibration is for {calibration.codes}: re-calibrate it"
            )
        payload = calibration_payload(calibration)
        entry = record(
            client,
            AuditEntry(
                model=name,
                action=CALIBRATE,
                versions={"calibrated": str(version)},
                reason=reason or f"calibrated v{version} on {fit.records} records of {fit.source}",
                metrics={"calibration": payload, "fit": fit.__dict__},
                who=by.who,
                champion=dict(state.expected),  # unchanged: calibration never moves champion
                evidence={EVIDENCE_KEY: evidence_digest(payload)},
            ),
            by.signer,
        )
        client.set_model_version_tag(
            name, str(version), TAG_CALIBRATION, json.dumps({"seq": entry.seq, "digest": entry.digest()})
        )
    return entry


def calibration_entry(entries: list[AuditEntry], version: str) -> AuditEntry | None:
    """The last signed ``calibrate`` entry of a verified log for ``version`` (None: never calibrated)."""
    return next(
        (
            e
            for e in reversed(entries)
            if e.format >= 2 and e.action == CALIBRATE and e.versions.get("calibrated") == str(version)
        ),
        None,
    )


def signed_calibration(
    entries: list[AuditEntry], version: str, classes: list[str]
) -> tuple[CalibrationSet | None, AuditEntry | None]:
    """``version``'s calibration from its **verified** log ``entries`` and the entry that signed
    it; (None, None) when it has none; CalibrationMismatchError when the entry's digest or
    classes do not hold."""
    entry = calibration_entry(entries, version)
    if entry is None:
        return None, None
    payload = entry.metrics.get("calibration")
    where = f"{entry.model} audit entry #{entry.seq} (calibrate v{version} by {entry.who})"
    if not isinstance(payload, dict) or evidence_digest(payload) != entry.evidence.get(EVIDENCE_KEY):
        raise CalibrationMismatchError(f"{where}: its calibration does not match its signed digest")
    try:
        calibration = CalibrationSet.from_json(json.dumps(payload))
    except (ValueError, KeyError, TypeError) as err:
        raise CalibrationMismatchError(f"{where}: not a usable calibration ({err})") from err
    if calibration.codes != list(classes):
        raise CalibrationMismatchError(f"{where}: calibrated for {calibration.codes}, the model predicts {classes}")
    return calibration, entry


def calibration_of(entries: list[AuditEntry], version: str, classes: list[str]) -> CalibrationSet | None:
    """The calibration of :func:`signed_calibration` alone."""
    return signed_calibration(entries, version, classes)[0]
