"""The `cessl` command line.

Each concern adds its own sub-commands from a module in `pipeline/commands/` (an
`add_commands(subparsers)` function), so the command line grows with the project
without one file owning every option.

Errors: a :class:`ml.errors.CesslError` (a failed step, a registry in the wrong state, a
failed local run) and the ValueError / FileNotFoundError of argument validation are
printed as one line, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ml.errors import CesslError

# Modules under pipeline.commands that contribute sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = ("run", "compare", "registry", "testset", "data", "backbone", "method_demo")
# Errors whose message is all the user needs (exit status 2).
USER_ERRORS: tuple[type[Exception], ...] = (CesslError, ValueError, FileNotFoundError)
EXIT_USER_ERROR = 2

log = logging.getLogger("cessl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cessl",
        description="CE-SSL: computation-efficient semi-supervised fine-tuning for ECG diagnosis.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pipeline.commands.{name}").add_commands(subparsers)
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
    except USER_ERRORS as err:
        log.error("%s", err)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
