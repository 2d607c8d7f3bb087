"""One registry decision at a time per production model.

Two release managers who promote (or roll back) the same model at once would both read the
same verified head, both move ``champion`` and both append an entry chained to that head: the
log forks and the alias ends where the later write put it, whatever the log says. MLflow has
no compare-and-set on tags or aliases, but creating a registered model is atomic: a second
create of the same name fails with ``RESOURCE_ALREADY_EXISTS``, on a server and on a SQLite
store alike. So a decision holds the lock model ``<model>.decision-lock`` (created with the
holder and the time as tags, deleted when the decision is recorded) from before it reads the
verified state until after its signed entry is written; a second decision waits for it, then
reads the state the first one left.

On an MLflow server with authentication the creator MANAGEs the lock model and only it (or an
admin) can delete it: a lock left by a killed process is broken after ``stale_after_s`` by its
own holder; another caller is told who holds it and since when, and how an admin removes it.
The lock orders honest release managers; it is not a permission (anyone who may create
models can hold it, which delays decisions but changes none of them: what a decision may do
is still checked by the server and by the signed, chained log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ml.errors import CesslError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".decision-lock"
TAG_HOLDER = "cessl.lock.holder"
TAG_SINCE = "cessl.lock.since"  # epoch seconds when it was taken


class DecisionLockError(CesslError):
    """Another decision about the model is in progress (or left its lock behind)."""


@dataclass(frozen=True)
class LockPolicy:
    """How long a decision waits for another one, and when a left-behind lock counts as stale."""

    wait_s: float = 300.0
    poll_s: float = 1.0
    stale_after_s: float = 3600.0


def lock_name(model: str) -> str:
    return f"{model}{LOCK_SUFFIX}"


def is_lock_model(name: str) -> bool:
    """A lock model (left out of the model listings)."""
    return name.endswith(LOCK_SUFFIX)


@dataclass(frozen=True)
class Holder:
    who: str
    since: float | None

    def age_s(self, now: float) -> float | None:
        return None if self.since is None else max(0.0, now - self.since)

    def describe(self, now: float) -> str:
        age = self.age_s(now)
        return f"{self.who or 'someone'}" + ("" if age is None else f" for {age:.0f} s")


def _try_create(client, name: str, who: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={TAG_HOLDER: who, TAG_SINCE: f"{time.time():.3f}"},
            description="cessl: a registry decision is in progress (deleted when it is recorded)",
        )
    except MlflowException as err:
        # RESOURCE_DOES_NOT_EXIST: the SQL store's insert collided with a holder's lock, which was
        # released before the store looked it up to word its "already exists" error: held a moment ago
        if err.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return False
        raise
    return True


def holder(client, model: str) -> Holder | None:
    """Who holds ``model``'s decision lock (None: free)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock_name(model)).tags or {}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        since: float | None = float(tags.get(TAG_SINCE, ""))
    except ValueError:
        since = None
    return Holder(tags.get(TAG_HOLDER, ""), since)


def _release(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as err:
        log.warning("decision lock %s not released (%s): it is broken after it goes stale", name, err.error_code)


def _stuck_message(model: str, current: Holder, now: float, policy: LockPolicy) -> str:
    age = current.age_s(now)
    stale = age is not None and age > policy.stale_after_s
    return (
        f"model {model!r}: another decision is in progress ({current.describe(now)}); waited {policy.wait_s:.0f} s. "
        + (
            f"Its lock is stale: {current.who or 'its holder'} or an admin deletes registered model "
            f"{lock_name(model)!r} to free it"
            if stale
            else "Try again when it is recorded (`cessl models --history` shows it)"
        )
    )


def acquire(client, model: str, who: str, policy: LockPolicy = LockPolicy()) -> None:
    """Take ``model``'s decision lock, waiting up to ``policy.wait_s`` for another holder."""
    name = lock_name(model)
    deadline = time.monotonic() + policy.wait_s
    announced = False
    while True:
        if _try_create(client, name, who):
            return
        current = holder(client, model)
        if current is None:  # released between the create and the read
            continue
        now = time.time()
        age = current.age_s(now)
        if current.who == who and age is not None and age > policy.stale_after_s:
            log.warning("%s: breaking my own stale decision lock (taken %.0f s ago)", model, age)
            _release(client, name)
            continue
        if time.monotonic() >= deadline:
            raise DecisionLockError(_stuck_message(model, current, now, policy))
        if not announced:
            log.info("%s: waiting for another decision (%s)", model, current.describe(now))
            announced = True
        time.sleep(policy.poll_s)


@contextmanager
def decision_lock(client, model: str, who: str, policy: LockPolicy = LockPolicy()) -> Iterator[None]:
    """Hold ``model``'s decision lock for the block (released however the block ends)."""
    acquire(client, model, who, policy)
    try:
        yield
    finally:
        _release(client, lock_name(model))
