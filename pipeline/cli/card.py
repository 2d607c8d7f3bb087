"""``cessl card``: a production version's model card (:mod:`pipeline.registry.model_card`).

``cessl card [NAME] [--site SITE] [--version V] [-o FILE] [--log]`` verifies ``NAME``'s audit
log (as ``cessl predict`` does: a broken log or a moved alias exits 1 in one line) and prints
the Markdown card of its champion (or version ``V``): the signed decision and calibration, the
training run's data, split and test metrics with intervals, intended use and known limits.
``--log`` also logs it as ``model_card.md`` to the audit run of the version's last decision.
``cessl promote``, ``cessl rollback`` and ``cessl calibrate`` log the card of the version they
decided about (:func:`pipeline.registry.model_card.log_decision_card`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli.audit import add_trust_flag
from pipeline.cli.options import add_production_model
from pipeline.core.constraints import add_tracking_uri_flag, number, output_file

log = logging.getLogger(__name__)


def cmd_card(args: argparse.Namespace) -> int:
    from pipeline.cli.audit import require_verified, verify
    from pipeline.cli.monitor import target_model
    from pipeline.cli.preflight import registry_tracking
    from pipeline.cli.registry import champion_of
    from pipeline.registry.model_card import champion_decision, log_card, model_card
    from pipeline.registry.signing import find_trust

    model, _ = target_model(args)
    tracking = registry_tracking(args.tracking_uri, model)
    client = tracking.client()
    (result,) = verify(client, find_trust(args.trust_file), [model])
    require_verified([result])
    version = str(args.version) if args.version else champion_of(result)
    text = model_card(client, model, version, result.entries)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        log.info("wrote %s", args.output)
    else:
        sys.stdout.write(text)
    if args.log:
        decision = champion_decision(result.entries, version)
        if decision is None:
            log.error("%s v%s: no signed decision made it champion: no audit run to log the card to", model, version)
            return 2
        log.info(
            "%s v%s: model card logged to audit run %s",
            model,
            version,
            log_card(client, model, version, result.entries, decision.seq),
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "card",
        help="a production version's model card (Markdown) from the registry's verified evidence",
        description="Verify the model's audit log and print the model card of its champion (or --version): the "
        "signed decision and calibration, the training run's data and test metrics with intervals, intended use "
        "and known limits.",
    )
    add_production_model(parser, "the card of")
    parser.add_argument(
        "--version", type=number(int, minimum=1, name="version"), default=None, help="default: the verified champion"
    )
    parser.add_argument("-o", "--output", type=output_file, default=None, metavar="PATH", help="write it here")
    parser.add_argument("--log", action="store_true", help="also log it to the audit run of its champion decision")
    add_trust_flag(parser)
    add_tracking_uri_flag(parser)
    parser.set_defaults(func=cmd_card)
