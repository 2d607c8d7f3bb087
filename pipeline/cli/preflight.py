"""Checks a command runs before any work: its servers answer, its stores exist.

- :func:`check_tracking`: the MLflow tracking URI resolved as ``TrackingConfig.resolve``
  does; a ``sqlite:///`` store's folder must exist, and its database too unless it is the
  local default ``./mlflow.db`` of a command that writes or the command was told to create
  one (``--create-store``): a mistyped path never becomes a new empty store. An http(s)
  server must answer ``/health`` (or the REST API) within :data:`HEALTH_TIMEOUT_S`, and be
  MLflow (not 404 at both); a ``user:password@`` in the URI is sent as Basic credentials,
  never as part of the URL, and never shown.
- :func:`check_kfp_host`: a Kubeflow Pipelines endpoint answers (``/apis/v2/healthz``).
- :func:`check_docker`: a Docker engine answers (``--runner docker``).
- :func:`check_s3`: credentials are configured and the bucket answers (one cheap call).

Each raises :class:`ml.errors.ParameterError` (2) for a bad value or
:class:`ml.errors.ServiceUnavailableError` (3) for a server that does not answer or refuses.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from ml.errors import ParameterError, ServiceUnavailableError
from pipeline.core.constraints import s3_problem, tracking_uri_problem
from pipeline.core.logsafe import register_secret

HEALTH_TIMEOUT_S = 5.0
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
LOCAL_DB = "mlflow.db"
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # an endpoint every MLflow server has


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason).strip() or type(err).__name__


def _get(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    """HTTP status of a GET (an HTTP error status is an answer too); OSError when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local servers: no proxy detour
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@dataclass(frozen=True)
class ServerURL:
    """An http(s) URL split from its ``user:password@`` part: the password goes in the
    ``Authorization`` header, never in the URL a request is made to or a message shows."""

    url: str  # without user:password@
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, uri: str) -> ServerURL:
        parts = urlsplit(uri)
        if "@" not in parts.netloc:
            return cls(uri)
        userinfo, _, host = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        if password:
            register_secret(unquote(password))
        return cls(urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password))

    @property
    def shown(self) -> str:
        """The URL as a message names it (the user, never the password)."""
        if not self.username:
            return self.url
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(netloc=f"{self.username}:***@{parts.netloc}"))


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _mlflow_auth_headers(server: ServerURL | None = None) -> dict[str, str]:
    """The credentials MLflow's client sends: the URI's own ``user:password@`` first, else
    ``MLFLOW_TRACKING_TOKEN``, else ``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``."""
    if server is not None and server.username:
        return _basic(server.username, server.password)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return _basic(user, password)
    return {}


def resolve_tracking_uri(uri: str = "") -> tuple[str, str]:
    """The URI ``TrackingConfig.resolve`` would use and where it came from (the flag, the
    environment variable, or the local default)."""
    if uri:
        return uri, "--tracking-uri"
    env = os.environ.get(TRACKING_URI_ENV, "")
    if env:
        return env, f"${TRACKING_URI_ENV}"
    return f"sqlite:///{Path.cwd().absolute() / LOCAL_DB}", "default"


