"""Who may promote: a real `mlflow server --app-name basic-auth` (tests/servers.py), users and
permissions made by the real `cessl access init`, and `cessl promote` / `rollback` run as
the real CLI under each identity (issues 17 and 22).

One server per module; production models ``cessl-ecg`` and ``cessl-ecg-a`` (site ``a``) and
their candidates models (``-candidates``, where the pipeline registers); the pipeline
identity ``cessl-pipeline``, release manager ``alice``, reviewer ``rita``. Separated duties:
acting with plain ``MlflowClient`` calls, the pipeline cannot write anything to a production
model (the server refuses), and ``cessl promote`` refuses forged evidence, a model-less
version and a version whose artifacts do not match their digests (real tiny models,
``tests/promote_support.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from signing_support import make_signer

from ml.errors import EXIT_UNAVAILABLE, EXIT_USAGE
from pipeline.registry.access import (
    AccessPlan,
    password_env,
    plan_grants,
)
from pipeline.registry.audit import AUDIT_EXPERIMENT, AuditEntry, history, record
from pipeline.registry.signing import KEY_ENV, TRUST_ENV
from pipeline.registry.tracking import (
    CHALLENGER,
    CHAMPION,
    TAG_DIGEST_ADAPTER,
    TAG_SOURCE_CANDIDATE,
    candidates_model_name,
)

REPO = Path(__file__).resolve().parents[2]
PIPELINE, MANAGER, REVIEWER, AUDITOR = "cessl-pipeline", "alice", "rita", "audrey"
MODEL, SITE_MODEL, AUDITED_MODEL = "cessl-ecg", "cessl-ecg-a", "cessl-ecg-c"
CANDIDATES, SITE_CANDIDATES = candidates_model_name(MODEL), candidates_model_name(SITE_MODEL)

pytestmark = pytest.mark.integration


@dataclass
class Cluster:
    """The server, each identity's password, and every CLI output seen (scanned at the end)."""

    server: object
    passwords: dict[str, str] = field(repr=False)
    outputs: list[str] = field(default_factory=list, repr=False)
    init_argv: list[str] = field(default_factory=list)
    init_env: dict[str, str] = field(default_factory=dict, repr=False)
    signing: Path = Path()  # alice's key pair and the trust file listing her

    def env(self, user: str = "", password: str | None = None) -> dict[str, str]:
        if not user:
            return self.server.env()
        return self.server.env(user, self.passwords[user] if password is None else password)

    def cli(
        self, argv: list[str], user: str = "", password: str | None = None, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """The real ``cessl`` in a child process as ``user`` (none: anonymous)."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CESSL_PASSWORD_"))}
        environment |= {"PYTHONPATH": str(REPO), **self.env(user, password), **(extra or {})}
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *argv, "--tracking-uri", self.server.tracking_uri],
            cwd=self.server.data_dir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.outputs += [done.stdout, done.stderr]
        return done


@pytest.fixture(scope="module")
def cluster(mlflow_auth_server) -> Iterator[Cluster]:
    """The server with its roles, made by ``cessl access init`` (run twice: idempotent)."""
    passwords = {
        "admin": mlflow_auth_server.admin_password,
        **{user: f"pw-{user}-" + secrets.token_urlsafe(12) for user in (PIPELINE, MANAGER, REVIEWER, AUDITOR)},
    }
    cluster = Cluster(mlflow_auth_server, passwords)
    argv = ["access", "init", "--pipeline-user", PIPELINE, "--release-manager", MANAGER, "--reviewer", REVIEWER]
    argv += ["--auditor", AUDITOR, "--model", MODEL, "--site", "a", "--site", "c"]
    env = {password_env(u): passwords[u] for u in (PIPELINE, MANAGER, REVIEWER, AUDITOR)}
    done = cluster.cli(argv, "admin", extra=env)
    assert done.returncode == 0, done.stderr
    cluster.init_argv, cluster.init_env = argv, env
    cluster.signing = Path(mlflow_auth_server.data_dir) / "signing"
    make_signer(cluster.signing, MANAGER)
    yield cluster


@pytest.fixture(autouse=True)
def signing_key(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of the server's tests finds alice's signing key and the trust file (only a
    release manager's decision is ever signed: the others are refused before that)."""
    if "cluster" not in request.fixturenames:
        return
    cluster = request.getfixturevalue("cluster")
    monkeypatch.setenv(KEY_ENV, str(cluster.signing / "keys" / MANAGER / "signing-key.pem"))
    monkeypatch.setenv(TRUST_ENV, str(cluster.signing / "trust.yaml"))


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cessl(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The CLI in this process (``pipeline.cli.main``, its one error boundary) as a user: the
    same code as the child process, without its 5-20 s of start-up on a busy machine."""
    from pipeline import cli

    def run(argv: list[str], user: str = "", password: str | None = None) -> Outcome:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(key, raising=False)
        for key, value in cluster.env(user, password).items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(cluster.server.data_dir)
        capsys.readouterr()
        try:
            code = cli.main([*argv, "--tracking-uri", cluster.server.tracking_uri])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        captured = capsys.readouterr()
        cluster.outputs += [captured.out, captured.err]
        return Outcome(code, captured.out, captured.err)

    return run


@pytest.fixture
def as_user(cluster: Cluster, monkeypatch: pytest.MonkeyPatch):
    """Make this process's MLflow clients authenticate as a user (MLflow's standard variables)."""

    def switch(user: str) -> object:
        from mlflow import MlflowClient

        for key, value in cluster.env(user).items():
            monkeypatch.setenv(key, value)
        uri = cluster.server.tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    return switch


def _register(client, model: str) -> str:
    """What the pipeline's register step writes on the server (a run, a version of a
    candidates model, the ``challenger`` alias and its audit entry), without a model behind it."""
    experiment = client.get_experiment_by_name("cessl")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("cessl")
    run = client.create_run(experiment_id, tags={"method": "cessl"})
    client.log_param(run.info.run_id, "labelled_ratio", "0.05")
    client.log_text(run.info.run_id, "weights", "model/adapter.txt")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(model, CHALLENGER, version.version)
    record(
        client,
        AuditEntry(model=model, action="challenger", versions={"challenger": str(version.version)}, reason="test"),
    )
    return str(version.version)


def _aliases(client, model: str) -> dict[str, str]:
    return dict(client.get_registered_model(model).aliases or {})


def _one_line(text: str) -> str:
    """The one line of ``text`` (MLflow's own "View run" links of the audit runs aside)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("🏃 View run", "🧪 View"))]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_anonymous_calls_are_refused(cluster: Cluster) -> None:
    url = cluster.server.tracking_uri + "/api/2.0/mlflow/registered-models/search?max_results=5"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    done = cluster.cli(["models", MODEL])
    assert done.returncode == EXIT_UNAVAILABLE
    assert "anonymous" in _one_line(done.stderr) and "MLFLOW_TRACKING_USERNAME" in done.stderr


def test_access_init_grants_each_role_what_the_plan_says(
    cluster: Cluster, as_user, cessl, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server import get_app_client

    for key, value in cluster.init_env.items():  # a second run changes nothing it should not
        monkeypatch.setenv(key, value)
    assert cessl(cluster.init_argv, "admin").returncode == 0
    as_user("admin")
    auth = get_app_client("basic-auth", tracking_uri=cluster.server.tracking_uri)
    models = (MODEL, SITE_MODEL, CANDIDATES, SITE_CANDIDATES, "other")
    effective = {
        user: {m: auth.get_user_permission(user, "registered_model", m).permission for m in models}
        for user in (PIPELINE, MANAGER, REVIEWER)
    }
    assert effective == {
        PIPELINE: {MODEL: "READ", SITE_MODEL: "READ", CANDIDATES: "EDIT", SITE_CANDIDATES: "EDIT", "other": "READ"},
        MANAGER: {MODEL: "MANAGE", SITE_MODEL: "MANAGE", CANDIDATES: "EDIT", SITE_CANDIDATES: "EDIT", "other": "READ"},
        REVIEWER: dict.fromkeys(models, "READ"),
    }
    plan = plan_grants(AccessPlan(PIPELINE, (MANAGER,), (REVIEWER,), (MODEL, SITE_MODEL)))
    assert not {g.resource for g in plan[PIPELINE]} & {MODEL, SITE_MODEL}  # only the wildcard READ there
    assert {g.permission for g in plan[PIPELINE] if g.resource in (CANDIDATES, SITE_CANDIDATES)} == {"EDIT"}


def test_pipeline_registers_and_sets_challenger_but_cannot_promote(cluster: Cluster, as_user, cessl) -> None:
    from mlflow.exceptions import MlflowException

    pipeline = as_user(PIPELINE)
    version = _register(pipeline, SITE_CANDIDATES)
    before = _aliases(pipeline, SITE_CANDIDATES)
    assert before == {CHALLENGER: version}
    entries = len(history(pipeline, SITE_MODEL))

    for run, argv in (
        (cluster.cli, ["promote", SITE_MODEL, "--force", "--reason", "try"]),  # the real CLI process
        (cessl, ["rollback", SITE_MODEL]),
    ):
        done = run(argv, PIPELINE)
        assert done.returncode == EXIT_UNAVAILABLE, done.stderr
        line = _one_line(done.stderr)
        assert all(word in line for word in (PIPELINE, SITE_MODEL, "MANAGE", "has READ")), line
    done = cessl(["promote", "--site", "a"], PIPELINE)  # a network's site model: checked the same way
    assert done.returncode == EXIT_UNAVAILABLE and SITE_MODEL in _one_line(done.stderr)

    # what the server itself refuses the pipeline: deleting on its candidates model (EDIT only)...
    with pytest.raises(MlflowException, match="403"):
        pipeline.delete_model_version(SITE_CANDIDATES, version)
    with pytest.raises(MlflowException, match="403"):
        pipeline.delete_registered_model_alias(SITE_CANDIDATES, CHALLENGER)
    with pytest.raises(MlflowException, match="403"):
        pipeline.delete_registered_model(SITE_CANDIDATES)
    # ...and any write at all to the production model: a version, a copy, a tag, any alias
    source = pipeline.get_model_version(SITE_CANDIDATES, version)
    for write in (
        lambda: pipeline.create_model_version(SITE_MODEL, source.source, source.run_id),
        lambda: pipeline.copy_model_version(f"models:/{SITE_CANDIDATES}/{version}", SITE_MODEL),
        lambda: pipeline.set_registered_model_alias(SITE_MODEL, CHAMPION, "1"),
        lambda: pipeline.set_registered_model_alias(SITE_MODEL, CHALLENGER, "1"),
        lambda: pipeline.set_registered_model_tag(SITE_MODEL, "champion_history", "[]"),
        lambda: pipeline.delete_registered_model(SITE_MODEL),
    ):
        with pytest.raises(MlflowException, match="403"):
            write()
    assert not pipeline.search_model_versions(f"name = '{SITE_MODEL}'")
    assert _aliases(pipeline, SITE_MODEL) == {}
    assert _aliases(pipeline, SITE_CANDIDATES) == before
    assert len(history(pipeline, SITE_MODEL)) == entries
    assert pipeline.get_model_version(SITE_CANDIDATES, version).tags.get("promotion_decision") is None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Records, a backbone and a good and a bad adapter (``tests/promote_support.py``)."""
    from promote_support import BAD, GOOD, make_adapter, make_backbone, write_records

    root = tmp_path_factory.mktemp("models")
    records, hashes = write_records(root)
    backbone = make_backbone(root)
    return {
        "records": records,
        "hashes": hashes,
        "backbone": backbone,
        "good": make_adapter(root, backbone, "good", GOOD),
        "bad": make_adapter(root, backbone, "bad", BAD),
    }


def _pipeline(as_user, models: dict, model: str):
    """The pipeline's register step, acting as the pipeline identity."""
    from promote_support import Pipeline

    return Pipeline(as_user(PIPELINE), model, models["records"], models["hashes"], models["backbone"])


def test_release_manager_promotes_and_rolls_back_and_the_audit_names_who(
    cluster: Cluster, as_user, cessl, models
) -> None:
    """The release manager's promote copies the candidate into the production model; the
    evidence is recomputed (a forged paired bootstrap is ignored); a model-less version and a
    version whose artifacts do not match their digests are refused in one line, even forced."""
    from pipeline.registry.policy import GATE_ARTIFACT

    pipeline = _pipeline(as_user, models, MODEL)
    c1 = pipeline.register(models["bad"])
    done = cluster.cli(["promote", MODEL], MANAGER)  # the real process: the first champion
    assert done.returncode == 0, done.stderr
    admin = as_user("admin")
    assert _aliases(admin, MODEL) == {CHAMPION: "1"}
    assert admin.get_model_version(MODEL, "1").tags[TAG_SOURCE_CANDIDATE] == f"{CANDIDATES}/{c1}"

    # forged evidence: a worse challenger (the same bad adapter again) with a fabricated bootstrap
    pipeline = _pipeline(as_user, models, MODEL)
    c2 = pipeline.register(models["bad"])
    run_id = pipeline.client.get_model_version(CANDIDATES, c2).run_id
    forged = {"estimate": 0.5, "ci_low": 0.3, "ci_high": 0.7, "challenger": 0.9, "champion": 0.2}
    pipeline.client.log_dict(run_id, {"intervals": {"macro_f_beta": forged}, "per_class": []}, GATE_ARTIFACT)
    pipeline.client.log_metric(run_id, "test_macro_f_beta", 0.99)
    done = cessl(["promote", MODEL], MANAGER)
    assert done.returncode == 1 and "REFUSED" in done.stdout and "0.3000" not in done.stdout, done.stdout
    # a version with numbers and tags but no model, and one with a wrong digest: refused even forced
    digest = {TAG_DIGEST_ADAPTER: admin.get_model_version(CANDIDATES, c1).tags[TAG_DIGEST_ADAPTER]}
    for adapter, tags, why in (
        (None, digest, "has no loadable model"),
        (models["good"], {TAG_DIGEST_ADAPTER: "0" * 64}, "do not match their recorded digest"),
    ):
        _pipeline(as_user, models, MODEL).register(adapter, tags=tags)
        done = cessl(["promote", MODEL, "--force", "--reason", "trust me"], MANAGER)
        assert done.returncode == 1 and why in _one_line(done.stdout), done.stdout
    assert _aliases(admin, MODEL) == {CHAMPION: "1"}

    # a better challenger: promoted on the recomputed numbers, then rolled back
    c5 = _pipeline(as_user, models, MODEL).register(models["good"])
    done = cessl(["promote", MODEL], MANAGER)
    assert done.returncode == 0 and "(recomputed)" in done.stdout, done.stdout
    assert _aliases(admin, MODEL) == {CHAMPION: "2"}
    assert admin.get_model_version(MODEL, "2").tags[TAG_SOURCE_CANDIDATE] == f"{CANDIDATES}/{c5}"
    done = cessl(["rollback", MODEL, "--reason", "v2 misbehaves"], MANAGER)
    assert done.returncode == 0, done.stderr
    assert _aliases(admin, MODEL)[CHAMPION] == "1"

    reviewer = as_user(REVIEWER)
    log = [(e.action, e.who) for e in history(reviewer, MODEL)]
    assert log == [
        ("promote", MANAGER),
        ("refuse", MANAGER),
        ("refuse", MANAGER),
        ("refuse", MANAGER),
        ("promote", MANAGER),
        ("rollback", MANAGER),
    ]
    done = cessl(["models", MODEL, "--history"], REVIEWER)
    assert done.returncode == 0 and MANAGER in done.stdout


def test_a_log_cut_with_its_head_behind_the_auditors_anchor_is_caught(cluster: Cluster, as_user, cessl, models) -> None:
    """A release manager may rewrite the head tag (MANAGE on the model) and hide the newest audit
    run (EDIT on the audit experiment: retag it to another model): the log then reads as a
    consistent, shorter one. The auditor's anchor, which only the auditor may write, catches it."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.anchor import ANCHOR_EXPERIMENT, anchor_of
    from pipeline.registry.audit import AUDIT_EXPERIMENT, TAG_HEAD, TAG_MODEL, audit_runs, run_entry

    model = AUDITED_MODEL
    _pipeline(as_user, models, model).register(models["good"])
    assert cessl(["promote", model], MANAGER).returncode == 0  # entry: the first champion
    assert cessl(["promote", model], MANAGER).returncode == 1  # entry: refused (already the champion)
    done = cessl(["audit", "verify", "--model", model, "--anchor"], AUDITOR)
    assert done.returncode == 0, done.stderr
    reviewer = as_user(REVIEWER)
    runs = audit_runs(reviewer, model)[model]
    assert anchor_of(reviewer, model).seq == len(runs) >= 2

    manager = as_user(MANAGER)  # the anchor is the auditor's alone
    anchors = manager.get_experiment_by_name(ANCHOR_EXPERIMENT).experiment_id
    with pytest.raises(MlflowException, match="403"):
        manager.set_experiment_tag(anchors, f"cessl.anchor.{model}", '{"seq": 1, "digest": "x"}')
    done = cessl(["audit", "verify", "--model", model, "--anchor"], MANAGER)
    assert done.returncode == EXIT_UNAVAILABLE and "the auditor may" in _one_line(done.stderr), done.stderr

    # the cut: the newest entry hidden, the head set back to the one before it
    assert manager.get_experiment_by_name(AUDIT_EXPERIMENT) is not None
    manager.set_tag(runs[-1].info.run_id, TAG_MODEL, "elsewhere")
    previous = run_entry(manager, audit_runs(manager, model)[model][-1])
    head = {"seq": previous.seq, "digest": previous.digest()}
    manager.set_registered_model_tag(model, TAG_HEAD, json.dumps(head, sort_keys=True))
    done = cessl(["audit", "verify", "--model", model], REVIEWER)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "auditor's anchor" in done.stderr and "entries removed" in done.stderr
    assert cessl(["models", model, "--history"], REVIEWER).returncode == 1


def test_reviewer_reads_but_cannot_write(cluster: Cluster, as_user, cessl) -> None:
    from mlflow.exceptions import MlflowException

    version = _register(as_user(PIPELINE), SITE_CANDIDATES)
    reviewer = as_user(REVIEWER)
    assert _aliases(reviewer, SITE_CANDIDATES)[CHALLENGER] == version
    assert reviewer.get_model_version(SITE_CANDIDATES, version).run_id
    with pytest.raises(MlflowException, match="403"):
        reviewer.set_registered_model_alias(SITE_CANDIDATES, CHAMPION, version)
    with pytest.raises(MlflowException, match="403"):
        reviewer.set_registered_model_tag(SITE_MODEL, "note", "x")
    done = cessl(["promote", SITE_MODEL, "--force", "--reason", "x"], REVIEWER)
    assert done.returncode == EXIT_UNAVAILABLE and "has READ" in _one_line(done.stderr)
    assert CHAMPION not in _aliases(as_user(REVIEWER), SITE_MODEL)


def test_access_init_takes_a_production_model_back_from_whoever_created_it(
    cluster: Cluster, as_user, cessl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any user may create a new model (and MANAGE it): a reviewer who creates the model of a
    site before it is configured keeps only READ once `access init` names that site."""
    from mlflow.server import get_app_client

    as_user(REVIEWER).create_registered_model("cessl-ecg-b")
    assert cessl(["access", "check", "cessl-ecg-b"], REVIEWER).returncode == 0
    for key, value in cluster.init_env.items():
        monkeypatch.setenv(key, value)
    assert cessl([*cluster.init_argv, "--site", "b"], "admin").returncode == 0
    as_user("admin")
    auth = get_app_client("basic-auth", tracking_uri=cluster.server.tracking_uri)
    permission = {
        u: auth.get_user_permission(u, "registered_model", "cessl-ecg-b").permission
        for u in (REVIEWER, PIPELINE, MANAGER)
    }
    assert permission == {REVIEWER: "READ", PIPELINE: "READ", MANAGER: "MANAGE"}
    done = cessl(["promote", "cessl-ecg-b", "--force", "--reason", "x"], REVIEWER)
    assert done.returncode == EXIT_UNAVAILABLE and "has READ" in _one_line(done.stderr)


@pytest.mark.parametrize("argv", [["promote", MODEL, "--force", "--reason", "x"], ["models", MODEL]])
def test_wrong_password_fails_with_one_line(cluster: Cluster, argv: list[str]) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(12)
    done = cluster.cli(argv, MANAGER, password=wrong)
    assert done.returncode == EXIT_UNAVAILABLE
    line = _one_line(done.stderr)
    assert MANAGER in line and ("401" in line or "refused the credentials" in line), line
    assert wrong not in done.stderr + done.stdout


def test_access_init_refuses_bad_input_in_one_line(cessl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["access", "init", "--pipeline-user", PIPELINE, "--release-manager", MANAGER]
    monkeypatch.setenv(password_env(PIPELINE), "short")
    short = cessl(base, "admin")
    assert short.returncode == EXIT_USAGE and "12 characters" in _one_line(short.stderr)
    monkeypatch.delenv(password_env(PIPELINE))
    doubled = cessl([*base, "--reviewer", MANAGER], "admin")
    assert doubled.returncode == EXIT_USAGE and "more than one role" in _one_line(doubled.stderr)
    not_admin = cessl(base, MANAGER)
    assert not_admin.returncode == EXIT_UNAVAILABLE and "not an MLflow admin" in _one_line(not_admin.stderr)
    secret = "file-secret-" + secrets.token_urlsafe(8)
    bad = tmp_path / "passwords"
    bad.write_text(f"{PIPELINE} {secret}\n", encoding="utf-8")
    done = cessl([*base, "--passwords", str(bad)], "admin")
    assert done.returncode == EXIT_USAGE and f"{bad}:1: expected user:password" in _one_line(done.stderr)
    assert secret not in done.stderr


def test_no_credential_in_any_log_param_tag_or_artifact(cluster: Cluster, as_user) -> None:
    """Runs last in the module: every output the CLI printed, the server's log, every run's
    params and tags, every registered model's and version's tags, every artifact file."""
    admin = as_user("admin")
    texts = [*cluster.outputs, cluster.server.log_path.read_text(errors="replace")]
    for experiment in admin.search_experiments():
        for run in admin.search_runs([experiment.experiment_id], max_results=1000):
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for model in admin.search_registered_models():
        texts.append(json.dumps(model.tags))
        for version in admin.search_model_versions(f"name = '{model.name}'"):
            texts.append(json.dumps(version.tags))
    files = [p for p in cluster.server.artifacts_dir.rglob("*") if p.is_file()]
    assert any(p.name == "audit.jsonl" for p in files)
    texts += [p.read_text(errors="replace") for p in files]
    assert len(texts) > 10
    blob = "\n".join(texts)
    for user, password in cluster.passwords.items():
        assert password not in blob, f"the password of {user} was found"
    assert AUDIT_EXPERIMENT in {e.name for e in admin.search_experiments()}


def test_a_lost_registration_race_is_tagged_where_the_pipeline_may_not_delete(cluster: Cluster, as_user) -> None:
    """The loser of two registrations of one fingerprint is withdrawn; on its candidates model
    the pipeline may not delete the version (EDIT, not MANAGE), so it stays, tagged as the duplicate."""
    from pipeline.registry.tracking import TAG_DUPLICATE_OF, _withdraw

    pipeline = as_user(PIPELINE)
    winner = pipeline.get_model_version(SITE_CANDIDATES, _register(pipeline, SITE_CANDIDATES))
    loser = pipeline.get_model_version(SITE_CANDIDATES, _register(pipeline, SITE_CANDIDATES))
    _withdraw(pipeline, SITE_CANDIDATES, loser.version, loser.run_id, winner)
    kept = pipeline.get_model_version(SITE_CANDIDATES, loser.version)
    assert kept.tags[TAG_DUPLICATE_OF] == f"{SITE_CANDIDATES}/{winner.version}"
    assert pipeline.get_run(loser.run_id).info.lifecycle_stage == "deleted"
