"""Model registry policy: naming, separated duties, the challenger/champion gate, rollback.

- Naming (:func:`registered_model_name`, the one place): a run of a production method
  (``TrainingMethod.production``) belongs to ``cessl-ecg``; any other method (the
  baselines) to ``cessl-ecg-experiments``, unless the run names the model explicitly.
- Separated duties: the pipeline registers only into the *candidates* model of that name,
  ``<model>-candidates`` (:func:`registration_model_name`; per site ``<model>-<site>-candidates``),
  and sets ``challenger`` there for a production method only. The production model
  ``<model>`` receives a version only from :func:`promote` (a release manager, ``MANAGE``):
  ``MlflowClient.copy_model_version`` of the candidate (its tags kept, plus
  :data:`~pipeline.registry.tracking.TAG_SOURCE_CANDIDATE` naming it), then ``champion``.
  On an MLflow server ``cessl access init`` gives the pipeline ``READ`` on every production
  model, so the server itself refuses it any alias or version there
  (:mod:`pipeline.registry.access`).
- :func:`promote` never trusts numbers the pipeline wrote. It loads the challenger and the
  champion (their artifacts checked against their recorded digests), reads the frozen test
  set's records from the data (content hashes checked) and recomputes the evidence
  (:mod:`pipeline.registry.evidence`). ``champion`` moves to (a copy of) the challenger only if

  1. its adapter was trained with a production method (never overridable: a baseline never
     reaches a production model), and its model loads and matches its digests (never
     overridable either);
  2. with a champion: the paired jackknife-t interval of both models' predictions on the same
     frozen records (:mod:`ml.eval.bootstrap`) of ``challenger - champion`` (macro F-beta2 by
     default) has a lower bound above the margin (>= 0), and no scored class's F-beta2 drops by
     more than ``max_class_drop``. The interval's one-sided level is spent over the attempts on
     one frozen test set: attempt k (counted from the verified, signed decisions of the
     production model's audit log on that test-set version, :func:`earlier_attempts`) is
     tested at ``alpha / 2^k`` (:mod:`ml.eval.power`; 2.5% in all), so retrying on the same
     records cannot buy a promotion. A challenger that cannot be compared (not scored on the
     model's current frozen test set, a champion that cannot be loaded or scored, no frozen
     record in the data) is refused as not comparable;
  3. without a champion: no other production candidate on the same test split scores higher
     on the frozen records (each rescored here), else it is refused, naming the better version.

  ``force`` (with a reason) overrides 2 and 3 only; who forced and why are recorded.

  The outcome (:attr:`PromotionDecision.label`) is *promoted*, *forced*, *refused*, or
  *insufficient evidence*: the interval contains the margin and the frozen test set holds
  fewer records than the power computation needs to detect an improvement of
  ``evidence.effect`` above the margin (:meth:`Comparison.insufficient` names both counts,
  the interval and the assumptions). Those records cannot tell "better" from "not better",
  so it is not recorded as a refusal: its audit action is ``insufficient`` (signed like
  every decision), and ``cessl promote`` exits 7 (refused: 1).
- Who may: on an MLflow server with authentication, :func:`promote` and :func:`rollback`
  first require ``MANAGE`` on the production model and fail before any change otherwise;
  the audit log names the authenticated user.
- Every decision (and every rollback, and every ``challenger`` alias the pipeline sets) is
  appended to the model's audit log (:mod:`pipeline.registry.audit`); the version tags keep the last
  decision for convenience only.
- The champion history is a registered-model tag (JSON list of production versions, oldest
  first), so :func:`rollback` restores the previous champion.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import CesslError
from ml.eval.power import SD_FROM_DATA, PowerCheck, PowerConfig, attempt_alpha, power_check
from pipeline.registry.access import client_tracking_uri, require_model_permission
from pipeline.registry.audit import CHAMPION_ACTIONS, AuditEntry, current_user, evidence_digest, record
from pipeline.registry.audit import history as audit_history
from pipeline.registry.decision_lock import decision_lock, is_lock_model
from pipeline.registry.evidence import EvidenceError, LoadedModel, fetch_model, frozen_test_records, paired, score
from pipeline.registry.lineage import TAG_DATA_VERSION
from pipeline.registry.signing import Signer, Trust, find_signer, find_trust
from pipeline.registry.store import TrackingConfig
from pipeline.registry.tracking import (
    CHALLENGER,
    CHAMPION,
    TAG_DIGEST_ADAPTER,
    TAG_METHOD,
    TAG_SOURCE_CANDIDATE,
    TAG_TEST_SPLIT,
    TEST_PREFIX,
    candidates_model_name,
    current_alias,
    is_production_method,
)
from pipeline.registry.verify import Verification, verify_model

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "cessl-ecg"
EXPERIMENTS_SUFFIX = "-experiments"
GATE_METRICS = ("macro_f_beta", "macro_g_beta")  # ml.eval.bootstrap.BOOTSTRAP_METRICS
# The pipeline's own paired bootstrap (components.register.CHAMPION_ARTIFACT_DIR / GATE_FILE): shown in
# the run, never read by promote (the gate recomputes its evidence).
GATE_ARTIFACT = "champion/paired_bootstrap.json"
HISTORY_TAG = "champion_history"
TAG_SITE = "site"  # pipeline.registry.network_tracking.TAG_SITE: a network run's site
PARAM_SOURCE = "source"  # the run's data source (where promote reads the frozen test records by default)
TAG_DECISION = "promotion_decision"
TAG_COMPARISON = "promotion_comparison"
TAG_PREVIOUS = "previous_champion"
TAG_GATE_POWER = "gate_power"  # run tag: the split's power check of its test part (ml.eval.power.PowerCheck, JSON)
# A decision's outcome (PromotionDecision.label) and its audit action.
PROMOTED, FORCED, REFUSED, INSUFFICIENT = "promoted", "forced", "refused", "insufficient evidence"
ACTION_OF = {PROMOTED: "promote", FORCED: "force", REFUSED: "refuse", INSUFFICIENT: "insufficient"}
COMPARED = ("promote", "force", "refuse", "insufficient")  # the decisions that may rest on an interval


class RegistryError(CesslError):
    """The registry is not in a state the operation needs (no challenger, no history...)."""


# --------------------------------------------------------------------------- naming


def registered_model_name(model_name: str, method: str) -> str:
    """The registered model a run goes to: ``model_name`` when given explicitly, else
    ``cessl-ecg`` for a production method and ``cessl-ecg-experiments`` for any other."""
    if model_name:
        return model_name
    return DEFAULT_MODEL_NAME if is_production_method(method) else DEFAULT_MODEL_NAME + EXPERIMENTS_SUFFIX


def registration_model_name(model_name: str, method: str) -> str:
    """The model the pipeline registers a run into: the candidates model of
    :func:`registered_model_name` (``cessl-ecg-candidates``...)."""
    return candidates_model_name(registered_model_name(model_name, method))


def site_model_name(model_name: str, site: str) -> str:
    """A hospital network's registered model for ``site``: ``<model_name>-<site>`` (each site
    has its own versions, aliases and promotion gate)."""
    return f"{model_name}-{site}"


# --------------------------------------------------------------------------- the gate


def class_label(code: str) -> str:
    """A class as the gate prints it: ``AF (164889003)``; the code alone where the Challenge's
    label mapping has no name for it (or cannot be read)."""
    from ml.data.labels import LabelMapping

    try:
        name = LabelMapping.from_csv().abbreviation(code)
    except (ValueError, KeyError, OSError):
        return code
    return code if name == code else f"{name} ({code})"


@dataclass(frozen=True)
class GateConfig:
    """How a challenger must beat the champion: the lower bound of the paired interval of
    ``metric`` above ``margin``, no scored class's F-beta2 lower by more than
    ``max_class_drop``; ``evidence``: the one-sided level over all attempts on one frozen test
    set, and the power to detect an improvement of ``evidence.effect`` above the margin, which
    decide when the records are too few to decide (:mod:`ml.eval.power`)."""

    metric: str = "macro_f_beta"
    margin: float = 0.0
    max_class_drop: float = 0.05
    evidence: PowerConfig = PowerConfig()

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise RegistryError(f"gate metric {self.metric!r} has no paired bootstrap; use one of {GATE_METRICS}")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise RegistryError(f"margin must be a finite number >= 0, got {self.margin}")
        if not math.isfinite(self.max_class_drop) or self.max_class_drop < 0:
            raise RegistryError(f"max class drop must be a finite number >= 0, got {self.max_class_drop}")


@dataclass
class Comparison:
    """The numbers a decision rests on, recomputed at promotion (:mod:`pipeline.registry.evidence`)."""

    metric: str
    challenger_version: str  # the candidate version
    challenger_value: float | None
    champion_version: str | None  # the production version
    champion_value: float | None
    margin: float
    basis: str  # where the numbers come from (or why they are not comparable)
    comparable: bool = False
    estimate: float | None = None  # challenger - champion on all shared records
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    n_records: int | None = None
    n_resamples: int | None = None
    max_class_drop: float = 0.05
    class_drops: dict[str, float] = field(default_factory=dict)  # champion - challenger F-beta2 per class
    better_versions: dict[str, float] = field(default_factory=dict)  # no champion: higher on the same records
    testset_version: int | None = None  # the frozen test set the records came from
    testset_md5: str = ""
    digests: dict[str, dict[str, str]] = field(default_factory=dict)  # "challenger"/"champion" -> digest tags
    interval: str = ""  # how the interval was computed (ml.eval.bootstrap.INTERVALS)
    attempt: int | None = None  # the how-manieth comparison on this frozen test set (audit log)
    alpha: float | None = None  # the attempt's one-sided level: alpha / 2^attempt
    record_sd: float | None = None  # per-record SD of the difference (jackknife), for the power
    required_records: int | None = None  # the records the gate needs to detect `effect` with `power`
    effect: float | None = None
    power: float | None = None

    @property
    def failing_classes(self) -> dict[str, float]:
        return {k: d for k, d in self.class_drops.items() if d > self.max_class_drop}

    def power_check(self) -> PowerCheck | None:
        """What the records could detect, from the numbers recorded here (None: not computed)."""
        n, required, sd, alpha, attempt = (
            self.n_records,
            self.required_records,
            self.record_sd,
            self.alpha,
            self.attempt,
        )
        if n is None or required is None or sd is None or alpha is None or attempt is None:
            return None
        if self.effect is None or self.power is None:
            return None
        return PowerCheck(
            n, required, sd, SD_FROM_DATA, self.margin, self.effect, alpha, self.power, attempt, self.metric
        )

    @property
    def level(self) -> str:
        """The interval's confidence, e.g. ``97.5%``."""
        return f"{100 * (self.confidence or 0):.4g}%"

    @property
    def below_margin(self) -> bool:
        """The whole interval is at or below the margin: the challenger is shown not better by it."""
        return self.ci_high is not None and self.ci_high <= self.margin

    def insufficient(self) -> str:
        """Why these records cannot decide ("" when they can): the interval contains the margin
        and fewer records than the power computation needs were compared."""
        check = self.power_check()
        if self.champion_version is None or not self.comparable or self.ci_low is None or check is None:
            return ""
        if self.ci_low > self.margin or self.below_margin or check.sufficient:
            return ""
        return (
            f"{check.n_records} frozen test records, the gate needs >= {check.required} to decide: the "
            f"{self.level} interval [{self.ci_low:.4f}, {self.ci_high:.4f}] contains the margin {self.margin:g} "
            f"({check.assumptions()}); more labelled records (then `cessl testset refresh`) or accept "
            "a larger --effect"
        )

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        if self.champion_version is None:
            rivals = ", ".join(f"v{v} {x:.4f}" for v, x in self.better_versions.items())
            return (
                f"{self.metric} (recomputed): challenger v{self.challenger_version} {fmt(self.challenger_value)}, "
                "no champion yet" + (f"; higher on the same records: {rivals}" if rivals else f"; {self.basis}")
            )
        text = (
            f"{self.metric} (recomputed): challenger v{self.challenger_version} {fmt(self.challenger_value)} vs "
            f"champion v{self.champion_version} {fmt(self.champion_value)}"
        )
        if self.ci_low is None:
            return f"{text} ({self.basis})"
        worst = max(self.class_drops.items(), key=lambda kv: kv[1], default=("-", 0.0))
        worst_class = class_label(worst[0]) if worst[0] != "-" else "-"
        return (
            f"{text}; difference {fmt(self.estimate)}, {self.level} CI [{fmt(self.ci_low)}, {fmt(self.ci_high)}] "
            f"over {self.n_records} records of frozen test set v{self.testset_version} ({self._method()}), needs "
            f"lower bound > {self.margin:g}; largest class drop {worst[1]:.4f} ({worst_class}), allowed "
            f"{self.max_class_drop:g}"
        )

    def _method(self) -> str:
        """How the interval was computed and, with alpha spending, which attempt on the test set it is."""
        method = f"{self.n_resamples} paired resamples" if self.n_resamples else f"paired {self.interval or 'interval'}"
        if self.attempt is None or self.alpha is None:
            return method
        return f"{method}; attempt {self.attempt} on this test set, one-sided alpha {self.alpha:.4g}"