def check_tracking(
    uri: str = "", *, writes: bool = True, create: bool = False, timeout: float = HEALTH_TIMEOUT_S
) -> str:
    """The resolved tracking URI, once it is usable (see the module's doc).

    ``writes``: the command logs or registers (the local default store may be created);
    ``create``: a new sqlite store at an explicit path may be created (``--create-store``).
    """
    resolved, origin = resolve_tracking_uri(uri)
    where = "" if origin == "default" else f" ({origin})"
    problem = tracking_uri_problem(resolved)
    if problem:
        raise ParameterError(f"MLflow tracking URI {resolved!r}{where}: {problem}")
    if resolved.startswith("sqlite:///"):
        db = Path(resolved.removeprefix("sqlite:///")).expanduser()
        if db.is_dir():
            raise ParameterError(f"MLflow store {db}{where} is a folder: name the .db file (sqlite:///path/mlflow.db)")
        if not db.parent.is_dir():
            raise ParameterError(f"MLflow store {db}{where}: folder {db.parent} does not exist (a typo?)")
        if not db.exists():
            is_default = db.absolute() == (Path.cwd() / LOCAL_DB).absolute()
            if not (create or (writes and is_default)):
                if not writes:  # a reading command: nothing to read there
                    hint = (
                        "nothing has been tracked here yet: run `cessl run` first, or pass --tracking-uri"
                        if is_default
                        else "nothing has been tracked there (a typo?): name an existing .db file"
                    )
                else:
                    hint = "a typo? pass --create-store to start a new store there"
                raise ParameterError(f"no MLflow store at {db}{where}: {hint}")
            if not os.access(db.parent, os.W_OK | os.X_OK):
                raise ParameterError(f"MLflow store {db}{where}: folder {db.parent} is not writable")
    elif resolved.startswith(("http://", "https://")):
        check_mlflow_server(resolved, where, timeout)
    elif resolved.startswith("file:"):
        folder = Path(resolved.removeprefix("file://").removeprefix("file:"))
        if not folder.is_dir() and not create:
            raise ParameterError(f"no MLflow file store at {folder}{where}: pass --create-store to start one")
    return resolved


def registry_tracking(uri: str = "", model_name: str = "", *, writes: bool = False):
    """The :class:`pipeline.registry.tracking.TrackingConfig` of a command that reads or changes the
    registry of an existing store (``promote``, ``rollback``, ``predict``, ``models``,
    ``testset ...``), once :func:`check_tracking` passed: these commands never create a store
    (no MLflow database-creation lines, no new folder or file), and an http(s) server must
    answer first. ``writes``: the command may create the local default store."""
    from pipeline.registry.store import TrackingConfig

    resolved = check_tracking(uri, writes=writes)
    return TrackingConfig.resolve(resolved, model_name=model_name or "cessl-ecg")


def check_mlflow_server(uri: str, where: str = "", timeout: float = HEALTH_TIMEOUT_S) -> None:
    """An MLflow tracking server answers at ``uri``: ``/health``, or its REST API (behind a
    proxy that routes only the API). A server that answers 404 to both is not MLflow."""
    server = ServerURL.parse(uri.rstrip("/"))
    shown, headers = server.shown, _mlflow_auth_headers(server)
    try:
        status = _get(server.url + "/health", timeout, headers)
        if status == 404:  # behind a proxy that only routes the API
            status = _get(server.url + API_PROBE, timeout, headers)
    except (OSError, ValueError) as err:
        raise ServiceUnavailableError(
            f"MLflow tracking server {shown}{where} does not answer ({_reason(err)}; {timeout:g} s timeout): "
            "start it, or fix --tracking-uri / $MLFLOW_TRACKING_URI"
        ) from err
    if status in (401, 403):
        fix = (
            f"the user {server.username!r} and password of the URI"
            if server.username
            else "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
        raise ServiceUnavailableError(
            f"MLflow tracking server {shown}{where} refuses the credentials (HTTP {status}): {fix}"
        )
    if status == 404:
        raise ServiceUnavailableError(
            f"{shown}{where} is not an MLflow tracking server: HTTP 404 at /health and at MLflow's REST API "
            f"({API_PROBE.partition('?')[0]}); check the host, port and path of --tracking-uri / $MLFLOW_TRACKING_URI"
        )
    if status >= 500:
        raise ServiceUnavailableError(f"MLflow tracking server {shown}{where} answers HTTP {status}: check its log")


def check_kfp_host(host: str, timeout: float = HEALTH_TIMEOUT_S) -> str:
    """``host`` once a Kubeflow Pipelines API answers there."""
    from pipeline.core.constraints import http_url

    try:
        http_url(host)
    except Exception as err:
        raise ParameterError(f"--host {err}") from None
    try:
        status = _get(host.rstrip("/") + "/apis/v2/healthz", timeout)
    except (OSError, ValueError) as err:
        raise ServiceUnavailableError(
            f"Kubeflow Pipelines at {host} does not answer ({_reason(err)}; {timeout:g} s timeout): "
            "check --host (e.g. kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow)"
        ) from err
    if status >= 500:
        raise ServiceUnavailableError(f"Kubeflow Pipelines at {host} answers HTTP {status}: check the cluster")
    return host


def check_docker(timeout: float = HEALTH_TIMEOUT_S) -> None:
    """A Docker engine answers (``--runner docker``)."""
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        import docker

        docker.from_env(timeout=int(max(1, timeout))).ping()
    except ImportError:
        raise ServiceUnavailableError(
            "--runner docker needs the docker Python package (pip install docker); or use --runner subprocess"
        ) from None
    except Exception as err:  # docker.errors.DockerException, requests' ConnectionError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ServiceUnavailableError(
            f"--runner docker: no Docker engine answers at {where} ({reason[:200]}): "
            "start Docker, fix DOCKER_HOST, or use --runner subprocess"
        ) from err


