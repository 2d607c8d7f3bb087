"""The champion/challenger gate (paired bootstrap), naming, audit log and rollback on a real MLflow store (SQLite)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ml.eval.bootstrap import BootstrapConfig, paired_bootstrap
from pipeline import cli
from pipeline.core.params import PipelineParams
from pipeline.registry.audit import AUDIT_EXPERIMENT, history, local_log_path
from pipeline.registry.lineage import TAG_DATA_VERSION
from pipeline.registry.policy import (
    GATE_ARTIFACT,
    HISTORY_TAG,
    TAG_COMPARISON,
    TAG_DECISION,
    TAG_METHOD,
    TAG_PREVIOUS,
    GateConfig,
    RegistryError,
    champion_history,
    describe_versions,
    promote,
    registered_model_name,
    rollback,
)
from pipeline.registry.tracking import CHALLENGER, CHAMPION, TAG_COMPARED_CHAMPION, TAG_TEST_SPLIT, current_alias


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); one model per test."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("gate", artifact_location=(root / "mlruns").as_uri())
    return uri


CLASSES = [f"c{k}" for k in range(6)]


def labels(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < 0.25).astype(np.int64)
    y[np.arange(n), rng.integers(0, len(CLASSES), n)] = 1  # every record has a label
    return y


def predictions(y: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Probabilities that separate the labels less well as ``noise`` grows."""
    rng = np.random.default_rng(seed)
    return np.clip(0.25 + 0.5 * y + rng.normal(0.0, noise, y.shape), 0.0, 1.0)


def evidence(challenger_noise: float, champion_noise: float, n: int = 300) -> dict:
    """A real paired bootstrap (as score_champion computes it) of two synthetic models."""
    y = labels(n)
    thresholds = np.full(len(CLASSES), 0.5)
    result = paired_bootstrap(
        y,
        predictions(y, challenger_noise, 1),
        thresholds,
        predictions(y, champion_noise, 2),
        thresholds,
        CLASSES,
        BootstrapConfig(n_resamples=300, seed=0),
    )
    return result.to_json()


@dataclass
class Registry:
    client: MlflowClient
    name: str

    def new_version(
        self,
        metrics: dict[str, float],
        split: str = "split-a",
        data: str = "md5-1",
        method: str = "cessl",
        champion: str | None = None,
        gate: dict | None = None,
    ) -> str:
        """A version shaped like pipeline.registry.tracking registers them (run metrics, tags, the
        score_champion evidence against ``champion`` as the run's artifact, challenger)."""
        client = self.client
        run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
        run_id = run.info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, f"test_{key}", value)
        tags = {TAG_TEST_SPLIT: split, TAG_DATA_VERSION: data, TAG_METHOD: method}
        if champion is not None:
            tags[TAG_COMPARED_CHAMPION] = champion
            if gate is not None:
                client.log_dict(run_id, gate, GATE_ARTIFACT)
                client.log_metric(run_id, "champion_test_macro_f_beta", gate["intervals"]["macro_f_beta"]["champion"])
        client.set_terminated(run_id)
        mv = client.create_model_version(self.name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags=tags)
        client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return str(mv.version)

    def alias(self, alias: str) -> str:
        return str(self.client.get_model_version_by_alias(self.name, alias).version)

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.name, version).tags


@pytest.fixture()
def reg(store, monkeypatch, request) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("CESSL_USER", "dr-test")
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = f"gate-{request.node.name.removeprefix('test_')}".replace("[", "-").replace("]", "")
    client.create_registered_model(name)
    return Registry(client, name)


