"""Logging for ``cessl``: no secret reaches a terminal or a log file.

- :func:`redact`: replaces what looks like a credential in a text with ``***``: AWS access
  key ids (``AKIA...`` / ``ASIA...``), the values of ``aws_secret_access_key=``,
  ``X-Amz-Security-Token``, ``Authorization:``, ``password=``, ``token=``, ``Signature=``,
  the password of ``scheme://user:password@host`` URIs, and the literal values of the
  credential variables of the environment (:data:`SECRET_ENV`, MLflow's auth ones included,
  and every ``CESSL_PASSWORD_*``) and of :func:`register_secret`'s, each as a whole token
  (never inside a longer word: that would mangle the text and hint at the secret).
- :class:`RedactingFilter`: a ``logging.Filter`` that redacts a record's message and its
  traceback text; :func:`configure_logging` installs it on every handler (the root's and
  those of loggers configured before, e.g. mlflow's) and in the record factory, so handlers
  added later are covered too.
- Third-party HTTP / cloud loggers (:data:`NOISY_LOGGERS`: botocore, boto3, urllib3,
  s3transfer, mlflow's REST client, git, docker, ...) stay at WARNING under ``-v`` unless
  ``--debug-http``: their DEBUG output prints request headers (tokens, signed URLs).
- Library noise stays out of a command's output (:func:`route_warnings`,
  :func:`quiet_progress_bars`): a ``warnings.warn`` of a third-party library (mlflow's "Add
  type hints to the `predict` method", ...) becomes a DEBUG record of ``py.warnings`` (shown
  with ``-v``); the project's own warnings stay WARNING records. The libraries' download bars
  (MLflow artifacts, Hugging Face Hub) are off unless ``-v``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path

SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "KF_PIPELINES_TOKEN",
    "KF_PIPELINES_COOKIES",
    "DOCKER_AUTH_CONFIG",
)
NOISY_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "mlflow.utils.rest_utils",
    "mlflow.utils.request_utils",
    "mlflow.store.artifact",
    "git",
    "docker",
    "kfp_server_api",
    "kubernetes",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "dvc_objects",
    "dvc_s3",
)
# the environment that turns the libraries' download bars off (set unless -v; a value already set wins)
QUIET_PROGRESS_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# a warning raised from a file of these top-level packages is the project's own: it stays visible
PROJECT_PACKAGES = ("ml", "components", "pipeline", "bench")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
WARNINGS_LOGGER = "py.warnings"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # mlflow colours its warnings
# every variable with this prefix holds a password (`cessl access init`: CESSL_PASSWORD_<USER>)
SECRET_ENV_PREFIXES = ("CESSL_PASSWORD_",)
MASK = "***"
_registered: set[str] = set()  # secrets read from elsewhere (a password file, stdin)
_MIN_SECRET_LEN = 4  # shorter env values would mask ordinary words

_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:)(?P<secret>[^@\s/]+)(?P<tail>@)")
# name ... separator ... value: aws_secret_access_key=..., 'X-Amz-Security-Token': b'...', "password": "..."
# (a bare "name: value" only for header names: "/etc/passwd: not found" stays readable)
_SECRET_NAMES = (
    r"aws_secret_access_key|aws_session_token|secret[_-]?access[_-]?key|secret[_-]?key|session[_-]?token|"
    r"security[_-]?token|password|passwd|pwd|api[_-]?key|access[_-]?token|refresh[_-]?token|token|"
    r"x-amz-signature|x-amz-credential|signature|credential"
)
_NAMED = re.compile(
    r"(?P<head>(?<![A-Za-z])(?i:(?:" + _SECRET_NAMES + r")(?:\s*=\s*|['\"]\s*:\s*|:\s*(?=b?['\"]))"
    r"|x-amz-security-token['\"]?\s*:\s*)b?['\"]?)(?P<secret>[^\s'\",&;}]+)"
)
# the whole value of an Authorization header (it has spaces: "AWS4-HMAC-SHA256 Credential=..., Signature=...")
_AUTHORIZATION = re.compile(r"(?P<head>(?i:authorization)['\"]?\s*[:=]\s*b?['\"]?)(?P<secret>[^'\"\n]+)")


def register_secret(value: str) -> None:
    """Redact ``value`` from now on too (a password that came from a file or stdin)."""
    if len(value) >= _MIN_SECRET_LEN:
        _registered.add(value)


def _env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    values = {env.get(name, "") for name in SECRET_ENV}
    values |= {v for k, v in env.items() if k.startswith(SECRET_ENV_PREFIXES)} | _registered
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def _whole(secret: str) -> re.Pattern[str]:
    """``secret`` as a whole token: not where a letter, digit or ``_`` continues it on either
    side ("short" is masked in "short!" but "shorter" stays a word, and says nothing of it)."""
    head = r"(?<![\w])" if re.match(r"\w", secret[:1]) else ""
    tail = r"(?![\w])" if re.match(r"\w", secret[-1:]) else ""
    return re.compile(head + re.escape(secret) + tail)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    if not text:
        return text
    for value in _env_secrets() if secrets is None else secrets:
        text = _whole(value).sub(MASK, text)
    text = _AUTHORIZATION.sub(lambda m: m["head"] + MASK, text)
    text = _NAMED.sub(lambda m: m["head"] + (m["secret"] if m["secret"] == MASK else MASK), text)
    text = _URI_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)
    return _KEY_ID.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Redacts a record's message (its arguments merged in) and its traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_cessl_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to logging's own error handling
        return record
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._cessl_redacted = True
    return record


_FILTER = RedactingFilter()
_factory_installed = False


def _install_record_factory() -> None:
    """Redact in the record factory too: handlers added after start-up are covered."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def install_filter() -> None:
    """:class:`RedactingFilter` on the handlers of the root and of every configured logger."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def quiet_third_party(debug_http: bool) -> None:
    """HTTP / cloud client loggers at WARNING (DEBUG with ``debug_http``: still redacted)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug_http else logging.WARNING)


