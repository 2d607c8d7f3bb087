"""The `cessl` command line.

Each concern adds its own sub-commands from a module in `pipeline/cli/` (an
`add_commands(subparsers)` function; the pipeline verbs' from :mod:`pipeline.cli.verbs`),
so the command line grows with the project without one file owning every option. Building
the parser imports no heavy library (torch, mlflow, kfp, pandas, ...): a verb's body
imports them when it runs (:func:`pipeline.cli.options.command`), so ``cessl --help`` is quick.

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
from pipeline.cli.options import parse_args
from pipeline.core.failures import describe
from pipeline.core.logsafe import configure_logging, redact, route_warnings

# The functions under pipeline.cli that add sub-commands ("module:function"), in help order.
COMMANDS: tuple[str, ...] = (
    "verbs:add_run_commands",
    "sites:add_commands",
    "verbs:add_compare_commands",
    "registry:add_commands",
    "access:add_commands",
    "audit:add_commands",
    "serve:add_commands",
    "testset:add_commands",
    "monitor:add_commands",
    "calibrate:add_commands",
    "card:add_commands",
    "data:add_commands",
    "backbone:add_commands",
    "method_demo:add_commands",
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
    parser.add_argument("--version", action=VersionAction, help="the package version and git commit, and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(f"pipeline.cli.{module}"), function)(subparsers)
    return parser


def version() -> str:
    """``cessl <version> (git <commit>)``: the installed package's version, and the commit of
    the source tree it runs from when that is a git work tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    from pathlib import Path

    from pipeline.registry.lineage import git_commit

    try:
        number = package_version("cessl")
    except PackageNotFoundError:
        number = "unknown"
    commit = git_commit(Path(__file__).resolve().parents[2])
    return f"cessl {number}" + ("" if commit == "unknown" else f" (git {commit})")


class VersionAction(argparse.Action):
    """``--version``: print :func:`version` and exit (computed only when asked: it runs git)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        sys.stdout.write(version() + "\n")
        parser.exit(0)


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
    route_warnings()  # before the verbs' imports: a library warning is not output (-v shows it)
    args = parse_args(build_parser(), argv)
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
