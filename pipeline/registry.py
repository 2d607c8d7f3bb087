"""Model registry policy: the challenger/champion gate, promotion history and rollback.

- Every registered version gets the alias ``challenger`` (``pipeline.tracking``).
- :func:`promote` moves ``champion`` to the challenger only if the challenger beats the
  champion **on the same test split** by more than a margin (macro F-beta2 by default).
  "Same test split" means either the champion was scored on the challenger's test split
  when the challenger was registered (``champion_test_*`` metrics of the challenger's run)
  or both versions carry the same ``test_split_hash``. Anything else is refused as not
  comparable. The decision and the comparison are written as tags on the challenger;
  ``force`` promotes anyway and is recorded as such.
- The champion history is a registered-model tag (JSON list of versions, oldest first),
  so :func:`rollback` restores the previous champion and records that too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ml.errors import CesslError
from pipeline.lineage import TAG_DATA_VERSION
from pipeline.tracking import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_PREFIX,
    TAG_COMPARED_CHAMPION,
    TAG_TEST_SPLIT,
    TEST_PREFIX,
    TrackingConfig,
    current_alias,
)

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
LOWER_IS_BETTER = frozenset({"ranking_loss", "coverage"})
TAG_DECISION = "promotion_decision"
TAG_COMPARISON = "promotion_comparison"
TAG_PREVIOUS = "previous_champion"


class RegistryError(CesslError):
    """The registry is not in a state the operation needs (no challenger, no history...)."""


@dataclass(frozen=True)
class GateConfig:
    """How a challenger must beat the champion."""

    metric: str = "macro_f_beta"
    margin: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def beats(self, challenger: float, champion: float) -> bool:
        if self.higher_is_better:
            return challenger > champion + self.margin
        return challenger < champion - self.margin


@dataclass
class Comparison:
    metric: str
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    basis: str  # how the two numbers were made comparable (or why they are not)
    higher_is_better: bool = True

    @property
    def comparable(self) -> bool:
        return self.challenger_value is not None and (self.champion_version is None or self.champion_value is not None)

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        if self.champion_version is None:
            return f"{self.metric}: challenger v{self.challenger_version} {fmt(self.challenger_value)}, no champion yet"
        better = ">" if self.higher_is_better else "<"
        return (
            f"{self.metric}: challenger v{self.challenger_version} {fmt(self.challenger_value)} vs champion "
            f"v{self.champion_version} {fmt(self.champion_value)} (needs {better} champion "
            f"{'+' if self.higher_is_better else '-'} {self.margin:g}; {self.basis})"
        )


@dataclass
class PromotionDecision:
    promoted: bool
    forced: bool
    reason: str
    comparison: Comparison
    previous_champion: str | None = None
    history: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.promoted:
            return "forced" if self.forced else "promoted"
        return "refused"


@dataclass
class RollbackResult:
    restored: str
    replaced: str
    history: list[str]


# --------------------------------------------------------------------------- reading


def champion_history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    raw = tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        return [str(v) for v in json.loads(raw)]
    except json.JSONDecodeError as err:
        raise RegistryError(f"model {name}: tag {HISTORY_TAG} is not a JSON list ({err})") from err


def _run_metric(client, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def compare(client, name: str, gate: GateConfig, challenger, champion) -> Comparison:
    """Challenger and champion numbers on the same test split, or why there are none."""
    challenger_value = _run_metric(client, challenger.run_id, TEST_PREFIX + gate.metric)
    base = dict(
        metric=gate.metric,
        challenger_version=str(challenger.version),
        challenger_value=challenger_value,
        margin=gate.margin,
        higher_is_better=gate.higher_is_better,
    )
    if champion is None:
        return Comparison(champion_version=None, champion_value=None, basis="no champion", **base)
    champion_version = str(champion.version)
    if challenger.tags.get(TAG_COMPARED_CHAMPION) == champion_version:
        value = _run_metric(client, challenger.run_id, CHAMPION_PREFIX + gate.metric)
        basis = "champion scored on the challenger's test split at registration"
        if value is not None:
            return Comparison(champion_version=champion_version, champion_value=value, basis=basis, **base)
    split_c, split_h = challenger.tags.get(TAG_TEST_SPLIT), champion.tags.get(TAG_TEST_SPLIT)
    if split_c and split_c == split_h:
        value = _run_metric(client, champion.run_id, TEST_PREFIX + gate.metric)
        return Comparison(
            champion_version=champion_version, champion_value=value, basis=f"same test split {split_c[:12]}", **base
        )
    return Comparison(
        champion_version=champion_version,
        champion_value=None,
        basis=(
            f"not comparable: test splits differ ({(split_c or '?')[:12]} vs {(split_h or '?')[:12]}) and the "
            f"champion was not scored on the challenger's split; re-run the pipeline to score it"
        ),
        **base,
    )


# --------------------------------------------------------------------------- writing


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _record(client, name: str, version: str, decision: PromotionDecision, reason_prefix: str = "") -> None:
    comparison = asdict(decision.comparison) | {
        "decided_at": _now(),
        "forced": decision.forced,
        "reason": reason_prefix + decision.reason,
    }
    client.set_model_version_tag(name, version, TAG_DECISION, decision.label)
    client.set_model_version_tag(name, version, TAG_COMPARISON, json.dumps(comparison, sort_keys=True))


def promote(client, name: str, gate: GateConfig = GateConfig(), force: bool = False) -> PromotionDecision:
    """Move ``champion`` to the challenger if it beats the champion (or ``force``)."""
    challenger = current_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no version with the alias {CHALLENGER!r}")
    champion = current_alias(client, name, CHAMPION)
    comparison = compare(client, name, gate, challenger, champion)
    if champion is not None and str(champion.version) == str(challenger.version):
        return PromotionDecision(
            False,
            False,
            f"v{challenger.version} is already the champion",
            comparison,
            previous_champion=str(champion.version),
            history=champion_history(client, name),
        )
    if comparison.challenger_value is None:
        reason = f"challenger v{challenger.version} has no {TEST_PREFIX}{gate.metric} metric"
        promoted = False
    elif champion is None:
        reason, promoted = "no champion yet: the challenger becomes the first champion", True
    elif comparison.champion_value is None:
        reason, promoted = comparison.basis, False
    elif gate.beats(comparison.challenger_value, comparison.champion_value):
        reason, promoted = "challenger beats the champion", True
    else:
        reason, promoted = "challenger does not beat the champion", False
    forced = force and not promoted
    decision = PromotionDecision(
        promoted or force,
        forced,
        reason,
        comparison,
        previous_champion=None if champion is None else str(champion.version),
    )
    _record(client, name, str(challenger.version), decision, "forced despite: " if forced else "")
    if decision.promoted:
        history = champion_history(client, name)
        if champion is not None and (not history or history[-1] != str(champion.version)):
            history.append(str(champion.version))  # a champion set by hand, outside this history
        history.append(str(challenger.version))
        client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        if champion is not None:
            client.set_model_version_tag(name, str(challenger.version), TAG_PREVIOUS, str(champion.version))
        decision.history = history
        log.info("%s v%s is the champion (%s): %s", name, challenger.version, decision.label, comparison.describe())
    else:
        decision.history = champion_history(client, name)
        log.info("%s v%s not promoted: %s; %s", name, challenger.version, reason, comparison.describe())
    return decision


def rollback(client, name: str) -> RollbackResult:
    """Give ``champion`` back to the previous champion."""
    champion = current_alias(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    history = champion_history(client, name)
    current = str(champion.version)
    if history and history[-1] == current:
        history = history[:-1]
    if not history:
        raise RegistryError(f"model {name!r}: champion v{current} has no previous champion to restore")
    previous = history[-1]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, current, "rolled_back_at", _now())
    client.set_model_version_tag(name, previous, "restored_at", _now())
    client.set_registered_model_tag(name, "last_rollback", json.dumps({"from": current, "to": previous, "at": _now()}))
    log.info("%s: champion rolled back from v%s to v%s", name, current, previous)
    return RollbackResult(restored=previous, replaced=current, history=history)


def champion_data_version(client, name: str) -> str | None:
    """The data version (DVC md5) the current champion was trained on, if any."""
    champion = current_alias(client, name, CHAMPION)
    if champion is None:
        return None
    return champion.tags.get(TAG_DATA_VERSION) or None


def load_champion(config: TrackingConfig):
    """The current champion of ``config.model_name`` as a :class:`components.evaluate.Champion`
    (its predictor None, with the reason, when it cannot be loaded); None when there is none."""
    from mlflow.exceptions import MlflowException

    from components.evaluate import Champion
    from pipeline.pyfunc_model import load_predictor

    champion = current_alias(config.client(), config.model_name, CHAMPION)
    if champion is None:
        return None
    version = str(champion.version)
    try:
        predictor = load_predictor(f"models:/{config.model_name}@{CHAMPION}", tracking_uri=config.tracking_uri)
    except (MlflowException, CesslError, ValueError, OSError) as err:
        log.warning("champion v%s of %s could not be loaded: %s", version, config.model_name, err)
        return Champion(version, problem=str(err))
    return Champion(version, predictor)


def describe_versions(client, name: str) -> list[dict[str, Any]]:
    """Version, aliases, data version and main test metric of every version (newest first)."""
    versions = client.search_model_versions(f"name = '{name}'")
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": v.version,
                "aliases": ",".join(getattr(v, "aliases", []) or []),
                "data_version": v.tags.get(TAG_DATA_VERSION, ""),
                "decision": v.tags.get(TAG_DECISION, ""),
                "macro_f_beta": v.tags.get(TEST_PREFIX + "macro_f_beta", ""),
            }
        )
    return rows
