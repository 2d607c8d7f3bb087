"""Process hygiene for pipeline steps: a step dies with the process that started it.

``kfp.local``'s SubprocessRunner starts each task as ``sh -c '... python -m
kfp.dsl.executor_main ...'``; after a ``kill -9`` of ``cessl run`` such a task lived on as
an orphan (a fine-tune kept training and writing its checkpoint folder). Every KFP step
body first calls :func:`die_with_parent`:

- on Linux the kernel sends the task SIGTERM when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere);
- the parent of the task is ``sh``, not ``cessl run``, so a local run also names its own
  pid in :data:`RUN_PID_ENV` (set by :func:`pipeline.dags.finetune.execute_local`, inherited by the
  tasks): a daemon thread watches that process and sends the task SIGTERM once it is gone,
  and a task whose run is already gone when it starts exits at once;
- SIGTERM / SIGINT become :class:`Terminated` (a SystemExit) / KeyboardInterrupt in the
  main thread (:func:`terminate_cleanly`), so a fine-tune stops between Python operations,
  runs its ``finally`` blocks and leaves its last checkpoint (written atomically: temp file
  + rename) for the next run to resume.

Containers (``cessl run --runner docker``) are not children of the run: the Docker engine
keeps them running whatever happens to the process that started them. They die with the run
another way (:func:`containers_die_with_us`, used by :func:`pipeline.dags.finetune.execute_local`):

- each task container carries the run's labels (:func:`run_labels`: this host and pid);
- SIGTERM / SIGINT / any exit of the run: its containers are removed (``docker rm -f``);
- ``kill -9``: a small watcher process (:func:`reap_when_gone`, its own session) sees the run
  gone within :data:`WATCH_INTERVAL_S` and removes them; and every docker run first removes
  the leftovers of dead runs of this host (:func:`remove_leftovers`), whatever killed them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1
RUN_PID_ENV = "CESSL_RUN_PID"  # the pid of the local `cessl run` whose tasks these are
WATCH_INTERVAL_S = 0.5
LABEL_PREFIX = "org.cessl."
HOST_LABEL = LABEL_PREFIX + "host"  # the host of the run that started a container
PID_LABEL = LABEL_PREFIX + "pid"  # ... and its pid there
STOP_TIMEOUT_S = 5

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """The step got SIGTERM (its run died, or it was asked to stop)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def terminate_cleanly() -> bool:
    """SIGTERM -> :class:`Terminated`, SIGINT -> KeyboardInterrupt (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()  # noqa: SIM115
    except FileNotFoundError:
        return False
    except OSError:  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _watch(pid: int, interval: float) -> None:
    while alive(pid):
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


def _request_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def die_with_parent(interval: float = WATCH_INTERVAL_S) -> bool:
    """Make this step die (SIGTERM, handled as :class:`Terminated`) with the process that
    started it; exit at once when that is already gone. True when the run's pid is watched."""
    parent = os.getppid()
    _request_parent_death_signal(signal.SIGTERM)
    if not terminate_cleanly():
        return False
    if os.getppid() != parent:
        raise Terminated(128 + signal.SIGTERM)  # the parent died before the request took effect
    run_pid = os.environ.get(RUN_PID_ENV, "")
    if not run_pid.isdigit() or int(run_pid) == os.getpid():
        return False
    if not alive(int(run_pid)):
        raise Terminated(128 + signal.SIGTERM)
    threading.Thread(target=_watch, args=(int(run_pid), interval), name="cessl-die-with-run", daemon=True).start()
    return True


# --------------------------------------------------------------------------- containers


def run_labels(pid: int | None = None) -> dict[str, str]:
    """The labels of the containers a run starts (this host, the run's pid)."""
    return {HOST_LABEL: socket.gethostname(), PID_LABEL: str(pid or os.getpid())}


def _label_filter(labels: dict[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{key}={value}" for key, value in labels.items()]}


def remove_containers(client: Any, labels: dict[str, str]) -> list[str]:
    """Stop and remove every container (running or not) with all of ``labels``; their names."""
    removed = []
    for container in client.containers.list(all=True, filters=_label_filter(labels), ignore_removed=True):
        try:
            container.remove(force=True)  # SIGKILL, then remove
            removed.append(container.name)
        except Exception as err:  # docker.errors.NotFound: removed meanwhile (auto_remove)
            if type(err).__name__ not in ("NotFound", "APIError"):
                raise
    return removed


def remove_leftovers(client: Any) -> list[str]:
    """Remove the containers of this host's runs that are no longer running (killed before
    they could clean up); their names."""
    host, removed = socket.gethostname(), []
    for container in client.containers.list(
        all=True, filters={"label": [f"{HOST_LABEL}={host}", PID_LABEL]}, ignore_removed=True
    ):
        pid = str(container.labels.get(PID_LABEL, ""))
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            removed += remove_containers(client, {HOST_LABEL: host, PID_LABEL: pid})
    return removed


def reap_when_gone(pid: int, interval: float = WATCH_INTERVAL_S) -> None:
    """Wait for process ``pid`` to end, then remove its containers (the watcher's body)."""
    while alive(pid):
        time.sleep(interval)
    import docker

    client = docker.from_env()
    try:
        remove_containers(client, run_labels(pid))
    finally:
        client.close()


def start_reaper(pid: int | None = None) -> subprocess.Popen:
    """The watcher of ``pid`` (this process): its own session, so neither Ctrl-C nor a kill
    of the run's process group stops it before it has cleaned up; it exits when the run has."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.core.process", "reap", str(pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_project_root(), os.environ.get("PYTHONPATH")])),
        },
    )


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stopped(SystemExit):
    """The run got SIGTERM while its containers ran."""


@contextlib.contextmanager
def containers_die_with_us(client: Any) -> Iterator[dict[str, str]]:
    """The labels to give this run's containers; they are removed when the block ends
    (normally, by an exception, Ctrl-C or SIGTERM: handled here as an exit) and, after a
    ``kill -9``, by the watcher. Leftovers of dead runs are removed first."""
    leftovers = remove_leftovers(client)
    if leftovers:
        log.info("removed %d container(s) left by a killed run: %s", len(leftovers), ", ".join(leftovers))
    labels = run_labels()
    reaper = start_reaper()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def stop(signum: int, frame: FrameType | None) -> None:
            raise _Stopped(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield labels
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        removed = remove_containers(client, labels)
        if removed:
            log.info("stopped and removed the run's container(s): %s", ", ".join(removed))
        reaper.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=STOP_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.core.process reap PID``: the watcher of :func:`start_reaper`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "reap" or not args[1].isdigit():
        sys.stderr.write("usage: python -m pipeline.core.process reap PID\n")
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run's Ctrl-C is the run's
    reap_when_gone(int(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