@dataclass
class PromotionDecision:
    promoted: bool
    forced: bool
    reason: str
    comparison: Comparison
    previous_champion: str | None = None
    history: list[str] = field(default_factory=list)
    who: str = ""
    force_reason: str = ""
    candidates: str = ""  # the candidates model the challenger is a version of
    production_version: str | None = None  # promoted: the challenger's copy in the production model
    integrity: bool = False  # refused because the challenger's model is missing, altered or a baseline

    @property
    def label(self) -> str:
        """promoted, forced, refused, or insufficient evidence (not refused: the records cannot decide)."""
        if self.promoted:
            return FORCED if self.forced else PROMOTED
        return INSUFFICIENT if not self.integrity and self.comparison.insufficient() else REFUSED

    @property
    def action(self) -> str:
        """The audit log's action."""
        return ACTION_OF[self.label]


@dataclass
class RollbackResult:
    restored: str
    replaced: str
    history: list[str]


# --------------------------------------------------------------------------- reading


def champion_history(client, name: str) -> list[str]:
    """The production versions that were champion, oldest first ([] for a model not created yet)."""
    if not _model_exists(client, name):
        return []
    tags = client.get_registered_model(name).tags or {}
    raw = tags.get(HISTORY_TAG)
    if not raw:
        return []
    try:
        return [str(v) for v in json.loads(raw)]
    except json.JSONDecodeError as err:
        raise RegistryError(f"model {name}: tag {HISTORY_TAG} is not a JSON list ({err})") from err


