"""Verify a model's audit log and its ``champion`` on every read.

:func:`verify_model` reads a registered model's audit runs (:mod:`pipeline.registry.audit`) and
checks, oldest first:

- **the chain**: each entry's ``seq`` is its position and its ``prev`` the digest of the entry
  before it (an edited, inserted, reordered or removed entry breaks it); entries of the older,
  unchained format may only precede the chain;
- **the signatures**: each decision (promote, force, rollback, refusal) is signed by the key
  that the trust file lists for its ``who`` (:mod:`pipeline.registry.signing`); the pipeline's
  unsigned entries never count as decisions;
- **the copies**: each run's ``decision.json`` and ``audit.jsonl`` (the log up to that entry)
  read back equal to the chain, and, on a local store, the append-only file
  ``<store>/audit/<model>.jsonl`` is a prefix of it (a deleted run is caught there);
- **the head**: the registered model names its log's last decision (``cessl.audit.head``,
  written by the decider, who may write the model; the pipeline identity may not): a log that
  ends before it, or holds another entry there, was cut or rewritten (hiding the last entry,
  a refusal say, breaks no link of the chain);
- **the anchor**: the log still holds the entry the auditor anchored at its last check
  (:mod:`pipeline.registry.anchor`: written where no decider may write, so a log cut or
  rewritten together with its head tag is caught too);
- **the alias**: ``champion`` is the version (and run) that the last valid decision names.

The result (:class:`Verification`) says what is wrong in one line; the champions that valid
decisions made, in order, are what :func:`pipeline.registry.policy.rollback` may go back to.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from ml.errors import EXIT_REFUSED, CesslError
from pipeline.registry.access import client_tracking_uri
from pipeline.registry.anchor import anchor_of, anchor_problem
from pipeline.registry.audit import (
    CHAMPION_ACTIONS,
    DECISION_FILE,
    LOG_FILE,
    TAG_HEAD,
    AuditEntry,
    audit_runs,
    head_of,
    local_log_path,
    read_artifact,
    run_entry,
)
from pipeline.registry.signing import Trust

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"  # pipeline.registry.tracking.CHAMPION (tracking imports the audit log)
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class AuditMismatchError(CesslError):
    """A model's audit log is broken, or its ``champion`` is not what the last valid decision named."""

    exit_code = EXIT_REFUSED


@dataclass
class Verification:
    """What :func:`verify_model` found for one registered model."""

    model: str
    entries: list[AuditEntry] = field(default_factory=list)
    broken: str = ""  # the first broken entry and why ("" none)
    champions: list[dict[str, str]] = field(default_factory=list)  # champion_stack of the valid decisions
    expected: dict[str, str] = field(default_factory=dict)  # the champion the last valid decision names
    found: str | None = None  # the version the champion alias points at (None: no alias)
    found_run: str = ""

    @property
    def expected_version(self) -> str | None:
        return self.expected.get("version") or None

    @property
    def alias_ok(self) -> bool:
        if self.found != self.expected_version:
            return False
        return not (self.found and self.expected.get("run_id") and self.found_run != self.expected["run_id"])

    @property
    def ok(self) -> bool:
        return not self.broken and self.alias_ok

    def problem(self) -> str:
        """One line: what is wrong ("" when nothing is)."""
        if self.broken:
            return f"model {self.model!r}: audit log broken: {self.broken}"
        if self.alias_ok:
            return ""
        expected = f"v{self.expected_version}" if self.expected_version else "no champion"
        found = f"v{self.found}" if self.found else "no version"
        if self.found == self.expected_version:  # same number, another run behind it
            found += f" of run {self.found_run}, not run {self.expected.get('run_id')}"
        return (
            f"model {self.model!r}: alias {CHAMPION_ALIAS!r} is {found}, but the last valid signed decision names "
            f"{expected}"
        )

    def raise_if_broken(self) -> None:
        if not self.ok:
            raise AuditMismatchError(self.problem())


def _name(entry: AuditEntry) -> str:
    return f"entry #{entry.seq} ({entry.action} by {entry.who or '?'} at {entry.at})"


def _chain_problem(entries: list[AuditEntry], model: str, trust: Trust) -> str:
    """The first broken link of the chain, or ""."""
    chained = False
    for i, entry in enumerate(entries):
        if entry.model != model:
            return f"{_name(entry)} names model {entry.model!r}"
        if entry.format < 2:
            if chained:
                return f"{_name(entry)} is unchained (no format/prev) after the chain began"
            continue
        chained = True
        if entry.seq != i + 1:
            return f"{_name(entry)} is at position {i + 1} of the log (an entry was added, removed or reordered)"
        expected_prev = entries[i - 1].digest() if i else ""
        if entry.prev != expected_prev:
            return f"{_name(entry)} does not follow the entry before it (prev digest differs: edited or removed)"
        if entry.is_decision:
            why = trust.check(entry.who, entry.payload(), entry.signature)
            if why:
                return f"{_name(entry)}: {why}"
    return ""


def _lines(text: str | None) -> list[str] | None:
    if text is None:
        return None
    try:
        return [AuditEntry.from_json(json.loads(line)).digest() for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError, ValueError):
        return None


def _one(text: str | None) -> str | None:
    """The digest of the entry a ``decision.json`` holds, or None."""
    if text is None:
        return None
    try:
        return AuditEntry.from_json(json.loads(text)).digest()
    except (json.JSONDecodeError, TypeError, ValueError):
        return None


