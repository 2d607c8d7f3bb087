"""`cessl submit | schedule` on a Kubeflow cluster: namespace, ServiceAccount, authentication.

No Kubeflow Pipelines API server runs here, so a small real HTTP server on a free port
plays the few KFP v2beta1 endpoints the real ``kfp.Client`` calls (healthz, experiments,
runs, recurring runs) and records each request: its path, its ``Authorization`` and
``Cookie`` headers and its JSON body. Everything on the client side is real: the parser,
the compiled package, ``kfp.Client`` with ``existing_token`` or
``ServiceAccountTokenVolumeCredentials``, and the log records (the token never appears).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ml.errors import ParameterError
from pipeline import cli
from pipeline.dags.kfp_auth import (
    COOKIES_ENV,
    SA_TOKEN_PATH_ENV,
    TOKEN_ENV,
    KfpAuth,
    client_kwargs,
    make_client,
    resolve_auth,
)

TOKEN = "kfp-test-token-5c1e3b9a77d04f2e"


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    cookie: str | None
    user_agent: str = ""
    body: dict[str, Any] = field(default_factory=dict)


class FakeKfp:
    """A local HTTP server answering what kfp.Client 2.17 asks of a KFP v2 API server."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                recorder.requests.append(
                    Recorded(
                        method,
                        self.path,
                        self.headers.get("Authorization"),
                        self.headers.get("Cookie"),
                        self.headers.get("User-Agent", ""),
                        body,
                    )
                )
                path = self.path.split("?")[0]
                if path.endswith("/healthz"):
                    reply: dict[str, Any] = {"multi_user": False}
                elif path.endswith("/experiments") and method == "GET":
                    reply = {}  # none yet: the client creates it
                elif path.endswith("/experiments"):
                    reply = {"experiment_id": "exp-1", "display_name": body.get("display_name", "")}
                elif path.endswith("/recurringruns"):
                    reply = {"recurring_run_id": "job-1", "display_name": body.get("display_name", "")}
                elif path.endswith("/runs"):
                    reply = {"run_id": "run-1", "display_name": body.get("display_name", "")}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_requests(self) -> list[Recorded]:
        """The kfp.Client's requests (not cessl's own reachability probe, urllib's healthz)."""
        return [r for r in self.requests if not r.user_agent.startswith("Python-urllib")]

    def posted(self, suffix: str) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST" and r.path.split("?")[0].endswith(suffix)]


@pytest.fixture()
def kfp_server() -> Iterator[FakeKfp]:
    fake = FakeKfp()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def clean_env(monkeypatch, tmp_path) -> Path:
    """No KFP credentials or context from this machine; a private HOME for kfp's context file."""
    for name in (TOKEN_ENV, COOKIES_ENV, SA_TOKEN_PATH_ENV, "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- resolution


def test_auto_picks_the_env_token_then_the_service_account_token_then_none(clean_env, tmp_path):
    sa_token = tmp_path / "sa-token"
    assert resolve_auth("auto", environ={}).mode == "none" or Path("/var/run/secrets/kubeflow/pipelines/token").exists()
    sa_token.write_text("sa\n")
    auth = resolve_auth("auto", environ={SA_TOKEN_PATH_ENV: str(sa_token)})
    assert (auth.mode, auth.token_path) == ("service-account", str(sa_token))
    auth = resolve_auth("auto", environ={SA_TOKEN_PATH_ENV: str(sa_token), TOKEN_ENV: TOKEN})
    assert (auth.mode, auth.token) == ("token", TOKEN)
    file_token = tmp_path / "token"
    file_token.write_text(f"  {TOKEN}\n")
    assert resolve_auth("auto", str(file_token), environ={}).token == TOKEN  # stripped


def test_bad_auth_settings_are_one_clear_error(clean_env, tmp_path):
    with pytest.raises(ParameterError, match=r"--kfp-auth token: set \$KF_PIPELINES_TOKEN or give --kfp-token-file"):
        resolve_auth("token", environ={})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ParameterError, match=r"--kfp-token-file .*empty: the file is empty"):
        resolve_auth("token", str(empty), environ={})
    with pytest.raises(ParameterError, match=r"\$KF_PIPELINES_SA_TOKEN_PATH .*missing: cannot read the token"):
        resolve_auth("service-account", environ={SA_TOKEN_PATH_ENV: str(tmp_path / "missing")})


def test_the_token_stays_out_of_repr_and_descriptions():
    auth = KfpAuth("token", f"${TOKEN_ENV}", token=TOKEN, cookies="authservice_session=abc")
    assert TOKEN not in repr(auth) and "abc" not in repr(auth)
    assert auth.describe() == f"bearer token from ${TOKEN_ENV}, cookies from ${COOKIES_ENV}"
    kwargs = client_kwargs("http://kfp", "team-a", auth)
    assert kwargs == {
        "host": "http://kfp",
        "namespace": "team-a",
        "existing_token": TOKEN,
        "cookies": "authservice_session=abc",
    }
    assert client_kwargs("http://kfp", None, KfpAuth("none")) == {"host": "http://kfp"}