def _base(gate: GateConfig, challenger, challenger_value: float | None = None) -> dict[str, Any]:
    return dict(
        metric=gate.metric,
        challenger_version=str(challenger.version),
        challenger_value=challenger_value,
        margin=gate.margin,
        max_class_drop=gate.max_class_drop,
    )


@dataclass(frozen=True)
class GateInputs:
    """Where :func:`compare` finds what it recomputes: a scratch folder, the data holding
    the frozen test records ("" = the challenger's run's ``source``), and the production
    model's verified audit log (the earlier attempts on the same frozen test set)."""

    work_dir: Path
    source: str = ""
    log: tuple[AuditEntry, ...] = ()


def earlier_attempts(log: tuple[AuditEntry, ...] | list[AuditEntry], version: int | None, md5: str) -> int:
    """How many signed decisions of a verified audit log compared a challenger with the
    champion on the frozen test set ``version`` (content ``md5``): each one an interval looked
    at, whatever it decided (forced ones too). Counted from the log, never from a tag."""
    return sum(
        1
        for entry in log
        if entry.format >= 2
        and entry.action in COMPARED
        and entry.signature
        and entry.metrics.get("ci_low") is not None
        and str(entry.metrics.get("testset_version")) == str(version)
        and entry.metrics.get("testset_md5", "") == md5
    )


