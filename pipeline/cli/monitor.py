"""``cessl monitor``: label-free drift monitoring of one site's champion between retrainings.

``cessl monitor [NAME] [--site SITE] --recent DIR`` loads the production model's verified ``champion``
(the version its last valid signed decision names, checked as ``cessl predict`` checks it)
(``NAME``, or ``<NAME>-<SITE>`` for a site of a hospital network; NAME defaults to
``cessl-ecg``), embeds a reference set and the recent WFDB records of ``--recent`` with it and
runs the checks of :mod:`ml.eval.drift` (embedding MMD² with a permutation test, predicted
prevalence per class, the unreadable-record rate, the change of average confidence).

The reference (what the champion's training distribution looked like):

- ``--reference DIR``: the WFDB records of a folder (e.g. an export of the site's records
  at training time); or, by default,
- the champion's own lineage: its run's split (``data/splits.json``, logged by the register
  step) and its run's ``source`` parameter. Held-out records come first (the test split,
  then valid: the model never fitted them, so their embeddings and predicted prevalences are
  not flattered by training), then train and unlabelled records, up to ``--max-reference``.
  This fails in one line (use ``--reference``) when the run logged no split or its source can
  no longer be read.

It logs a run in the experiment ``cessl-monitor``: params (model, version, site, folders,
thresholds), the report's numbers as metrics, the decision and its reasons as tags, the
report as ``drift/report.json`` and ``drift/mmd_null.png`` (the MMD² statistic against its
permutation null), and prints a short table.

``--retrain-on-drift``: on a drift decision the monitor triggers ``cessl retrain`` for that site
(a child process, with ``--tracking-uri`` and each ``--retrain-arg``, e.g. ``--host URL`` to
submit to Kubeflow Pipelines) after recording the reasons, the request and the exact command in
the run's tags (``retrain_requested``, ``retrain_reason``, ``retrain_command``) and in the audit
log. Retrain decides what there is to train on: it retrains when the site's data version moved
since the champion (the recent records added with ``cessl data add``) and otherwise says so and
names the drift (retraining the unchanged data would reproduce the champion). Its exit code is
the tag ``retrain_exit``; the monitor's own exit code stays the drift's.

A drift decision is also appended to the production model's audit log as an unsigned, chained
``drift`` entry (the champion, the reasons, the monitor run, whether retraining was asked for),
which ``cessl retrain`` names until a retraining on new data answers it.

``--recent`` (and ``--reference``) is a folder or an ``s3://bucket/prefix``. ``--all-sites``
monitors every site of ``--sites`` (default ``sites.yaml``), each on ``<--recent>/<site>``: one
scheduled job for the network (``deploy/monitor-cronjob.yaml``); a site that cannot be
monitored is logged and the others still are.

Exit codes: 0 no drift; 1 drift (an answer, as a refused promotion is); 7 insufficient
evidence (too few readable recent or reference records: :attr:`ml.eval.drift.DriftConfig.min_recent`,
default 30); 2 for a bad flag, a missing folder or a model without a champion. With
``--all-sites``, the worst over the sites: drift, then a site's error, then insufficient evidence.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.errors import EXIT_INSUFFICIENT, EXIT_REFUSED, EXIT_USAGE, CesslError, ParameterError
from pipeline.cli.audit import add_trust_flag
from pipeline.cli.options import add_production_model
from pipeline.cli.shell import shell_command
from pipeline.core.constraints import (
    add_tracking_uri_flag,
    fraction,
    non_negative_int,
    number,
    output_file,
    positive_int,
    source,
)

if TYPE_CHECKING:
    from pipeline.registry.signing import Trust

log = logging.getLogger(__name__)

EXPERIMENT = "cessl-monitor"
REPORT_ARTIFACT = "drift/report.json"
PLOT_ARTIFACT = "drift/mmd_null.png"
DEFAULT_MAX_REFERENCE = 500
SPLIT_ORDER = ("test", "valid", "train", "unlabelled")  # held-out records first
EXIT_DRIFT = EXIT_REFUSED  # 1
ERROR = "error"  # --all-sites: a site that could not be monitored (its line is logged)
EXIT_OF = {"no drift": 0, "insufficient evidence": EXIT_INSUFFICIENT, ERROR: EXIT_USAGE, "drift": EXIT_DRIFT}
WORST_FIRST = ("drift", ERROR, "insufficient evidence", "no drift")  # --all-sites: the exit code of the worst


@dataclass(frozen=True)
class Champion:
    """The champion loaded for monitoring: its model, version, run and site."""

    model: str
    version: str
    run_id: str
    site: str
    predictor: Any  # ml.eval.predictor.Predictor


def target_model(args: argparse.Namespace) -> tuple[str, str]:
    """(the production model, the site) the monitor watches: ``NAME``, or ``<NAME>-<SITE>``
    (the site checked against ``--sites`` / ``sites.yaml`` when there is one)."""
    from pipeline.core.sites import DEFAULT_SITES_FILE, check_site_name, load_sites
    from pipeline.registry.policy import DEFAULT_MODEL_NAME, site_model_name

    if not args.site:
        if not args.name:
            raise ParameterError("name a registered model, or a site with --site NAME")
        return args.name, ""
    site = check_site_name(args.site)
    file = Path(args.sites or DEFAULT_SITES_FILE)
    if args.sites or file.exists():
        site = load_sites(file).get(site).name
    return site_model_name(args.name or DEFAULT_MODEL_NAME, site), site


def load_champion(
    client, tracking_uri: str, model: str, site: str, trust: Trust, version_number: str | None = None
) -> Champion:
    """The production model's verified champion: the version its last valid signed decision
    names, as ``cessl predict`` loads it (AuditMismatchError, exit 1, when the log is broken or the
    alias was moved; RegistryError, one line, when no decision made one); ``version_number``:
    that version instead (the log still verified)."""
    from pipeline.cli.registry import verified_champion
    from pipeline.registry.pyfunc_model import load_predictor

    champion = verified_champion(client, model, trust)
    version = client.get_model_version(model, version_number or champion)
    predictor = load_predictor(f"models:/{model}/{version.version}", tracking_uri=tracking_uri)
    site = site or str((version.tags or {}).get("site", ""))
    return Champion(model, str(version.version), str(version.run_id or ""), site, predictor)


def lineage_reference(client, champion: Champion, limit: int) -> tuple[str, list[str]]:
    """(source, record keys) of the champion's reference: its run's split, held-out first
    (see the module doc); ParameterError naming the run and what is missing."""
    source, parts = champion_split(client, champion)
    keys = [k for part in SPLIT_ORDER for k in parts[part]]
    return source, list(dict.fromkeys(keys))[:limit]


def champion_split(client, champion: Champion, hint: str = "pass --reference DIR") -> tuple[str, dict[str, list[str]]]:
    """(source, record keys per part: train, valid, test, unlabelled) of the champion's run's
    split, keys relative to ``source``; ParameterError naming the run, what is missing and ``hint``."""
    from mlflow.exceptions import MlflowException

    from ml.data.splits import Splits
    from pipeline.registry.policy import PARAM_SOURCE
    from pipeline.registry.testsets import SPLITS_ARTIFACT

    label = f"{champion.model} v{champion.version}"
    if not champion.run_id:
        raise ParameterError(f"{label}: no run behind the champion to find its training records; {hint}")
    source = client.get_run(champion.run_id).data.params.get(PARAM_SOURCE, "")
    if not source:
        raise ParameterError(f"{label}: its run {champion.run_id} names no data source; {hint}")
    with tempfile.TemporaryDirectory(prefix="cessl-monitor-") as tmp:
        try:
            splits = Splits.load(client.download_artifacts(champion.run_id, SPLITS_ARTIFACT, tmp))
        except (MlflowException, OSError, ValueError) as err:
            raise ParameterError(
                f"{label}: its run {champion.run_id} has no readable {SPLITS_ARTIFACT} ({str(err).splitlines()[0]}); "
                f"{hint}"
            ) from None
    prefix = f"{champion.site}/" if champion.site else ""
    return source, {part: [k.removeprefix(prefix) for k in getattr(splits, part)] for part in SPLIT_ORDER}


def reference_records(args: argparse.Namespace, client, champion: Champion) -> tuple[list, str]:
    """The reference readers and a description of where they come from."""
    from ml.eval.monitoring import records_of, source_records

    if args.reference:
        readers = records_of(args.reference)
        return readers[: args.max_reference], str(args.reference)
    source, keys = lineage_reference(client, champion, args.max_reference)
    if "://" not in source and not Path(source).is_dir():
        raise ParameterError(
            f"{champion.model} v{champion.version}: its training data {source} is not here; pass --reference DIR"
        )
    return source_records(source, keys), f"{source} (split of run {champion.run_id})"


def retrain_command(args: argparse.Namespace, champion: Champion) -> list[str]:
    """The ``cessl retrain`` command line of the site (or model) the drift was found at."""
    if champion.site:
        target = ["--sites", str(args.sites or "sites.yaml"), "--site", champion.site]
    else:
        target = ["--model-name", champion.model]
    store = ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    return ["cessl", "retrain", *target, *store, *args.retrain_arg]


def trigger_retrain(client, run_id: str, command: list[str]) -> int:
    """Run ``command`` (``cessl retrain ...``) as a child process, its output passed through;
    its exit code, also the monitor run's tag ``retrain_exit``."""
    import subprocess
    import sys

    log.info("triggering: %s", shell_command(command))
    code = subprocess.call([sys.executable, "-m", "pipeline.cli", *command[1:]])
    client.set_tag(run_id, "retrain_exit", str(code))
    (log.info if code == 0 else log.error)("%s exited %d", " ".join(command[:2]), code)
    return code


