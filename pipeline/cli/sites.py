"""`cessl sites list | add | remove`, and the network run behind `cessl run --sites`.

The site registry file (``sites.yaml``, :mod:`pipeline.core.sites`) names the hospitals of the
network. ``cessl sites`` edits it (validated, written atomically; an error names the file
and line). ``cessl run --sites sites.yaml`` (:func:`run_network`) checks every site's
source, runs the network pipeline (:mod:`pipeline.dags.network`) on the sites that can run, and
prints the per-site summary and the cross-site matrix; :func:`demo_network` makes the
demo's synthetic hospitals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import ParameterError
from pipeline.core.constraints import field_value
from pipeline.core.logsafe import redact
from pipeline.core.params import PipelineParams
from pipeline.core.sites import (
    DEFAULT_SITES_FILE,
    OVERRIDABLE,
    Site,
    SiteRegistry,
    load_sites,
    new_site,
    save_sites,
)

log = logging.getLogger(__name__)

DEMO_SITES = 3
# 360 records a site: with the network demo's test_ratio (0.4) each test split holds 104-130
# records, enough for its intervals to tell apart differences of ~0.1 (Step 15)
DEMO_RECORDS_PER_SITE = 360
DEMO_NETWORK_DIR = Path("network")  # outside data/: the one-hospital demo's source

REGISTERED, REUSED, FAILED = "registered", "reused", "failed"


# --------------------------------------------------------------------------- demo data


def demo_network(out_dir: Path, n_sites: int, records_per_site: int, seed: int = 0) -> list[tuple[str, Path]]:
    """``n_sites`` synthetic hospitals under ``out_dir`` (``hospital-a``, ``hospital-b``, ...)
    with real site shift (``ml.data.synth.synthesize_network``: devices, lead geometry, case
    mix) and classes mostly new to the embedded default backbone
    (:data:`ml.data.synth.NETWORK_DEMO_CLASSES`); (site, folder) pairs."""
    from ml.data.parallel import default_workers
    from ml.data.synth import NETWORK_DEMO_CLASSES, SiteOptions, synthesize_network

    options = SiteOptions(classes=NETWORK_DEMO_CLASSES)
    written = synthesize_network(out_dir, n_sites, records_per_site, seed, options, workers=default_workers())
    return [(str(s), Path(p)) for s, p in written]


def ensure_demo_network(sites_file: Path, n_sites: int = DEMO_SITES, records: int = DEMO_RECORDS_PER_SITE) -> Path:
    """A ``sites.yaml`` of the demo's synthetic hospitals (made when missing) at ``sites_file``;
    each hospital's folder is versioned on its own with DVC (``network/<site>.dvc``)."""
    if sites_file.exists():
        return sites_file
    folders = demo_network(sites_file.parent / DEMO_NETWORK_DIR, n_sites, records)
    track_sites([folder for _, folder in folders], sites_file.parent)
    registry = SiteRegistry(tuple(Site(name, str(folder.absolute())) for name, folder in folders), sites_file)
    save_sites(registry, sites_file)
    log.info("demo network: %d synthetic hospitals, %s", len(folders), sites_file)
    return sites_file


def track_sites(folders: Sequence[Path], start: Path) -> dict[str, str]:
    """``dvc add`` each site folder in the repository around ``start``: each its own
    ``<folder>.dvc`` (``cessl data add --site`` adds to one, ``retrain --sites`` retrains it)."""
    from ml.data.dvc import Versioned, find_repo_root, track_folders

    root = find_repo_root(start)
    versions = track_folders(root, [Versioned.of(folder, root).relative for folder in folders])
    for folder, version in versions.items():
        log.info("site data %s: version %s (%s.dvc)", folder, version, folder)
    return versions


# --------------------------------------------------------------------------- preflight


@dataclass
class SiteOutcome:
    """One site's line of the network summary."""

    site: str
    source: str
    status: str = ""  # registered | reused | failed
    reason: str = ""
    data_version: str = ""
    n_records: int | None = None
    n_quarantined: int | None = None
    model_name: str = ""
    model_version: str = ""
    run_id: str = ""


def source_problem(source: str) -> str | None:
    """Why a site's source cannot be ingested from here (None: it can be tried). An ``s3://``
    source is left to ingest (it lists it where it runs)."""
    if "://" in source:
        return None
    path = Path(source)
    if not path.exists():
        return f"{path}: data folder not found"
    if not path.is_dir():
        return f"{path}: not a folder"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{path}: not readable"
    try:
        next(iter(path.iterdir()), None)
    except OSError as err:
        return f"{path}: cannot be listed ({err.strerror or err})"
    return None