def _not_comparable(gate: GateConfig, challenger, champion, why: str, **extra: Any) -> Comparison:
    return Comparison(
        champion_version=None if champion is None else str(champion.version),
        champion_value=None,
        basis=f"not comparable: {why}",
        **_base(gate, challenger) | extra,
    )


def _records_of(client, candidates: str, challenger, inputs: GateInputs):
    """The frozen test records of ``candidates``, read from the data the challenger's run used
    (or ``inputs.source``)."""
    source = inputs.source or client.get_run(challenger.run_id).data.params.get(PARAM_SOURCE, "")
    if not source:
        raise EvidenceError(f"{candidates} v{challenger.version}: its run names no data source; pass --source")
    site = (challenger.tags or {}).get(TAG_SITE, "")
    return frozen_test_records(client, candidates, source, site, inputs.work_dir)


def compare(
    client, name: str, gate: GateConfig, challenger, champion, challenger_model: LoadedModel, inputs: GateInputs
) -> Comparison:
    """The evidence for promoting ``challenger`` (a version of ``name``'s candidates model,
    loaded as ``challenger_model``) over ``champion`` (a version of ``name``), recomputed here
    on the frozen test records (or why there is none)."""
    from ml.eval.bootstrap import BootstrapConfig  # numpy: not on the command line's start-up path
    from pipeline.registry.testsets import gate_problem

    candidates = candidates_model_name(name)
    problem = gate_problem(client, candidates, challenger)  # not scored on the model's frozen test set
    if problem:
        return _not_comparable(gate, challenger, champion, problem)
    try:
        records = _records_of(client, candidates, challenger, inputs)
        mine = score(challenger_model, records)
    except EvidenceError as err:
        return _not_comparable(gate, challenger, champion, str(err))
    found = dict(
        challenger_value=mine.metrics.get(gate.metric),
        testset_version=records.testset_version,
        testset_md5=records.testset_md5,
        digests={"challenger": challenger_model.digests},
    )
    if champion is None:
        return _first_champion(client, candidates, gate, challenger, challenger_model, records, found, inputs)
    try:
        champion_model = fetch_model(client, name, str(champion.version), inputs.work_dir)
        theirs = score(champion_model, records)
    except EvidenceError as err:
        return _not_comparable(gate, challenger, champion, f"champion {err}", **found)
    attempt = earlier_attempts(inputs.log, records.testset_version, records.testset_md5) + 1
    alpha = attempt_alpha(gate.evidence.alpha, attempt)
    boot = paired(mine, theirs, records.classes, BootstrapConfig(confidence=1.0 - 2.0 * alpha))
    interval = boot.intervals[gate.metric]
    check = power_check(
        int(boot.n_records), float(interval.record_sd), SD_FROM_DATA, gate.evidence, gate.margin, attempt, gate.metric
    )
    return Comparison(
        **_base(gate, challenger)
        | found
        | {
            "challenger_value": float(interval.challenger),
            "digests": found["digests"] | {"champion": champion_model.digests},
        },
        champion_version=str(champion.version),
        champion_value=float(interval.champion),
        basis=(
            f"recomputed at promotion: both models loaded (digests checked) and scored on {records.describe()}, "
            f"paired {interval.method} interval"
        ),
        comparable=math.isfinite(float(interval.ci_low)),
        estimate=float(interval.estimate),
        ci_low=float(interval.ci_low),
        ci_high=float(interval.ci_high),
        confidence=float(boot.confidence),
        n_records=int(boot.n_records),
        n_resamples=int(boot.n_resamples),
        class_drops={c.name: float(c.drop) for c in boot.per_class},
        interval=interval.method,
        attempt=attempt,
        alpha=alpha,
        record_sd=_finite(interval.record_sd),
        required_records=check.required if math.isfinite(check.sd) else None,
        effect=gate.evidence.effect,
        power=gate.evidence.power,
    )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _rivals(client, candidates: str, challenger, challenger_model: LoadedModel) -> list:
    """The other production candidates on the challenger's test split (one per distinct adapter)."""
    split = (challenger.tags or {}).get(TAG_TEST_SPLIT)
    seen = {challenger_model.digests.get(TAG_DIGEST_ADAPTER, "")}
    rivals = []
    for version in sorted(client.search_model_versions(f"name = '{candidates}'"), key=lambda v: int(v.version)):
        tags = version.tags or {}
        if str(version.version) == str(challenger.version) or not split or tags.get(TAG_TEST_SPLIT) != split:
            continue
        if not is_production_method(tags.get(TAG_METHOD, "")) or tags.get(TAG_DIGEST_ADAPTER, "") in seen:
            continue
        seen.add(tags.get(TAG_DIGEST_ADAPTER, ""))
        rivals.append(version)
    return rivals


