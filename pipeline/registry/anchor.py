"""The auditor's anchor: how far each audit log had verified, kept where no decider can write.

The head tag on a production model (``cessl.audit.head``, :mod:`pipeline.registry.verify`)
catches a log cut after its last decision, unless whoever cuts it may also write that model: a
release manager (``MANAGE`` there, ``EDIT`` on the audit experiment) can delete the newest
audit runs and set the head back to the entry before them, and a fresh reader would find a
consistent, shorter log. The **auditor** (``cessl access init --auditor USER``; the audit
CronJob's identity) closes that: ``cessl audit verify --anchor`` records, after a log
verified, its length and the digest of its last entry as a tag of the experiment
:data:`ANCHOR_EXPERIMENT`, which only the auditor (and the admin) may write; release managers
and the pipeline have ``READ`` there. Every verification then checks that the log still holds
the anchored entry where the anchor says: a log cut or rewritten behind the auditor's last
check is caught by every reader, a fresh one included. An anchor only moves forward (it is
written only for a log that verified, which holds the previous anchor).

On a local store there are no users: the anchor is written and checked the same way, but
whoever can write the store can write it too (there the append-only file is the witness).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from pipeline.registry.audit import AuditEntry

log = logging.getLogger(__name__)

ANCHOR_EXPERIMENT = "cessl-audit-anchors"
TAG_PREFIX = "cessl.anchor."


@dataclass(frozen=True)
class Anchor:
    """The log's length and last digest when the auditor last verified it."""

    seq: int
    digest: str
    at: str = ""
    by: str = ""

    def text(self) -> str:
        who = f" by {self.by}" if self.by else ""
        return f"entry #{self.seq} ({self.digest[:12]}), verified at {self.at or '?'}{who}"


def _tag(model: str) -> str:
    return f"{TAG_PREFIX}{model}"


def anchor_of(client, model: str) -> Anchor | None:
    """The anchor of ``model``'s log (None: never anchored)."""
    experiment = client.get_experiment_by_name(ANCHOR_EXPERIMENT)
    raw = None if experiment is None else (experiment.tags or {}).get(_tag(model))
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Anchor(int(data["seq"]), str(data["digest"]), str(data.get("at", "")), str(data.get("by", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return Anchor(0, f"unreadable {str(raw)[:40]!r}")


def anchor_problem(anchor: Anchor | None, entries: list[AuditEntry]) -> str:
    """Why ``entries`` do not hold the anchored entry where the anchor says ("" if they do)."""
    if anchor is None:
        return ""
    held = entries[anchor.seq - 1] if 0 < anchor.seq <= len(entries) else None
    if held is None:
        return (
            f"the auditor's anchor names {anchor.text()}, but the log ends at entry #{len(entries)} "
            "(entries removed after the auditor's check)"
        )
    if held.digest() != anchor.digest:
        return f"the auditor's anchor names {anchor.text()}, the log holds {held.digest()[:12]} there (rewritten)"
    return ""


def write_anchor(client, model: str, entries: list[AuditEntry], by: str) -> Anchor | None:
    """Anchor ``model``'s verified log at its last entry (None: an empty log, nothing to anchor).
    MlflowException (PERMISSION_DENIED on a server) when the caller is not the auditor."""
    if not entries:
        return None
    experiment = client.get_experiment_by_name(ANCHOR_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(ANCHOR_EXPERIMENT)
    last = entries[-1]
    anchor = Anchor(len(entries), last.digest(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), by)
    client.set_experiment_tag(experiment_id, _tag(model), json.dumps(asdict(anchor), sort_keys=True))
    log.debug("audit: %s anchored at %s", model, anchor.text())
    return anchor