def plot_null(report, path: Path) -> Path | None:
    """A PNG of the MMD² permutation null with the observed statistic (None when not computed)."""
    if report.embedding is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = report.embedding
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(e.null, bins=40, color="0.7", label=f"permutation null ({e.null.size})")
    ax.axvline(e.statistic, color="red", label=f"observed {e.statistic:.3g} (p = {e.p_value:.3f})")
    ax.set_xlabel("MMD² (RBF kernel, median heuristic)")
    ax.set_ylabel("permutations")
    ax.set_title(f"embedding drift: {e.n_recent} recent vs {e.n_reference} reference records")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_run(client, champion: Champion, report, params: dict[str, str], tags: dict[str, str]) -> str:
    """The monitor's MLflow run in :data:`EXPERIMENT`: params, metrics, tags, report and plot."""
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment, tags={"mlflow.runName": f"monitor-{champion.model}-v{champion.version}"})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in report.metrics().items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, value[:5000])
    with tempfile.TemporaryDirectory(prefix="cessl-monitor-") as tmp:
        path = Path(tmp) / Path(REPORT_ARTIFACT).name
        path.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path), str(Path(REPORT_ARTIFACT).parent))
        plot = plot_null(report, Path(tmp) / Path(PLOT_ARTIFACT).name)
        if plot is not None:
            client.log_artifact(run_id, str(plot), str(Path(PLOT_ARTIFACT).parent))
    client.set_terminated(run_id)
    return run_id