def check_s3(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Credentials are configured and ``s3://bucket`` answers (one HEAD, no retries)."""
    problem = s3_problem(uri)
    if problem:
        raise ParameterError(f"{uri}: {problem}")
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise ServiceUnavailableError(
            f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    bucket = uri[5:].partition("/")[0]
    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": 1},
    )
    try:
        session.client("s3", config=config).head_bucket(Bucket=bucket)
    except Exception as err:
        from pipeline.core.failures import describe

        failure = describe(err)
        if failure is None:
            raise
        error = ParameterError if failure.code == 2 else ServiceUnavailableError
        raise error(f"{uri}: {failure.message}") from err


def check_backbone(backbone: str) -> None:
    """A local backbone (a folder or a checkpoint file) exists; 'default', ``models:/`` and
    ``s3://`` backbones are resolved by the pipeline's backbone step."""
    if backbone in ("", "default") or "://" in backbone or backbone.startswith("models:/"):
        return
    if not Path(backbone).expanduser().exists():
        raise ParameterError(
            f"--backbone {backbone}: no such folder or checkpoint file "
            "(use 'default', a backbone folder, a .pt/.safetensors file, s3://... or models:/...)"
        )


def check_demo_data(data_dir: Path) -> None:
    """The demo hospital is in ``data_dir`` (any WFDB header), or can be generated there: it is
    made from the real sample records of a project checkout (``ml.data.dvc.REAL_RECORDS_DIR``
    next to ``data_dir``). Checked before a local run takes its lock, so a run started outside
    the project says so in one line instead of failing after creating its state folder."""
    from ml.data.dvc import REAL_RECORDS_DIR

    data_dir = Path(data_dir).absolute()
    if data_dir.exists() and not data_dir.is_dir():
        raise ParameterError(f"--source {data_dir}: is a file, expected a folder of WFDB records")
    if data_dir.is_dir() and next(data_dir.rglob("*.hea"), None) is not None:
        return
    real = data_dir.parent / REAL_RECORDS_DIR
    if not real.is_dir():
        raise ParameterError(
            f"--source {data_dir}: no WFDB records there, and the demo hospital cannot be generated "
            f"(it needs {real} of a project checkout): pass --source FOLDER, or run in the project folder"
        )


def check_records_folder(folder: Path) -> None:
    """A local ``--source`` holds at least one WFDB header (``*.hea``, at any depth): an empty
    or mistyped folder is refused before a run starts, not by its ingest step minutes later."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise ParameterError(f"--source {folder}: data folder not found")
    if next(folder.rglob("*.hea"), None) is None:
        raise ParameterError(f"--source {folder}: no WFDB record (.hea) in this folder or below it")