def preflight_sites(registry: SiteRegistry) -> tuple[list[Site], list[SiteOutcome]]:
    """The sites that can run, and an outcome ``failed`` for each that cannot (missing or
    unreadable source): those are left out of the run, the others go on."""
    ready, failed = [], []
    for site in registry:
        problem = source_problem(site.source)
        if problem:
            log.warning("site %s left out of this run: %s", site.name, problem)
            failed.append(SiteOutcome(site.name, site.source, FAILED, problem))
        else:
            ready.append(site)
    return ready, failed


def data_versions(sites: Sequence[Site], repo: Path) -> dict[str, str]:
    """Each site's data version (a folder's DVC md5, an s3:// prefix's listing version or "")."""
    from pipeline.registry.lineage import source_data_version

    return {site.name: source_data_version(site.source, repo) for site in sites}


# --------------------------------------------------------------------------- summary


@dataclass
class NetworkSummary:
    """What `cessl run --sites` reports."""

    network_id: str
    parent_run_id: str
    tracking_uri: str
    sites: list[SiteOutcome]
    cells: list[dict[str, Any]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # ml.eval.cross_site.PairedComparison
    seconds: float = 0.0
    error: str = ""  # the run's failure, when it ended early
    sites_file: str = ""  # the site registry the run read

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not self.error and all(s.status != FAILED for s in self.sites)


def outcomes_from_summary(
    text: str, items: Sequence[dict[str, Any]]
) -> tuple[str, list[SiteOutcome], list[dict], list[dict]]:
    """The cross-site step's JSON -> (parent run, per-site outcomes, cells, comparisons)."""
    data = json.loads(text)
    sources = {i["name"]: i["source"] for i in items}
    outcomes = [
        SiteOutcome(
            site=s["site"],
            source=sources.get(s["site"], ""),
            status=REUSED if s.get("reused") else REGISTERED,
            reason="data unchanged: cached steps, identical registration reused" if s.get("reused") else "",
            data_version=s.get("data_version", ""),
            n_records=s.get("n_records") if s.get("n_records", -1) >= 0 else None,
            n_quarantined=s.get("n_quarantined") if s.get("n_quarantined", -1) >= 0 else None,
            model_name=s.get("model_name", ""),
            model_version=s.get("model_version", ""),
            run_id=s.get("run_id", ""),
        )
        for s in data["sites"]
    ]
    return data["parent_run_id"], outcomes, list(data.get("cells", [])), list(data.get("comparisons", []))


def outcomes_from_tracking(tracking, network_id: str, items: Sequence[dict[str, Any]], error: str) -> list[SiteOutcome]:
    """After a failed run: the sites this network run registered (tag ``cessl.network_id``);
    the others failed (``error``: why the run ended)."""
    from pipeline.registry.network_tracking import site_runs

    try:
        runs = site_runs(tracking, network_id)
    except Exception as err:  # the summary must still print
        log.warning("cannot read the site runs of network %s: %s", network_id, err)
        runs = {}
    outcomes = []
    for item in items:
        run = runs.get(item["name"])
        if run is None:
            outcomes.append(SiteOutcome(item["name"], item["source"], FAILED, error))
            continue
        tags = run.data.tags
        versions = tracking.client().search_model_versions(f"run_id = '{run.info.run_id}'")
        outcomes.append(
            SiteOutcome(
                item["name"],
                item["source"],
                REGISTERED,
                "",
                tags.get("data_version", ""),
                None,
                int(tags["n_quarantined"]) if tags.get("n_quarantined", "").isdigit() else None,
                item["model_name"],
                str(versions[0].version) if versions else "",
                run.info.run_id,
            )
        )
    return outcomes


def print_network_summary(summary: NetworkSummary, console=None) -> None:
    """The per-site table, the cross-site matrix and what to do next."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ml.eval.cross_site import METRIC_TITLES, METRICS, CrossSiteMatrix
    from pipeline.cli.render import print_records

    console = console or Console()
    style = {REGISTERED: "green", REUSED: "cyan", FAILED: "red"}
    rows = []
    for s in summary.sites:
        status = Text(s.status, style=style.get(s.status, ""))
        if s.reason:
            status += Text(f": {s.reason}")
        rows.append(
            {
                "site": s.site,
                "records": "" if s.n_records is None else s.n_records,
                "quarantined": "" if s.n_quarantined is None else s.n_quarantined,
                "data version": s.data_version,
                "model version": f"{s.model_name} v{s.model_version}" if s.model_version else s.model_name,
                "status": status,
            }
        )
    columns = ("site", "records", "quarantined", "data version", "model version", "status")
    print_records(console, f"CE-SSL network {summary.network_id}", columns, rows)  # 80 columns, IDs whole
    if summary.cells:
        matrix = CrossSiteMatrix.from_records(summary.cells, summary.comparisons)
        for metric in METRICS:
            grid = Table(
                title=f"cross-site {METRIC_TITLES[metric]} [95% CI] (rows: model, columns: test split of site)"
            )
            grid.add_column("model", no_wrap=True)
            for target in matrix.targets:
                grid.add_column(Text(f"{target} (n={matrix.n_records(target)})"), justify="right")
            for model in matrix.models:
                grid.add_row(Text(model), *(matrix.interval_text(model, t, metric, 2) for t in matrix.targets))
            console.print(grid)
        console.print(
            Text(
                "95% jackknife-t intervals over each test split's records: overlapping cells are not told apart; "
                "scored over the classes each model and test split share; 'head-only': the baseline, the frozen "
                "backbone with a linear head fit on the site's labelled records; 'backbone': the pre-trained backbone, "
                "LoRA off, with the site's own head (an ablation); 'lora': the site's plain LoRA adapter (its "
                "labelled records alone); 'predict-everything': every class for every "
                "record, the reference to beat; the head-only row's macro AUROC is the frozen-probe AUROC",
                style="dim",
            )
        )
        if matrix.comparisons:
            console.print("each site's CE-SSL adapter against its baselines (paired, its own test split):")
            for comparison in matrix.comparisons:
                console.print(Text(f"  {comparison.text()}"), soft_wrap=True)
    if summary.error:
        console.print(Text(f"the network run ended early: {summary.error}", style="red"))
    from pipeline.cli.shell import shell_uri

    console.print(Text(f"MLflow parent run: {summary.parent_run_id or 'none'} ({redact(summary.tracking_uri)})"))
    console.print("next:", style="bold")
    flag = f" --tracking-uri {shell_uri(summary.tracking_uri)}" if summary.tracking_uri else ""
    for line in next_steps(summary, flag):
        console.print(Text(f"  {line}"), soft_wrap=True)


def next_steps(summary: NetworkSummary, flag: str) -> list[str]:
    from pipeline.cli.shell import runnable, shell_uri

    uri = shell_uri(summary.tracking_uri)
    lines = [f"mlflow ui --backend-store-uri {uri}" if summary.tracking_uri else "mlflow ui"]
    from pipeline.registry.signing import KEYGEN_HINT, has_signing_key
    from pipeline.registry.tracking import production_model_name

    if not has_signing_key() and any(s.status != FAILED and s.model_name for s in summary.sites):
        lines.append(KEYGEN_HINT)
    for s in summary.sites:  # a site registers into its candidates model; promote names the production model
        if s.status != FAILED and s.model_name:
            lines.append(f"cessl promote {production_model_name(s.model_name)}{flag}")
    if any(s.status != FAILED for s in summary.sites):
        lines.append(f"cessl promote --all-sites --sites {summary.sites_file}{flag}   (each site's own gate)")
        lines.append(f"cessl serve --sites {summary.sites_file}{flag}   (every site's champion behind one backbone)")
    return [runnable(line) for line in lines]


# --------------------------------------------------------------------------- network run


def network_params(base: PipelineParams, sites: Sequence[Site]) -> None:
    """Every site's parameters valid (the site's overrides on ``base``): all problems at once."""
    problems = []
    for site in sites:
        try:
            site.params(base)
        except ParameterError as err:
            problems.append(f"site {site.name}: {err}")
    if problems:
        raise ParameterError("; ".join(problems))


def run_network(args: argparse.Namespace, params: PipelineParams, registry: SiteRegistry) -> NetworkSummary:
    """Run the network locally (under the caller's project lock) and summarise it."""
    from pipeline.cli.local import local_run_config, prepare_store
    from pipeline.dags.network import NetworkSettings, network_arguments, site_items
    from pipeline.dags.spec import network_spec, run_local
    from pipeline.registry.lineage import git_commit
    from pipeline.registry.network_tracking import fail_network, new_network_id
    from pipeline.registry.store import TrackingConfig

    tracking = TrackingConfig.resolve(args.tracking_uri, params.experiment_name)
    state = Path(args.state_dir).absolute()
    params = params.replace(
        git_commit=git_commit(Path.cwd()),  # resolved here: the tasks never ask git
        tracking_uri=tracking.tracking_uri,
        checkpoint_root=str(state / "checkpoints"),
        state_dir=str(state),
        cache_dir=args.backbone_cache or "",
    )
    ready, failed = preflight_sites(registry)
    network_id = new_network_id()
    summary = NetworkSummary(network_id, "", tracking.tracking_uri, list(failed), sites_file=registry.where)
    if not ready:
        summary.error = "no site can run (every source failed its check)"
        return summary
    versions = data_versions(ready, Path.cwd())
    if args.data_version:
        log.warning("--data-version is ignored with --sites: each site's version is its own data's")
    items = site_items(ready, params, str(state), versions)
    prepare_store(tracking)
    start = time.perf_counter()
    config = local_run_config(args, "last_network_run.log")
    log.info("network %s: %d sites (%s), schedule %s", network_id, len(ready), ", ".join(versions), params.schedule())
    try:
        spec = network_spec(NetworkSettings(parallelism=args.site_parallelism))
        text = str(run_local(spec, params, config, network_arguments(params, items, network_id))["Output"])
    except Exception as err:
        from pipeline.core.failures import describe

        failure = describe(err)
        if failure is None:
            raise
        summary.parent_run_id = fail_network(tracking, network_id) or ""
        summary.sites = outcomes_from_tracking(tracking, network_id, items, failure.message) + summary.sites
        summary.error = failure.message
        summary.seconds = time.perf_counter() - start
        return summary
    summary.parent_run_id, outcomes, summary.cells, summary.comparisons = outcomes_from_summary(text, items)
    summary.sites = outcomes + summary.sites
    summary.seconds = time.perf_counter() - start
    if not getattr(args, "no_push", False):
        push_site_versions(summary.sites, Path.cwd())
    return summary


def push_site_versions(outcomes: Sequence[SiteOutcome], repo: Path) -> list[str]:
    """``dvc push`` each registered site's data version (its own ``<folder>.dvc``) when the
    project has a default DVC remote, so every version a site run logged can be ``dvc pull``-ed;
    the sites pushed (``pipeline.registry.lineage.push_data_version``: anything else a warning)."""
    from pipeline.registry.lineage import push_data_version

    return [
        o.site
        for o in outcomes
        if o.status == REGISTERED and "://" not in o.source and push_data_version(Path(o.source), o.data_version, repo)
    ]


# --------------------------------------------------------------------------- cessl sites


def _registry(path: str) -> SiteRegistry:
    file = Path(path)
    return load_sites(file) if file.exists() else SiteRegistry((), file)


def cmd_sites_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    registry = load_sites(args.file)
    table = Table(title=f"sites ({args.file})")
    for column in ("site", "source", "overrides", "description"):
        table.add_column(column)
    for site in registry:
        overrides = ", ".join(f"{k}={v}" for k, v in site.overrides.items())
        table.add_row(Text(site.name), Text(site.source), Text(overrides), Text(site.description))
    Console().print(table)
    if not len(registry):
        log.info("%s lists no site: `cessl sites add NAME SOURCE`", args.file)
    return 0


def cmd_sites_add(args: argparse.Namespace) -> int:
    registry = _registry(args.file)
    overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}
    # the checks of a site read from the file (pipeline.core.sites.site_problems), and the folder exists
    site = new_site(args.name, args.source, overrides, args.description or "", Path(args.file))
    save_sites(registry.add(site, replace=args.replace), args.file)
    load_sites(args.file)  # what was written reads back
    log.info("%s site %s (%s) in %s", "replaced" if args.replace else "added", site.name, site.source, args.file)
    return 0