def _first_champion(
    client,
    candidates: str,
    gate: GateConfig,
    challenger,
    challenger_model: LoadedModel,
    records,
    found: dict[str, Any],
    inputs: GateInputs,
) -> Comparison:
    """No champion yet: the other production candidates on the same test split, each loaded
    and rescored here on the same records; those that score higher."""
    mine = found["challenger_value"]
    better: dict[str, float] = {}
    for version in _rivals(client, candidates, challenger, challenger_model):
        try:
            value = score(fetch_model(client, candidates, str(version.version), inputs.work_dir), records).metrics
        except EvidenceError as err:
            log.info("%s v%s not considered: %s", candidates, version.version, err)
            continue
        rival = value.get(gate.metric)
        if rival is not None and mine is not None and rival > mine:
            better[str(version.version)] = rival
    return Comparison(
        **_base(gate, challenger) | found,
        champion_version=None,
        champion_value=None,
        basis=f"no champion: every production candidate on the same test split rescored on {records.describe()}",
        comparable=mine is not None,
        n_records=len(records.ids),
        better_versions=dict(sorted(better.items(), key=lambda kv: -kv[1])),
    )


def verdict(comparison: Comparison, gate: GateConfig, method_ok: bool, method: str) -> tuple[bool, str]:
    """(promote?, why) from the comparison alone (no force)."""
    version = comparison.challenger_version
    if not method_ok:
        return False, f"v{version} was trained with method {method or '?'!r}, not a production method"
    if not comparison.comparable:
        basis = comparison.basis
        return False, basis if basis.startswith("not comparable") else f"not comparable: {basis}"
    if comparison.champion_version is None:
        if comparison.better_versions:
            best = next(iter(comparison.better_versions))
            return False, f"no champion yet, but v{best} scored higher on the same records: promote that one"
        return True, "no champion yet: no production candidate scored higher on the same records"
    low, high, level = comparison.ci_low, comparison.ci_high, comparison.level
    if comparison.below_margin:
        return False, (
            f"the whole {level} interval [{low:.4f}, {high:.4f}] is at or below the margin {gate.margin:g}: "
            f"lower bound {low:.4f} does not exceed the margin {gate.margin:g}"
        )
    insufficient = comparison.insufficient()
    if insufficient:
        return False, insufficient
    if comparison.failing_classes:
        worst = ", ".join(f"{class_label(k)} -{d:.4f}" for k, d in comparison.failing_classes.items())
        return False, f"per-class non-inferiority fails (F-beta2 drop > {gate.max_class_drop:g}): {worst}"
    if low is not None and low > gate.margin:
        return True, f"lower bound {low:.4f} of the {level} interval exceeds the margin {gate.margin:g}"
    check = comparison.power_check()
    powered = (
        ""
        if check is None
        else f" ({check.n_records} records: enough to show an improvement of {check.effect:g} with power {check.power:g})"
    )
    return False, f"lower bound {low:.4f} of the {level} interval does not exceed the margin {gate.margin:g}{powered}"


# --------------------------------------------------------------------------- writing


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _audit_metrics(comparison: Comparison) -> dict[str, Any]:
    return {k: v for k, v in asdict(comparison).items() if v not in (None, {}, "")}


@dataclass(frozen=True)
class Decider:
    """Who decides and the key that signs it (checked against the trust file before any change)."""

    who: str
    signer: Signer
    trust: Trust


def decider(client, name: str, action: str, signer: Signer | None, trust: Trust | None) -> Decider:
    """The caller, once it may ``action`` ``name`` (MANAGE on a server) and its signing key is
    the one the trust file lists for it; nothing has changed yet."""
    authenticated = require_model_permission(client_tracking_uri(client), name, action)
    who = authenticated or current_user()
    signer = signer or find_signer()
    trust = trust or find_trust()
    trust.require(who, signer)
    return Decider(who, signer, trust)


def verified_state(client, name: str, trust: Trust) -> Verification:
    """``name``'s verified audit log; RegistryError when the log itself is broken (a moved
    alias is fine here: the decision about to be made names the champion again)."""
    state = verify_model(client, name, trust)
    if state.broken:
        raise RegistryError(f"{state.problem()}; run `cessl audit verify --model {name}`")
    if not state.alias_ok:
        log.warning("%s (the verified champion is used)", state.problem())
    return state


def champion_facts(version) -> dict[str, str]:
    """What a decision records of the version it makes champion (rollback compares them)."""
    from pipeline.registry.testsets import TAG_VERSION

    tags = version.tags or {}
    return {
        "version": str(version.version),
        "run_id": str(version.run_id or ""),
        "backbone_id": tags.get("backbone_id", ""),
        "classes": tags.get("classes", ""),
        "testset_version": tags.get(TAG_VERSION, ""),
    }


