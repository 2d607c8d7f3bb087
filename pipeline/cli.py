"""The `cessl` command line.

Each concern registers its own sub-commands from a module in `pipeline/commands/`
(a `register(subparsers)` function), so the command line grows with the project
without one file owning every option.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Modules under pipeline.commands that contribute sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = ("run", "registry", "data", "backbone", "method_demo")

log = logging.getLogger("cessl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cessl",
        description="CE-SSL: computation-efficient semi-supervised fine-tuning for ECG diagnosis.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pipeline.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pipeline.commands.{name}":
                raise
            continue  # that concern is not part of this build yet
        module.register(subparsers)
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
