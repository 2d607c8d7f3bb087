"""Warm task processes for local runs: each ``kfp.local`` task forked from a process that has
already imported torch, MLflow and the steps, instead of a new Python that imports them again.

A local run (``cessl run``, subprocess runner) starts about ten tasks, one process each; each
spent 4-5 s of its 5-12 s importing torch, MLflow, pandas and kfp before its first line of
work (a 63 s single-site run spent ~45 s so). Here a run starts one **task server**
(:func:`task_server`) that imports them once, and every task's ``python3 -m
kfp.dsl.executor_main ...`` becomes ``python -m pipeline.dags.warm_tasks -m
kfp.dsl.executor_main ...``: a **client** (stdlib only, ~40 ms) that hands the server its
arguments, environment, working folder and its stdin/stdout/stderr (``SCM_RIGHTS``); the
server forks a child that takes them over and runs the executor exactly as the new process
would have (``runpy``, same exit codes), while the client forwards SIGTERM / SIGINT to the child
and exits with the child's status. What stays true of the task process:

- its output is the client's (kfp.local reads the same pipe), its exit status is the child's;
- it dies with the run: the server dies with the run (``PR_SET_PDEATHSIG``) and is stopped at
  its end, the child dies with the server, and a task's ``die_with_parent`` still watches the
  run's pid (``pipeline.core.process``); a client that goes away takes its child with it;
- nothing is shared between tasks but what was imported before the fork (the server never runs
  a torch operation, so no thread pool is forked);
- no server (Docker runner, a cluster, the server gone): the client ``exec``s the plain Python
  command, so a task never depends on the server.

Only the server's owner may connect: the socket lives in a private temporary folder (0700).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import importlib
import json
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import NoReturn

SOCKET_ENV = "CESSL_TASK_SERVER"  # the task server's socket, for the tasks of this run
# What the steps import (each a few hundred ms to seconds); one that fails to import is left to the task.
PRELOAD = (
    "kfp.dsl.executor_main",
    "torch",
    "numpy",
    "pandas",
    "mlflow",
    "mlflow.tracking",
    "pipeline.core.process",
    "components.ingest",
    "components.preprocess",
    "components.split",
    "components.allocate_ranks",
    "components.finetune",
    "components.evaluate",
    "components.register",
    "components.cross_site",
    "components.compare",
    "components.pretrain",
)
PR_SET_PDEATHSIG = 1
MAX_REQUEST = 16 << 20


# --------------------------------------------------------------------------- the client


def _recv_line(sock: socket.socket, buffer: bytearray) -> str | None:
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def _exec_plain(args: list[str]) -> NoReturn:
    """Run the task as a plain Python process would (no server)."""
    os.execv(sys.executable, [sys.executable, *args])


def client(args: list[str]) -> int:
    """Run ``python <args>`` in a child of the task server; its exit status."""
    path = os.environ.get(SOCKET_ENV)
    if not path or len(args) < 2 or args[0] != "-m":  # the server runs `-m module ...` only
        _exec_plain(args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        _exec_plain(args)
    request = json.dumps({"args": args, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(sock, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    buffer = bytearray()
    started = _recv_line(sock, buffer)
    if started is None or not started.startswith("pid "):
        return 1
    child = int(started.split()[1])

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    ended = _recv_line(sock, buffer)
    if ended is None or not ended.startswith("exit "):
        return 1  # the server died (it takes its children with it)
    return int(ended.split()[1])


# --------------------------------------------------------------------------- the server


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data = bytearray()
    size = None
    while size is None or len(data) < 8 + size:
        message, ancillary, _flags, _addr = conn.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
        if not message:
            raise ConnectionError("the client went away")
        data += message
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if size is None and len(data) >= 8:
            size = int.from_bytes(data[:8], "big")
            if size > MAX_REQUEST:
                raise ConnectionError(f"a request of {size} bytes")
    return json.loads(bytes(data[8:])), list(fds)


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the task process and run it; never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    args = list(request["args"])
    code = 0
    try:
        sys.argv = [args[1], *args[2:]]
        sys.path[0] = request["cwd"]
        import runpy

        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:  # the traceback a plain Python process prints
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    """Exit as Python does (threading's exit hooks and the non-daemon threads, atexit handlers
    such as MLflow's, flush the streams), without tearing down every module of the preloaded interpreter one by
    one (a second per task), as ``multiprocessing``'s forked children do."""
    import atexit
    import threading

    # what the interpreter does first at exit: threading's own exit hooks (a ThreadPoolExecutor
    # tells its workers to stop there), then it joins the non-daemon threads
    getattr(threading, "_shutdown")()  # noqa: B009 (private; the exact first step of a normal exit)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def serve(path: str) -> None:
    """Listen on ``path`` (already bound by :func:`task_server`'s child), preload, fork one child per task."""
    _die_with_parent()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    os.environ.setdefault("_KFP_RUNTIME", "true")  # what a task's kfp import sees
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:  # the child keeps only its own streams
                    selector.close()
                    for other in (listener, conn, *children.values()):
                        other.close()
                    _run_child(request, fds)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
                with contextlib.suppress(OSError):
                    conn.sendall(f"pid {pid}\n".encode())
            else:  # a client closed its end: it is gone, its task goes too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(key.data, signal.SIGTERM)
                selector.unregister(key.fileobj)
        while children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                conn = children.pop(pid)
                with contextlib.suppress(OSError):
                    conn.sendall(f"exit {_status(wait_status)}\n".encode())
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(conn)
                conn.close()


# --------------------------------------------------------------------------- in the run


def client_command() -> str:
    """What stands for ``python3`` in a task's command while a task server runs."""
    return f"{shlex.quote(sys.executable)} -m {__name__}"


@contextlib.contextmanager
def task_server() -> Iterator[str | None]:
    """A task server for the tasks started meanwhile (their ``python3`` becomes the client;
    :data:`SOCKET_ENV` names the socket): the socket path, or None where none could start
    (the tasks then start as plain processes)."""
    from kfp.local import subprocess_task_handler as handler

    folder = tempfile.mkdtemp(prefix="cessl-tasks-")  # 0700: only this user connects
    path = os.path.join(folder, "socket")
    server = subprocess.Popen(
        [sys.executable, "-m", __name__, "--serve", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5.0
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    replace = handler.replace_python_executable
    before = os.environ.get(SOCKET_ENV)
    started = os.path.exists(path)
    if started:
        os.environ[SOCKET_ENV] = path
        handler.replace_python_executable = lambda command, _python: replace(command, client_command())
    try:
        yield path if started else None
    finally:
        handler.replace_python_executable = replace
        if before is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = before
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"] and len(argv) == 2:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        serve(argv[1])
        return 0
    return client(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
