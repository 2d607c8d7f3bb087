"""The warm task server of local runs (``pipeline.dags.warm_tasks``), with real processes: a task
forked from it behaves as the plain ``python -m`` process it stands for (output, exit status,
environment, working folder, signals), and without a server the client is that process.
The whole pipeline through it: every kfp.local run of the integration tier."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from kfp.local import subprocess_task_handler as handler

from pipeline.dags import warm_tasks
from pipeline.dags.warm_tasks import SOCKET_ENV, task_server

REPO = Path(__file__).resolve().parents[2]

TASK = textwrap.dedent(
    """
    import os, signal, sys, time
    print("argv", sys.argv[1:], flush=True)
    print("env", os.environ.get("TASK_VALUE"), "cwd", os.getcwd(), flush=True)
    print("parent", os.getppid(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    what = sys.argv[1]
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "raise":
        raise RuntimeError("the task failed")
    if what == "threads":  # a normal exit stops an executor's workers and waits for a thread
        from concurrent.futures import ThreadPoolExecutor
        import threading
        pool = sys._test_pool = ThreadPoolExecutor(2)  # held by a module (as a library does): only
        # the exit hook stops its workers
        assert pool.submit(lambda: 41).result() == 41
        threading.Thread(target=lambda: (time.sleep(0.5), open("joined", "w").write("yes"))).start()
        sys.exit(0)
    if what == "wait":
        def stop(signum, frame):
            with open("stopped.tmp", "w") as f:  # then renamed: the test never reads a half-written file
                f.write(str(signum))
            os.replace("stopped.tmp", "stopped")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("waiting", flush=True)
        time.sleep(60)
    """
)


def _client(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TASK_VALUE": "from-the-client", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", warm_tasks.__name__, "-m", "the_task", *args],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def task_folder(tmp_path: Path) -> Path:
    (tmp_path / "the_task.py").write_text(TASK)
    return tmp_path


def test_a_task_forked_from_the_server_is_the_process_it_stands_for(task_folder):
    with task_server() as path:
        assert path and os.environ[SOCKET_ENV] == path
        (server,) = [p for p in psutil.Process(os.getpid()).children() if path in p.cmdline()]
        # kfp.local's `python3` in each task's command becomes the client while the server runs
        assert handler.replace_python_executable(["sh", "-c", "python3 -m x"], sys.executable)[2] == (
            f"{warm_tasks.client_command()} -m x"
        )

        done = _client(task_folder, "exit", "3")
        out, err = done.communicate(timeout=120)
        assert done.returncode == 3, err
        assert "argv ['exit', '3']" in out and f"env from-the-client cwd {task_folder}" in out
        assert f"parent {server.pid}" in out  # forked from the server, not a new interpreter
        assert "to stderr" in err

        threads = _client(task_folder, "threads")
        assert threads.wait(timeout=60) == 0 and (task_folder / "joined").read_text() == "yes"

        failed = _client(task_folder, "raise")
        _, err = failed.communicate(timeout=60)
        assert failed.returncode == 1 and "RuntimeError: the task failed" in err

        waiting = _client(task_folder, "wait")
        assert waiting.stdout is not None
        while "waiting" not in waiting.stdout.readline():
            pass
        started = time.monotonic()
        waiting.send_signal(signal.SIGTERM)  # reaches the task through the client
        assert waiting.wait(timeout=30) == 143
        assert (task_folder / "stopped").read_text() == str(int(signal.SIGTERM))
        assert time.monotonic() - started < 10
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert SOCKET_ENV not in os.environ and not Path(path).parent.exists()
    assert handler.replace_python_executable(["python3"], "/x/python") == ["/x/python"]


def test_a_task_whose_client_is_killed_stops_too(task_folder):
    with task_server():
        waiting = _client(task_folder, "wait")
        assert waiting.stdout is not None
        while "waiting" not in waiting.stdout.readline():
            pass
        waiting.kill()
        waiting.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not (task_folder / "stopped").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (task_folder / "stopped").read_text() == str(int(signal.SIGTERM))


@pytest.mark.parametrize("socket_path", ["", "/nonexistent/socket"])
def test_without_a_server_the_client_is_the_plain_process(task_folder, socket_path):
    done = _client(task_folder, "exit", "5", env={SOCKET_ENV: socket_path})
    out, _ = done.communicate(timeout=60)
    assert done.returncode == 5 and "argv ['exit', '5']" in out
    assert f"parent {os.getpid()}" in out  # the client became the task (exec), no server between
