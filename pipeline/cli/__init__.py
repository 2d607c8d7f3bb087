"""The `cessl` command line.

Each concern adds its own sub-commands from a module in `pipeline/cli/` (an
`add_commands(subparsers)` function), so the command line grows with the project
without one file owning every option.

Errors (the one error boundary, :func:`main`): a bad flag is reported by the parser in one
line (exit 2); a known failure (:func:`pipeline.core.failures.describe`: a
:class:`ml.errors.CesslError`, an unreachable server, missing credentials, a bad file, a
read-only or full disk, a failed step) is printed as one line and exits with its class's
code (:data:`ml.errors.EXIT_CODES`); ``-v`` adds the traceback. Anything else is a bug and
keeps its traceback. Log output is redacted (:mod:`pipeline.core.logsafe`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from ml.errors import EXIT_CODES, EXIT_USAGE
from pipeline.core.failures import describe
from pipeline.core.logsafe import configure_logging, redact

# Modules under pipeline.cli that contribute sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "run",
    "sites",
    "compare",
    "registry",
    "access",
    "audit",
    "serve",
    "testset",
    "data",
    "backbone",
    "method_demo",
)
EXIT_USER_ERROR = EXIT_USAGE

log = logging.getLogger("cessl")

EPILOG = "exit codes:\n" + "\n".join(f"  {code:<3} {text}" for code, text in EXIT_CODES.items())


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``cessl run: error: ...``,
    with a pointer to ``--help``) and exit 2: the usage block stays in ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {redact(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cessl",
        description="CE-SSL: computation-efficient semi-supervised fine-tuning for ECG diagnosis.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of known errors")
    parser.add_argument(
        "--debug-http",
        action="store_true",
        help="also debug-log the HTTP/S3 clients (botocore, urllib3, mlflow's REST client); secrets stay redacted",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pipeline.cli.{name}").add_commands(subparsers)
    return parser


def report(err: BaseException, verbose: bool) -> int | None:
    """Print a known failure as one line (``-v``: with its traceback); its exit code, or
    None for an unknown exception (the caller re-raises it)."""
    failure = describe(err)
    if failure is None:
        return None
    if verbose:
        sys.stderr.write(redact("".join(traceback.format_exception(err))))
    sys.stderr.write(f"cessl: error: {redact(failure.message)}\n")
    sys.stderr.flush()
    return failure.code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.debug_http)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:
        code = report(err, args.verbose)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
