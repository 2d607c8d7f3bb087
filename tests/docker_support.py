"""A private Docker engine and the project image, as session fixtures.

``docker_engine`` -> :class:`DockerEngine`
    Starts ``dockerd`` (scripts/docker_engine.sh) with its own exec root and unix socket
    under /tmp, installing ``docker.io``/``mmdebstrap`` with apt first when missing (CI
    runs as root and can). Skips, with the reason, only where no engine can be installed
    or started. ``.host`` (``unix://...``), ``.env()`` -> ``{"DOCKER_HOST": ...}``,
    ``.docker(*args)`` runs the BuildKit-capable CLI, ``.client()`` a docker-py client.
    Set ``CESSL_DOCKER_HOST`` to use an engine that is already running instead.
    Images persist between sessions in ``.cache/docker-data`` (gitignored) when no other
    session holds it, so a re-run rebuilds only what changed. ``make test`` builds the image
    there in the background while it installs and starts the workers
    (``scripts/docker_engine.sh prebuild-background``); the engine waits for that build.
``cessl_image`` -> str
    The project image tag (``localhost:5000/cessl:<version>``), built offline by
    scripts/build_image.sh on ``BASE_IMAGE``: ``CESSL_BASE_IMAGE`` if set, else
    ``python:3.11-slim`` if present in the engine, else ``cessl-base:test`` made with
    mmdebstrap (no registry is reachable here). It is in the engine's image list, so
    ``kfp.local.DockerRunner`` will not try to pull it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = REPO / "scripts" / "docker_engine.sh"
BUILD_SCRIPT = REPO / "scripts" / "build_image.sh"
DOCKER_CLI = os.environ.get("DOCKER", "/usr/bin/docker")  # Debian docker.io: built-in BuildKit
PERSISTENT_DATA_ROOT = REPO / ".cache" / "docker-data"
LOCAL_BASE_TAG = "cessl-base:test"
SKIP_EXIT_CODE = 3  # docker_engine.sh: cannot install/start an engine on this machine


@dataclass(frozen=True)
class DockerEngine:
    host: str
    run_dir: Path | None
    pid: int | None
    cli: str = DOCKER_CLI

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host}

    def docker(
        self, *args: str, timeout: float = 600, check: bool = True, env_extra: dict[str, str] | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run the docker CLI against this engine; output captured as text.

        ``env_extra`` goes to the CLI's environment: with ``--env NAME`` (no value) a
        container gets a secret without it appearing in any command line.
        """
        return subprocess.run(
            [self.cli, *args],
            env={**os.environ, **(env_extra or {}), **self.env(), "DOCKER_BUILDKIT": "1"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kwargs,
        )

    def client(self):
        """A docker-py client (what kfp.local.DockerRunner uses) for this engine."""
        import docker

        return docker.DockerClient(base_url=self.host)

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=60).returncode == 0


