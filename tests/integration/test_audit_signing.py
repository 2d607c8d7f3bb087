"""Signed, chained registry decisions on a local SQLite store (no auth server): whoever can
write the store directly (plain MlflowClient calls) moves the alias, edits, adds or deletes an
audit entry, overwrites an audit artifact or rewrites ``champion_history``; the signatures and
the chain are what detect it (`cessl audit verify`, `models --history`, `predict`), and rollback
only goes back to a signed champion with the same backbone, classes and test set.

As in production: the pipeline's side registers real models (``tests/promote_support.py``) in
``<model>-candidates``; each decision is a signed ``promote`` that copies the challenger into
the production model, whose audit log holds only the decisions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from promote_support import GOOD, Pipeline, make_adapter, make_backbone, write_records
from signing_support import make_signer, use_signer

from pipeline import cli
from pipeline.registry.audit import (
    AUDIT_EXPERIMENT,
    LOG_FILE,
    TAG_ENTRY,
    TAG_HEAD,
    TAG_MODEL,
    TAG_SEQ,
    AuditEntry,
    history,
    record,
)
from pipeline.registry.policy import HISTORY_TAG, RegistryError, promote, rollback
from pipeline.registry.signing import SigningError, find_trust, load_signer
from pipeline.registry.testsets import TAG_VERSION
from pipeline.registry.tracking import CHAMPION, TAG_SOURCE_CANDIDATE
from pipeline.registry.verify import verify_model

USER = "dr-sign"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """One SQLite store, the records, the backbone and a production and a baseline adapter
    (``tests/promote_support.py``): promote loads and rescores the models it decides on."""
    root = tmp_path_factory.mktemp("signed")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("runs", artifact_location=(root / "mlruns").as_uri())
    records, hashes = write_records(root)
    backbone = make_backbone(root)
    return {
        "uri": uri,
        "records": records,
        "hashes": hashes,
        "backbone": backbone,
        "cessl": make_adapter(root, backbone, "good", GOOD),
        "fixmatch": make_adapter(root, backbone, "fixmatch", GOOD, method="fixmatch", seed=1),
        "logged": {},  # adapter -> its logged model, shared by the module's pipelines
    }


@dataclass
class Model:
    """A production model ``name``; the pipeline registers its candidates in ``<name>-candidates``."""

    client: MlflowClient
    name: str
    pipeline: Pipeline
    adapters: dict[str, Path]

    @property
    def candidates(self) -> str:
        return self.pipeline.candidates

    def version(self, method: str = "cessl", backbone: str = "", testset: str = "") -> str:
        """A candidate version of a real model, made ``challenger`` (a baseline too: by hand),
        with the facts rollback checks (``backbone`` / ``testset``: recorded otherwise)."""
        tags = {"backbone_id": backbone} if backbone else {}
        version = self.pipeline.register(self.adapters[method], method=method, tags=tags, challenger=True)
        if testset:
            self.client.set_model_version_tag(self.candidates, version, TAG_VERSION, testset)
        return version

    def force(self, why: str = "release") -> str:
        """A forced, signed promotion of the challenger: its production version."""
        decision = promote(self.client, self.name, force=True, reason=why)
        assert decision.promoted, decision.reason
        return str(decision.production_version)

    def copy(self, candidate: str) -> str:
        """A production version written straight to the store (no decision): its number."""
        return str(self.client.copy_model_version(f"models:/{self.candidates}/{candidate}", self.name).version)

    def champion(self) -> str:
        return str(self.client.get_model_version_by_alias(self.name, CHAMPION).version)

    def runs(self) -> list:
        experiment = self.client.get_experiment_by_name(AUDIT_EXPERIMENT)
        runs = self.client.search_runs([experiment.experiment_id], f"tags.`{TAG_MODEL}` = '{self.name}'")
        return sorted(runs, key=lambda r: int(r.data.tags[TAG_SEQ]))


@pytest.fixture()
def model(world, monkeypatch, tmp_path, request) -> Model:
    store = world["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("CESSL_USER", USER)
    use_signer(monkeypatch, tmp_path, USER)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = "sig-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:12]
    client.create_registered_model(name)
    pipeline = Pipeline(
        client, name, world["records"], world["hashes"], world["backbone"], "runs", logged=world["logged"]
    )
    return Model(client, name, pipeline, {"cessl": world["cessl"], "fixmatch": world["fixmatch"]})


@pytest.fixture()
def two_champions(model) -> tuple[Model, str, str]:
    """Production v1 then v2 made champion by signed (forced) decisions."""
    model.version()
    v1 = model.force("first")
    model.version()
    v2 = model.force("second")
    return model, v1, v2


def _check(model: Model, capsys, *needles: str) -> None:
    """audit verify, models --history and predict each fail with a line naming ``needles``."""
    for argv in (
        ["audit", "verify", "--model", model.name],
        ["models", model.name, "--history"],
        ["predict", "--model", f"models:/{model.name}@champion", "no-such-record"],
    ):
        capsys.readouterr()
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert model.name in last and all(n in last for n in needles), (argv, last)
    assert cli.main(["models"]) == 1  # every model: this one among those that fail
    assert model.name in capsys.readouterr().err


def test_signed_decisions_verify_and_name_the_champion(two_champions, capsys):
    model, v1, v2 = two_champions
    result = verify_model(model.client, model.name, find_trust())
    assert result.ok and result.expected_version == v2 and [c["version"] for c in result.champions] == [v1, v2]
    decisions = [e for e in history(model.client, model.name) if e.is_decision]
    assert all(e.signature and e.who == USER and e.champion["version"] for e in decisions)
    assert decisions[-1].prev == history(model.client, model.name)[-2].digest()
    assert decisions[-1].evidence["comparison"]
    assert cli.main(["audit", "verify", "--model", model.name]) == 0
    assert cli.main(["models", model.name, "--history"]) == 0
    assert "yes" in capsys.readouterr().out  # the signed column


def test_a_moved_alias_is_detected_and_a_refusal_puts_it_back(two_champions, capsys):
    model, v1, v2 = two_champions
    model.client.set_registered_model_alias(model.name, CHAMPION, v1)  # straight to the store
    _check(model, capsys, "'champion'", f"v{v1}", f"v{v2}")
    model.version(method="fixmatch")
    decision = promote(model.client, model.name)  # a baseline: refused, compared with the signed v2
    assert not decision.promoted and decision.previous_champion == v2
    assert model.champion() == v2 and len(model.client.search_model_versions(f"name = '{model.name}'")) == 2
    assert cli.main(["audit", "verify", "--model", model.name]) == 0


def test_an_edited_entry_is_detected(two_champions, capsys):
    model, _, _ = two_champions
    run = model.runs()[0]  # the first decision: its signature and the next entry's prev break
    entry = json.loads(run.data.tags[TAG_ENTRY])
    entry["reason"] = "approved by the board"
    model.client.set_tag(run.info.run_id, TAG_ENTRY, json.dumps(entry))
    _check(model, capsys, "audit log broken", "entry #")


def test_an_added_decision_is_detected(two_champions, capsys):
    model, v1, _ = two_champions
    entries = history(model.client, model.name)
    forged = AuditEntry(
        model=model.name,
        action="promote",
        versions={"challenger": v1},
        reason="alice promoted v1",
        who="alice",
        champion={"version": v1},
        seq=len(entries) + 1,
        prev=entries[-1].digest(),
        signature="AAAA",
    )
    experiment = model.client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id
    tags = {TAG_MODEL: model.name, TAG_SEQ: str(forged.seq), TAG_ENTRY: forged.line()}
    run = model.client.create_run(experiment, tags=tags)
    model.client.log_dict(run.info.run_id, forged.to_json(), "decision.json")
    model.client.set_registered_model_alias(model.name, CHAMPION, v1)
    _check(model, capsys, "audit log broken", "'alice' is not a signer")


def test_a_deleted_entry_is_detected(two_champions, capsys):
    model, v1, _ = two_champions
    model.client.delete_run(model.runs()[-1].info.run_id)  # the decision that made v2 champion
    model.client.set_registered_model_alias(model.name, CHAMPION, v1)  # and the alias back
    _check(model, capsys, "audit log broken", TAG_HEAD, "removed or hidden")  # the head its decider wrote
    first = history(model.client, model.name)[0]  # a local writer may rewrite the head as well:
    head = json.dumps({"seq": first.seq, "digest": first.digest()})
    model.client.set_registered_model_tag(model.name, TAG_HEAD, head)
    _check(model, capsys, "audit log broken", "local audit file")  # the append-only file still has it


def test_an_overwritten_audit_artifact_is_detected(two_champions, capsys, tmp_path):
    model, _, _ = two_champions
    earliest = model.runs()[0]
    fake = tmp_path / LOG_FILE
    fake.write_text("")
    model.client.log_artifact(earliest.info.run_id, str(fake))  # PUT over it
    _check(model, capsys, "audit log broken", LOG_FILE, "overwritten")


def test_the_pipeline_cannot_record_a_decision_and_its_entries_never_make_a_champion(model):
    v1 = model.copy(model.version())  # a production version written straight to the store
    with pytest.raises(SigningError, match="must be signed"):
        record(model.client, AuditEntry(model.name, "promote", {"challenger": v1}, "me", champion={"version": v1}))
    record(model.client, AuditEntry(model.name, "challenger", {"challenger": v1}, "registered"))
    model.client.set_registered_model_alias(model.name, CHAMPION, v1)
    result = verify_model(model.client, model.name, find_trust())
    assert not result.broken and result.expected_version is None and not result.ok
    assert "names no champion" in result.problem()


def test_a_signer_missing_from_the_trust_file_changes_nothing(model, tmp_path, monkeypatch):
    model.version()
    stranger = make_signer(tmp_path / "other", "mallory")
    monkeypatch.setenv("CESSL_SIGNING_KEY", str(stranger.private))
    with pytest.raises(SigningError, match=f"{USER}' has another key"):
        promote(model.client, model.name, force=True, reason="x")
    assert history(model.client, model.name) == []
    assert CHAMPION not in (model.client.get_registered_model(model.name).aliases or {})


def test_rollback_follows_signed_decisions_not_the_history_tag(two_champions):
    model, v1, v2 = two_champions
    fixmatch = model.copy(model.version(method="fixmatch"))  # a baseline put in production by hand
    model.client.set_registered_model_tag(model.name, HISTORY_TAG, json.dumps([fixmatch, v2]))
    result = rollback(model.client, model.name, reason="alarms")
    assert result.restored == v1 and model.champion() == v1
    assert verify_model(model.client, model.name, find_trust()).ok
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(model.client, model.name)


@pytest.mark.parametrize(
    ("facts", "what"), [({"backbone": "bb-2"}, "backbone"), ({"testset": "2"}, "test-set version")]
)
def test_rollback_refuses_an_incompatible_champion(model, facts, what):
    model.version()
    model.force()
    model.version(**facts)
    model.force()
    with pytest.raises(RegistryError, match=f"its {what} .* differs from champion"):
        rollback(model.client, model.name)


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("CESSL_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("CESSL_USER", "carol")
    assert cli.main(["access", "keygen"]) == 0
    key = tmp_path / "cfg" / "signing-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    signer = load_signer(key)
    assert find_trust().signers["carol"] and "carol: " + signer.public_text in (tmp_path / "cfg/trust.yaml").read_text()
    seen = capsys.readouterr()
    assert "PRIVATE KEY" not in seen.out + seen.err + caplog.text
    assert cli.main(["access", "keygen"]) == 2  # never overwritten
    os.chmod(key, 0o644)
    with pytest.raises(SigningError, match="readable by others"):
        load_signer(key)
    out = tmp_path / "elsewhere"
    assert cli.main(["access", "keygen", "--out", str(out), "--name", "dave", "--trust", str(tmp_path / "t.yaml")]) == 0
    assert "dave" in find_trust(str(tmp_path / "t.yaml")).signers and (out / "signing-key.pub").is_file()


def test_promote_without_a_key_says_how_to_make_one(model, monkeypatch, tmp_path, capsys):
    model.version()
    monkeypatch.delenv("CESSL_SIGNING_KEY")
    monkeypatch.setenv("CESSL_CONFIG_DIR", str(tmp_path / "empty"))
    assert cli.main(["promote", model.name]) == 2
    assert "cessl access keygen" in capsys.readouterr().err
    assert history(model.client, model.name) == []


def test_trust_file_errors_are_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "trust.yaml"
    bad.write_text("version: 1\nsigners:\n  bob: rsa:AAAA\n")
    monkeypatch.setenv("CESSL_TRUST_FILE", str(bad))
    with pytest.raises(SigningError, match="bob: expected ed25519:"):
        find_trust()
    assert Path(find_trust(str(tmp_path / "none.yaml")).source).name == "none.yaml"


def test_a_local_user_promotes_after_keygen_with_the_defaults(model, monkeypatch, tmp_path, caplog):
    """The demo's next step: `cessl access keygen` once, then `cessl promote` finds the key and
    the trust file under ~/.config/cessl (here $CESSL_CONFIG_DIR) with no flag or variable."""
    caplog.set_level(logging.INFO)
    candidate = model.version()
    monkeypatch.delenv("CESSL_SIGNING_KEY")
    monkeypatch.delenv("CESSL_TRUST_FILE")
    monkeypatch.setenv("CESSL_CONFIG_DIR", str(tmp_path / "home-config"))
    assert cli.main(["access", "keygen"]) == 0
    assert cli.main(["promote", model.name, "--force", "--reason", "demo"]) == 0
    v1 = model.champion()
    source = model.client.get_model_version(model.name, v1).tags[TAG_SOURCE_CANDIDATE]
    assert source == f"{model.candidates}/{candidate}"
    assert cli.main(["audit", "verify", "--model", model.name]) == 0
    assert f"{model.name}: ok, champion v{v1}" in caplog.text


def test_the_sweep_leaves_out_a_backbone_model_and_keeps_every_gated_one(tmp_path):
    """`cessl audit verify --all` (and its CronJob) sweeps the models with a champion: a backbone
    registered with ``--alias champion`` has no decisions to verify; a model without the backbone
    tag whose champion no decision names is still reported."""
    from pipeline.registry.verify import verify_all

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    for name, tags in (("cessl-backbone-tiny", {"kind": "backbone"}), ("cessl-ecg-moved", {})):
        client.create_registered_model(name, tags=tags)
        version = client.create_model_version(name, f"{run.info.artifact_uri}/m", run_id=run.info.run_id)
        client.set_registered_model_alias(name, CHAMPION, version.version)
    make_signer(tmp_path, USER)
    trust = find_trust(str(tmp_path / "trust.yaml"))
    checked = {v.model: v for v in verify_all(client, trust)}
    assert "cessl-backbone-tiny" not in checked
    assert not checked["cessl-ecg-moved"].ok and "cessl-ecg-moved" in checked["cessl-ecg-moved"].problem()