def record_drift(client, champion: Champion, report, run_id: str, tags: dict[str, str]) -> None:
    """The drift report as an (unsigned, chained) ``drift`` entry of the production model's audit
    log: which champion, why, the monitor run, and the retraining asked for (``cessl retrain``
    names the reports since the champion's decision)."""
    from pipeline.registry.audit import AuditEntry, record

    metrics: dict[str, Any] = dict(report.metrics())
    metrics |= {"monitor_run": run_id, "retrain_requested": tags.get("retrain_requested") == "true"}
    if "retrain_command" in tags:
        metrics["retrain_command"] = tags["retrain_command"]
    entry = record(
        client,
        AuditEntry(
            model=champion.model,
            action="drift",
            versions={"champion": champion.version},
            reason="; ".join(report.reasons),
            metrics=metrics,
        ),
    )
    log.info("%s: drift recorded in its audit log (entry #%d)", champion.model, entry.seq)


def report_rows(report) -> list[dict[str, str]]:
    """One row per check: its statistic, p-value and whether it rejects."""
    level = report.config.level

    def verdict(p: float) -> str:
        return "DRIFT" if p <= level else "ok"

    rows = []
    if report.embedding is not None:
        e = report.embedding
        rows.append({"check": "embedding MMD²", "value": f"{e.statistic:.4g}", "p": f"{e.p_value:.4f}"})
    for s in report.prevalence:
        rows.append(
            {
                "check": f"prevalence {s.label}",
                "value": f"{s.reference_rate:.1%} -> {s.recent_rate:.1%}",
                "p": f"{s.p_adjusted:.4f}",
            }
        )
    q = report.quality
    rows.append({"check": "unreadable", "value": f"{q.unreadable}/{q.n_records}", "p": f"{q.p_value:.4f}"})
    if report.confidence is not None:
        c = report.confidence
        rows.append({"check": "confidence (DoC)", "value": f"{c.change:+.4f}", "p": f"{c.p_value:.4f}"})
    for row in rows:
        row["verdict"] = verdict(float(row["p"]))
    return rows


