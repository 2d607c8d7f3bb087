"""The ``cessl`` error boundary: known failures -> one actionable line and an exit code.

:func:`describe` maps an exception to a :class:`Failure` (exit code + one line: what failed,
which file or URI, what to do), or None for an unknown exception (a bug: the command line
re-raises it, so its traceback shows). The exit codes are :data:`ml.errors.EXIT_CODES`:

- :class:`ml.errors.CesslError` and its subclasses: their ``exit_code`` (2 by default);
- usage: ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``NotADirectoryError``
  / ``IsADirectoryError`` of argument checks, an unknown MLflow model or alias, a missing
  bucket or key: 2;
- unreachable servers and missing or refused credentials (botocore, urllib3, requests,
  ``ConnectionError``, MLflow's failed requests, ``docker.errors.DockerException``): 3;
- bad files: ``SafetensorError``, ``pickle.UnpicklingError``, torch's load errors: 4;
- a failed pipeline step (``pipeline.dags.finetune.PipelineRunError``): 5;
- ``OSError`` EROFS / ENOSPC / EDQUOT / EACCES / EPERM: 6.

Classes are matched by module and name, so neither botocore, mlflow, docker nor torch is
imported to classify an error.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from ml.errors import (
    EXIT_BAD_FILE,
    EXIT_DISK,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CesslError,
)

MAX_LINE = 600

DISK_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
S3_NOT_FOUND = ("NoSuchBucket", "NoSuchKey", "404", "NotFound")
S3_REFUSED = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
    "Forbidden",
)


@dataclass(frozen=True)
class Failure:
    code: int
    message: str


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` on one line (its lines joined), at most ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    joined = " | ".join(lines) if lines else ""
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _names(exc: BaseException) -> set[str]:
    """``module.Class`` and ``Class`` of the exception's type and its bases."""
    names = set()
    for kind in type(exc).__mro__:
        names.add(kind.__name__)
        names.add(f"{kind.__module__.split('.')[0]}.{kind.__name__}")
    return names


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def describe(exc: BaseException) -> Failure | None:
    """The failure ``exc`` stands for, or None for an unknown exception (a bug)."""
    direct = _describe_one(exc, top=True)
    if direct is not None:
        return direct
    # A wrapper of a known infrastructure failure (e.g. a RuntimeError raised from an OSError).
    for cause in _chain(exc)[1:]:
        found = _describe_one(cause, top=False)
        if found is not None and found.code in (EXIT_UNAVAILABLE, EXIT_DISK):
            return found
    return None


