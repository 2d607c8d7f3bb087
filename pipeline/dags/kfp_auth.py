"""How ``cessl submit | schedule | retrain --host`` authenticates to Kubeflow Pipelines.

The ways ``kfp.Client`` supports, chosen with ``--kfp-auth`` (default ``auto``):

- ``token``: a bearer token (``existing_token``): from ``$KF_PIPELINES_TOKEN``, or read from
  ``--kfp-token-file`` (e.g. ``kubectl create token default-editor -n NS > FILE``). Never
  taken as a flag value, so it is in no command line, shell history or process list;
- ``service-account``: the projected, audience-bound ServiceAccount token a pod in the
  cluster has (``credentials=ServiceAccountTokenVolumeCredentials``: re-read on every
  request, so the kubelet's rotation is picked up) at ``--kfp-token-file``,
  ``$KF_PIPELINES_SA_TOKEN_PATH`` or ``/var/run/secrets/kubeflow/pipelines/token``;
- ``none``: no credentials (KFP standalone through ``kubectl port-forward``);
- ``auto``: ``token`` when ``$KF_PIPELINES_TOKEN`` is set or ``--kfp-token-file`` is given,
  else ``service-account`` when that token file exists, else ``none``.

``$KF_PIPELINES_COOKIES`` (e.g. ``authservice_session=...`` of a Dex login) is sent as the
``Cookie`` header in any mode. The token and cookies are never logged:
:meth:`KfpAuth.describe` says where they came from, not what they are, and
``pipeline.core.logsafe`` redacts ``$KF_PIPELINES_TOKEN``'s value from every log record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import ParameterError
from pipeline.core.files import UserFileError, read_text

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"
COOKIES_ENV = "KF_PIPELINES_COOKIES"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp.client.KF_PIPELINES_SA_TOKEN_PATH
MODES = ("auto", "token", "service-account", "none")


@dataclass(frozen=True)
class KfpAuth:
    """The resolved authentication; secrets are kept out of ``repr``."""

    mode: str  # token | service-account | none
    source: str = ""  # where the credential comes from, for logs ("$KF_PIPELINES_TOKEN", a path)
    token: str = field(default="", repr=False)
    token_path: str = ""  # service-account: the projected token file
    cookies: str = field(default="", repr=False)

    def describe(self) -> str:
        """E.g. ``"bearer token from $KF_PIPELINES_TOKEN"``; never the credential itself."""
        text = {
            "token": f"bearer token from {self.source}",
            "service-account": f"ServiceAccount token from {self.source}",
            "none": "no credentials",
        }[self.mode]
        return text + (f", cookies from ${COOKIES_ENV}" if self.cookies else "")


def _read_token(path: str, what: str) -> str:
    """The token in ``path``, read by :mod:`pipeline.core.files` (a regular file, at most 1 MiB of UTF-8)."""
    try:
        token = read_text(path).strip()
    except UserFileError as err:
        raise ParameterError(f"{what} {err.where}: cannot read the token ({err.problem})") from None
    if not token:
        raise ParameterError(f"{what} {path}: the file is empty (expected a bearer token)")
    return token


def resolve_auth(
    mode: str = "auto", token_file: str | None = None, environ: Mapping[str, str] | None = None
) -> KfpAuth:
    """The authentication ``mode`` means here (see the module docstring); bad settings raise
    :class:`ParameterError` naming the flag or variable."""
    env = os.environ if environ is None else environ
    if mode not in MODES:
        raise ParameterError(f"--kfp-auth {mode!r}: choose one of {', '.join(MODES)}")
    cookies = env.get(COOKIES_ENV, "")
    env_token = env.get(TOKEN_ENV, "").strip()
    sa_path = token_file or env.get(SA_TOKEN_PATH_ENV) or DEFAULT_SA_TOKEN_PATH
    if mode == "auto":
        if env_token or token_file:
            mode = "token"
        elif Path(sa_path).is_file():
            mode = "service-account"
        else:
            mode = "none"
    if mode == "token":
        if token_file:
            return KfpAuth("token", token_file, token=_read_token(token_file, "--kfp-token-file"), cookies=cookies)
        if not env_token:
            raise ParameterError(f"--kfp-auth token: set ${TOKEN_ENV} or give --kfp-token-file")
        return KfpAuth("token", f"${TOKEN_ENV}", token=env_token, cookies=cookies)
    if mode == "service-account":
        what = "--kfp-token-file" if token_file else f"${SA_TOKEN_PATH_ENV}" if env.get(SA_TOKEN_PATH_ENV) else "token"
        _read_token(sa_path, what)  # readable and not empty now, not at the first request
        return KfpAuth("service-account", sa_path, token_path=sa_path, cookies=cookies)
    return KfpAuth("none", cookies=cookies)


def client_kwargs(host: str, namespace: str | None, auth: KfpAuth) -> dict[str, Any]:
    """The keyword arguments of ``kfp.Client`` for ``host``, ``namespace`` and ``auth``."""
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if auth.mode == "token":
        kwargs["existing_token"] = auth.token
    elif auth.mode == "service-account":
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=auth.token_path)
    if auth.cookies:
        kwargs["cookies"] = auth.cookies
    return kwargs


def make_client(host: str, namespace: str | None, auth: KfpAuth):
    """A ``kfp.Client`` for ``host`` authenticated as ``auth`` says."""
    import kfp

    log.info("Kubeflow Pipelines at %s%s: %s", host, f", namespace {namespace}" if namespace else "", auth.describe())
    return kfp.Client(**client_kwargs(host, namespace, auth))