def print_report(report, champion: Champion, run_id: str, console=None) -> None:
    from rich.console import Console

    from pipeline.cli.render import print_fields, print_records
    from pipeline.registry.policy import class_label

    console = console or Console()
    for row in report_rows(report):
        if row["check"].startswith("prevalence "):
            row["check"] = "prevalence " + class_label(row["check"].removeprefix("prevalence ")).split(" ")[0]
    print_records(
        console,
        f"{champion.model} v{champion.version}: {report.decision.upper()}",
        ["check", "value", "p", "verdict"],
        report_rows(report),
    )
    print_fields(
        console,
        "",
        [
            (
                "records",
                f"{report.n_recent} recent readable, {report.n_recent_unreadable} unreadable, "
                f"{report.n_reference} reference",
            ),
            ("level", f"{report.config.level:.4f} per check (alpha {report.alpha})"),
            *(("reason", r) for r in report.reasons),
            ("run", run_id),
        ],
    )


def cmd_monitor(args: argparse.Namespace) -> int:
    """One model (``NAME`` / ``--site``), or with ``--all-sites`` every site of the registry file,
    each against ``<--recent>/<site>``; the exit code of the worst answer (drift, then too few)."""
    if not args.all_sites:
        return EXIT_OF[monitor_one(args, *target_model(args), args.recent)]
    from pipeline.core.sites import DEFAULT_SITES_FILE, load_sites
    from pipeline.registry.policy import DEFAULT_MODEL_NAME, site_model_name

    if args.site:
        raise ParameterError("--all-sites monitors every site of --sites: give it or --site, not both")
    registry = load_sites(Path(args.sites or DEFAULT_SITES_FILE))
    decisions = {}
    for site in registry:
        recent = f"{str(args.recent).rstrip('/')}/{site.name}"
        log.info("-- %s (%s)", site.name, recent)
        try:
            decisions[site.name] = monitor_one(
                args, site_model_name(args.name or DEFAULT_MODEL_NAME, site.name), site.name, recent
            )
        except CesslError as err:  # one site's problem (no champion, no records) does not hide the others'
            log.error("%s: %s", site.name, err)
            decisions[site.name] = ERROR
    log.info("monitored %d sites: %s", len(decisions), ", ".join(f"{k} {v}" for k, v in decisions.items()))
    return next((EXIT_OF[d] for d in WORST_FIRST if d in decisions.values()), 0)