def _describe_one(exc: BaseException, top: bool) -> Failure | None:
    names = _names(exc)
    text = one_line(str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted")
    if isinstance(exc, CesslError):
        return Failure(exc.exit_code, text or type(exc).__name__)
    # --- S3 (botocore)
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return Failure(
            EXIT_UNAVAILABLE,
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and try again",
        )
    if {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"} & names and "botocore" in str(
        type(exc).__module__
    ):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return Failure(
            EXIT_UNAVAILABLE,
            f"S3 endpoint {endpoint} does not answer: check AWS_ENDPOINT_URL and that the server is up",
        )
    if "ClientError" in names and hasattr(exc, "response"):
        error = (getattr(exc, "response", None) or {}).get("Error", {})
        s3_code = str(error.get("Code", ""))
        message = error.get("Message") or text
        if s3_code in S3_NOT_FOUND:
            return Failure(EXIT_USAGE, f"S3: {message} ({s3_code}): check the bucket and prefix")
        if s3_code in S3_REFUSED:
            return Failure(
                EXIT_UNAVAILABLE,
                f"S3 refused the credentials ({s3_code}: {message}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            )
        return Failure(EXIT_UNAVAILABLE, f"S3 request failed: {text}")
    if "ParamValidationError" in names:
        return Failure(EXIT_USAGE, f"S3: {text}")
    # --- Docker
    if "docker.DockerException" in names:
        return Failure(
            EXIT_UNAVAILABLE,
            f"no Docker engine answers ({text}): start Docker, fix DOCKER_HOST, or use --runner subprocess",
        )
    # --- MLflow
    if "MlflowException" in names:
        if str(getattr(exc, "error_code", "")) == "RESOURCE_DOES_NOT_EXIST":
            return Failure(EXIT_USAGE, f"MLflow: {text} (list what exists with `cessl models`)")
        refused = _mlflow_refused(exc, text)
        if refused is not None:
            return refused
        if _looks_unreachable(text):
            return Failure(
                EXIT_UNAVAILABLE,
                f"MLflow tracking server does not answer ({text}): start it or fix --tracking-uri",
            )
        return Failure(EXIT_USAGE, f"MLflow: {text}")
    # --- HTTP clients and sockets
    if {
        "requests.ConnectionError",
        "requests.Timeout",
        "urllib3.MaxRetryError",
        "urllib3.NewConnectionError",
        "urllib3.ProtocolError",
        "urllib3.TimeoutError",
        "URLError",
        "ConnectionError",
        "TimeoutError",
    } & names:
        return Failure(EXIT_UNAVAILABLE, f"cannot reach the server: {text}: check the URL and that it is up")
    # --- bad files
    if "SafetensorError" in names:
        return Failure(EXIT_BAD_FILE, f"not a valid .safetensors file ({text}): re-create or re-download it")
    if isinstance(exc, pickle.UnpicklingError):
        return Failure(EXIT_BAD_FILE, f"not a valid checkpoint file ({text})")
    if isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("PytorchStreamReader", "invalid load key", "Weights only load failed")
    ):
        return Failure(EXIT_BAD_FILE, f"not a valid torch checkpoint ({text})")
    # --- file system
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        where = exc.filename or "a file"
        return Failure(
            EXIT_DISK,
            f"cannot write {where}: {DISK_ERRNOS[exc.errno]}: choose a writable folder with free space",
        )
    if isinstance(exc, FileNotFoundError | FileExistsError | NotADirectoryError | IsADirectoryError):
        return Failure(EXIT_USAGE, text)
    if top and isinstance(exc, ValueError):
        return Failure(EXIT_USAGE, text)
    return None


def _mlflow_refused(exc: BaseException, text: str) -> Failure | None:
    """An authenticated MLflow server's 401 (no or wrong credentials) or 403 (the user lacks
    the permission), as one line naming the user and the refused endpoint."""
    code = str(getattr(exc, "error_code", ""))
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    match = re.search(r"endpoint (\S+)", text)
    endpoint = match.group(1) if match else "the request"
    if code == "UNAUTHENTICATED":
        who = f"the credentials of user {user!r}" if user else "an anonymous call"
        return Failure(
            EXIT_UNAVAILABLE,
            f"MLflow refused {who} (HTTP 401 on {endpoint}): set MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD to a valid user",
        )
    return Failure(
        EXIT_UNAVAILABLE,
        f"MLflow: user {user or '(anonymous)'!r} lacks the permission for {endpoint} (HTTP 403): "
        "ask an MLflow admin (`cessl access init`)",
    )


def _looks_unreachable(text: str) -> bool:
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "Failed to establish a new connection",
        "Name or service not known",
        "timed out",
        "API request to",
    )
    return any(marker in text for marker in markers)


# --------------------------------------------------------------------------- failed local runs

_FAILED_TASK = re.compile(r"Task '(?P<task>[^']+)' finished with status FAILURE")
_EXCEPTION_LINE = re.compile(r"^(?P<kind>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\w*)(?::\s*(?P<why>.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_INNER = re.compile(r"Inner task failed: '(?P<task>[^']+)'")


def failed_run_message(pipeline: str, task_log: Path | None) -> str:
    """One line for a local run that ended without outputs: the failed step, why (the last
    exception line before its failure), and where its full log is."""
    if task_log is None or not Path(task_log).is_file():
        return f"pipeline {pipeline} failed (no outputs); see the task output above"
    text = _ANSI.sub("", Path(task_log).read_text(encoding="utf-8", errors="replace"))  # kfp.local colours names
    lines = text.splitlines()
    step, why, end = "", "", len(lines)
    for i, line in enumerate(lines):
        found = _FAILED_TASK.search(line)
        if found and found["task"] not in ("", pipeline):
            step, end = found["task"], i
            break  # the first failure is the cause; the others follow from it
    if not step:
        for line in reversed(lines):
            inner = _INNER.search(line)
            if inner:
                step = inner["task"]
                break
    for line in reversed(lines[:end]):
        exc = _EXCEPTION_LINE.match(line.strip())
        if exc:
            kind = exc["kind"].rsplit(".", 1)[-1]
            why = f"{kind}: {exc['why']}" if exc["why"] else kind
            break
    where = f"step {step!r}" if step else "a step"
    because = f": {one_line(why, 300)}" if why else ""
    return f"pipeline {pipeline}: {where} failed{because} (full log: {task_log})"