def _script(
    script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args],
        env={**os.environ, "DOCKER": DOCKER_CLI, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _fail_or_skip(step: str, proc: subprocess.CompletedProcess) -> None:
    detail = (proc.stderr or proc.stdout).strip()[-3000:]
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(f"no Docker engine on this machine ({step}): {detail.splitlines()[-1] if detail else ''}")
    pytest.fail(f"{step} failed (exit {proc.returncode}):\n{detail}", pytrace=False)


PREBUILD_LOCK = PERSISTENT_DATA_ROOT.parent / "docker-prebuild.lock"  # held while `make test`'s prebuild runs
PREBUILD_WAIT_S = 1200


def wait_for_prebuild(lock: Path = PREBUILD_LOCK, timeout: float = PREBUILD_WAIT_S) -> float:
    """Wait while the background prebuild holds ``lock``; the seconds waited."""
    if not lock.exists():
        return 0.0
    start = time.monotonic()
    with open(lock, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return time.monotonic() - start
            except BlockingIOError:
                if time.monotonic() - start > timeout:
                    log.warning("the prebuild still runs after %.0f s: going on without it", timeout)
                    return time.monotonic() - start
                time.sleep(0.5)


def _lock_persistent_data_root() -> tuple[Path, object] | None:
    """The shared data root and its held lock, or None when another session uses it."""
    if os.environ.get("CESSL_DOCKER_PERSIST", "1") == "0":
        return None
    try:
        PERSISTENT_DATA_ROOT.parent.mkdir(parents=True, exist_ok=True)
        # not a `with`: the lock is held as long as the returned handle stays open
        handle = open(PERSISTENT_DATA_ROOT.parent / "docker-data.lock", "w")  # noqa: SIM115
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None
    return PERSISTENT_DATA_ROOT, handle


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A running Docker engine (private dockerd unless CESSL_DOCKER_HOST is set)."""
    external = os.environ.get("CESSL_DOCKER_HOST")
    if external:
        engine = DockerEngine(external, None, None)
        if engine.docker("version", check=False, timeout=30).returncode != 0:
            pytest.fail(f"CESSL_DOCKER_HOST={external} does not answer", pytrace=False)
        yield engine
        return

    start = time.monotonic()
    waited = wait_for_prebuild()  # it installs with apt and uses the shared data root
    if waited > 1:
        log.info("waited %.0f s for the background prebuild (.cache/prebuild.log)", waited)
    proc = _script(ENGINE_SCRIPT, "install", timeout=900)
    if proc.returncode != 0:
        _fail_or_skip("install docker.io/mmdebstrap", proc)
    run_dir = Path(tempfile.mkdtemp(prefix="cessl-dockerd-", dir="/tmp"))
    locked = _lock_persistent_data_root()
    data_root = locked[0] if locked else run_dir / "data"
    proc = _script(ENGINE_SCRIPT, "start", str(run_dir), str(data_root), timeout=120)
    if proc.returncode != 0 and locked:  # e.g. a stale engine still holds the shared root
        log.warning("dockerd on %s failed, retrying with a fresh data root", data_root)
        data_root = run_dir / "data"
        proc = _script(ENGINE_SCRIPT, "start", str(run_dir), str(data_root), timeout=120)
    if proc.returncode != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        _fail_or_skip("start dockerd", proc)
    host = f"unix://{run_dir / 'docker.sock'}"
    pid = int((run_dir / "dockerd.pid.launcher").read_text())
    log.info("dockerd pid %d at %s ready in %.1f s (data root %s)", pid, host, time.monotonic() - start, data_root)
    engine = DockerEngine(host, run_dir, pid)
    try:
        yield engine
    finally:
        engine.docker("image", "prune", "--force", check=False, timeout=120)  # dangling layers only
        _script(ENGINE_SCRIPT, "stop", str(run_dir), timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)
        if locked:
            locked[1].close()


def ensure_base_image(engine: DockerEngine) -> str:
    """BASE_IMAGE for the build: configured, python:3.11-slim if present, else mmdebstrap."""
    configured = os.environ.get("CESSL_BASE_IMAGE")
    if configured:
        return configured
    if engine.has_image("python:3.11-slim"):
        return "python:3.11-slim"
    proc = _script(ENGINE_SCRIPT, "base-image", LOCAL_BASE_TAG, env=engine.env(), timeout=900)
    if proc.returncode != 0:
        _fail_or_skip("build the local base image with mmdebstrap", proc)
    return LOCAL_BASE_TAG


@pytest.fixture(scope="session")
def cessl_image(docker_engine: DockerEngine) -> str:
    """Tag of the project image, built offline in ``docker_engine`` (once per session)."""
    base = ensure_base_image(docker_engine)
    start = time.monotonic()
    proc = _script(BUILD_SCRIPT, env={**docker_engine.env(), "BASE_IMAGE": base}, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build_image.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    tag = proc.stdout.strip().splitlines()[-1]
    log.info("built %s on %s in %.0f s", tag, base, time.monotonic() - start)
    assert docker_engine.has_image(tag), tag
    return tag
