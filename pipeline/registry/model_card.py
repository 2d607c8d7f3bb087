"""A production version's model card, generated from the registry's own evidence.

:func:`model_card` writes Markdown for ``NAME`` v``V`` from a **verified** audit log
(:mod:`pipeline.registry.verify`) and the version's registry entry, in two kinds of evidence
kept apart on the card:

- **signed** (a release manager's decisions, verified on every read): the decision that made
  the version champion (who, when, the gate's recomputed comparison: metric, difference with
  its interval, frozen test-set version and size) and the version's calibration
  (:mod:`pipeline.registry.calibration`: per class the decision thresholds, the miss-rate
  bounds, what it was fitted on, the refer rate);
- **reported by the training run** (written by the pipeline's identity, shown, not re-checked):
  the data version and source, the split sizes, the method and backbone, and the test metrics
  with their 95% bootstrap intervals.

It also states the intended use, what is known not to hold (:data:`KNOWN_LIMITS`) and that it
is not for clinical use without local validation. ``cessl card`` prints or logs it;
``cessl serve`` answers it at ``/v2/models/{S}/card``; ``cessl promote`` and ``cessl calibrate``
log it (``model_card.md``) to the audit run of the decision they record.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.registry.audit import CHAMPION_ACTIONS, AuditEntry, audit_runs
from pipeline.registry.calibration import calibration_entry, signed_calibration
from pipeline.registry.tracking import tagged_classes

if TYPE_CHECKING:
    from pipeline.registry.signing import Trust

log = logging.getLogger(__name__)

CARD_FILE = "model_card.md"
CARD_METRICS = ("macro_f_beta", "macro_g_beta", "challenge_score", "macro_auroc", "macro_map")
INTENDED_USE = (
    "Decision support for reading 12-lead ECGs: flags the listed diagnoses (SNOMED CT codes) for a "
    "clinician to confirm, at the site whose data it was fine-tuned and calibrated on. It does not diagnose, "
    "does not replace a cardiologist's reading, and answers 'unreadable' instead of diagnoses for a record "
    "that fails the signal-quality check."
)
NOT_CLINICAL = "**Not for clinical use without validation** on the site's own patients, devices and case mix."
KNOWN_LIMITS = (
    "Only the classes listed are predicted; any other finding is silently absent from the answer.",
    "Metrics hold for records like the test split (same site, devices and case mix); another hospital, a new "
    "device or a shift in case mix needs its own evaluation (`cessl monitor` watches for drift without labels).",
    "A calibrated miss-rate bound is marginal per class, for records exchangeable with the calibration split: "
    "not per patient, not per subgroup, not joint over classes.",
    "Thresholds fitted on few validation records are unreliable; uncalibrated classes answer present/absent "
    "with no miss-rate statement.",
    "Semi-supervised fine-tuning reads unlabelled records of the site; labels are SNOMED codes from record "
    "headers, not adjudicated.",
)


def champion_decision(entries: Sequence[AuditEntry], version: str) -> AuditEntry | None:
    """The last signed decision that made ``version`` champion (None: none did)."""
    return next(
        (
            e
            for e in reversed(entries)
            if e.format >= 2 and e.action in CHAMPION_ACTIONS and e.champion.get("version") == str(version)
        ),
        None,
    )


def _names(codes: Sequence[str]) -> dict[str, str]:
    """code -> ``AF (atrial fibrillation)`` (the code alone where the mapping has no name)."""
    from ml.data.labels import class_descriptions

    abbreviations, names = class_descriptions(codes)
    return {
        code: code if abbreviation == code else f"{abbreviation} ({name})"
        for code, abbreviation, name in zip(codes, abbreviations, names, strict=True)
    }


def _num(value: Any, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def _interval(source: dict[str, Any], key: str) -> str:
    """``0.560 [0.495, 0.625]`` from ``key``, ``key_low``, ``key_high`` of a tag or metric dict."""
    if key not in source:
        return "n/a"
    low, high = source.get(f"{key}_low"), source.get(f"{key}_high")
    bounds = f" [{_num(low)}, {_num(high)}]" if low is not None and high is not None else " (no interval)"
    return _num(source[key]) + bounds


def _decision_section(decision: AuditEntry | None) -> list[str]:
    if decision is None:
        return ["No signed decision made this version champion: it is not in production."]
    m = decision.metrics
    lines = [
        f"- {decision.action} by **{decision.who}** at {decision.at} (audit entry #{decision.seq}): {decision.reason}"
    ]
    if decision.action in ("promote", "force") and "metric" in m:
        if m.get("ci_low") is not None:
            lines.append(
                f"- gate, recomputed at the decision: {m['metric']} challenger {_num(m.get('challenger_value'))} vs "
                f"champion v{m.get('champion_version')} {_num(m.get('champion_value'))}; difference "
                f"{_num(m.get('estimate'))}, {100 * float(m.get('confidence') or 0):.4g}% CI "
                f"[{_num(m.get('ci_low'))}, {_num(m.get('ci_high'))}] over {m.get('n_records')} records of frozen "
                f"test set v{m.get('testset_version')}"
            )
        else:
            lines.append(f"- gate: {m['metric']} {_num(m.get('challenger_value'))} ({m.get('basis', '')})")
    return lines


def _calibration_section(entries: Sequence[AuditEntry], version: str, classes: list[str]) -> list[str]:
    calibration, entry = signed_calibration(list(entries), version, classes)
    if calibration is None or entry is None:
        return [
            "Not calibrated: every class answers present / absent by its fitted threshold, with no statement "
            "about how often it misses (`cessl calibrate`)."
        ]
    fit = entry.metrics.get("fit", {})
    names = _names(classes)
    lines = [
        f"Signed by **{entry.who}** at {entry.at} (audit entry #{entry.seq}); fitted on {fit.get('records', '?')} "
        f"records of {fit.get('source', '?')}; target miss rate {calibration.config.target_miss_rate:g} for the "
        f"critical classes; refer rate on that split {100 * float(fit.get('refer_rate', 0)):.1f}%.",
        "",
        "| class | critical | positives | absent below | present from | miss-rate bound | upper "
        f"({100 * calibration.config.confidence:g}%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for cal in calibration.classes:
        lines.append(
            f"| {names[cal.code]} | {'yes' if cal.critical else ''} | {cal.n_positives} | {_num(cal.t_low)} | "
            f"{_num(cal.t_high)} | {_num(cal.miss_rate_bound)} | {_num(cal.miss_rate_upper)} |"
        )
    lines += [f"- {names[c.code]}: {c.note}" for c in calibration.classes if c.note]
    return lines


def _calibrated_codes(entries: Sequence[AuditEntry], version: str) -> list[str]:
    """The classes a version's signed calibration names ([] when it has none)."""
    entry = calibration_entry(list(entries), version)
    payload = entry.metrics.get("calibration", {}) if entry is not None else {}
    return [str(c.get("code", "")) for c in payload.get("classes", [])] if isinstance(payload, dict) else []


