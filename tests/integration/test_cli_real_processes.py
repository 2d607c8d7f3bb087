"""Real processes: `python -m pipeline.cli` answers bad input with one line and its exit code
and creates nothing, prints no library warning, and a verbose S3 command against a real S3
server prints no credential; a task started under `sh` dies with its run (kill -9).
The generated in-process cases (every verb, every parameter): tests/unit/test_cli_bad_input.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pipeline_support import closed_port, snapshot

from ml.errors import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from pipeline.core.logsafe import PROJECT_ROOT
from pipeline.core.process import RUN_PID_ENV

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- real processes


def cessl_subprocess(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_",))}
    environment |= {"PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("argv", "code", "named"),
    [
        (["data", "synth", "out", "--records", "-5"], EXIT_USAGE, "--records"),
        (["data", "ingest", "missing", "out"], EXIT_USAGE, "missing"),
        (["run", "--labelled-ratio", "1.5", "-r", "0"], EXIT_USAGE, "--labelled-ratio"),
        (["models", "--tracking-uri", "http://127.0.0.1:{port}"], EXIT_UNAVAILABLE, "127.0.0.1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_real_process(argv, code, named, tmp_path):
    argv = [a.format(port=closed_port()) for a in argv]
    before = snapshot(tmp_path)
    proc = cessl_subprocess(argv, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- secrets


def test_no_credential_reaches_the_output_of_a_verbose_s3_command(s3_server, s3_bucket, tmp_path):
    """`cessl -v [--debug-http] data ingest s3://...` against a real S3 server: the access
    key id, the secret key and a session token appear nowhere in stdout or stderr."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="site/readme.txt", Body=b"not a record")
    env = s3_server.env()
    secrets = [s3_server.access_key, s3_server.secret_key]
    for extra, token in (([], None), (["--debug-http"], "FwoGZXIvYXdzEJr//////////wEaDFakeSessionToken0123456789")):
        run_env = dict(env)
        if token:
            run_env["AWS_SESSION_TOKEN"] = token
        proc = cessl_subprocess(["-v", *extra, "data", "ingest", f"s3://{s3_bucket}/site", "out"], tmp_path, run_env)
        output = proc.stdout + proc.stderr
        assert output.strip(), "the command said something"
        for secret in [*secrets, *([token] if token else [])]:
            assert secret not in output, f"a credential reached the output ({extra})"
        if not token:
            assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- every --tracking-uri


def test_testset_in_a_real_process_creates_no_store(tmp_path):
    """The reported case: MLflow printed its database-creation lines and created the folder."""
    missing = tmp_path / "nope" / "x.db"
    proc = cessl_subprocess(["testset", "show", "M", "--tracking-uri", f"sqlite:///{missing}"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_USAGE and len(lines) == 1 and str(missing.parent) in lines[0], proc.stderr
    assert not proc.stdout and not missing.parent.exists()


# --------------------------------------------------------------------------- data remote


def test_data_remote_add_in_a_real_process_leaves_nothing(tmp_path):
    """The reported case: `data remote add r /missing/x --default --repo /nope` exited 0."""
    missing_repo = tmp_path / "nope"
    argv = ["data", "remote", "add", "r", str(tmp_path / "missing" / "x"), "--default", "--repo", str(missing_repo)]
    proc = cessl_subprocess(argv, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_USAGE and len(lines) == 1 and str(missing_repo) in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_command_prints_no_library_warning(tmp_path):
    """`cessl predict` imports the pyfunc model (mlflow warns about its `predict` type hints
    while the class is defined), then stops on the missing store: one line, nothing else."""
    store = f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "predict",
            "--model",
            "models:/m@champion",
            "--tracking-uri",
            store,
            "r",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cessl: error: MLflow store") and len(done.stderr.splitlines()) == 1, done.stderr


def test_task_dies_with_its_run_even_under_sh():
    """A stand-in for `cessl run` starts `sh -c python ...` (as kfp.local does) and is killed
    with SIGKILL: the task (a grandchild) stops within seconds."""
    task = textwrap.dedent(
        """
        import sys, time
        from pipeline.core.process import die_with_parent
        assert die_with_parent(interval=0.1)
        print("ready", flush=True)
        try:
            time.sleep(60)
        except SystemExit:
            open(sys.argv[1], "w").write("terminated")
            raise
        """
    )
    run = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        os.environ[{RUN_PID_ENV!r}] = str(os.getpid())
        child = subprocess.Popen(["sh", "-c", 'x=1; "$0" -c "$1" "$2"', sys.executable, sys.argv[1], sys.argv[2]])
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"cessl-die-{os.getpid()}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", run, task, str(marker)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        sh_pid = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while not any(p.name().startswith("python") for p in _children(sh_pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        (task_proc,) = _children(sh_pid)
        time.sleep(1.0)  # the task has called die_with_parent
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        task_proc.wait(timeout=10)
        assert marker.read_text() == "terminated"  # it ran its exception handlers: a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()
        marker.unlink(missing_ok=True)


def _children(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
