"""Separated duties and the recomputed gate on a real MLflow store (SQLite): naming, the copy into
the production model, refusals, the audit log and rollback.

Real models, records and numbers (``tests/promote_support.py``): a ``tinylight`` backbone and
adapters whose thresholds make them good (every class diagnosed) or bad (none), each logged
once as a pyfunc model; 16 synthetic WFDB records, frozen as each model's test set. The
pipeline's side registers versions of ``<model>-candidates`` as the register step does;
``promote`` recomputes everything from those models and records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from promote_support import BAD, CLASSES, GOOD, Pipeline, make_adapter, make_backbone, write_records
from signing_support import make_signer, use_keys

from pipeline import cli
from pipeline.core.params import PipelineParams
from pipeline.registry.audit import history
from pipeline.registry.policy import (
    GATE_ARTIFACT,
    HISTORY_TAG,
    TAG_COMPARISON,
    TAG_DECISION,
    TAG_PREVIOUS,
    Comparison,
    GateConfig,
    RegistryError,
    champion_history,
    describe_versions,
    promote,
    registered_model_name,
    registration_model_name,
    rollback,
    verdict,
)
from pipeline.registry.signing import KeyFiles
from pipeline.registry.tracking import (
    CHALLENGER,
    CHAMPION,
    TAG_DIGEST_ADAPTER,
    TAG_DIGEST_BACKBONE,
    TAG_SOURCE_CANDIDATE,
    current_alias,
)

pytestmark = pytest.mark.slow  # real models: seconds per promotion


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """One SQLite store, the records, the backbone and the adapters for the module."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("cessl", artifact_location=(root / "mlruns").as_uri())
    records, hashes = write_records(root)
    backbone = make_backbone(root)
    adapters = {
        "good": make_adapter(root, backbone, "good", GOOD),
        "bad": make_adapter(root, backbone, "bad", BAD),
        "fixmatch": make_adapter(root, backbone, "fixmatch", GOOD, method="fixmatch", seed=1),
    }
    return {"root": root, "uri": uri, "pipeline": Pipeline(client, "", records, hashes, backbone), **adapters}


@pytest.fixture(scope="module")
def signing(tmp_path_factory) -> tuple[KeyFiles, Path]:
    """dr-test's key and the trust file, one for the module's store (`cessl models` verifies it all)."""
    root = tmp_path_factory.mktemp("signing")
    return make_signer(root, "dr-test"), root / "trust.yaml"