def _metrics_table(tags: dict[str, str]) -> list[str]:
    rows = [f"| {m} | {_interval(tags, 'test_' + m)} |" for m in CARD_METRICS if "test_" + m in tags]
    if not rows:
        return ["The training run reported no test metrics on this version."]
    return ["| metric | value [95% CI] |", "|---|---|", *rows]


def model_card(
    client, name: str, version: str, entries: Sequence[AuditEntry], classes: Sequence[str] | None = None
) -> str:
    """The Markdown card of ``name`` v``version`` from its **verified** log ``entries``;
    ``classes``: the model's (default: the version's ``classes`` tag, else its calibration's)."""
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    if classes is None:
        classes = tagged_classes(mv) or _calibrated_codes(entries, str(version))
    classes = list(classes)
    params: dict[str, str] = {}
    if mv.run_id:
        params = dict(client.get_run(mv.run_id).data.params)
    names = _names(classes)
    split = params.get("split_sizes", "")
    try:
        sizes = json.loads(split) if split else {}
    except ValueError:
        sizes = {}
    lines = [
        f"# Model card: {name} v{version}",
        "",
        NOT_CLINICAL,
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## In production (signed)",
        *_decision_section(champion_decision(entries, str(version))),
        "",
        "## Calibration (signed)",
        *_calibration_section(entries, str(version), classes),
        "",
        "## Model and data (reported by the training run, not re-verified)",
        f"- method {tags.get('method', '?')}, backbone {tags.get('backbone_name', '?')} "
        f"({tags.get('backbone_id', '?')[:12]}), site {tags.get('site', '-') or '-'}",
        f"- data {params.get('source', '?')}, DVC version {tags.get('data_version', '?')}; split "
        + (", ".join(f"{k} {v}" for k, v in sizes.items()) if sizes else "sizes not recorded"),
        f"- frozen test set v{tags.get('testset_version', '?')} ({tags.get('test_split_hash', '?')[:12]})",
        f"- classes ({len(classes)}): " + ", ".join(names[c] for c in classes),
        "",
        f"## Test metrics (run's report, 95% bootstrap interval over {sizes.get('test', '?')} test records)",
        *_metrics_table(tags),
        "",
        "## Known limits",
        *(f"- {limit}" for limit in KNOWN_LIMITS),
        "",
    ]
    return "\n".join(lines)


def log_card(client, name: str, version: str, entries: Sequence[AuditEntry], seq: int) -> str | None:
    """Log ``name`` v``version``'s card as ``model_card.md`` of the audit run of entry ``seq``
    (the decision just recorded); that run's id, or None when it is not found."""
    run = next(
        (r for r in audit_runs(client, name).get(name, []) if r.data.tags.get("cessl.audit.seq") == str(seq)), None
    )
    if run is None:
        log.warning("%s: no audit run #%d to log the model card to", name, seq)
        return None
    with tempfile.TemporaryDirectory(prefix="cessl-card-") as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(model_card(client, name, version, entries), encoding="utf-8")
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def log_decision_card(client, name: str, trust: Trust) -> None:
    """After a decision: the card of the version it was about, logged to its audit run (a
    failure to log is a warning: the decision itself is recorded)."""
    from mlflow.exceptions import MlflowException

    from ml.errors import CesslError
    from pipeline.registry.verify import verify_model

    try:
        result = verify_model(client, name, trust, deep=False)
        last = result.entries[-1] if result.entries and not result.broken else None
        version = None if last is None else last.versions.get("calibrated") or last.champion.get("version")
        if last is not None and version:
            run_id = log_card(client, name, version, result.entries, last.seq)
            log.debug("%s v%s: model card logged to audit run %s", name, version, run_id)
    except (MlflowException, OSError, ValueError, CesslError) as err:  # the decision itself is recorded
        log.warning("%s: the model card was not logged (%s)", name, err)
