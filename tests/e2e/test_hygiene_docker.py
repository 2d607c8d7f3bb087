"""Process hygiene with the Docker runner: the task containers of a run die with it (a real
Docker engine). The rest of step 8's hygiene: tests/unit/test_hygiene.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- Docker runner

SLEEP_IMAGE = "cessl-sleep:test"
STAND_IN_RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kfp import dsl
    from pipeline.dags.finetune import LocalRunConfig, execute_local
    from pipeline.core.params import DEFAULTS

    @dsl.container_component
    def sleeper():
        return dsl.ContainerSpec(image=sys.argv[2], command=["sleep", "300"])

    @dsl.pipeline(name="sleepy")
    def sleepy():
        sleeper()

    root = Path(sys.argv[1])
    config = LocalRunConfig(pipeline_root=root / "outputs", cache=False, runner="docker", task_log=root / "task.log")
    execute_local(sleepy, {}, DEFAULTS.replace(source=str(root)), config, "sleepy")
    """
)


def _sleep_image(engine, tmp_path: Path) -> str:
    """A tiny image with `env` and `sleep` of this machine (no registry is reachable here)."""
    import tarfile

    if engine.has_image(SLEEP_IMAGE):
        return SLEEP_IMAGE
    tar = tmp_path / "rootfs.tar"
    files = {"/usr/bin/env", "/usr/bin/sleep"}
    libs = subprocess.run(["ldd", *sorted(files)], capture_output=True, text=True).stdout
    for line in libs.splitlines():
        files |= {part for part in line.split() if part.startswith("/") and not part.endswith(":")}
    with tarfile.open(tar, "w") as out:
        for path in sorted(files):
            out.add(os.path.realpath(path), arcname=path.lstrip("/"))
    engine.docker("import", str(tar), SLEEP_IMAGE, timeout=120)
    return SLEEP_IMAGE


def _containers(client, pid: int, running_only: bool = False) -> list:
    from pipeline.core.process import PID_LABEL

    return client.containers.list(all=not running_only, filters={"label": f"{PID_LABEL}={pid}"})


def _start_stand_in(engine, image: str, root: Path, client) -> subprocess.Popen:
    env = {**os.environ, **engine.env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN_RUN, str(root), image], cwd=root, env=env)
    deadline = time.monotonic() + 90
    while not _containers(client, proc.pid, running_only=True):
        assert proc.poll() is None, f"the stand-in run ended early ({proc.returncode}); see {root / 'task.log'}"
        assert time.monotonic() < deadline, "no container started"
        time.sleep(0.5)
    return proc


def _wait_until_gone(client, pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _containers(client, pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _containers(client, pid), "the run's container outlived it"


@pytest.mark.timeout(1800)  # the first Docker test installs and starts the engine
def test_docker_task_containers_die_with_their_run(docker_engine, tmp_path):
    """`--runner docker`: a task's container is not a child of the run. SIGTERM of the run
    removes it at once; after SIGKILL the watcher removes it; and a run that starts removes
    what dead runs of this host left."""
    from pipeline.core.process import HOST_LABEL, PID_LABEL, remove_leftovers

    image = _sleep_image(docker_engine, tmp_path)
    client = docker_engine.client()
    try:
        for sig, within in ((signal.SIGTERM, 20), (signal.SIGKILL, 15)):
            root = tmp_path / sig.name
            root.mkdir()
            proc = _start_stand_in(docker_engine, image, root, client)
            proc.send_signal(sig)
            proc.wait(timeout=30)
            _wait_until_gone(client, proc.pid, within)

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = __import__("socket").gethostname()
        leftover = client.containers.run(
            image, ["sleep", "300"], entrypoint=["/usr/bin/env"], detach=True,
            labels={HOST_LABEL: host, PID_LABEL: str(dead.pid)},
        )  # fmt: skip
        living = client.containers.run(
            image, ["sleep", "300"], entrypoint=["/usr/bin/env"], detach=True,
            labels={HOST_LABEL: host, PID_LABEL: str(os.getppid())},
        )  # fmt: skip
        try:
            assert remove_leftovers(client) == [leftover.name]
            assert [c.name for c in client.containers.list()] == [living.name]
        finally:
            for container in (leftover, living):
                with contextlib.suppress(Exception):  # removed by the test already
                    container.remove(force=True)
    finally:
        client.close()
