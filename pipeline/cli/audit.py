"""`cessl audit verify`: check the registry's audit logs and champions (also a CronJob in deploy/).

For every registered model with a champion or an audit log (``--all``, the default) or one
model (``--model M``, repeatable), :mod:`pipeline.registry.verify` checks the chain of its audit
log, each decision's signature against the trust file (``--trust-file`` /
``$CESSL_TRUST_FILE`` / ``~/.config/cessl/trust.yaml``), the stored copies of the log, and that
``champion`` is the version the last valid signed decision names, and that each log still
holds the entry the auditor anchored (``--anchor``: record it, as the CronJob does). One line per model; exit 0
when all verify, 1 when one does not (the line names the model, the alias, the expected and
the found version, or the broken entry).
"""

from __future__ import annotations

import argparse
import logging
import os

from pipeline.core.constraints import add_tracking_uri_flag, registered_model
from pipeline.registry.access import AccessDeniedError
from pipeline.registry.anchor import ANCHOR_EXPERIMENT, write_anchor
from pipeline.registry.signing import Trust, find_trust
from pipeline.registry.verify import AuditMismatchError, Verification, verify_all, verify_model

log = logging.getLogger(__name__)


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-file",
        default="",
        metavar="FILE",
        help="the release managers' public keys (default: $CESSL_TRUST_FILE or ~/.config/cessl/trust.yaml)",
    )


def signing_flags(parser: argparse.ArgumentParser) -> None:
    """Who signs a registry decision, and whom a verb trusts."""
    parser.add_argument(
        "--signing-key",
        default="",
        metavar="FILE",
        help="your Ed25519 key that signs the decision (default: $CESSL_SIGNING_KEY or "
        "~/.config/cessl/signing-key.pem; `cessl access keygen` makes one)",
    )
    add_trust_flag(parser)


def verify(client, trust: Trust, models: list[str] | None = None) -> list[Verification]:
    """Each of ``models`` (default: every model with a champion or an audit log), verified."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per audit artifact read
    if models is None:
        return verify_all(client, trust)
    return [verify_model(client, name, trust) for name in models]


def require_verified(results: list[Verification]) -> None:
    """Log each failing model's line; AuditMismatchError (exit 1) naming them, if any."""
    failing = [r for r in results if not r.ok]
    for result in failing:
        log.error("%s", result.problem())
    if len(failing) == 1:
        raise AuditMismatchError(failing[0].problem())
    if failing:
        names = ", ".join(r.model for r in failing)
        raise AuditMismatchError(f"{len(failing)} models fail the audit check: {names} (each line above says why)")


def anchor_verified(client, results: list[Verification]) -> None:
    """Anchor each verified log at its last entry (the auditor's identity may; others are refused)."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.access import client_tracking_uri
    from pipeline.registry.audit import authenticated_name, current_user

    by = authenticated_name(client_tracking_uri(client)) or current_user()
    for result in results:
        try:
            anchor = write_anchor(client, result.model, result.entries, by)
        except MlflowException as err:
            raise AccessDeniedError(
                f"cannot anchor {result.model!r}: user {by!r} may not write experiment {ANCHOR_EXPERIMENT!r} "
                f"({err.error_code}); the auditor may (`cessl access init --auditor USER`)"
            ) from None
        if anchor is not None:
            log.info("%s: anchored at %s", result.model, anchor.text())


def summary(result: Verification) -> str:
    decisions = sum(1 for e in result.entries if e.is_decision and e.format >= 2)
    champion = f"champion v{result.found}" if result.found else "no champion"
    return f"{result.model}: ok, {champion}; {len(result.entries)} entries, {decisions} signed decisions"


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import registry_tracking

    trust = find_trust(args.trust_file)
    if not trust.exists:
        log.warning("trust file %s does not exist: no decision can verify", trust.source)
    client = registry_tracking(args.tracking_uri).client()
    results = verify(client, trust, list(args.model) or None)
    for result in results:
        if result.ok:
            log.info("%s", summary(result))
    if args.anchor:  # the logs that verified, before a failing one stops the command
        anchor_verified(client, [r for r in results if r.ok])
    require_verified(results)
    log.info("%d models verified against %s", len(results), trust.source)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    au = subparsers.add_parser("audit", help="verify the registry's signed decisions and champions")
    verbs = au.add_subparsers(dest="audit_command", required=True, metavar="VERB")
    vf = verbs.add_parser(
        "verify",
        help="check every audit log's chain and signatures, and that each champion is the signed one",
    )
    which = vf.add_mutually_exclusive_group()
    which.add_argument(
        "--model", action="append", default=[], type=registered_model, metavar="M", help="one model (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every model with a champion or an audit log (default)")
    vf.add_argument(
        "--anchor",
        action="store_true",
        help=f"then record how far each verified log reaches, in experiment {ANCHOR_EXPERIMENT} (the auditor: "
        "the audit CronJob); a log later cut or rewritten behind it fails every check",
    )
    add_trust_flag(vf)
    add_tracking_uri_flag(vf)
    vf.set_defaults(func=cmd_audit_verify)
