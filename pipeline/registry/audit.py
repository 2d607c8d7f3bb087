"""Append-only audit log of registry decisions (promote, refuse, force, rollback, alias moves).

Every decision is one :class:`AuditEntry` (who, when, model, versions, action, the numbers,
why), written twice, never overwritten:

- as its own small MLflow run in the experiment ``cessl-audit`` (tags ``cessl.audit.*`` and
  the artifact ``decision.json``; the run also carries ``audit.jsonl``, the model's history up
  to and including this entry, so the newest run always holds the full log as JSON lines
  and no earlier object is ever rewritten - this works on any artifact store, S3 included);
- appended as one JSON line to ``<store folder>/audit/<model>.jsonl`` when the tracking
  store is a local SQLite/file store (opened in append mode only).

``who`` is, on an MLflow server, the user whose credentials the server authenticated for the
write (``MLFLOW_TRACKING_USERNAME``); on a local store ``$CESSL_USER`` or the OS user.

:func:`history` reads the runs (the source of truth), oldest first. The version tags that
``pipeline.registry.policy`` writes keep the last decision for convenience only.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_EXPERIMENT = "cessl-audit"
USER_ENV = "CESSL_USER"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
DECISION_FILE = "decision.json"
LOG_FILE = "audit.jsonl"
TAG_MODEL = "cessl.audit.model"
TAG_ACTION = "cessl.audit.action"
TAG_WHO = "cessl.audit.who"
TAG_SEQ = "cessl.audit.seq"
TAG_ENTRY = "cessl.audit.entry"  # the entry as JSON when it fits in a tag (else: decision.json)
MAX_TAG = 5000
ACTIONS = ("promote", "refuse", "force", "rollback", "challenger", "testset_freeze", "testset_refresh")


def authenticated_name(tracking_uri: str) -> str:
    """The MLflow user a server authenticates this process's writes as
    (``$MLFLOW_TRACKING_USERNAME``), or "" for a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    return os.environ.get(USERNAME_ENV, "").strip()


def current_user() -> str:
    """Who decides: ``$CESSL_USER``, else the OS user name (a local store; on an MLflow
    server :func:`record` names the authenticated user instead)."""
    user = os.environ.get(USER_ENV, "").strip()
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


@dataclass
class AuditEntry:
    """One registry decision."""

    model: str
    action: str  # one of ACTIONS
    versions: dict[str, str]  # role -> version, e.g. {"challenger": "3", "champion": "2"}
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    who: str = field(default_factory=current_user)
    at: str = field(default_factory=_now)
    seq: int = 0  # position in the model's log (1-based), set when recorded

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"audit action {self.action!r} is not one of {ACTIONS}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def line(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, default=str)


def _tracking_uri(client) -> str:
    return client._tracking_client.tracking_uri


def local_log_path(tracking_uri: str, model: str) -> Path | None:
    """``<store folder>/audit/<model>.jsonl`` for a local SQLite or file store, else None."""
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri.removeprefix("sqlite:///")).parent
    elif tracking_uri.startswith("file://"):
        root = Path(tracking_uri.removeprefix("file://"))
    elif "://" not in tracking_uri and tracking_uri:
        root = Path(tracking_uri)
    else:
        return None
    return root / "audit" / f"{model}.jsonl"


def _experiment_id(client, tracking_uri: str) -> str:
    from pipeline.registry.store import TrackingConfig, ensure_experiment

    return ensure_experiment(TrackingConfig.resolve(tracking_uri, experiment_name=AUDIT_EXPERIMENT))


def _runs(client, model: str) -> list:
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_MODEL}` = '{model}'",
        max_results=50000,
    )
    return sorted(runs, key=lambda r: (int(r.data.tags.get(TAG_SEQ, 0)), r.info.start_time))


def history(client, model: str) -> list[AuditEntry]:
    """Every recorded decision about ``model``, oldest first."""
    entries = []
    for run in _runs(client, model):
        raw = run.data.tags.get(TAG_ENTRY)
        if raw:
            entries.append(AuditEntry.from_json(json.loads(raw)))
        else:  # too long for a tag: the run's decision.json
            with tempfile.TemporaryDirectory(prefix="cessl-audit-") as tmp:
                path = client.download_artifacts(run.info.run_id, DECISION_FILE, tmp)
                entries.append(AuditEntry.from_json(json.loads(Path(path).read_text(encoding="utf-8"))))
    return entries


def record(client, entry: AuditEntry) -> AuditEntry:
    """Append ``entry`` to the model's audit log (an MLflow run + the JSON-lines file)."""
    tracking_uri = _tracking_uri(client)
    authenticated = authenticated_name(tracking_uri)
    if authenticated:  # the identity the server checked for this very write, not a claim
        entry.who = authenticated
    previous = history(client, entry.model)
    entry.seq = len(previous) + 1
    experiment_id = _experiment_id(client, tracking_uri)
    run = client.create_run(
        experiment_id,
        run_name=f"{entry.model}-{entry.seq:05d}-{entry.action}",
        tags={
            TAG_MODEL: entry.model,
            TAG_ACTION: entry.action,
            TAG_WHO: entry.who,
            TAG_SEQ: str(entry.seq),
            TAG_ENTRY: entry.line() if len(entry.line()) <= MAX_TAG else "",
            **{f"cessl.audit.version.{role}": v for role, v in entry.versions.items()},
        },
    )
    run_id = run.info.run_id
    client.log_dict(run_id, entry.to_json(), DECISION_FILE)
    with tempfile.TemporaryDirectory(prefix="cessl-audit-") as tmp:
        path = Path(tmp) / LOG_FILE
        path.write_text("".join(e.line() + "\n" for e in [*previous, entry]), encoding="utf-8")
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    local = local_log_path(tracking_uri, entry.model)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "a", encoding="utf-8") as f:  # append only
            f.write(entry.line() + "\n")
    log.debug(
        "audit: %s %s %s by %s: %s", entry.model, entry.action, entry.versions, entry.who, entry.reason
    )  # the command prints the decision
    return entry