def _record(
    client, name: str, decision: PromotionDecision, by: Decider, champion: dict[str, str], evidence: dict[str, str]
) -> None:
    """The decision as the challenger's version tags (the last one only) and a signed audit entry."""
    c = decision.comparison
    version = c.challenger_version
    summary = asdict(c) | {
        "decided_at": _now(),
        "forced": decision.forced,
        "reason": decision.reason,
        "who": decision.who,
        "force_reason": decision.force_reason,
        "production_version": decision.production_version,
    }
    tagged = [(decision.candidates or name, version)]
    if decision.production_version is not None:
        tagged.append((name, decision.production_version))
    for model, model_version in tagged:
        client.set_model_version_tag(model, model_version, TAG_DECISION, decision.label)
        client.set_model_version_tag(model, model_version, TAG_COMPARISON, json.dumps(summary, sort_keys=True)[:5000])
    versions = {"challenger": version, "candidate": f"{decision.candidates or name}/{version}"}
    if decision.previous_champion:
        versions["champion"] = decision.previous_champion
    if decision.production_version is not None:
        versions["production"] = decision.production_version
    why = decision.reason + (f"; forced by {decision.who}: {decision.force_reason}" if decision.forced else "")
    record(
        client,
        AuditEntry(
            model=name,
            action=decision.action,
            versions=versions,
            reason=why,
            metrics=_audit_metrics(c),
            who=decision.who,
            champion=champion,
            evidence=evidence,
        ),
        by.signer,
    )


def _evidence(comparison: Comparison) -> dict[str, str]:
    """Digest of what the decision rests on: the comparison recomputed at promotion (its
    figures, the frozen test set's version and digest, the models' artifact digests)."""
    return {"comparison": evidence_digest(asdict(comparison))}


def _restore_alias(client, name: str, state: Verification) -> None:
    """A refusal puts ``champion`` back where the last valid decision put it (if it was moved)."""
    if state.alias_ok or state.expected_version is None:
        return
    client.set_registered_model_alias(name, CHAMPION, state.expected_version)
    log.warning("%s: %s moved back to v%s", name, CHAMPION, state.expected_version)


ROLLBACK_FACTS = {"backbone_id": "backbone", "classes": "classes", "testset_version": "test-set version"}


def rollback_problem(name: str, target: dict[str, str], current: dict[str, str]) -> str:
    """Why ``target`` cannot replace ``current`` as champion ("" when it can)."""
    for key, what in ROLLBACK_FACTS.items():
        if target.get(key, "") != current.get(key, ""):
            return (
                f"cannot roll back model {name!r} to v{target['version']}: its {what} "
                f"{target.get(key) or 'none'!r} differs from champion v{current['version']}'s "
                f"{current.get(key) or 'none'!r}"
            )
    return ""


def copy_to_production(client, name: str, candidates: str, challenger, challenger_model: LoadedModel) -> str:
    """The production version of the candidate ``challenger``: an earlier copy of it, or a new
    one (``copy_model_version``: its tags kept, plus the source candidate and the verified
    digests)."""
    source = f"{candidates}/{challenger.version}"
    earlier = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if (v.tags or {}).get(TAG_SOURCE_CANDIDATE) == source
    ]
    if earlier:
        version = str(min(int(v.version) for v in earlier))
    else:
        version = str(client.copy_model_version(f"models:/{source}", name).version)
    for key, value in {TAG_SOURCE_CANDIDATE: source, **challenger_model.digests}.items():
        client.set_model_version_tag(name, version, key, value)
    return version


@dataclass(frozen=True)
class _Contest:
    """What one promotion decides on: the models' names and versions, the gate, who decides
    (with the key that signs), and the verified audit log the champion comes from."""

    name: str  # the production model
    candidates: str
    gate: GateConfig
    challenger: Any  # the candidate ModelVersion
    champion: Any  # the production ModelVersion the last valid signed decision names, or None
    by: Decider
    state: Verification

    @property
    def previous(self) -> str | None:
        return None if self.champion is None else str(self.champion.version)

    @property
    def past(self) -> list[str]:
        """The champions valid decisions made, oldest first."""
        return [c["version"] for c in self.state.champions]

    def kept(self) -> dict[str, str]:
        """The champion a refusal leaves in place ({} none)."""
        return {} if self.champion is None else champion_facts(self.champion)


def _refuse(client, contest: _Contest, why: str, comparison: Comparison | None = None, integrity: bool = False):
    """A refusal decided before (or without) the statistics, recorded and signed. ``integrity``:
    the challenger may never reach production (no loadable model, altered artifacts, a
    baseline), whatever ``force`` says; the decision is one line."""
    c = contest
    comparison = comparison or _not_comparable(c.gate, c.challenger, c.champion, why)
    if integrity:
        comparison.basis = why
    decision = PromotionDecision(
        False, False, why, comparison, c.previous, c.past, who=c.by.who, candidates=c.candidates, integrity=integrity
    )
    _restore_alias(client, c.name, c.state)
    _record(client, c.name, decision, c.by, c.kept(), _evidence(comparison))
    log.debug("%s: candidate v%s refused: %s", c.name, c.challenger.version, why)
    return decision


def _already_champion(contest: _Contest) -> bool:
    tags = {} if contest.champion is None else (contest.champion.tags or {})
    return tags.get(TAG_SOURCE_CANDIDATE) == f"{contest.candidates}/{contest.challenger.version}"


