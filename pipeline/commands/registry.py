"""`cessl promote | rollback | predict | models`: the MLflow model registry from the shell.

- ``promote NAME``: ``champion`` moves to the ``challenger`` only if it beats the champion on
  the same test split (``--metric``, ``--margin``); the decision and the comparison are
  written as tags. Exit 0 when promoted, 1 when refused (the numbers are printed),
  ``--force`` promotes anyway and records it.
- ``rollback NAME``: the previous champion gets ``champion`` back.
- ``predict --model models:/NAME@champion RECORDS...``: per-record probabilities and
  thresholded diagnoses, as CSV or JSON.
- ``models NAME``: the versions, their aliases, data versions and gate decisions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.registry import (
    GateConfig,
    PromotionDecision,
    describe_versions,
    promote,
    rollback,
)
from pipeline.tracking import TRACKING_URI_ENV, TrackingConfig

log = logging.getLogger(__name__)

EXIT_REFUSED = 1


def _tracking(args: argparse.Namespace, name: str = "") -> TrackingConfig:
    return TrackingConfig.resolve(args.tracking_uri, model_name=name or "cessl-ecg")


def print_decision(decision: PromotionDecision) -> None:
    from rich.console import Console

    c = decision.comparison
    colour = {"promoted": "green", "forced": "yellow", "refused": "red"}[decision.label]
    console = Console()
    console.print(f"[bold {colour}]{decision.label.upper()}[/]: {decision.reason}")
    console.print(c.describe())
    if decision.history:
        console.print(f"champion history: {' -> '.join('v' + v for v in decision.history)}")


def run_promote(tracking: TrackingConfig, metric: str, margin: float, force: bool) -> PromotionDecision:
    decision = promote(tracking.client(), tracking.model_name, GateConfig(metric=metric, margin=margin), force=force)
    print_decision(decision)
    return decision


def cmd_promote(args: argparse.Namespace) -> int:
    decision = run_promote(_tracking(args, args.name), args.metric, args.margin, args.force)
    return 0 if decision.promoted else EXIT_REFUSED


def cmd_rollback(args: argparse.Namespace) -> int:
    result = rollback(_tracking(args, args.name).client(), args.name)  # RegistryError: exit 2 (cli.main)
    log.info("%s: champion is v%s again (was v%s)", args.name, result.restored, result.replaced)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.pyfunc_model import load_predictor

    tracking = _tracking(args)
    predictor = load_predictor(args.model, tracking_uri=tracking.tracking_uri)
    table = predictor.predict_records([Path(r) for r in args.records])  # unreadable records: in `error`
    bad = table[table["error"] != ""]
    if len(bad):
        log.warning(
            "%d of %d records could not be read (see the error column): %s",
            len(bad),
            len(table),
            ", ".join(bad["record"]),
        )
    fmt = args.format or ("json" if args.output and args.output.endswith(".json") else "csv")
    if fmt == "json":
        text = json.dumps(
            {
                "model": args.model,
                "classes": predictor.classes,
                "thresholds": [float(t) for t in predictor.thresholds],
                "records": json.loads(table.to_json(orient="records")),  # NaN -> null
            },
            indent=2,
        )
    else:
        text = table.to_csv(index=False, float_format="%.6f")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        log.info("wrote %d predictions to %s", len(table), args.output)
    else:
        sys.stdout.write(text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = describe_versions(_tracking(args, args.name).client(), args.name)
    table = Table(title=f"{args.name}")
    for column in ("version", "aliases", "data_version", "decision", "macro_f_beta"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("version", "aliases", "data_version", "decision", "macro_f_beta")))
    Console().print(table)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    def tracking_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tracking-uri",
            default="",
            help=f"MLflow tracking URI (default: ${TRACKING_URI_ENV} or sqlite:///./mlflow.db)",
        )

    pr = subparsers.add_parser("promote", help="move 'champion' to the challenger if it beats the champion")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("--metric", default="macro_f_beta", help="test metric of the gate (default: %(default)s)")
    pr.add_argument("--margin", type=float, default=0.0, help="required improvement (default: %(default)s)")
    pr.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded)")
    tracking_flag(pr)
    pr.set_defaults(func=cmd_promote)

    rb = subparsers.add_parser("rollback", help="restore the previous champion")
    rb.add_argument("name", help="registered model name")
    tracking_flag(rb)
    rb.set_defaults(func=cmd_rollback)

    pd_ = subparsers.add_parser("predict", help="predict diagnoses of WFDB records with a registered model")
    pd_.add_argument("--model", required=True, help="model URI, e.g. models:/cessl-ecg@champion")
    pd_.add_argument("records", nargs="+", help="WFDB records (path with or without .hea)")
    pd_.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    pd_.add_argument("--format", choices=("csv", "json"), default=None, help="default: from -o's suffix, else csv")
    tracking_flag(pd_)
    pd_.set_defaults(func=cmd_predict)

    md = subparsers.add_parser("models", help="list a registered model's versions and aliases")
    md.add_argument("name")
    tracking_flag(md)
    md.set_defaults(func=cmd_models)