# --------------------------------------------------------------------------- real kfp.Client


def test_kfp_client_sends_the_bearer_token(clean_env, kfp_server):
    client = make_client(kfp_server.url, None, resolve_auth("token", environ={TOKEN_ENV: TOKEN}))
    assert client.get_kfp_healthz().multi_user is False
    assert kfp_server.requests and {r.authorization for r in kfp_server.requests} == {f"Bearer {TOKEN}"}


def test_kfp_client_rereads_the_projected_service_account_token(clean_env, kfp_server, tmp_path):
    """The kubelet rotates the projected token: every request reads the file again."""
    token_file = tmp_path / "token"
    token_file.write_text("first-token")
    client = make_client(kfp_server.url, "team-a", resolve_auth("service-account", str(token_file), environ={}))
    client.get_kfp_healthz()
    token_file.write_text("rotated-token")
    client.get_kfp_healthz()
    assert [r.authorization for r in kfp_server.requests][-2:] == ["Bearer first-token", "Bearer rotated-token"]


def test_no_credentials_sends_no_authorization(clean_env, kfp_server):
    make_client(kfp_server.url, None, resolve_auth("none", environ={})).get_kfp_healthz()
    assert kfp_server.requests and all(r.authorization is None for r in kfp_server.requests)


# --------------------------------------------------------------------------- the commands


SUBMIT = ["--data-version", "v1", "--source", "s3://hospital/ecg", "--credentials-secret", ""]


def test_submit_runs_as_the_service_account_in_the_namespace(clean_env, kfp_server, monkeypatch, caplog):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv(COOKIES_ENV, "authservice_session=s3cr3t-cookie")
    caplog.set_level(logging.DEBUG)
    args = ["submit", "--host", kfp_server.url, "--namespace", "kubeflow-user-example-com"]
    args += ["--service-account", "default-editor", "--image-pull-secret", "cessl-registry", *SUBMIT]
    assert cli.main(["-v", *args]) == 0
    (experiment,) = kfp_server.posted("/experiments")
    assert experiment["namespace"] == "kubeflow-user-example-com"
    (run,) = kfp_server.posted("/runs")
    assert run["service_account"] == "default-editor" and run["experiment_id"] == "exp-1"
    # the package sent holds the pull Secret on every task
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors and all(
        [secret["secretName"] for secret in e["imagePullSecret"]] == ["cessl-registry"] for e in executors.values()
    )
    assert {r.authorization for r in kfp_server.api_requests()} == {f"Bearer {TOKEN}"}
    assert {r.cookie for r in kfp_server.api_requests()} == {"authservice_session=s3cr3t-cookie"}
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "bearer token from $KF_PIPELINES_TOKEN" in caplog.text
    assert TOKEN not in logged and "s3cr3t-cookie" not in logged
    assert "SYNTHETIC BACKBONE" in caplog.text  # backbone "default" on a cluster warns


def test_schedule_passes_the_service_account(clean_env, kfp_server, tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ["schedule", "--host", kfp_server.url, "--cron", "0 3 * * 1", "--kfp-token-file", str(token_file)]
    args += ["--service-account", "pipeline-runner", "--backbone", "s3://models/base", "--backbone-config", "base"]
    args += ["--source", "s3://hospital/ecg", "--credentials-secret", ""]
    assert cli.main(args) == 0
    (job,) = kfp_server.posted("/recurringruns")
    assert job["service_account"] == "pipeline-runner"
    assert {r.authorization for r in kfp_server.api_requests()} == {f"Bearer {TOKEN}"}
    assert "SYNTHETIC BACKBONE" not in caplog.text  # a real backbone: no warning


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--service-account", "Default_Editor"], "--service-account"),
        (["--namespace", "team/a"], "--namespace"),
        (["--image-pull-secret", "UPPER"], "--image-pull-secret"),
        (["--kfp-auth", "password"], "--kfp-auth"),
        (["--kfp-token-file", "/no/such/token"], "--kfp-token-file"),
    ],
)
def test_bad_cluster_flags_are_refused_before_anything_runs(clean_env, kfp_server, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "--host", kfp_server.url, *SUBMIT, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not kfp_server.requests


def test_compile_warns_that_the_package_defaults_to_the_synthetic_backbone(clean_env, tmp_path, caplog):
    assert cli.main(["compile", "-o", str(tmp_path / "p.yaml"), "--image-pull-secret", "cessl-registry"]) == 0
    assert "the compiled pipeline's default backbone parameter: SYNTHETIC BACKBONE" in caplog.text
