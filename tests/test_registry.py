"""The champion/challenger gate, promotion history and rollback on a real MLflow store (SQLite)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.lineage import TAG_DATA_VERSION
from pipeline.registry import (
    HISTORY_TAG,
    TAG_COMPARISON,
    TAG_DECISION,
    TAG_PREVIOUS,
    GateConfig,
    RegistryError,
    champion_data_version,
    champion_history,
    promote,
    rollback,
)
from pipeline.tracking import CHALLENGER, CHAMPION, TAG_COMPARED_CHAMPION, TAG_TEST_SPLIT


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); one model per test."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("gate", artifact_location=(root / "mlruns").as_uri())
    return uri


@dataclass
class Registry:
    client: MlflowClient
    name: str

    def new_version(
        self,
        metrics: dict[str, float],
        split: str = "split-a",
        data: str = "md5-1",
        champion_scored: tuple[str, dict[str, float]] | None = None,
    ) -> str:
        """A version shaped like pipeline.tracking registers them (run metrics, tags, challenger)."""
        client = self.client
        run = client.create_run(client.get_experiment_by_name("gate").experiment_id)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, f"test_{key}", value)
        tags = {TAG_TEST_SPLIT: split, TAG_DATA_VERSION: data}
        if champion_scored is not None:
            version, champ_metrics = champion_scored
            for key, value in champ_metrics.items():
                client.log_metric(run.info.run_id, f"champion_test_{key}", value)
            tags[TAG_COMPARED_CHAMPION] = version
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(
            self.name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
        )
        client.set_registered_model_alias(self.name, CHALLENGER, mv.version)
        return str(mv.version)

    def alias(self, alias: str) -> str:
        return str(self.client.get_model_version_by_alias(self.name, alias).version)

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.name, version).tags


@pytest.fixture()
def reg(store, monkeypatch, request) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = f"gate-{request.node.name.removeprefix('test_')}"
    client.create_registered_model(name)
    return Registry(client, name)


def test_first_challenger_becomes_champion(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    decision = promote(reg.client, reg.name)
    assert decision.promoted and not decision.forced
    assert reg.alias(CHAMPION) == v1
    assert champion_history(reg.client, reg.name) == [v1]
    assert reg.tags(v1)[TAG_DECISION] == "promoted"


def test_gate_passes_and_refuses_on_the_same_split(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    v2 = reg.new_version({"macro_f_beta": 0.45})
    assert promote(reg.client, reg.name, GateConfig(margin=0.01)).promoted
    assert reg.alias(CHAMPION) == v2
    assert reg.tags(v2)[TAG_PREVIOUS] == v1

    v3 = reg.new_version({"macro_f_beta": 0.44})
    decision = promote(reg.client, reg.name)
    assert not decision.promoted
    assert reg.alias(CHAMPION) == v2
    tags = reg.tags(v3)
    assert tags[TAG_DECISION] == "refused"
    comparison = json.loads(tags[TAG_COMPARISON])
    assert comparison["challenger_value"] == pytest.approx(0.44)
    assert comparison["champion_value"] == pytest.approx(0.45)
    assert comparison["champion_version"] == v2
    assert champion_history(reg.client, reg.name) == [v1, v2]


def test_margin_and_lower_is_better_metrics(reg):
    reg.new_version({"macro_f_beta": 0.40, "ranking_loss": 0.30})
    promote(reg.client, reg.name)
    reg.new_version({"macro_f_beta": 0.405, "ranking_loss": 0.25})
    assert not promote(reg.client, reg.name, GateConfig(margin=0.01)).promoted  # +0.005 < margin
    decision = promote(reg.client, reg.name, GateConfig(metric="ranking_loss", margin=0.01))
    assert decision.promoted  # 0.25 < 0.30 - 0.01


def test_different_split_is_refused_unless_champion_was_scored_on_it(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40}, split="split-a")
    promote(reg.client, reg.name)
    reg.new_version({"macro_f_beta": 0.90}, split="split-b", data="md5-2")
    decision = promote(reg.client, reg.name)
    assert not decision.promoted
    assert "not comparable" in decision.reason
    # Scored at registration: the champion on the challenger's split (the pipeline does this).
    v3 = reg.new_version(
        {"macro_f_beta": 0.50}, split="split-b", data="md5-2", champion_scored=(v1, {"macro_f_beta": 0.45})
    )
    decision = promote(reg.client, reg.name)
    assert decision.promoted
    assert decision.comparison.champion_value == pytest.approx(0.45)
    assert "challenger's test split" in decision.comparison.basis
    assert reg.alias(CHAMPION) == v3
    assert champion_data_version(reg.client, reg.name) == "md5-2"


def test_force_is_recorded(reg):
    reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    v2 = reg.new_version({"macro_f_beta": 0.10})
    decision = promote(reg.client, reg.name, force=True)
    assert decision.promoted and decision.forced
    tags = reg.tags(v2)
    assert tags[TAG_DECISION] == "forced"
    assert json.loads(tags[TAG_COMPARISON])["forced"] is True
    assert reg.alias(CHAMPION) == v2


def test_rollback_restores_previous_champion(reg):
    v1 = reg.new_version({"macro_f_beta": 0.40})
    promote(reg.client, reg.name)
    v2 = reg.new_version({"macro_f_beta": 0.50})
    promote(reg.client, reg.name)
    result = rollback(reg.client, reg.name)
    assert (result.restored, result.replaced) == (v1, v2)
    assert reg.alias(CHAMPION) == v1
    assert json.loads(reg.client.get_registered_model(reg.name).tags[HISTORY_TAG]) == [v1]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(reg.client, reg.name)


def test_cli_exit_codes(reg, capsys):
    main = cli.main
    reg.new_version({"macro_f_beta": 0.40})
    assert main(["promote", reg.name]) == 0
    reg.new_version({"macro_f_beta": 0.30})
    assert main(["promote", reg.name]) == 1
    out = capsys.readouterr().out
    assert "REFUSED" in out and "0.3000" in out and "0.4000" in out
    assert main(["promote", reg.name, "--force"]) == 0
    assert main(["rollback", reg.name]) == 0
    assert main(["models", reg.name]) == 0
    assert main(["promote", "no-such-model"]) == 2