def promote(
    client,
    name: str,
    gate: GateConfig = GateConfig(),
    force: bool = False,
    reason: str = "",
    signer: Signer | None = None,
    trust: Trust | None = None,
    source: str = "",
) -> PromotionDecision:
    """Copy the challenger of ``<name>-candidates`` into the production model ``name`` and move
    ``champion`` to the copy if the recomputed gate passes, or with ``force`` and a ``reason``.

    ``source``: where the frozen test records are read ("" = the challenger's run's source).
    Every call is recorded (version tags + a signed audit entry), refusals included. The
    champion compared with is the one the last valid signed decision names (a moved alias is
    put back by a refusal). ``signer`` / ``trust``: default :func:`find_signer` / :func:`find_trust`.
    """
    if force and not reason.strip():
        raise RegistryError("--force needs --reason TEXT: who forced a promotion and why is recorded")
    by = decider(client, name, "promote", signer, trust)  # before any change
    with decision_lock(client, name, by.who):  # the state read and the decision recorded, one at a time
        return _promote(client, name, gate, force, reason, by, source)


def _promote(
    client, name: str, gate: GateConfig, force: bool, reason: str, by: Decider, source: str
) -> PromotionDecision:
    candidates = candidates_model_name(name)
    challenger = current_alias(client, candidates, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"model {candidates!r} has no version with the alias {CHALLENGER!r} (the pipeline registers {name}'s "
            "candidates there)"
        )
    state = verified_state(client, name, by.trust)
    verified = state.expected_version
    champion = None if verified is None else client.get_model_version(name, verified)
    contest = _Contest(name, candidates, gate, challenger, champion, by, state)
    if _already_champion(contest):
        return _refuse(
            client, contest, f"candidate v{challenger.version} is already the champion (v{contest.previous})"
        )
    from pipeline.registry.testsets import gate_problem

    problem = gate_problem(client, candidates, challenger)
    if problem and not force:  # not comparable whatever the models hold: refused before any download
        comparison = _not_comparable(gate, challenger, champion, problem)
        return _refuse(client, contest, comparison.basis, comparison)
    with tempfile.TemporaryDirectory(prefix="cessl-promote-") as tmp:
        inputs = GateInputs(Path(tmp), source, tuple(state.entries))
        try:
            model = fetch_model(client, candidates, str(challenger.version), inputs.work_dir)
        except EvidenceError as err:
            return _refuse(client, contest, str(err), integrity=True)
        if not is_production_method(model.method):
            why = (
                f"{candidates} v{challenger.version} was trained with {model.method or '?'!r}, not a production method"
            )
            return _refuse(client, contest, why, integrity=True)
        comparison = compare(client, name, gate, challenger, champion, model, inputs)
        passed, why = verdict(comparison, gate, True, model.method)
        decision = PromotionDecision(
            promoted=passed or force,
            forced=force and not passed,
            reason=why,
            comparison=comparison,
            previous_champion=contest.previous,
            who=by.who,
            force_reason=reason.strip() if force else "",
            candidates=candidates,
        )
        if decision.promoted:
            kept = _install(client, contest, decision, model)
        else:
            decision.history = contest.past
            kept = contest.kept()
            _restore_alias(client, name, state)
            log.debug("%s v%s not promoted: %s; %s", candidates, challenger.version, why, comparison.describe())
    _record(client, name, decision, by, kept, _evidence(comparison))
    return decision


def _install(client, contest: _Contest, decision: PromotionDecision, model: LoadedModel) -> dict[str, str]:
    """Copy the challenger into the production model, move ``champion`` to the copy, extend
    the history; the facts of the new champion (what the signed decision records)."""
    name = contest.name
    version = copy_to_production(client, name, contest.candidates, contest.challenger, model)
    history = [*contest.past, version]
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    if contest.previous is not None:
        client.set_model_version_tag(name, version, TAG_PREVIOUS, contest.previous)
    decision.history, decision.production_version = history, version
    log.debug(
        "%s v%s (candidate v%s) is the champion (%s): %s",
        name,
        version,
        contest.challenger.version,
        decision.label,
        decision.comparison.describe(),
    )
    return champion_facts(client.get_model_version(name, version))


def rollback(
    client, name: str, reason: str = "", signer: Signer | None = None, trust: Trust | None = None
) -> RollbackResult:
    """Give ``champion`` back to the previous champion that a valid signed decision made,
    if compatible (backbone, classes, test-set version); recorded as a signed entry."""
    by = decider(client, name, "roll back", signer, trust)  # before any change
    with decision_lock(client, name, by.who):
        return _rollback(client, name, reason, by)


def _rollback(client, name: str, reason: str, by: Decider) -> RollbackResult:
    state = verified_state(client, name, by.trust)
    stack = state.champions
    if state.expected_version is None or not stack:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    current, target = stack[-1], stack[-2] if len(stack) > 1 else None
    if target is None:
        raise RegistryError(f"model {name!r}: champion v{current['version']} has no previous champion to restore")
    problem = rollback_problem(name, target, current)
    if problem:
        raise RegistryError(problem)
    restored = client.get_model_version(name, target["version"])
    if str(restored.run_id or "") != target.get("run_id", ""):
        raise RegistryError(
            f"cannot roll back model {name!r} to v{target['version']}: it is now run {restored.run_id}, "
            f"the decision named run {target.get('run_id')}"
        )
    history = [c["version"] for c in stack[:-1]]
    previous = target["version"]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, current["version"], "rolled_back_at", _now())
    client.set_model_version_tag(name, previous, "restored_at", _now())
    client.set_registered_model_tag(
        name, "last_rollback", json.dumps({"from": current["version"], "to": previous, "at": _now()})
    )
    record(
        client,
        AuditEntry(
            model=name,
            action="rollback",
            versions={"from": current["version"], "to": previous},
            reason=reason or f"champion rolled back from v{current['version']} to v{previous}",
            metrics={"history": history},
            who=by.who,
            champion=target,
            evidence={"replaced": evidence_digest(current)},
        ),
        by.signer,
    )
    log.debug("%s: champion rolled back from v%s to v%s", name, current["version"], previous)
    return RollbackResult(restored=previous, replaced=current["version"], history=history)


