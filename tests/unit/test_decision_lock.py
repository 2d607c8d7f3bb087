"""One registry decision at a time per model (pipeline/registry/decision_lock.py), on a real
SQLite MLflow store: concurrent holders never overlap, a held lock makes the next decision
wait or fail with who holds it, a stale lock of one's own is broken, and the lock model never
shows up as a model."""

from __future__ import annotations

import re
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.registry.decision_lock import (
    TAG_SINCE,
    DecisionLockError,
    LockPolicy,
    acquire,
    decision_lock,
    holder,
    lock_name,
)
from pipeline.registry.policy import describe_models

FAST = LockPolicy(wait_s=30.0, poll_s=0.01)


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry too: not the process default


def test_concurrent_decisions_never_overlap(client):
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    order: list[str] = []

    def decide(who: str) -> None:
        with decision_lock(client, "m", who, FAST):
            inside.append(who)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            order.append(who)
            time.sleep(0.05)
            inside.remove(who)

    threads = [threading.Thread(target=decide, args=(f"rm{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(order) == ["rm0", "rm1", "rm2", "rm3"]  # everyone decided, one after the other
    assert overlaps == []
    assert holder(client, "m") is None  # released


def test_a_lock_released_while_the_store_words_its_collision_is_taken_next(client, monkeypatch):
    """The race CI met: bob's insert collides with alice's lock, alice releases it before the SQL
    store looks the lock up to say "already exists" (so it says "not found"): bob waits and takes it."""
    store = client._get_registry_client().store
    lookup = store.get_registered_model
    released: list[str] = []

    def alice_releases_first(name: str):
        if not released:
            released.append(name)
            client.delete_registered_model(name)  # alice's decision is recorded right then
        return lookup(name)

    acquire(client, "m", "alice", FAST)
    monkeypatch.setattr(store, "get_registered_model", alice_releases_first)
    acquire(client, "m", "bob", FAST)
    assert released == [lock_name("m")] and holder(client, "m").who == "bob"


def test_a_held_lock_names_its_holder_and_the_wait(client):
    with decision_lock(client, "m", "alice", FAST):
        current = holder(client, "m")
        assert current is not None and current.who == "alice"
        with pytest.raises(DecisionLockError) as caught:
            acquire(client, "m", "bob", LockPolicy(wait_s=0.2, poll_s=0.05))
    message = str(caught.value)
    assert "'m'" in message and "alice" in message and "another decision is in progress" in message
    assert "waited 0 s" in message and "Try again" in message
    with decision_lock(client, "m", "bob", FAST):  # free again once alice's is recorded
        assert holder(client, "m").who == "bob"


def test_the_lock_is_released_when_the_decision_fails(client):
    with pytest.raises(RuntimeError), decision_lock(client, "m", "alice", FAST):
        raise RuntimeError("the gate crashed")
    assert holder(client, "m") is None


def test_a_stale_lock_is_broken_by_its_holder_and_named_to_others(client):
    acquire(client, "m", "alice", FAST)  # alice's process dies holding it
    client.set_registered_model_tag(lock_name("m"), TAG_SINCE, f"{time.time() - 7200:.3f}")
    stale = re.escape("stale: alice or an admin deletes registered model 'm.decision-lock'")
    with pytest.raises(DecisionLockError, match=stale):
        acquire(client, "m", "bob", LockPolicy(wait_s=0.0, poll_s=0.01))
    with decision_lock(client, "m", "alice", FAST):  # alice again: her own stale lock is broken
        assert holder(client, "m").who == "alice"
    assert holder(client, "m") is None


def test_lock_models_are_not_listed_as_models(client):
    client.create_registered_model("m")
    with decision_lock(client, "m", "alice", FAST):
        assert [row["name"] for row in describe_models(client)] == ["m"]
