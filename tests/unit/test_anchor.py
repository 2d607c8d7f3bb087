"""The auditor's anchor (pipeline/registry/anchor.py) on a real SQLite MLflow store: written for
a verified log, read back, and what it catches (a log cut or rewritten behind it); a longer log
is fine."""

from __future__ import annotations

import dataclasses

from mlflow.tracking import MlflowClient

from pipeline.registry.anchor import ANCHOR_EXPERIMENT, anchor_of, anchor_problem, write_anchor
from pipeline.registry.audit import AuditEntry


def _log(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for seq in range(1, n + 1):
        prev = entries[-1].digest() if entries else ""
        entries.append(AuditEntry("m", "refuse", {"challenger": str(seq)}, "why", who="rm", seq=seq, prev=prev))
    return entries


def test_an_anchor_round_trips_and_only_a_verified_prefix_passes(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = _log(3)
    assert anchor_of(client, "m") is None and anchor_problem(None, log) == ""
    assert write_anchor(client, "m", [], "auditor") is None  # nothing to anchor
    anchor = write_anchor(client, "m", log, "auditor")
    assert anchor_of(client, "m") == anchor and (anchor.seq, anchor.by) == (3, "auditor")
    assert client.get_experiment_by_name(ANCHOR_EXPERIMENT) is not None

    assert anchor_problem(anchor, log) == ""
    assert anchor_problem(anchor, [*log, *_log(4)[3:]]) == ""  # the log grew since: fine
    cut = anchor_problem(anchor, log[:2])
    assert "entry #3" in cut and "ends at entry #2" in cut and "entries removed" in cut
    rewritten = [*log[:2], dataclasses.replace(log[2], reason="another reason")]
    assert "rewritten" in anchor_problem(anchor, rewritten)


def test_an_unreadable_anchor_fails_every_log(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment(ANCHOR_EXPERIMENT)
    client.set_experiment_tag(experiment, "cessl.anchor.m", "not json")
    assert "unreadable" in anchor_problem(anchor_of(client, "m"), _log(2))
