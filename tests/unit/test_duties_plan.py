"""Separated duties without a server: where the pipeline registers, and what `cessl access init` grants."""

from __future__ import annotations

import pytest

from pipeline.registry.access import (
    EXPERIMENT,
    MODEL,
    PIPELINE,
    RELEASE_MANAGER,
    REVIEWER,
    AccessPlan,
    plan_grants,
    role_grants,
)
from pipeline.registry.evidence import EvidenceError, check_digests
from pipeline.registry.tracking import (
    TAG_DIGEST_ADAPTER,
    TAG_DIGEST_BACKBONE,
    candidates_model_name,
    production_model_name,
)

PRODUCTION = ("cessl-ecg", "cessl-ecg-hospital-a")


def per_model(role: str) -> dict[str, str]:
    return {g.resource: g.permission for g in role_grants(role, PRODUCTION, "cessl-audit") if g.resource_type == MODEL}


def test_candidates_names_round_trip():
    assert candidates_model_name("cessl-ecg") == "cessl-ecg-candidates"
    assert candidates_model_name("cessl-ecg-candidates") == "cessl-ecg-candidates"  # never doubled
    assert production_model_name("cessl-ecg-hospital-a-candidates") == "cessl-ecg-hospital-a"
    assert production_model_name("cessl-ecg") == "cessl-ecg"


def test_the_pipeline_writes_only_candidates_and_release_managers_manage_production():
    assert per_model(PIPELINE) == {
        "*": "READ",
        "cessl-ecg-candidates": "EDIT",
        "cessl-ecg-hospital-a-candidates": "EDIT",
    }  # no grant on a production model: the wildcard READ
    assert per_model(RELEASE_MANAGER) == {
        "*": "READ",
        "cessl-ecg": "MANAGE",
        "cessl-ecg-hospital-a": "MANAGE",
        "cessl-ecg-candidates": "EDIT",
        "cessl-ecg-hospital-a-candidates": "EDIT",
    }
    assert per_model(REVIEWER) == {"*": "READ"}
    for role in (PIPELINE, RELEASE_MANAGER):
        experiments = {g.resource: g.permission for g in role_grants(role, PRODUCTION, "cessl-audit")}
        assert experiments["cessl-audit"] == "EDIT"
    assert {g.resource_type for g in role_grants(REVIEWER, PRODUCTION, "a")} == {MODEL, EXPERIMENT}
    grants = plan_grants(AccessPlan("bot", ("alice",), ("rita",), PRODUCTION))
    assert set(grants) == {"bot", "alice", "rita"}


def test_digests_must_be_recorded_and_equal():
    actual = {TAG_DIGEST_BACKBONE: "b" * 64, TAG_DIGEST_ADAPTER: "a" * 64}
    check_digests("m v1", dict(actual), actual)
    with pytest.raises(EvidenceError, match="no recorded artifact digests"):
        check_digests("m v1", {TAG_DIGEST_BACKBONE: "b" * 64}, actual)
    with pytest.raises(EvidenceError, match="adapter artifacts do not match their recorded digest"):
        check_digests("m v1", actual | {TAG_DIGEST_ADAPTER: "0" * 64}, actual)