def _copies_problem(client, runs: list, entries: list[AuditEntry]) -> str:
    """The first run whose ``decision.json`` / ``audit.jsonl`` differ from the chain, or ""."""
    digests = [e.digest() for e in entries]
    for i, (run, entry) in enumerate(zip(runs, entries, strict=True)):
        if entry.format < 2 or (i == len(runs) - 1 and run.info.status == "RUNNING"):
            continue  # the newest entry while its writer is still logging the copies
        run_id = run.info.run_id
        if _one(read_artifact(client, run_id, DECISION_FILE)) != digests[i]:
            return f"{_name(entry)}: {DECISION_FILE} of audit run {run_id} differs from the entry (overwritten?)"
        if _lines(read_artifact(client, run_id, LOG_FILE)) != digests[: i + 1]:
            return f"{_name(entry)}: {LOG_FILE} of audit run {run_id} differs from the log up to it (overwritten?)"
    return ""


def _mirror_problem(client, model: str, entries: list[AuditEntry]) -> str:
    """On a local store: the append-only file must be a prefix of the log (a deleted run shows)."""
    path = local_log_path(client_tracking_uri(client), model)
    if path is None or not path.is_file():
        return ""
    mirrored = _lines(path.read_text(encoding="utf-8"))
    if mirrored is None:
        return f"the local audit file {path} is not valid JSON lines"
    digests = [e.digest() for e in entries]
    if mirrored != digests[: len(mirrored)]:
        first = next((i for i, d in enumerate(mirrored) if i >= len(digests) or digests[i] != d), len(digests))
        return f"entry #{first + 1} of the local audit file {path} is missing or differs in the registry's log"
    return ""


def _head_problem(client, model: str, entries: list[AuditEntry]) -> str:
    """The log must hold the decision the model names as its head, where it says ("" if so)."""
    head = head_of(client, model)
    if head is None:
        return ""
    seq, digest = head.get("seq"), str(head.get("digest", ""))
    held = entries[seq - 1] if isinstance(seq, int) and 0 < seq <= len(entries) else None
    if held is None:
        return (
            f"the model's {TAG_HEAD} tag names entry #{seq} ({digest[:12]}), but the log ends at entry "
            f"#{len(entries)} (entries removed or hidden)"
        )
    if held.digest() != digest:
        return (
            f"the model's {TAG_HEAD} tag names entry #{seq} as {digest[:12]}, the log holds {held.digest()[:12]} there"
        )
    return ""


def champion_stack(entries: list[AuditEntry]) -> list[dict[str, str]]:
    """The champions that valid decisions made, as a stack: a promotion pushes, a rollback
    pops back to the champion it restored (``entries``: a verified log)."""
    stack: list[dict[str, str]] = []
    for entry in entries:
        if entry.format < 2 or entry.action not in CHAMPION_ACTIONS or not entry.champion:
            continue
        version = entry.champion.get("version")
        if entry.action == "rollback":
            while stack and stack[-1].get("version") != version:
                stack.pop()
            if not stack:
                stack.append(dict(entry.champion))
        elif not stack or stack[-1].get("version") != version:
            stack.append(dict(entry.champion))
    return stack


def _last_decision(entries: list[AuditEntry]) -> AuditEntry | None:
    return next((e for e in reversed(entries) if e.format >= 2 and e.is_decision), None)


def _alias(client, model: str) -> tuple[str | None, str]:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(model, CHAMPION_ALIAS)
    except MlflowException as err:
        if err.error_code in NOT_THERE:
            return None, ""
        raise
    return str(version.version), str(version.run_id or "")


def check_log(client, model: str, runs: list, trust: Trust, deep: bool = True) -> Verification:
    """Verify ``model``'s audit ``runs`` (oldest first) and its champion alias."""
    result = Verification(model)
    try:
        result.entries = [run_entry(client, run) for run in runs]
    except ValueError as err:
        result.broken = str(err)
    if not result.broken:
        result.broken = (
            _chain_problem(result.entries, model, trust)
            or _head_problem(client, model, result.entries)
            or anchor_problem(anchor_of(client, model), result.entries)
        )
    if not result.broken and deep:
        result.broken = _copies_problem(client, runs, result.entries) or _mirror_problem(client, model, result.entries)
    if not result.broken:
        last = _last_decision(result.entries)
        result.expected = dict(last.champion) if last is not None else {}
        result.champions = champion_stack(result.entries)
    result.found, result.found_run = _alias(client, model)
    return result


def verify_model(client, model: str, trust: Trust, deep: bool = True) -> Verification:
    """Verify one registered model (see the module's doc)."""
    return check_log(client, model, audit_runs(client, model).get(model, []), trust, deep)


def verify_all(client, trust: Trust, deep: bool = True) -> list[Verification]:
    """Verify every registered model that has a champion or an audit log, by name. A backbone
    model (tag ``kind=backbone``: ``cessl backbone ... --register --alias champion``) with no
    audit log is not a gated model and is left out; one that has a log is verified like any."""
    by_model = audit_runs(client)
    names = set(by_model)
    for model in client.search_registered_models(max_results=1000):
        backbone = (model.tags or {}).get("kind") == "backbone" and model.name not in by_model
        if CHAMPION_ALIAS in (model.aliases or {}) and not backbone:
            names.add(model.name)
    return [check_log(client, name, by_model.get(name, []), trust, deep) for name in sorted(names)]