class PrefixFilter(logging.Filter):
    """Starts every record's message with ``[prefix] `` (once, whatever handlers it passes)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = f"[{prefix}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_cessl_prefixed", False):
            record.msg, record.args = self.prefix + record.getMessage(), None
            record._cessl_prefixed = True
        return True


def name_task_logs(prefix: str) -> None:
    """Every log line of this process (a pipeline task) starts with ``[prefix]``: a network
    run's sites share one task log, and each site's lines must say whose they are."""
    if not prefix:
        return
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    prefixer = PrefixFilter(prefix)
    for handler in root.handlers:
        if not any(isinstance(f, PrefixFilter) for f in handler.filters):
            handler.addFilter(prefixer)


def is_project_file(filename: str) -> bool:
    """True for a source file of the project's own packages (not of an installed library)."""
    try:
        relative = Path(filename).resolve().relative_to(PROJECT_ROOT)
    except (ValueError, OSError):
        return False
    return len(relative.parts) > 1 and relative.parts[0] in PROJECT_PACKAGES


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    level = logging.WARNING if is_project_file(filename) else logging.DEBUG
    text = _ANSI.sub("", str(message))
    logging.getLogger(WARNINGS_LOGGER).log(level, "%s: %s (%s:%s)", category.__name__, text, filename, lineno)


def route_warnings() -> None:
    """``warnings.warn`` as log records: a library's at DEBUG (``-v``), the project's at WARNING.
    Call it before the heavy imports: some libraries warn while being imported."""
    warnings.showwarning = _log_warning


def quiet_progress_bars() -> None:
    """The libraries' download bars off (:data:`QUIET_PROGRESS_ENV`), unless already set."""
    for name, value in QUIET_PROGRESS_ENV.items():
        os.environ.setdefault(name, value)


def configure_logging(verbose: bool, debug_http: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_third_party(debug_http)
    route_warnings()
    if not verbose:
        quiet_progress_bars()
    _install_record_factory()
    install_filter()