@pytest.fixture()
def reg(world, monkeypatch, request, signing) -> Pipeline:
    """The pipeline's side for this test's own production model (dr-test signs the decisions)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.setenv("CESSL_USER", "dr-test")
    use_keys(monkeypatch, *signing)
    name = f"gate-{request.node.name.removeprefix('test_')}".replace("[", "-").replace("]", "").replace("_", "-")
    return world["pipeline"].for_model(name[:60])


def alias(reg: Pipeline, model: str, name: str) -> str | None:
    version = current_alias(reg.client, model, name)
    return None if version is None else str(version.version)


def test_registered_model_name_keeps_baselines_off_production_names():
    assert registered_model_name("", "cessl") == "cessl-ecg"
    for method in ("fixmatch", "lora", "full", "no-such-method"):
        assert registered_model_name("", method) == "cessl-ecg-experiments"
    assert registered_model_name("ward-7", "fixmatch") == "ward-7"
    assert registered_model_name("cessl-ecg", "fixmatch") == "cessl-ecg"  # explicit: as asked...
    # ...but the pipeline only ever registers into a candidates model, never a production one
    assert registration_model_name("cessl-ecg", "fixmatch") == "cessl-ecg-candidates"
    assert registration_model_name("", "cessl") == "cessl-ecg-candidates"
    assert registration_model_name("", "fixmatch") == "cessl-ecg-experiments-candidates"
    assert PipelineParams().model_name == ""  # the default defers to the method


def test_verdict_needs_the_lower_bound_above_the_margin_and_no_class_drop():
    """The decision rule alone, on recomputed numbers."""
    base = dict(metric="macro_f_beta", challenger_version="3", challenger_value=0.7, champion_version="1")
    numbers = dict(champion_value=0.5, margin=0.0, basis="recomputed", comparable=True, ci_high=0.3, estimate=0.2)
    good = Comparison(**base, **numbers, ci_low=0.05, class_drops={"a": 0.01})
    assert verdict(good, GateConfig(), True, "cessl")[0]
    assert not verdict(good, GateConfig(margin=0.05), True, "cessl")[0]  # 0.05 does not exceed 0.05
    dropped = Comparison(**base, **numbers, ci_low=0.05, class_drops={"a": 0.2}, max_class_drop=0.05)
    passed, why = verdict(dropped, GateConfig(), True, "cessl")
    assert not passed and "non-inferiority" in why and "a -0.2000" in why
    assert not verdict(good, GateConfig(), False, "fixmatch")[0]


def test_first_challenger_is_copied_into_the_production_model(reg, world):
    v1 = reg.register(world["good"])
    decision = promote(reg.client, reg.model)
    assert decision.promoted and not decision.forced, decision.reason
    production = decision.production_version
    assert alias(reg, reg.model, CHAMPION) == production
    assert alias(reg, reg.candidates, CHAMPION) is None  # the candidates model never has a champion
    assert CHALLENGER not in (reg.client.get_registered_model(reg.model).aliases or {})
    tags = reg.client.get_model_version(reg.model, production).tags
    assert tags[TAG_SOURCE_CANDIDATE] == f"{reg.candidates}/{v1}"
    candidate_tags = reg.client.get_model_version(reg.candidates, v1).tags
    assert {tags[k] for k in (TAG_DIGEST_ADAPTER, TAG_DIGEST_BACKBONE)} == {
        candidate_tags[k] for k in (TAG_DIGEST_ADAPTER, TAG_DIGEST_BACKBONE)
    }
    assert tags["method"] == "cessl" and tags[TAG_DECISION] == "promoted"  # the candidate's tags kept
    assert champion_history(reg.client, reg.model) == [production]
    assert decision.comparison.challenger_value and decision.comparison.n_records == 16
    # what serve, predict and the pipeline's score_champion load: the production model's champion
    from pipeline.registry.policy import load_champion
    from pipeline.registry.store import TrackingConfig

    loaded = load_champion(TrackingConfig.resolve(world["uri"], model_name=reg.model))
    assert loaded is not None and loaded.version == production and loaded.predictor is not None, loaded
    assert list(loaded.predictor.classes) == CLASSES
    # the copy keeps the facts the signed decision records and rollback compares
    facts = history(reg.client, reg.model)[-1].champion
    assert facts["version"] == production and facts["testset_version"] == "1", facts
    assert (facts["backbone_id"], facts["classes"]) == (candidate_tags["backbone_id"], ",".join(CLASSES))
    again = promote(reg.client, reg.model)
    assert not again.promoted and "already the champion" in again.reason


def test_no_champion_does_not_crown_a_worse_candidate(reg, world):
    v1 = reg.register(world["good"])
    reg.register(world["fixmatch"], method="fixmatch")  # a baseline: not a rival, and no challenger
    v3 = reg.register(world["bad"])
    assert alias(reg, reg.candidates, CHALLENGER) == v3
    decision = promote(reg.client, reg.model)
    assert not decision.promoted and f"v{v1} scored higher" in decision.reason
    assert set(decision.comparison.better_versions) == {v1}
    assert alias(reg, reg.model, CHAMPION) is None
    reg.client.set_registered_model_alias(reg.candidates, CHALLENGER, v1)
    assert promote(reg.client, reg.model).promoted


def test_the_gate_recomputes_and_ignores_forged_evidence(reg, world, capsys):
    """A worse challenger whose run carries a fabricated paired bootstrap and fabricated
    metrics is refused on the numbers promote computes itself; a better one is promoted only
    when the recomputed lower bound clears the margin."""
    reg.register(world["good"])
    assert promote(reg.client, reg.model).promoted
    champion = alias(reg, reg.model, CHAMPION)
    worse = reg.register(world["bad"])
    run_id = reg.client.get_model_version(reg.candidates, worse).run_id
    forged = {
        "confidence": 0.95,
        "n_records": 16,
        "n_resamples": 1000,
        "intervals": {"macro_f_beta": {"estimate": 0.5, "ci_low": 0.3, "ci_high": 0.7, "challenger": 0.9}},
        "per_class": [],
    }
    reg.client.log_dict(run_id, forged | {"intervals": forged["intervals"] | {}}, GATE_ARTIFACT)
    for key, value in {"test_macro_f_beta": 0.99, "gate_macro_f_beta_ci_low": 0.3}.items():
        reg.client.log_metric(run_id, key, value)
    assert cli.main(["promote", reg.model]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "(recomputed)" in out and "[0.3000, 0.7000]" not in out
    decision = json.loads(reg.client.get_model_version(reg.candidates, worse).tags[TAG_COMPARISON])
    assert decision["ci_high"] < 0 and decision["challenger_value"] == 0.0  # the bad model's real F-beta2
    assert alias(reg, reg.model, CHAMPION) == champion


def test_a_better_challenger_is_promoted_only_above_the_margin(reg, world):
    reg.register(world["bad"])
    first = promote(reg.client, reg.model)
    assert first.promoted
    v2 = reg.register(world["good"])
    refused = promote(reg.client, reg.model, GateConfig(margin=0.95))
    assert not refused.promoted and refused.label == "refused" and "does not exceed the margin" in refused.reason
    c = refused.comparison
    assert c.ci_low is not None and 0 < c.ci_low < 0.95 and c.n_records == 16 and c.testset_version == 1
    assert (c.attempt, c.alpha, c.confidence, c.interval) == (1, 0.0125, 0.975, "jackknife-t")
    promoted = promote(reg.client, reg.model, GateConfig(margin=0.01))
    second = promoted.comparison
    assert promoted.promoted and (second.attempt, second.alpha) == (2, 0.00625)  # the same test set: alpha spent
    assert second.estimate == pytest.approx(c.estimate) and second.ci_low < c.ci_low  # a wider interval
    production = promoted.production_version
    assert alias(reg, reg.model, CHAMPION) == production
    tags = reg.client.get_model_version(reg.model, production).tags
    assert tags[TAG_PREVIOUS] == first.production_version and tags[TAG_SOURCE_CANDIDATE].endswith(f"/{v2}")
    assert json.loads(tags[TAG_COMPARISON])["who"] == "dr-test"


def test_too_few_records_is_insufficient_evidence_not_a_refusal(reg, world, capsys):
    """An interval that contains the margin on fewer records than the power computation needs
    is its own answer: signed and verified like any decision, exit 7, the champion kept; the
    attempts on the frozen test set keep counting through it and through the command line."""
    reg.register(world["bad"])
    champion = promote(reg.client, reg.model).production_version
    reg.register(world["good"])
    first = promote(reg.client, reg.model, GateConfig(margin=0.95)).comparison  # attempt 1: refused
    margin = round((first.ci_low + first.ci_high) / 2, 4)  # inside every later (wider) interval
    decision = promote(reg.client, reg.model, GateConfig(margin=margin))
    c = decision.comparison
    assert decision.label == "insufficient evidence" and not decision.promoted, decision.reason
    assert c.attempt == 2 and c.required_records is not None and c.n_records == 16 < c.required_records
    assert decision.reason.startswith(f"16 frozen test records, the gate needs >= {c.required_records} to decide")
    assert (
        f"contains the margin {margin:g}" in decision.reason
        and "one-sided alpha 0.00625 (attempt 2)" in decision.reason
    )
    assert alias(reg, reg.model, CHAMPION) == champion
    entry = history(reg.client, reg.model)[-1]
    assert (entry.action, entry.metrics["attempt"], entry.champion["version"]) == ("insufficient", 2, champion)
    assert entry.signature and entry.metrics["required_records"] == c.required_records
    assert reg.client.get_model_version(reg.candidates, c.challenger_version).tags[TAG_DECISION] == decision.label
    assert cli.main(["promote", reg.model, "--margin", str(margin)]) == 7  # attempt 3
    out = capsys.readouterr().out
    assert "INSUFFICIENT EVIDENCE: 16 frozen test records" in out and "attempt 3 on this test set" in out, out
    assert cli.main(["models", reg.model]) == 0  # the log and its signatures verify
    assert [e.metrics.get("attempt") for e in history(reg.client, reg.model)] == [None, 1, 2, 3]


def test_model_less_and_altered_versions_are_refused_even_when_forced(reg, world, capsys, tmp_path):
    import shutil

    reg.register(world["good"])
    assert promote(reg.client, reg.model).promoted
    champion = alias(reg, reg.model, CHAMPION)
    digests = {k: reg.client.get_model_version(reg.candidates, "1").tags[k] for k in (TAG_DIGEST_ADAPTER,)}
    # a version with tags and numbers but no model behind it
    reg.register(None, tags=digests)
    assert cli.main(["promote", reg.model, "--force", "--reason", "trust me"]) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "REFUSED" in out and "has no loadable model" in out, out
    # a real model whose recorded digest is not its artifacts'
    reg.register(world["good"], tags={TAG_DIGEST_ADAPTER: "0" * 64})
    decision = promote(reg.client, reg.model, force=True, reason="trust me")
    assert not decision.promoted and "adapter artifacts do not match their recorded digest" in decision.reason
    # a real model whose artifacts were overwritten after registration (its digests recorded before)
    altered = shutil.copytree(world["good"], tmp_path / "adapter-altered")
    version = reg.register(altered)
    source = reg.client.get_model_version_download_uri(reg.candidates, version).removeprefix("file://")
    config = next(Path(source).rglob("adapter_config.json"))
    data = json.loads(config.read_text())
    config.write_text(json.dumps(data | {"thresholds": [BAD] * len(data["classes"])}))
    decision = promote(reg.client, reg.model, force=True, reason="trust me")
    assert not decision.promoted and "do not match their recorded digest" in decision.reason
    assert alias(reg, reg.model, CHAMPION) == champion
    assert [e.action for e in history(reg.client, reg.model)][-3:] == ["refuse"] * 3


def test_baselines_never_reach_the_production_model(reg, world):
    reg.register(world["good"])
    assert promote(reg.client, reg.model).promoted
    champion = alias(reg, reg.model, CHAMPION)
    baseline = reg.register(world["fixmatch"], method="fixmatch")
    assert alias(reg, reg.candidates, CHALLENGER) != baseline  # the pipeline set no challenger for it
    reg.client.set_registered_model_alias(reg.candidates, CHALLENGER, baseline)  # by hand
    decision = promote(reg.client, reg.model, force=True, reason="baseline for the ward study")
    assert not decision.promoted and "not a production method" in decision.reason
    assert {k: str(v) for k, v in reg.client.get_registered_model(reg.model).aliases.items()} == {CHAMPION: champion}
    assert len(reg.client.search_model_versions(f"name = '{reg.model}'")) == 1


def test_force_rollback_and_the_audit_history(reg, world, capsys):
    v1 = reg.register(world["good"])
    assert promote(reg.client, reg.model).promoted  # 1 promote
    v2 = reg.register(world["bad"])
    assert not promote(reg.client, reg.model).promoted  # 2 refuse
    with pytest.raises(RegistryError, match="--reason"):
        promote(reg.client, reg.model, force=True)
    forced = promote(reg.client, reg.model, force=True, reason="ward asked")  # 3 force
    assert forced.promoted and forced.forced and forced.who == "dr-test"
    result = rollback(reg.client, reg.model, reason="alarms")  # 4 rollback
    assert (result.replaced, result.restored) == (forced.production_version, "1")
    assert alias(reg, reg.model, CHAMPION) == "1"
    assert json.loads(reg.client.get_registered_model(reg.model).tags[HISTORY_TAG]) == ["1"]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(reg.client, reg.model)
    entries = history(reg.client, reg.model)
    assert [e.action for e in entries] == ["promote", "refuse", "force", "rollback"]
    assert [e.versions.get("challenger", e.versions.get("to")) for e in entries] == [v1, v2, v2, "1"]
    assert entries[2].versions["production"] == forced.production_version
    assert entries[1].metrics["ci_high"] < 0 and "ward asked" in entries[2].reason
    assert cli.main(["models", reg.model, "--history"]) == 0
    assert "audit log" in capsys.readouterr().out
    # the pipeline's side (the test set it froze) is in the candidates model's log, which has no champion
    assert [e.action for e in history(reg.client, reg.candidates)] == ["testset_freeze"]
    assert cli.main(["models", reg.candidates, "--history"]) == 0
    assert "testset_freeze" in capsys.readouterr().out
    assert describe_versions(reg.client, reg.model)[-1]["aliases"] == "champion"


def test_cli_exit_codes(reg, world, capsys):
    main = cli.main
    assert main(["promote", reg.model]) == 2  # no candidate yet
    assert "has no version with the alias 'challenger'" in capsys.readouterr().err
    reg.register(world["good"])
    assert main(["promote", reg.model, "--source", str(world["pipeline"].records)]) == 0
    reg.register(world["bad"])
    assert main(["promote", reg.model]) == 1
    assert main(["promote", reg.model, "--force"]) == 2  # --force needs --reason
    assert main(["promote", reg.model, "--force", "--reason", "test"]) == 0
    assert main(["rollback", reg.model]) == 0
    assert main(["models", reg.model]) == 0
    assert main(["promote", reg.model, "--source", str(world["root"] / "nowhere")]) == 1
    assert "not comparable" in capsys.readouterr().out


# --------------------------------------------------------------------------- a hospital network


def _sites_file(tmp_path: Path, sites: list[str]) -> Path:
    from pipeline.core.sites import Site, SiteRegistry, save_sites

    return save_sites(SiteRegistry(tuple(Site(s, str(tmp_path / s)) for s in sites)), tmp_path / "sites.yaml")


def test_promote_per_site_and_all_sites_and_changed_sites(world, monkeypatch, tmp_path, signing):
    from pipeline.core.sites import load_sites
    from pipeline.registry.policy import changed_sites, site_model_name

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.setenv("CESSL_USER", "dr-test")
    use_keys(monkeypatch, *signing)
    base, sites = "net-promote", ["hospital-a", "hospital-b", "hospital-c"]
    sites_file = _sites_file(tmp_path, sites)
    models = {s: world["pipeline"].for_model(site_model_name(base, s), site=s) for s in sites}
    for site, model in models.items():
        model.register(world["good"], tags={"data_version": f"md5-{site}"})
    assert cli.main(["promote", base, "--site", "hospital-b", "--sites", str(sites_file)]) == 0
    assert alias(models["hospital-b"], models["hospital-b"].model, CHAMPION) == "1"
    assert current_alias(models["hospital-a"].client, models["hospital-a"].model, CHAMPION) is None
    # every site: its own gate; b's is already the champion (refused as a no-op), so exit 1
    assert cli.main(["promote", base, "--all-sites", "--sites", str(sites_file)]) == 1
    assert {s: alias(m, m.model, CHAMPION) for s, m in models.items()} == dict.fromkeys(sites, "1")
    # retrain reads the champions of the production models and the test sets of the candidates
    now = {"hospital-a": "md5-hospital-a", "hospital-b": "md5-b-new", "hospital-c": "md5-hospital-c"}
    changes = changed_sites(
        models["hospital-a"].client,
        load_sites(sites_file),
        lambda site: site_model_name(base, site.name),
        lambda source: now[Path(source).name],
    )
    assert [(c.site, c.changed) for c in changes] == [
        ("hospital-a", False),
        ("hospital-b", True),
        ("hospital-c", False),
    ]
    assert "differs from the champion's (md5-hospital-b)" in changes[1].reason


@pytest.mark.parametrize(
    "argv, message",
    [
        (["promote", "net-x", "--site", "nope"], "no site named 'nope'"),
        (["promote", "net-x", "--site", "Bad_Name"], "no site named 'Bad_Name'"),
        (["promote"], "name a registered model"),
        (["promote", "net-x", "--all-sites", "--force", "--reason", "r"], "--force promotes one model"),
    ],
)
def test_promote_site_bad_input(world, monkeypatch, tmp_path, capsys, argv, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    sites_file = _sites_file(tmp_path, ["hospital-a"])
    assert cli.main([*argv, "--sites", str(sites_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
