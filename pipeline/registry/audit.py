"""Append-only audit log of registry decisions (promote, refuse, force, rollback, calibrate, alias moves).

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

Chained and signed (format 2): every entry carries ``prev``, the :func:`digest` (SHA-256 of
the canonical JSON) of the entry before it in the model's log ("" for the first), and its
``seq``; a **decision** (:data:`DECISIONS`: promote, force, rollback, refuse, insufficient: too
few records to decide; calibrate: a version's calibrated answers) also names the champion after it (``champion``: version, run id,
backbone, classes, test-set version), the digests of its evidence (``evidence``) and carries
``signature``, the decider's Ed25519 signature over the entry without it
(:mod:`pipeline.registry.signing`). The pipeline's entries
(``challenger``, ``testset_*``) and the monitor's ``drift`` reports are chained but unsigned. :mod:`pipeline.registry.verify`
checks all of it on every read.

:func:`history` reads the runs (the source of truth), oldest first. The version tags that
``pipeline.registry.policy`` writes keep the last decision for convenience only.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.registry.signing import Signer, SigningError

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
# On the registered model the decision is about: {"seq", "digest"} of its last decision, set by
# the decider, who may write that model (the pipeline identity may not: `cessl access init`);
# a log that ends before it was cut (pipeline.registry.verify).
TAG_HEAD = "cessl.audit.head"
ACTIONS = (
    "promote",
    "refuse",
    "insufficient",
    "force",
    "rollback",
    "calibrate",
    "drift",
    "challenger",
    "testset_freeze",
    "testset_refresh",
)
# signed by a release manager (calibrate: how a version answers, pipeline.registry.calibration)
DECISIONS = ("promote", "refuse", "insufficient", "force", "rollback", "calibrate")
CHAMPION_ACTIONS = ("promote", "force", "rollback")  # the decisions that make a version champion
FORMAT = 2  # chained + signed; entries without a format field are the older, unchained kind (1)


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
    champion: dict[str, str] = field(default_factory=dict)  # a decision: the champion after it ({} none)
    evidence: dict[str, str] = field(default_factory=dict)  # a decision: what -> sha256 of its evidence
    prev: str = ""  # digest of the previous entry of the model's log, set when recorded
    signature: str = ""  # a decision: the decider's Ed25519 signature of payload()
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"audit action {self.action!r} is not one of {ACTIONS}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{"format": 1, **fields})  # no format field: written before the chain existed

    def line(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, default=str)

    @property
    def is_decision(self) -> bool:
        return self.action in DECISIONS

    def payload(self) -> bytes:
        """What the signature covers: the canonical JSON of every field but the signature."""
        data = self.to_json()
        data.pop("signature")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")

    def digest(self) -> str:
        """SHA-256 of the whole entry's canonical JSON, signature included (the next entry's ``prev``)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def evidence_digest(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (a decision's ``evidence`` entries)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def _seq(run) -> int:
    try:
        return int(run.data.tags.get(TAG_SEQ, 0))
    except ValueError:  # an edited tag: ordered first, the chain check names it
        return 0


def _sorted(runs: list) -> list:
    return sorted(runs, key=lambda r: (_seq(r), r.info.start_time))


def audit_runs(client, model: str | None = None) -> dict[str, list]:
    """model -> its audit runs (oldest first); every model's, or only ``model``'s."""
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return {}
    where = f"tags.`{TAG_MODEL}` = '{model}'" if model is not None else ""
    runs = client.search_runs([experiment.experiment_id], filter_string=where, max_results=50000)
    by_model: dict[str, list] = {}
    for run in runs:
        by_model.setdefault(run.data.tags.get(TAG_MODEL, ""), []).append(run)
    return {name: _sorted(found) for name, found in by_model.items() if name}


def _runs(client, model: str) -> list:
    return audit_runs(client, model).get(model, [])


def read_artifact(client, run_id: str, path: str) -> str | None:
    """The text of a run's artifact, or None when it cannot be read."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="cessl-audit-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8")
        except (MlflowException, OSError, UnicodeDecodeError):
            return None


def run_entry(client, run) -> AuditEntry:
    """The entry an audit run holds (its tag, else its ``decision.json``); ValueError if neither parses."""
    raw = run.data.tags.get(TAG_ENTRY) or read_artifact(client, run.info.run_id, DECISION_FILE)
    if not raw:
        raise ValueError(f"audit run {run.info.run_id} holds no entry")
    try:
        return AuditEntry.from_json(json.loads(raw))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"audit run {run.info.run_id}: its entry is not valid ({err})") from None


def history(client, model: str) -> list[AuditEntry]:
    """Every recorded decision about ``model``, oldest first (unverified: see
    :mod:`pipeline.registry.verify`)."""
    return [run_entry(client, run) for run in _runs(client, model)]


def _normalized(entry: AuditEntry) -> AuditEntry:
    """The entry as it reads back (JSON types only), so that its digest and signature hold."""
    return AuditEntry.from_json(json.loads(entry.line()))


def _set_head(client, entry: AuditEntry) -> None:
    """Name ``entry`` (a decision) the head of its model's log on the registered model itself."""
    from mlflow.exceptions import MlflowException

    head = json.dumps({"seq": entry.seq, "digest": entry.digest()}, sort_keys=True)
    try:
        client.set_registered_model_tag(entry.model, TAG_HEAD, head)
    except MlflowException as err:  # no such model yet (a refusal before any champion), or not writable
        log.warning("audit: %s: the head of its log is not on the model (%s)", entry.model, err.error_code)


def head_of(client, model: str) -> dict | None:
    """The ``{"seq", "digest"}`` that the registered model names as its log's head, if any."""
    from mlflow.exceptions import MlflowException

    try:
        raw = (client.get_registered_model(model).tags or {}).get(TAG_HEAD)
    except MlflowException:
        return None
    if not raw:
        return None
    try:
        head = json.loads(raw)
    except json.JSONDecodeError:
        head = None
    return head if isinstance(head, dict) else {"seq": 0, "digest": f"unreadable {str(raw)[:40]!r}"}


def record(client, entry: AuditEntry, signer: Signer | None = None) -> AuditEntry:
    """Append ``entry`` to the model's audit log (an MLflow run + the JSON-lines file), chained
    to the previous entry and, for a decision, signed with ``signer`` (required then)."""
    if entry.is_decision and signer is None:
        raise SigningError(f"a {entry.action} decision must be signed: no signing key given")
    tracking_uri = _tracking_uri(client)
    authenticated = authenticated_name(tracking_uri)
    if authenticated:  # the identity the server checked for this very write, not a claim
        entry.who = authenticated
    previous = history(client, entry.model)
    entry.seq = len(previous) + 1
    entry.prev = previous[-1].digest() if previous else ""
    entry.format = FORMAT
    entry = _normalized(entry)
    if signer is not None:
        entry.signature = signer.sign(entry.payload())
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
    if entry.is_decision:
        _set_head(client, entry)
    local = local_log_path(tracking_uri, entry.model)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "a", encoding="utf-8") as f:  # append only
            f.write(entry.line() + "\n")
    log.debug(
        "audit: %s %s %s by %s: %s", entry.model, entry.action, entry.versions, entry.who, entry.reason
    )  # the command prints the decision
    return entry
