"""``cessl data ...``: synthetic hospitals, ingestion, preprocessing, splits, DVC versions."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ml.io import staged_folder
from pipeline.core.constraints import (
    dvc_remote_name,
    dvc_repo,
    existing_dir,
    fraction,
    http_url,
    non_negative_float,
    non_negative_int,
    optional,
    output_dir,
    output_file,
    path_part,
    positive_float,
    positive_int,
    probability,
    source,
)

log = logging.getLogger("cessl.data")


def _codes(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="ECG data: synthesise, ingest, preprocess, split, version with DVC",
        description="From a hospital's WFDB records to the tensors the trainer reads.",
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="STEP")

    p = sub.add_parser(
        "synth",
        help="write a synthetic hospital (or, with --sites N, a network of N) as Challenge-format WFDB records",
        description="One synthetic hospital in OUT; with --sites N, N hospitals with real site shift "
        "(sampling rate, ADC gain and units, noise, baseline wander, case mix, a faulty lead) in "
        "OUT/hospital-a, OUT/hospital-b... plus their site registry OUT/sites.yaml.",
    )
    p.add_argument("out", type=output_dir, nargs="?", help="output folder (or --out)")
    p.add_argument("--out", dest="out_option", type=output_dir, metavar="OUT", help="output folder")
    p.add_argument(
        "--sites",
        type=positive_int,
        default=None,
        help="write N hospitals (hospital-a...) and OUT/sites.yaml; --records is then per site",
    )
    p.add_argument("--records", type=positive_int, default=100)
    p.add_argument(
        "--classes",
        type=_codes,
        default=None,
        help="comma-separated SNOMED codes or abbreviations (default: NSR,SB,STach,AF,IAVB,LBBB,RBBB,PVC,LQRSV,TInv)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--unlabelled-fraction", type=probability, default=0.0, help="fraction written without # Dx")
    p.add_argument("--fs", type=positive_float, default=None, help="sampling frequency (Hz; default 500)")
    p.add_argument("--duration", type=positive_float, default=10.0, help="seconds per record")
    p.add_argument("--prefix", type=path_part, default=None, help="record id prefix (default S)")
    p.add_argument("--start", type=non_negative_int, default=None, help="number of the first record (default 0)")
    p.add_argument("--faults", action="store_true", help="also write one faulty record per fault kind")
    p.add_argument("--workers", type=positive_int, default=2)
    p.set_defaults(func=_synth)

    p = sub.add_parser("ingest", help="validate records of a folder or s3://bucket/prefix into a manifest")
    p.add_argument("source", type=source, help="folder or s3://bucket/prefix")
    p.add_argument("out", type=output_dir, help="ingestion folder (manifest.parquet, quarantine.md)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--min-duration", type=non_negative_float, default=2.0, help="seconds")
    p.add_argument("--max-flat-leads", type=non_negative_int, default=6)
    p.set_defaults(func=_ingest)

    p = sub.add_parser("preprocess", help="build the memory-mapped dataset store from a manifest")
    p.add_argument("ingest_dir", type=existing_dir)
    p.add_argument("store", type=output_dir)
    p.add_argument("--classes", type=_codes, default=None, help="SNOMED codes/abbreviations (default: by --min-count)")
    p.add_argument("--min-count", type=positive_int, default=200, help="records a scored diagnosis needs to be a class")
    p.add_argument("--workers", type=positive_int, default=2)
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("split", help="test / train / valid / unlabelled split of a store (JSON id lists)")
    p.add_argument("store", type=existing_dir)
    p.add_argument("out", type=output_file, help="splits JSON file")
    p.add_argument("--test-size", type=fraction, default=0.1)
    p.add_argument("--labelled-ratio", type=fraction, default=0.05)
    p.add_argument("--valid-size", type=fraction, default=0.2)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=_split)

    p = sub.add_parser(
        "add",
        help="copy a hospital's records into data/ (or a network site's source) and record a new DVC version",
        description="Copy records into data/<name>/ (versioned by data.dvc) or, with --site, into that site's "
        "own source folder (versioned on its own by <folder>.dvc; `cessl retrain --sites` then retrains that "
        "site alone). A recorded version whose data is not here is never replaced: `dvc pull` it first, or "
        "pass --replace.",
    )
    p.add_argument("source", type=source, help="folder or s3://bucket/prefix")
    p.add_argument("--name", type=path_part, help="folder under data/ (default: the source's last path part)")
    p.add_argument("--site", metavar="NAME", help="add to this network site's source (its folder in --sites)")
    p.add_argument("--sites", default=None, help="the site registry --site is read from (default: ./sites.yaml)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="record a new version even when the recorded one's data is not here (it is replaced)",
    )
    p.add_argument("--repo", type=existing_dir, default=Path("."), help="repository root (an existing folder)")
    p.add_argument("--no-dvc", action="store_true", help="copy only, do not run dvc add")
    p.add_argument("--push", action="store_true", help="dvc push after recording the version")
    p.add_argument(
        "--no-commit",
        action="store_true",
        help="do not git-commit the .dvc file (default: commit it, naming the version; refused on a dirty tree)",
    )
    p.set_defaults(func=_add)

    p = sub.add_parser("remote", help="DVC remotes: where data versions are pushed (`cessl run` pushes to the default)")
    remote = p.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    r = remote.add_parser("add", help="configure a DVC remote (dvc remote add)")
    r.add_argument("name", type=dvc_remote_name, help="remote name (letters, digits, '_', '.', '-')")
    r.add_argument("url", help="s3://bucket/path, a folder (its parent must exist), or another DVC remote URL")
    r.add_argument("--default", action="store_true", help="make it the default remote (pushed by `cessl run`)")
    r.add_argument(
        "--endpoint-url", type=optional(http_url), default="", help="S3-compatible endpoint (SeaweedFS, MinIO...)"
    )
    r.add_argument("--force", action="store_true", help="replace a remote of that name")
    r.add_argument("--repo", type=dvc_repo, default=".", help="repository root: a DVC repository or a git work tree")
    r.set_defaults(func=_remote_add)
    r = remote.add_parser("list", help="the configured DVC remotes")
    r.add_argument("--repo", type=dvc_repo, default=".", help="repository root: a DVC repository or a git work tree")
    r.set_defaults(func=_remote_list)

    p = sub.add_parser("demo-data", help="generate the demo hospital in data/ (bit-identical) and track it")
    p.add_argument("--repo", type=existing_dir, default=Path("."), help="repository root (an existing folder)")
    p.add_argument("--force", action="store_true", help="regenerate and record it as the data version")
    p.add_argument("--no-dvc", action="store_true", help="do not run dvc add")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("version", help="print the data version recorded in data.dvc (or in a site's own .dvc)")
    p.add_argument("--repo", type=existing_dir, default=Path("."))
    p.add_argument("--site", metavar="NAME", help="the version of this network site's source (<folder>.dvc)")
    p.add_argument("--sites", default=None, help="the site registry --site is read from (default: ./sites.yaml)")
    p.set_defaults(func=_version)


def _synth_out(args: argparse.Namespace) -> Path:
    from ml.errors import ParameterError

    if args.out is not None and args.out_option is not None and args.out != args.out_option:
        raise ParameterError(f"data synth: two output folders given ({args.out} and --out {args.out_option})")
    out = args.out if args.out is not None else args.out_option
    if out is None:
        raise ParameterError("data synth: give the output folder (OUT or --out OUT)")
    return out


def _synth(args: argparse.Namespace) -> int:
    from ml.data.synth import DEFAULT_CLASSES, SynthConfig, generate

    args.out = _synth_out(args)
    if args.sites is not None:
        return _synth_network(args)
    config = SynthConfig(
        records=args.records,
        classes=tuple(args.classes or DEFAULT_CLASSES),
        seed=args.seed,
        fs=500.0 if args.fs is None else args.fs,
        duration_s=args.duration,
        unlabelled_fraction=args.unlabelled_fraction,
        prefix="S" if args.prefix is None else args.prefix,
        start=args.start or 0,
    )
    with staged_folder(args.out) as out:  # a new folder appears only when every record is written
        summary = generate(out, config, faults=args.faults, workers=args.workers)
    log.info(
        "%d records (%d labelled) in %s%s",
        summary.records,
        summary.labelled,
        args.out,
        f", plus {len(summary.faults)} faulty ones" if summary.faults else "",
    )
    print(
        json.dumps(
            {
                "records": summary.records,
                "labelled": summary.labelled,
                "labels": summary.label_counts,
                "faults": summary.faults,
            },
            indent=1,
        )
    )
    return 0


def _synth_network(args: argparse.Namespace) -> int:
    """``--sites N``: N hospitals with site shift in OUT/<site> and their registry OUT/sites.yaml."""
    from ml.data.synth import DEFAULT_CLASSES, SiteOptions, network_sites, synthesize_network
    from ml.errors import ParameterError
    from pipeline.core.sites import DEFAULT_SITES_FILE, Site, SiteRegistry, save_sites

    fixed = [flag for flag, value in (("--fs", args.fs), ("--prefix", args.prefix), ("--start", args.start)) if value]
    fixed += ["--faults"] if args.faults else []
    if fixed:
        raise ParameterError(
            f"data synth --sites: {', '.join(fixed)} cannot be combined with --sites "
            "(each site has its own sampling rate; records are named 00001... at every site)"
        )
    classes = tuple(args.classes or DEFAULT_CLASSES)
    options = SiteOptions(classes, args.unlabelled_fraction, args.duration)
    configs = dict(network_sites(args.sites, args.records, args.seed, options))
    with staged_folder(args.out) as out:  # a new folder appears only when every site is written
        sites = synthesize_network(out, args.sites, args.records, args.seed, options, workers=args.workers)
        registry = SiteRegistry(
            tuple(Site(name, str(folder), description=_site_description(configs[name])) for name, folder in sites)
        )
        save_sites(registry, out / DEFAULT_SITES_FILE)
    log.info("%d hospitals (%d records each) and %s in %s", len(sites), args.records, DEFAULT_SITES_FILE, args.out)
    print(
        json.dumps(
            {
                "sites": {name: str(Path(args.out) / name) for name, _ in sites},
                "registry": str(Path(args.out) / DEFAULT_SITES_FILE),
                "records_per_site": args.records,
            },
            indent=1,
        )
    )
    return 0


def _site_description(config) -> str:
    """One line on what sets a synthetic site apart (written into sites.yaml)."""
    fault = (
        f", lead fault {config.lead_fault} in {config.lead_fault_fraction:.0%} of records" if config.lead_fault else ""
    )
    return (
        f"synthetic: {config.fs:g} Hz, {config.gain:g} adu/{config.units}, mains {config.mains_hz:g} Hz, "
        f"noise x{config.noise:g}, wander x{config.wander:g}{fault}"
    )


def _ingest(args: argparse.Namespace) -> int:
    from ml.data.ingest import QUARANTINE_FILE, IngestConfig, ingest
    from ml.data.records import ValidationConfig

    if args.source.startswith("s3://"):
        from pipeline.cli.preflight import check_s3

        check_s3(args.source)  # credentials and the bucket, before an output folder exists
    config = IngestConfig(
        validation=ValidationConfig(min_duration_s=args.min_duration, max_flat_leads=args.max_flat_leads),
        workers=args.workers,
    )
    with staged_folder(args.out) as out:  # a new folder appears only when the ingestion finished
        report = ingest(args.source, out, config=config)
    print(
        f"seen {report.seen} = accepted {report.accepted} + quarantined {report.quarantined} "
        f"(parsed {report.read}, unchanged {report.reused}); report: {args.out / QUARANTINE_FILE}"
    )
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from ml.data.preprocess import preprocess

    store = preprocess(
        args.ingest_dir, args.store, classes=args.classes, min_count=args.min_count, workers=args.workers
    )
    print(
        f"{len(store)} records x {len(store.classes)} classes ({', '.join(store.meta['class_names'])}) in {args.store}"
    )
    return 0


def _split(args: argparse.Namespace) -> int:
    from ml.data.splits import split_store
    from ml.data.store import ECGStore

    splits = split_store(
        ECGStore.open(args.store),
        test_size=args.test_size,
        labelled_ratio=args.labelled_ratio,
        valid_size=args.valid_size,
        seed=args.seed,
    )
    splits.save(args.out)
    print(" ".join(f"{k} {v}" for k, v in splits.sizes().items()) + f" -> {args.out}")
    return 0


def site_folder(sites_file: str | None, name: str) -> Path:
    """The folder of network site ``name`` in the site registry ``sites_file`` (one line why
    not: an unknown site, an ``s3://`` source)."""
    from ml.errors import ParameterError
    from pipeline.core.sites import DEFAULT_SITES_FILE, load_sites

    path = Path(sites_file or DEFAULT_SITES_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: site registry not found (--sites FILE names it)")
    site = load_sites(path).get(name)
    if "://" in site.source:
        raise ParameterError(
            f"data add --site {name}: the site's source is {site.source}: put the records under that prefix "
            "(its data version is computed from the listing); --site copies into a site's folder"
        )
    return Path(site.source)


def _add(args: argparse.Namespace) -> int:
    from ml.data.dvc import add_records
    from ml.errors import ParameterError

    if args.site and args.name:
        raise ParameterError("data add: --name and --site cannot be combined (a site's records go to its source)")
    if args.sites and not args.site:
        raise ParameterError("data add: --sites names the registry of --site NAME; give --site")
    folder = site_folder(args.sites, args.site) if args.site else None
    if args.source.startswith("s3://"):
        from pipeline.cli.preflight import check_s3

        check_s3(args.source)
    result = add_records(
        args.source,
        args.repo,
        name=args.name,
        folder=folder,
        track_with_dvc=not args.no_dvc,
        push=args.push,
        commit=not args.no_commit,
        replace=args.replace,
    )
    for key in result.conflicts:
        log.warning("%s differs from the copy already in %s: kept the existing one", key, result.destination)
    for problem in result.unsafe:
        log.warning("refused %s", problem)
    print(
        f"copied {result.copied} records into {result.destination} ({result.unchanged} already there, "
        f"{len(result.conflicts)} conflicts, {len(result.unsafe)} refused); data version "
        f"{result.version_before} -> {result.version_after}"
        + (f"; committed {result.dvc_file} as {result.committed[:12]}" if result.committed else "")
    )
    if args.site and result.version_after != result.version_before:
        log.info(
            "site %s has a new data version: `cessl retrain --sites %s` retrains it",
            args.site,
            args.sites or "sites.yaml",
        )
    if result.not_committed:
        log.error("%s", result.not_committed)
        return 1
    return 1 if result.conflicts else 0


def _check_remote(args: argparse.Namespace) -> None:
    """Every problem of ``data remote add`` before DVC is run (which would first ``dvc init``
    the repository): the URL, ``--endpoint-url`` only with s3://, an existing name only with
    ``--force``."""
    from ml.data.dvc import run_dvc
    from ml.errors import ParameterError
    from pipeline.core.constraints import dvc_remote_url_problem

    problem = dvc_remote_url_problem(args.url, args.repo)
    if problem:
        raise ParameterError(f"remote URL {args.url}: {problem}")
    if args.endpoint_url and not args.url.startswith("s3://"):
        raise ParameterError(f"--endpoint-url {args.endpoint_url}: only for an s3:// remote, not {args.url}")
    if (args.repo / ".dvc").is_dir() and not args.force:
        names = [
            line.split()[0] for line in run_dvc("remote", "list", cwd=args.repo).stdout.splitlines() if line.split()
        ]
        if args.name in names:
            raise ParameterError(
                f"DVC remote {args.name} already exists in {args.repo.absolute() / '.dvc' / 'config'}: "
                "pass --force to replace it"
            )


def _remote_add(args: argparse.Namespace) -> int:
    from ml.data.dvc import add_remote

    _check_remote(args)
    add_remote(args.repo, args.name, args.url, default=args.default, endpoint_url=args.endpoint_url, force=args.force)
    print(
        f"DVC remote {args.name} -> {args.url}{' (default)' if args.default else ''}"
        f"{f', endpoint {args.endpoint_url}' if args.endpoint_url else ''}; written to .dvc/config "
        "(commit it; credentials come from AWS_* variables, never from the config)"
    )
    return 0


def _remote_list(args: argparse.Namespace) -> int:
    from ml.data.dvc import default_remote, run_dvc

    if not (args.repo / ".dvc").is_dir():  # a git work tree where DVC was never set up
        log.info("no DVC remote: %s is not a DVC repository yet (`cessl data remote add` sets one up)", args.repo)
        return 0
    default = default_remote(args.repo)
    for line in run_dvc("remote", "list", cwd=args.repo).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        print(line + ("  (default)" if name and name == default else ""))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from ml.data.dvc import ensure_demo_data

    demo = ensure_demo_data(args.repo, track_with_dvc=not args.no_dvc, force=args.force)
    print(f"{demo.path}: data version {demo.version}")
    return 0


def _version(args: argparse.Namespace) -> int:
    from ml.data.dvc import Versioned, data_version

    if args.site:
        target = Versioned.of(site_folder(args.sites, args.site), args.repo)
        version = target.recorded()
        if version is None:
            raise FileNotFoundError(f"no {target.dvc_file} in {target.root}: site {args.site} is not versioned yet")
    else:
        version = data_version(args.repo)
        if version is None:
            raise FileNotFoundError(f"no data.dvc in {args.repo.resolve()}")
    print(version)
    return 0