def test_first_challenger_becomes_champion(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    decision = promote(reg.client, reg.name)
    assert decision.promoted and not decision.forced
    assert reg.alias(CHAMPION) == v1
    assert champion_history(reg.client, reg.name) == [v1]
    assert reg.tags(v1)[TAG_DECISION] == "promoted"


def test_no_champion_does_not_crown_a_worse_newest_version(reg):
    v1 = reg.new_version({"macro_f_beta": 0.60})
    reg.new_version({"macro_f_beta": 0.70}, split="split-b")  # another split: not comparable, ignored
    reg.new_version({"macro_f_beta": 0.90}, method="fixmatch")  # an experiment: not a rival
    v4 = reg.new_version({"macro_f_beta": 0.50})
    decision = promote(reg.client, reg.name)
    assert not decision.promoted
    assert f"v{v1} scored higher" in decision.reason
    assert decision.comparison.better_versions == {v1: pytest.approx(0.60)}
    assert current_alias(reg.client, reg.name, CHAMPION) is None
    reg.client.set_registered_model_alias(reg.name, CHALLENGER, v1)
    assert promote(reg.client, reg.name).promoted
    assert reg.alias(CHAMPION) == v1 and v4 != v1


def test_gate_promotes_only_when_the_lower_bound_clears_the_margin(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    better = evidence(challenger_noise=0.15, champion_noise=0.45)
    interval = better["intervals"]["macro_f_beta"]
    assert interval["ci_low"] > 0.05
    v2 = reg.new_version({"macro_f_beta": interval["challenger"]}, champion=v1, gate=better)
    too_high = interval["ci_low"] + 0.01
    decision = promote(reg.client, reg.name, GateConfig(margin=too_high))
    assert not decision.promoted and "does not exceed the margin" in decision.reason
    decision = promote(reg.client, reg.name, GateConfig(margin=0.01))
    assert decision.promoted
    c = decision.comparison
    assert (c.ci_low, c.ci_high, c.n_records, c.n_resamples) == (
        pytest.approx(interval["ci_low"]),
        pytest.approx(interval["ci_high"]),
        300,
        300,
    )
    assert reg.alias(CHAMPION) == v2 and reg.tags(v2)[TAG_PREVIOUS] == v1
    comparison = json.loads(reg.tags(v2)[TAG_COMPARISON])
    assert comparison["ci_low"] == pytest.approx(interval["ci_low"]) and comparison["who"] == "dr-test"


def test_per_class_non_inferiority(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    gate = evidence(challenger_noise=0.15, champion_noise=0.45)
    gate["per_class"][0] |= {"challenger": 0.2, "champion": 0.9, "drop": 0.7}  # one class collapses
    reg.new_version({"macro_f_beta": 0.8}, champion=v1, gate=gate)
    decision = promote(reg.client, reg.name)
    assert not decision.promoted and "non-inferiority" in decision.reason and "c0" in decision.reason
    assert promote(reg.client, reg.name, GateConfig(max_class_drop=0.8)).promoted


@pytest.mark.parametrize("margin", ["0", "0.0", "1e-12", "0.001", "0.01", "0.05", "0.2", "1", "1e6"])
def test_a_worse_challenger_is_refused_at_any_margin_the_cli_accepts(reg, margin, capsys):
    v1 = reg.new_version({"macro_f_beta": 0.70})
    assert cli.main(["promote", reg.name]) == 0
    worse = evidence(challenger_noise=0.45, champion_noise=0.15)
    assert worse["intervals"]["macro_f_beta"]["ci_high"] < 0
    reg.new_version({"macro_f_beta": worse["intervals"]["macro_f_beta"]["challenger"]}, champion=v1, gate=worse)
    assert cli.main(["promote", reg.name, "--margin", margin, "--max-class-drop", "1"]) == 1
    assert reg.alias(CHAMPION) == v1
    assert "REFUSED" in capsys.readouterr().out


def test_an_equal_challenger_is_refused_and_negative_margins_are_rejected(reg, capsys):
    v1 = reg.new_version({"macro_f_beta": 0.70})
    promote(reg.client, reg.name)
    same = evidence(challenger_noise=0.3, champion_noise=0.3)
    same["intervals"]["macro_f_beta"] |= {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    reg.new_version({"macro_f_beta": 0.7}, champion=v1, gate=same)
    assert not promote(reg.client, reg.name, GateConfig(margin=0.0)).promoted  # 0 does not exceed 0
    for bad in ("-0.2", "-1e-9", "nan", "inf", "x"):
        with pytest.raises(SystemExit) as err:
            cli.main(["promote", reg.name, "--margin", bad])
        assert err.value.code == 2
    assert "must be a finite number >= 0" in capsys.readouterr().err
    for bad in (-0.2, float("nan"), float("inf")):
        with pytest.raises(RegistryError, match="margin must be a finite number >= 0"):
            GateConfig(margin=bad)
    assert reg.alias(CHAMPION) == v1


def test_without_paired_evidence_it_is_not_comparable(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40}, split="split-a")
    promote(reg.client, reg.name)
    reg.new_version({"macro_f_beta": 0.90}, split="split-a")  # same split, point estimates only
    decision = promote(reg.client, reg.name)
    assert not decision.promoted and "not comparable" in decision.reason
    reg.new_version({"macro_f_beta": 0.90}, champion=v1)  # scored, but no bootstrap (an older run)
    decision = promote(reg.client, reg.name)
    assert not decision.promoted and "no paired bootstrap" in decision.reason
    assert reg.alias(CHAMPION) == v1


def test_experiments_are_refused_unless_forced_with_a_reason(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    gate = evidence(challenger_noise=0.15, champion_noise=0.45)
    v2 = reg.new_version({"macro_f_beta": 0.9}, method="fixmatch", champion=v1, gate=gate)
    decision = promote(reg.client, reg.name)
    assert not decision.promoted and "not a production method" in decision.reason
    with pytest.raises(RegistryError, match="--reason"):
        promote(reg.client, reg.name, force=True)
    decision = promote(reg.client, reg.name, force=True, reason="baseline for the ward study")
    assert decision.promoted and decision.forced and decision.who == "dr-test"
    assert reg.alias(CHAMPION) == v2


def test_registered_model_name_keeps_baselines_off_production_names():
    assert registered_model_name("", "cessl") == "cessl-ecg"
    for method in ("fixmatch", "lora", "full", "no-such-method"):
        assert registered_model_name("", method) == "cessl-ecg-experiments"
    assert registered_model_name("ward-7", "fixmatch") == "ward-7"
    assert registered_model_name("cessl-ecg", "fixmatch") == "cessl-ecg"  # explicit: as asked
    assert PipelineParams().model_name == ""  # the default defers to the method


def test_force_is_recorded(reg):
    reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    v2 = reg.new_version({"macro_f_beta": 0.10})
    decision = promote(reg.client, reg.name, force=True, reason="emergency fix")
    assert decision.promoted and decision.forced
    tags = reg.tags(v2)
    assert tags[TAG_DECISION] == "forced"
    comparison = json.loads(tags[TAG_COMPARISON])
    assert comparison["forced"] is True and comparison["force_reason"] == "emergency fix"
    assert reg.alias(CHAMPION) == v2


def test_rollback_restores_previous_champion(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    v2 = reg.new_version({"macro_f_beta": 0.50}, champion=v1, gate=evidence(0.15, 0.45))
    assert promote(reg.client, reg.name).promoted
    result = rollback(reg.client, reg.name)
    assert (result.restored, result.replaced) == (v1, v2)
    assert reg.alias(CHAMPION) == v1
    assert json.loads(reg.client.get_registered_model(reg.name).tags[HISTORY_TAG]) == [v1]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(reg.client, reg.name)


def test_the_audit_history_survives_five_decisions(reg, store, capsys):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    assert promote(reg.client, reg.name).promoted  # 1 promote
    worse = evidence(challenger_noise=0.45, champion_noise=0.15)
    v2 = reg.new_version({"macro_f_beta": 0.30}, champion=v1, gate=worse)
    assert not promote(reg.client, reg.name).promoted  # 2 refuse
    assert promote(reg.client, reg.name, force=True, reason="ward asked").forced  # 3 force
    rollback(reg.client, reg.name, reason="alarms")  # 4 rollback (v1 again)
    better = evidence(challenger_noise=0.15, champion_noise=0.45)
    v3 = reg.new_version({"macro_f_beta": 0.80}, champion=v1, gate=better)
    assert promote(reg.client, reg.name).promoted  # 5 promote

    entries = history(reg.client, reg.name)
    assert [e.action for e in entries] == ["promote", "refuse", "force", "rollback", "promote"]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert [e.versions.get("challenger", e.versions.get("to")) for e in entries] == [v1, v2, v2, v1, v3]
    assert all(e.who == "dr-test" for e in entries)
    assert entries[1].metrics["ci_high"] == pytest.approx(worse["intervals"]["macro_f_beta"]["ci_high"])
    assert entries[4].metrics["ci_low"] == pytest.approx(better["intervals"]["macro_f_beta"]["ci_low"])
    assert "ward asked" in entries[2].reason and entries[3].reason == "alarms"
    # The JSON-lines file next to the SQLite store: appended, same five lines in order.
    path = local_log_path(store, reg.name)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["action"] for line in lines] == [e.action for e in entries]
    # One MLflow run per decision in cessl-audit; the newest carries the whole log.
    runs = reg.client.search_runs(
        [reg.client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id],
        filter_string=f"tags.`cessl.audit.model` = '{reg.name}'",
    )
    assert len(runs) == 5
    newest = max(runs, key=lambda r: int(r.data.tags["cessl.audit.seq"]))
    log_file = reg.client.download_artifacts(newest.info.run_id, "audit.jsonl", str(path.parent))
    assert len(Path(log_file).read_text().splitlines()) == 5
    # The version tags only hold the last decision; the CLI shows the full history and aliases.
    assert reg.tags(v2)[TAG_DECISION] == "forced"
    assert cli.main(["models", reg.name, "--history"]) == 0
    out = capsys.readouterr().out
    for action in ("promote", "refuse", "force", "rollback"):
        assert action in out
    assert cli.main(["models", reg.name]) == 0
    assert "champion" in capsys.readouterr().out
    assert describe_versions(reg.client, reg.name)[0]["aliases"] == "challenger,champion"
    assert cli.main(["models"]) == 0
    assert f"champion=v{v3}" in capsys.readouterr().out


def test_cli_exit_codes(reg, capsys):
    main = cli.main
    reg.new_version({"macro_f_beta": 0.40})
    assert main(["promote", reg.name]) == 0
    reg.new_version({"macro_f_beta": 0.30})
    assert main(["promote", reg.name]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "not comparable" in out
    assert main(["promote", reg.name, "--force"]) == 2  # --force needs --reason
    assert main(["promote", reg.name, "--force", "--reason", "test"]) == 0
    assert main(["rollback", reg.name]) == 0
    assert main(["models", reg.name]) == 0
    assert main(["promote", "no-such-model"]) == 2


# --------------------------------------------------------------------------- a hospital network


def _site_models(store: str, base: str, sites: list[str], tmp_path: Path) -> tuple[Path, dict[str, Registry]]:
    """A sites.yaml naming ``sites`` (folders in tmp_path) and one registered model per site."""
    from pipeline.core.sites import Site, SiteRegistry, save_sites
    from pipeline.registry.policy import site_model_name

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    registry = SiteRegistry(tuple(Site(s, str(tmp_path / s)) for s in sites))
    path = save_sites(registry, tmp_path / "sites.yaml")
    models = {}
    for site in sites:
        name = site_model_name(base, site)
        client.create_registered_model(name)
        models[site] = Registry(client, name)
    return path, models


def test_promote_per_site_and_all_sites(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("CESSL_USER", "dr-test")
    base = "net-promote"
    sites_file, models = _site_models(store, base, ["hospital-a", "hospital-b", "hospital-c"], tmp_path)
    for model in models.values():
        model.new_version({"macro_f_beta": 0.5})
    # one site: only its model moves
    assert cli.main(["promote", base, "--site", "hospital-b", "--sites", str(sites_file)]) == 0
    assert models["hospital-b"].alias(CHAMPION) == "1"
    assert current_alias(models["hospital-a"].client, models["hospital-a"].name, CHAMPION) is None
    # every site: each gets its own gate; b's is already the champion (refused as a no-op), so exit 1
    assert cli.main(["promote", base, "--all-sites", "--sites", str(sites_file)]) == 1
    assert {s: m.alias(CHAMPION) for s, m in models.items()} == {
        "hospital-a": "1",
        "hospital-b": "1",
        "hospital-c": "1",
    }
    # a worse challenger at site a is refused there while site c's better one is promoted
    y_gate_worse, y_gate_better = evidence(0.9, 0.2), evidence(0.2, 0.9)
    models["hospital-a"].new_version({"macro_f_beta": 0.3}, champion="1", gate=y_gate_worse)
    models["hospital-c"].new_version({"macro_f_beta": 0.7}, champion="1", gate=y_gate_better)
    assert cli.main(["promote", base, "--site", "hospital-a", "--site", "hospital-c", "--sites", str(sites_file)]) == 1
    assert models["hospital-a"].alias(CHAMPION) == "1"
    assert models["hospital-c"].alias(CHAMPION) == "2"
    assert cli.main(["rollback", base, "--site", "hospital-c", "--sites", str(sites_file)]) == 0
    assert models["hospital-c"].alias(CHAMPION) == "1"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["promote", "net-x", "--site", "nope"], "no site named 'nope'"),
        (["promote", "net-x", "--site", "Bad_Name"], "no site named 'Bad_Name'"),
        (["promote"], "name a registered model"),
        (["promote", "net-x", "--all-sites", "--force", "--reason", "r"], "--force promotes one model"),
    ],
)
def test_promote_site_bad_input(store, monkeypatch, tmp_path, capsys, argv, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    sites_file, _ = _site_models(store, f"net-bad-{len(argv)}-{len(message)}", ["hospital-a"], tmp_path)
    assert cli.main([*argv, "--sites", str(sites_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_changed_sites(store, tmp_path):
    from pipeline.core.sites import load_sites
    from pipeline.registry.policy import changed_sites

    base = "net-changed"
    sites_file, models = _site_models(store, base, ["hospital-a", "hospital-b", "hospital-c"], tmp_path)
    models["hospital-a"].new_version({"macro_f_beta": 0.5}, data="md5-a")
    models["hospital-b"].new_version({"macro_f_beta": 0.5}, data="md5-b-old")
    for model in (models["hospital-a"], models["hospital-b"]):
        assert promote(model.client, model.name).promoted
    now = {"hospital-a": "md5-a", "hospital-b": "md5-b-new", "hospital-c": "md5-c"}
    changes = changed_sites(
        models["hospital-a"].client,
        load_sites(sites_file),
        lambda site: f"{base}-{site.name}",
        lambda source: now[Path(source).name],
    )
    assert [(c.site, c.changed) for c in changes] == [("hospital-a", False), ("hospital-b", True), ("hospital-c", True)]
    assert "differs from the champion's (md5-b-old)" in changes[1].reason
    assert changes[2].reason == "no champion yet" and changes[2].model == f"{base}-hospital-c"