def cmd_sites_remove(args: argparse.Namespace) -> int:
    registry = load_sites(args.file)
    save_sites(registry.remove(args.name), args.file)
    log.info("removed site %s from %s", args.name, args.file)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.core.params import flag_of

    sites = subparsers.add_parser("sites", help="the hospital network's site registry (sites.yaml)")
    sites.add_argument("--file", default=DEFAULT_SITES_FILE, help="the site registry file (default: ./%(default)s)")
    verbs = sites.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="the sites: name, source, overrides")
    file_help = "the site registry file (also accepted before the verb)"
    listing.add_argument("--file", default=argparse.SUPPRESS, help=file_help)
    listing.set_defaults(func=cmd_sites_list)
    add = verbs.add_parser("add", help="add (or --replace) a site")
    add.add_argument("name", help="site name (a DNS label: lower-case letters, digits, '-')")
    add.add_argument(
        "source",
        help="an existing folder (inside the registry file's folder, relative to it, or an absolute path) "
        "or s3://bucket/prefix",
    )
    add.add_argument("--description", default="")
    add.add_argument("--replace", action="store_true", help="replace a site of that name")
    fields = {f.name: f for f in dataclasses.fields(PipelineParams)}
    for name in OVERRIDABLE:  # each flag checked by its pipeline parameter's own constraints
        flag = flag_of(name)
        flags = [flag] if flag.startswith("--") else [flag, f"--{name.replace('_', '-')}"]
        help_text = f"this site's {fields[name].metadata.get('help', name)}"
        add.add_argument(*flags, dest=name, type=field_value(fields[name]), default=None, help=help_text)
    add.add_argument("--file", default=argparse.SUPPRESS, help=file_help)
    add.set_defaults(func=cmd_sites_add)
    remove = verbs.add_parser("remove", help="remove a site")
    remove.add_argument("name")
    remove.add_argument("--file", default=argparse.SUPPRESS, help=file_help)
    remove.set_defaults(func=cmd_sites_remove)
