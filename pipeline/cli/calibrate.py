"""``cessl calibrate``: fit a production version's calibrated answers and record them, signed.

``cessl calibrate [NAME] [--site SITE] [--records DIR] [--version V]`` loads the verified
champion (or version ``V``) of ``NAME`` (``<NAME>-<SITE>`` for a site of a network), scores a
**calibration split** of labelled WFDB records with it and fits, per class, the present /
absent / refer answers of :mod:`ml.eval.calibration`: for the critical classes (``--critical``,
default AF, LBBB, STach) the split-conformal lower threshold whose miss rate is at most
``--target-miss-rate`` for records exchangeable with the split, and between it and the fitted
threshold a "refer to a cardiologist" band.

The calibration split: ``--records DIR`` (labelled records the model never trained on nor
tuned its thresholds with: a record whose name is in the version's train or validation split
is refused), or by default the version's own **test split** (read from its run's ``source``
as the gate reads it; held out from training and from fitting the thresholds).

Then, unless ``--dry-run``, it is recorded as a signed ``calibrate`` decision in the model's
audit log (:mod:`pipeline.registry.calibration`; a release manager's permission and key, as
``cessl promote``); from then on ``cessl predict`` and ``cessl serve`` answer that version with
it, after verifying the log. No retraining, no new version: the model's weights are unchanged.
``--output FILE`` also writes the ``calibration.json``.

Exit codes: 0 recorded (or written, with ``--dry-run``); 7 insufficient evidence: fewer
readable labelled records than ``--min-records`` (nothing is recorded); 2 bad flags or records.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ml.errors import EXIT_INSUFFICIENT, ParameterError
from pipeline.cli.audit import signing_flags
from pipeline.cli.options import add_production_model
from pipeline.core.constraints import (
    add_tracking_uri_flag,
    comma_list,
    existing_dir,
    fraction,
    number,
    output_file,
)

if TYPE_CHECKING:
    from ml.eval.calibration import CalibrationSet
    from pipeline.cli.monitor import Champion
    from pipeline.registry.calibration import CalibrationFit

log = logging.getLogger(__name__)

DEFAULT_MIN_RECORDS = 50
HELD_OUT = "test"  # the split part calibrated on by default
FITTED_ON = ("train", "valid")  # parts a calibration record must not come from


def calibration_readers(args: argparse.Namespace, client, champion: Champion) -> tuple[list, str]:
    """The calibration records (readers) and where they come from; ParameterError when a
    ``--records`` record trained or tuned the model."""
    from ml.eval.monitoring import folder_records, source_records
    from pipeline.cli.monitor import champion_split

    if args.records:
        readers = folder_records(Path(args.records))
        try:
            _, parts = champion_split(client, champion, hint="")
        except ParameterError as err:
            log.warning("%s: cannot check the records are held out (%s)", champion.model, err)
            return readers, str(args.records)
        fitted = {Path(k).name for part in FITTED_ON for k in parts[part]}
        overlap = sorted(name for name, _ in readers if Path(name).name in fitted)
        if overlap:
            raise ParameterError(
                f"{args.records}: {len(overlap)} of its records trained or tuned {champion.model} v{champion.version} "
                f"(its train/valid split), e.g. {', '.join(overlap[:3])}: calibrate on held-out records"
            )
        return readers, str(args.records)
    source, parts = champion_split(client, champion, hint="pass --records DIR")
    if "://" not in source and not Path(source).is_dir():
        raise ParameterError(f"{champion.model} v{champion.version}: its data {source} is not here; pass --records DIR")
    return source_records(source, parts[HELD_OUT]), f"{source} ({HELD_OUT} split of run {champion.run_id})"


def fit_summary(calibration: CalibrationSet, probs: np.ndarray, labels: np.ndarray, unreadable: int, source: str):
    """What the calibration was fitted on: records, refer rate, observed misses per critical class."""
    from ml.eval.calibration import ABSENT, REFER
    from pipeline.registry.calibration import CalibrationFit

    decisions = calibration.decide(probs)
    observed = {}
    for j, cal in enumerate(calibration.classes):
        positives = labels[:, j].astype(bool)
        if cal.critical and positives.any():
            observed[cal.code] = float(np.mean(decisions[positives, j] == ABSENT))
    return CalibrationFit(
        records=len(probs),
        unreadable=unreadable,
        source=source,
        refer_rate=float(np.mean((decisions == REFER).any(axis=1))) if len(probs) else 0.0,
        observed_miss=observed,
    )


def print_calibration(calibration: CalibrationSet, fit: CalibrationFit, label: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ml.eval.predictor import class_names

    short = class_names(calibration.codes)
    table = Table(title=f"{label}: calibrated on {fit.records} records ({fit.source})", title_justify="left")
    for column in ("class", "critical", "positives", "absent below", "present from", "miss bound", "miss upper"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for cal in calibration.classes:
        table.add_row(
            short[cal.code],
            "yes" if cal.critical else "",
            str(cal.n_positives),
            num(cal.t_low),
            num(cal.t_high),
            num(cal.miss_rate_bound),
            num(cal.miss_rate_upper) + (" *" if cal.note else ""),
        )
    console = console or Console(width=100)
    console.print(table)
    for cal in calibration.classes:
        if cal.note:
            console.print(f"* {short[cal.code]}: {cal.note}")
    console.print(f"refer rate on the calibration split: {fit.refer_rate:.1%} of records")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ml.eval.calibration import CalibrationConfig, calibrate
    from ml.eval.monitoring import observe
    from pipeline.cli.monitor import load_champion, target_model
    from pipeline.cli.preflight import registry_tracking
    from pipeline.registry.calibration import record_calibration
    from pipeline.registry.model_card import log_decision_card
    from pipeline.registry.signing import find_signer, find_trust

    try:
        config = CalibrationConfig(
            target_miss_rate=args.target_miss_rate, critical=tuple(args.critical), confidence=args.confidence
        )
    except ValueError as err:
        raise ParameterError(f"cessl calibrate: {err}") from None
    model, site = target_model(args)
    tracking = registry_tracking(args.tracking_uri, model)
    client = tracking.client()
    trust = find_trust(args.trust_file)
    signer = None if args.dry_run else find_signer(args.signing_key)  # before any work: a missing key is one line
    champion = load_champion(client, tracking.tracking_uri, model, site, trust, args.version)
    label = f"{model} v{champion.version}"
    readers, source = calibration_readers(args, client, champion)
    log.info("%s: scoring %d calibration records (%s)", label, len(readers), source)
    observed = observe(champion.predictor, readers, with_labels=True)
    if observed.labels is None and len(observed.probs):
        raise ParameterError(f"{source}: some records have no '# Dx:' line; calibration needs labelled records")
    if len(observed.probs) < args.min_records:
        log.error(
            "%s: insufficient evidence: %d readable labelled records (%d unreadable), --min-records %d; nothing recorded",
            label,
            len(observed.probs),
            observed.n_unreadable,
            args.min_records,
        )
        return EXIT_INSUFFICIENT
    predictor = champion.predictor
    labels = np.asarray(observed.labels)
    calibration = calibrate(observed.probs, labels, list(predictor.classes), list(predictor.thresholds), config)
    fit = fit_summary(calibration, observed.probs, labels, observed.n_unreadable, source)
    print_calibration(calibration, fit, label)
    if args.output:
        log.info("wrote %s", calibration.save(args.output))
    if args.dry_run:
        log.info("%s: --dry-run: nothing recorded in the registry", label)
        return 0
    entry = record_calibration(client, model, champion.version, calibration, fit, args.reason, signer, trust)
    log_decision_card(client, model, trust)
    log.info(
        "%s: calibration recorded (audit entry #%d, signed by %s); predict and serve answer with it",
        label,
        entry.seq,
        entry.who,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from ml.eval.calibration import DEFAULT_CRITICAL

    parser = subparsers.add_parser(
        "calibrate",
        help="fit a production version's present/absent/refer answers on held-out records; record them signed",
        description="Score a calibration split (--records DIR, default the version's test split) with the verified "
        "champion, fit per class a conformal 'refer to a cardiologist' band for the critical classes at "
        "--target-miss-rate, and record it as a signed calibrate decision in the audit log (predict and serve "
        "then answer with it). Exit 0 recorded; 7 insufficient evidence (fewer than --min-records).",
    )
    add_production_model(parser, "calibrate")
    parser.add_argument(
        "--version",
        type=number(int, minimum=1, name="version"),
        default=None,
        help="the version to calibrate (default: the verified champion)",
    )
    parser.add_argument(
        "--records",
        type=existing_dir,
        default=None,
        metavar="DIR",
        help="labelled held-out WFDB records (default: the version's test split, from its run's source)",
    )
    parser.add_argument(
        "--target-miss-rate",
        type=fraction,
        default=0.05,
        help="the critical classes' miss rate at most (default: %(default)s)",
    )
    parser.add_argument(
        "--critical",
        type=comma_list(str, "AF,LBBB,STach"),
        default=DEFAULT_CRITICAL,
        help="critical classes, abbreviations or SNOMED codes, comma-separated (default: "
        f"{','.join(DEFAULT_CRITICAL)})",
    )
    parser.add_argument(
        "--confidence",
        type=fraction,
        default=0.95,
        help="confidence of the miss-rate upper bounds (default: %(default)s)",
    )
    parser.add_argument(
        "--min-records",
        type=number(int, minimum=1, name="min_records"),
        default=DEFAULT_MIN_RECORDS,
        help="readable labelled records needed to calibrate (default: %(default)s)",
    )
    parser.add_argument("--reason", default="", help="why (recorded in the audit log)")
    parser.add_argument("--dry-run", action="store_true", help="fit and print; record nothing")
    parser.add_argument("--output", type=output_file, default=None, metavar="PATH", help="also write calibration.json")
    signing_flags(parser)
    add_tracking_uri_flag(parser)
    parser.set_defaults(func=cmd_calibrate)