def champion_data_version(client, name: str) -> str | None:
    """The data version (DVC md5) the current champion was trained on, if any."""
    champion = current_alias(client, name, CHAMPION)
    if champion is None:
        return None
    return champion.tags.get(TAG_DATA_VERSION) or None


@dataclass(frozen=True)
class SiteChange:
    """Whether a site of the network needs retraining, and why."""

    site: str
    model: str  # the site's registered model, <model>-<site>
    current: str  # the data version of the site's source now ("" when it cannot be told from here)
    trained_on: str  # the data version of the site's champion ("" when it has none)
    reason: str  # why it retrains, "" when it does not
    drift: str = ""  # the monitor's drift reports since the champion's decision ("" none)

    @property
    def changed(self) -> bool:
        return bool(self.reason)


def drift_since_champion(client, name: str) -> str:
    """The monitor's ``drift`` reports in ``name``'s audit log since the last decision about its
    champion, in one line ("" when none): what a retraining on new data answers."""
    if not _model_exists(client, name):
        return ""
    entries = audit_history(client, name)
    last = max((e.seq for e in entries if e.action in CHAMPION_ACTIONS), default=0)
    reports = [e for e in entries if e.action == "drift" and e.seq > last]
    if not reports:
        return ""
    newest = reports[-1]
    return (
        f"{len(reports)} drift report(s) since its champion's decision, the last at {newest.at} (audit entry "
        f"#{newest.seq}, monitor run {newest.metrics.get('monitor_run', '?')}): {newest.reason}"
    )


def site_change(client, site: str, model: str, current: str) -> SiteChange:
    """Compare ``current`` (the site's data version now) with its champion's: a site retrains
    when its data moved, when it has no champion, when its data version cannot be told from
    here (ingest computes it at run time), or when its frozen test set was refreshed."""
    from pipeline.registry.testsets import REDRAW
    from pipeline.registry.testsets import current as current_testset

    trained_on = champion_data_version(client, model) if _model_exists(client, model) else None
    pointer = current_testset(client, candidates_model_name(model)) if trained_on is not None else None
    if trained_on is None:
        reason = "no champion yet"
    elif not current:
        reason = "its data version cannot be computed from here"
    elif pointer is not None and pointer.status == REDRAW:
        reason = f"test set v{pointer.version} was refreshed"
    elif trained_on != current:
        reason = f"data version {current} differs from the champion's ({trained_on})"
    else:
        reason = ""
    return SiteChange(site, model, current, trained_on or "", reason, drift_since_champion(client, model))


def changed_sites(client, sites, model_of, data_version_of) -> list[SiteChange]:
    """One :class:`SiteChange` per site of ``sites`` (a :class:`pipeline.core.sites.SiteRegistry`):
    ``model_of(site) -> str`` names its registered model (``<model>-<site>``, the site's
    method override included), ``data_version_of(source) -> str`` gives its current data
    version (:func:`pipeline.registry.lineage.source_data_version`)."""
    return [site_change(client, site.name, model_of(site), data_version_of(site.source)) for site in sites]


def _model_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def load_champion(config: TrackingConfig):
    """The current champion of ``config.model_name`` as a :class:`components.evaluate.Champion`
    (its predictor None, with the reason, when it cannot be loaded); None when there is none."""
    from mlflow.exceptions import MlflowException

    from components.evaluate import Champion
    from pipeline.registry.pyfunc_model import load_predictor

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


def model_aliases(client, name: str) -> dict[str, str]:
    """alias -> version of a registered model (``search_model_versions`` returns no aliases)."""
    aliases = client.get_registered_model(name).aliases or {}
    return {str(alias): str(version) for alias, version in sorted(aliases.items())}


def describe_versions(client, name: str) -> list[dict[str, Any]]:
    """Version, aliases, method, data version, last decision and main test metric of every
    version (newest first)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = model_aliases(client, name)
    except MlflowException as err:
        raise RegistryError(f"no registered model {name!r}") from err
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": str(v.version),
                "aliases": ",".join(by_version.get(str(v.version), [])),
                "method": v.tags.get(TAG_METHOD, ""),
                "data_version": v.tags.get(TAG_DATA_VERSION, ""),
                "decision": v.tags.get(TAG_DECISION, ""),
                "macro_f_beta": v.tags.get(TEST_PREFIX + "macro_f_beta", ""),
            }
        )
    return rows


def describe_models(client) -> list[dict[str, str]]:
    """Every registered model with its current aliases."""
    rows = []
    for model in client.search_registered_models(max_results=1000):
        if is_lock_model(model.name):
            continue
        aliases = model.aliases or {}
        rows.append(
            {
                "name": model.name,
                "aliases": ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())),
                "latest_version": str(max((int(v.version) for v in model.latest_versions or []), default=0) or ""),
            }
        )
    return sorted(rows, key=lambda r: r["name"])
