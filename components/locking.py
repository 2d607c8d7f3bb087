"""Exclusive file locks (``fcntl.flock``) with a holder record, for one run per project.

:func:`exclusive` takes an exclusive ``flock`` on a lock file and writes who holds it (pid,
host, start time, command) into the file. The kernel releases a ``flock`` when its holder
exits, however it ends (killed, crashed, machine rebooted), so a lock left behind by a dead
process is taken over at once: the file's stale holder record is only reported
("recovered"), never trusted. A second taker fails at once with :class:`LockHeld`, naming the
holder, or waits up to ``wait`` seconds for it.

Used for ``cessl run | retrain | compare`` (``<state_dir>/run.lock``: the checkpoints, the
incremental ingest state and the local MLflow store are the project's) and around a
fine-tune's checkpoint folder (two identical fine-tunes on a shared checkpoint volume take
turns: the second resumes from the first one's last checkpoint and never interleaves its
``curves.jsonl`` rows). Locks are re-entrant within one process (``cessl retrain`` runs
``cessl run``'s code under the lock it already holds). ``flock`` is local to a machine (and
unreliable on some network filesystems): it serialises runs that share one host's folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ml.errors import CesslError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
_HELD: dict[str, int] = {}  # lock path -> depth, for re-entrance within this process


class LockHeld(CesslError):
    """Another process holds the lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lock, as written in the lock file."""

    pid: int
    host: str
    since: str  # ISO time, UTC
    command: str

    @classmethod
    def me(cls, command: str) -> Holder:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        return cls(os.getpid(), socket.gethostname(), now, command)

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["pid"]), str(data["host"]), str(data["since"]), str(data["command"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} (`{self.command}`)"

    def alive(self) -> bool:
        """Whether the recorded pid still runs (only meaningful on the same host)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def default_command() -> str:
    name = Path(sys.argv[0]).name if sys.argv else "python"
    return " ".join([name, *sys.argv[1:]])[:300]


@contextlib.contextmanager
def exclusive(
    path: str | Path, command: str | None = None, wait: float = 0.0, what: str = "this folder"
) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the ``with`` block.

    ``wait`` seconds: how long to wait for a holder (0: fail at once). Raises :class:`LockHeld`
    naming the holder and how to wait. Re-entrant within a process.
    """
    path = Path(path).absolute()
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, wait)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = Holder.read(path)
                who = holder.describe() if holder else "another process"
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait:g} s)" if wait > 0 else ""
                    raise LockHeld(
                        f"{what} is in use by {who}{waited}; lock {path}. Wait for it to finish, "
                        "or pass --wait-lock SECONDS to wait"
                    ) from None
                if not announced:
                    log.info("waiting up to %g s for %s (held by %s)", wait, path, who)
                    announced = True
                time.sleep(POLL_SECONDS)
        stale = Holder.read(path)
        if stale is not None and stale.pid != os.getpid():
            state = "no longer running" if not stale.alive() else "lock released"
            log.info("recovered %s, last held by %s: %s", path, stale.describe(), state)
        me = Holder.me(command or default_command())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.__dict__, sort_keys=True).encode() + b"\n", 0)
        os.fsync(fd)
        _HELD[key] = 1
        try:
            yield path
        finally:
            _HELD.pop(key, None)
            os.ftruncate(fd, 0)  # released cleanly: no holder recorded
    finally:
        os.close(fd)  # closing releases the flock
