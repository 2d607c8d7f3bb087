"""Process hygiene for pipeline steps: a step dies with the process that started it.

``kfp.local``'s SubprocessRunner starts each task as ``sh -c '... python -m
kfp.dsl.executor_main ...'``; after a ``kill -9`` of ``cessl run`` such a task lived on as
an orphan (a fine-tune kept training and writing its checkpoint folder). Every KFP step
body first calls :func:`die_with_parent`:

- on Linux the kernel sends the task SIGTERM when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere);
- the parent of the task is ``sh``, not ``cessl run``, so a local run also names its own
  pid in :data:`RUN_PID_ENV` (set by :func:`pipeline.dag.execute_local`, inherited by the
  tasks): a daemon thread watches that process and sends the task SIGTERM once it is gone,
  and a task whose run is already gone when it starts exits at once;
- SIGTERM / SIGINT become :class:`Terminated` (a SystemExit) / KeyboardInterrupt in the
  main thread (:func:`terminate_cleanly`), so a fine-tune stops between Python operations,
  runs its ``finally`` blocks and leaves its last checkpoint (written atomically: temp file
  + rename) for the next run to resume.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

PR_SET_PDEATHSIG = 1
RUN_PID_ENV = "CESSL_RUN_PID"  # the pid of the local `cessl run` whose tasks these are
WATCH_INTERVAL_S = 0.5


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
