"""Signed decisions against a real `mlflow server --app-name basic-auth` (tests/servers.py): the
pipeline identity, with plain MlflowClient calls, edits, adds or hides an audit entry, or
overwrites an audit artifact; ``champion`` is moved by whoever may write the production model
(the server refuses the pipeline that); `cessl audit verify` and `cessl models --history` exit
1 naming the model, `cessl predict` refuses, and `cessl serve`'s bank keeps the champion it
verified. Roles as `cessl access init` makes them: pipeline ``cessl-pipeline`` (registers real
models in ``<model>-candidates``, ``tests/promote_support.py``), release manager ``alice`` (whose
signed `cessl promote` copies the challenger into the production model), reviewer ``rita``
(who reads). The production model's audit log holds only alice's decisions."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from promote_support import GOOD, Pipeline, make_adapter, make_backbone, write_records
from signing_support import make_signer

from pipeline import cli
from pipeline.registry.access import AccessPlan, apply_plan
from pipeline.registry.audit import AUDIT_EXPERIMENT, LOG_FILE, TAG_ENTRY, TAG_MODEL, TAG_SEQ, AuditEntry
from pipeline.registry.policy import site_model_name
from pipeline.registry.signing import KEY_ENV, TRUST_ENV
from pipeline.registry.tracking import CHAMPION

PIPELINE, MANAGER, REVIEWER = "cessl-pipeline", "alice", "rita"
BASE = "audit"
SITES = ("alias", "edit", "add", "hide", "cut", "overwrite")

pytestmark = pytest.mark.integration


@dataclass
class Registry:
    server: object
    passwords: dict[str, str] = field(repr=False)
    signing: Path = Path()
    models: dict = field(default_factory=dict)  # records, hashes, backbone, adapter, logged models

    def env(self, user: str) -> dict[str, str]:
        return self.server.env(user, self.passwords[user]) | {
            KEY_ENV: str(self.signing / "keys" / MANAGER / "signing-key.pem"),
            TRUST_ENV: str(self.signing / "trust.yaml"),
        }


@pytest.fixture(scope="module")
def registry(mlflow_auth_server, tmp_path_factory) -> Iterator[Registry]:
    passwords = {"admin": mlflow_auth_server.admin_password}
    passwords |= {u: f"pw-{u}-" + secrets.token_urlsafe(12) for u in (PIPELINE, MANAGER, REVIEWER)}
    plan = AccessPlan(PIPELINE, (MANAGER,), (REVIEWER,), tuple(site_model_name(BASE, s) for s in SITES))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in mlflow_auth_server.admin_env().items():
            mp.setenv(key, value)
        apply_plan(mlflow_auth_server.tracking_uri, plan, passwords.get)
    signing = tmp_path_factory.mktemp("signing")
    make_signer(signing, MANAGER)
    root = tmp_path_factory.mktemp("models")
    records, hashes = write_records(root)
    backbone = make_backbone(root)
    models = {"records": records, "hashes": hashes, "backbone": backbone, "logged": {}}
    models["adapter"] = make_adapter(root, backbone, "good", GOOD)
    yield Registry(mlflow_auth_server, passwords, signing, models)


@pytest.fixture
def act(registry: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """act(user) -> an MlflowClient authenticated as ``user`` (this process's MLflow variables);
    act(user, argv) -> (exit code, stderr) of the CLI as ``user``."""
    from mlflow import MlflowClient

    def run(user: str, argv: list[str] | None = None):
        for key, value in registry.env(user).items():
            monkeypatch.setenv(key, value)
        uri = registry.server.tracking_uri
        if argv is None:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        capsys.readouterr()
        code = cli.main([*argv, "--tracking-uri", uri])
        return code, capsys.readouterr().err

    return run


def _register(registry: Registry, pipeline, model: str) -> str:
    """The pipeline's register step in plain client calls as the pipeline identity: a run, the
    real model, a version of ``<model>-candidates`` (its digests), ``challenger`` there."""
    m = registry.models
    found = Pipeline(pipeline, model, m["records"], m["hashes"], m["backbone"], logged=m["logged"])
    return found.register(m["adapter"])


def _two_champions(act, registry: Registry, site: str) -> tuple[str, str, str]:
    """Production v1 then v2 made champion by alice's signed decisions (each a copy of the
    candidate she promoted); (model, v1, v2)."""
    model = site_model_name(BASE, site)
    versions = []
    for why in ("first", "second"):
        _register(registry, act(PIPELINE), model)
        code, err = act(MANAGER, ["promote", model, "--force", "--reason", why])
        assert code == 0, err
        versions.append(str(act(REVIEWER).get_model_version_by_alias(model, CHAMPION).version))
    return model, versions[0], versions[1]


def _bank(registry: Registry, site: str):
    from pipeline.serving.server import Network, ServeConfig

    config = ServeConfig(
        sites=(site,),
        tracking_uri=registry.server.tracking_uri,
        model_name=BASE,
        refresh_seconds=0,
        trust_file=str(registry.signing / "trust.yaml"),
    )
    return Network(config)


def _audit_runs(client, model: str) -> list:
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], f"tags.`{TAG_MODEL}` = '{model}'")
    return sorted(runs, key=lambda r: int(r.data.tags[TAG_SEQ]))


def _move_alias(act, model: str, version: str) -> None:
    """The server refuses the pipeline (READ on a production model); the admin stands for
    whoever can write the model (the check is the same)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"403|PERMISSION_DENIED"):
        act(PIPELINE).set_registered_model_alias(model, CHAMPION, version)
    act("admin").set_registered_model_alias(model, CHAMPION, version)