def monitor_one(args: argparse.Namespace, model: str, site: str, recent_source: str) -> str:
    """Monitor one production model on ``recent_source``; its decision (DRIFT, no drift, insufficient)."""
    from ml.eval.drift import DRIFT, DriftConfig, drift_report
    from ml.eval.monitoring import observe, records_of
    from pipeline.cli.preflight import registry_tracking
    from pipeline.registry.signing import find_trust

    tracking = registry_tracking(args.tracking_uri, model)
    recent = records_of(recent_source)  # a missing or empty folder or prefix: one line, before any load
    client = tracking.client()
    champion = load_champion(client, tracking.tracking_uri, model, site, find_trust(args.trust_file))
    readers, reference_from = reference_records(args, client, champion)
    try:
        config = DriftConfig(
            alpha=args.alpha,
            permutations=args.permutations,
            seed=args.seed,
            min_recent=args.min_recent,
            min_reference=args.min_reference,
        )
    except ValueError as err:
        raise ParameterError(f"cessl monitor: {err}") from None
    log.info("%s v%s: embedding %d reference records (%s)", model, champion.version, len(readers), reference_from)
    reference_obs = observe(champion.predictor, readers, with_labels=True)
    log.info("%s v%s: embedding %d recent records (%s)", model, champion.version, len(recent), recent_source)
    recent_obs = observe(champion.predictor, recent)
    report = drift_report(reference_obs, recent_obs, list(champion.predictor.classes), config)
    tags = {"decision": report.decision, "reasons": "\n".join(report.reasons), "site": champion.site}
    command = retrain_command(args, champion) if args.retrain_on_drift and report.decision == DRIFT else []
    if command:
        tags |= {
            "retrain_requested": "true",
            "retrain_reason": "; ".join(report.reasons),
            "retrain_command": shell_command(command),
        }
    params = {
        "model": model,
        "champion_version": champion.version,
        "champion_run": champion.run_id,
        "site": champion.site,
        "recent": str(recent_source),
        "reference": reference_from,
        "alpha": str(config.alpha),
        "permutations": str(config.permutations),
        "min_recent": str(config.min_recent),
        "min_reference": str(config.min_reference),
        "seed": str(config.seed),
    }
    run_id = log_run(client, champion, report, params, tags)
    if report.decision == DRIFT:
        record_drift(client, champion, report, run_id, tags)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    print_report(report, champion, run_id)
    if command:
        trigger_retrain(client, run_id, command)
    return report.decision


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="label-free drift check of a site's champion on recent records (exit 0 / 1 drift / 7 too few)",
        description="Embed recent WFDB records and a reference set with the champion, test embedding drift "
        "(MMD², permutation test), predicted prevalence, the unreadable rate and the change of average "
        "confidence; log the report to the MLflow experiment cessl-monitor. Exit 0: no drift; 1: drift; "
        "7: insufficient evidence (fewer readable recent records than --min-recent).",
    )
    add_production_model(parser, "watch")
    parser.add_argument(
        "--all-sites",
        action="store_true",
        help="every site of --sites, each on <--recent>/<site> (a CronJob's run: deploy/monitor-cronjob.yaml)",
    )
    parser.add_argument(
        "--recent", type=source, required=True, metavar="SOURCE", help="the recent WFDB records (folder or s3://)"
    )
    parser.add_argument(
        "--reference",
        type=source,
        default=None,
        metavar="SOURCE",
        help="reference WFDB records, folder or s3:// (default: the champion's training split, read from its "
        "run's source)",
    )
    parser.add_argument(
        "--max-reference",
        type=number(int, minimum=2, name="max_reference"),
        default=DEFAULT_MAX_REFERENCE,
        help="reference records at most (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha", type=fraction, default=0.05, help="false-alarm level of one report (default: %(default)s)"
    )
    parser.add_argument(
        "--permutations", type=positive_int, default=300, help="MMD permutations (default: %(default)s)"
    )
    parser.add_argument(
        "--min-recent",
        type=number(int, minimum=2, name="min_recent"),
        default=30,
        help="readable recent records needed (default: %(default)s)",
    )
    parser.add_argument(
        "--min-reference",
        type=number(int, minimum=2, name="min_reference"),
        default=30,
        help="readable reference records needed (default: %(default)s)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="permutation seed (default: %(default)s)")
    parser.add_argument(
        "--retrain-on-drift",
        action="store_true",
        help="on drift, trigger `cessl retrain` for the site (it retrains when the site's data moved since the "
        "champion), recorded in the run and the audit log",
    )
    parser.add_argument(
        "--retrain-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the triggered `cessl retrain` (repeatable), e.g. --retrain-arg=--host "
        "--retrain-arg=http://ml-pipeline-ui.kubeflow",
    )
    parser.add_argument("--json", type=output_file, default=None, metavar="PATH", help="also write the report here")
    add_trust_flag(parser)
    add_tracking_uri_flag(parser)
    parser.set_defaults(func=cmd_monitor)