def _detected(act, registry: Registry, model: str, site: str, bank, *needles: str) -> str | None:
    for argv in (["audit", "verify", "--model", model], ["models", model, "--history"]):
        code, err = act(REVIEWER, argv)
        assert code == 1 and "Traceback" not in err, (argv, err)
        assert model in err and all(n in err for n in needles), (argv, err)
    code, err = act(REVIEWER, ["predict", "--model", f"models:/{model}@champion", "no-such-record"])
    assert code == 1 and model in err.strip().splitlines()[-1], err
    alias = bank.champion(site, refresh=True)
    assert alias.audit and model in alias.audit  # reported in readiness and the log
    return alias.version


@pytest.fixture
def case(registry: Registry, act, request):
    """(model, v1, v2, the serving bank that verified v2) for this test's site."""
    site = request.param
    model, v1, v2 = _two_champions(act, registry, site)
    bank = _bank(registry, site)
    assert bank.champion(site, refresh=True).version == v2 and not bank.audit_problem(site)
    code, err = act(REVIEWER, ["audit", "verify", "--model", model])
    assert code == 0, err
    yield site, model, v1, v2, bank
    bank.close()


@pytest.mark.parametrize("case", ["alias"], indirect=True)
def test_a_moved_alias(case, act, registry):
    site, model, v1, v2, bank = case
    _move_alias(act, model, v1)
    assert _detected(act, registry, model, site, bank, "'champion' is v1", f"names v{v2}") == v2


@pytest.mark.parametrize("case", ["edit"], indirect=True)
def test_an_edited_entry(case, act, registry):
    site, model, _, v2, bank = case
    pipeline = act(PIPELINE)
    run = _audit_runs(pipeline, model)[0]  # alice's first decision
    entry = json.loads(run.data.tags[TAG_ENTRY])
    entry["reason"] = "rewritten"
    pipeline.set_tag(run.info.run_id, TAG_ENTRY, json.dumps(entry))
    assert _detected(act, registry, model, site, bank, "audit log broken") == v2


@pytest.mark.parametrize("case", ["add"], indirect=True)
def test_an_added_entry(case, act, registry):
    site, model, v1, v2, bank = case
    pipeline = act(PIPELINE)
    runs = _audit_runs(pipeline, model)
    last = AuditEntry.from_json(json.loads(runs[-1].data.tags[TAG_ENTRY]))
    forged = AuditEntry(
        model, "promote", {"challenger": v1}, "alice promoted v1", who=MANAGER, champion={"version": v1}
    )
    forged.seq, forged.prev, forged.signature = last.seq + 1, last.digest(), "AAAA"
    experiment = pipeline.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id
    tags = {TAG_MODEL: model, TAG_SEQ: str(forged.seq), TAG_ENTRY: forged.line()}
    pipeline.create_run(experiment, tags=tags)
    _move_alias(act, model, v1)
    assert _detected(act, registry, model, site, bank, "audit log broken", "signature") == v2


@pytest.mark.parametrize("case", ["hide"], indirect=True)
def test_a_hidden_entry(case, act, registry):
    """The pipeline may not delete an audit run (MANAGE): it takes one out of the model's log."""
    from mlflow.exceptions import MlflowException

    site, model, _, v2, bank = case
    pipeline = act(PIPELINE)
    runs = _audit_runs(pipeline, model)
    with pytest.raises(MlflowException):
        pipeline.delete_run(runs[-1].info.run_id)
    pipeline.set_tag(runs[0].info.run_id, TAG_MODEL, "elsewhere")  # the first decision leaves the log
    assert _detected(act, registry, model, site, bank, "audit log broken") == v2


@pytest.mark.parametrize("case", ["cut"], indirect=True)
def test_a_hidden_last_decision(case, act, registry):
    """Alice's last decision, a refusal, taken out of the log: every link that is left holds
    and the alias is still what the last remaining decision names; the head that alice wrote on
    the production model (which the pipeline may not write) names the missing entry."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.audit import TAG_HEAD

    site, model, _, v2, bank = case
    _register(registry, act(PIPELINE), model)
    code, err = act(MANAGER, ["promote", model])  # the same adapter again: not promoted
    assert code != 0 and "Traceback" not in err, err
    pipeline = act(PIPELINE)
    last = _audit_runs(pipeline, model)[-1]
    assert last.data.tags["cessl.audit.action"] != "promote"
    assert json.loads(pipeline.get_registered_model(model).tags[TAG_HEAD])["seq"] == int(last.data.tags[TAG_SEQ])
    with pytest.raises(MlflowException, match=r"403|PERMISSION_DENIED"):
        pipeline.delete_registered_model_tag(model, TAG_HEAD)
    pipeline.set_tag(last.info.run_id, TAG_MODEL, "elsewhere")
    assert _detected(act, registry, model, site, bank, "audit log broken", TAG_HEAD, "removed or hidden") == v2


@pytest.mark.parametrize("case", ["overwrite"], indirect=True)
def test_an_overwritten_audit_artifact(case, act, registry, tmp_path):
    site, model, _, v2, bank = case
    pipeline = act(PIPELINE)
    earliest = _audit_runs(pipeline, model)[0]  # alice's first decision
    (tmp_path / LOG_FILE).write_text("")
    pipeline.log_artifact(earliest.info.run_id, str(tmp_path / LOG_FILE))  # PUT over the earlier object
    assert _detected(act, registry, model, site, bank, "audit log broken", LOG_FILE) == v2
