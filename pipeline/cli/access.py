"""`cessl access init | check | keygen`: who may change the registry of an authenticated MLflow server.

- ``access init``: as an MLflow admin (``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``), create or
  update the pipeline identity, the release managers and the reviewers and set their
  permissions (:mod:`pipeline.registry.access`): the pipeline writes only the candidates
  models (``<model>-candidates``) and reads the production models; release managers manage
  the production models. Passwords come from ``CESSL_PASSWORD_<USER>`` or a
  ``user:password`` file (``--passwords FILE``, ``-`` for stdin), never from the command
  line; they are never logged. Re-run it after adding a site (its model is created then).
- ``access check NAME``: who this process is on the server and its permission on a model.
- ``access keygen [--out DIR] [--name NAME] [--trust FILE]``: a release manager's Ed25519 key
  pair for signing registry decisions (:mod:`pipeline.registry.signing`): ``DIR/signing-key.pem``
  (mode 0600, never printed or logged) and ``DIR/signing-key.pub`` (default DIR
  ``~/.config/cessl``), and ``NAME: <public key>`` added to the trust file (default the local
  ``~/.config/cessl/trust.yaml``; for the cluster ``deploy/trust/release-managers.yaml``, then
  commit it). NAME defaults to ``$CESSL_USER`` / ``$MLFLOW_TRACKING_USERNAME`` / the OS user.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ml.errors import ParameterError
from pipeline.core.constraints import add_tracking_uri_flag, as_text, existing_file, optional, registered_model
from pipeline.core.files import UserFileError, read_stdin_text, read_text
from pipeline.core.logsafe import register_secret
from pipeline.registry.access import (
    PROMOTE_PERMISSION,
    AccessPlan,
    apply_plan,
    at_least,
    authenticated_user,
    check_password,
    model_permission,
    parse_password_file,
    password_env,
)

log = logging.getLogger(__name__)


def production_models(args: argparse.Namespace) -> tuple[str, ...]:
    """``--model`` (default ``cessl-ecg``) and, with ``--site`` / ``--all-sites``, each
    base's ``<model>-<site>``."""
    from pipeline.core.sites import DEFAULT_SITES_FILE, check_site_name, load_sites
    from pipeline.registry.policy import DEFAULT_MODEL_NAME, site_model_name

    bases = list(dict.fromkeys(args.model or [DEFAULT_MODEL_NAME]))
    sites = [check_site_name(s) for s in args.site]
    if args.all_sites:
        sites += load_sites(Path(args.sites or DEFAULT_SITES_FILE)).names
    return tuple(dict.fromkeys([*bases, *(site_model_name(b, s) for b in bases for s in sites)]))


def read_passwords(source: str) -> dict[str, str]:
    """``user:password`` lines from a file, or from stdin for ``-``."""
    if not source:
        return {}
    try:  # a regular file of at most 1 MiB of UTF-8 text (pipeline.core.files), or stdin
        text = read_stdin_text() if source == "-" else read_text(source)
    except UserFileError as err:
        raise ParameterError(f"--passwords {err}") from None
    passwords = parse_password_file(text, "stdin" if source == "-" else source)
    for password in passwords.values():
        register_secret(password)
    return passwords


def cmd_access_init(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_tracking

    plan = AccessPlan(
        pipeline=args.pipeline_user,
        release_managers=tuple(args.release_manager),
        reviewers=tuple(args.reviewer),
        auditors=tuple(args.auditor),
        models=production_models(args),
    )
    from_file = read_passwords(args.passwords)
    unknown = sorted(set(from_file) - set(plan.roles()))
    if unknown:
        raise ParameterError(f"--passwords names users without a role here: {', '.join(unknown)}")
    passwords: dict[str, str | None] = {}
    for user in plan.roles():
        env = password_env(user)
        password = from_file.get(user, os.environ.get(env))
        if password is not None:
            check_password(user, password, "--passwords" if user in from_file else f"${env}")
        passwords[user] = password
    uri = check_tracking(args.tracking_uri, writes=False)
    report = apply_plan(uri, plan, passwords.get)
    for user, grants in report.grants.items():
        text = ", ".join(f"{g.permission} on {g.resource_type} {g.resource}" for g in grants)
        log.info("%s: %s", user, text)
    return 0


def cmd_access_check(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_tracking

    uri = check_tracking(args.tracking_uri, writes=False)
    identity = authenticated_user(uri)
    if identity is None:
        log.info("%s has no authentication: anyone who reaches it may change the registry", uri)
        return 0
    if identity.is_admin:
        log.info("%s: admin (every permission)", identity.username)
        return 0
    has = model_permission(uri, identity.username, args.name)
    may = "may" if at_least(has, PROMOTE_PERMISSION) else "may not"
    log.info("%s: %s on %s; %s promote or roll back it", identity.username, has, args.name, may)
    return 0


def cmd_access_keygen(args: argparse.Namespace) -> int:
    from pipeline.registry.audit import USERNAME_ENV, current_user
    from pipeline.registry.signing import add_signer, config_dir, default_trust_path, generate_key

    name = args.name or os.environ.get(USERNAME_ENV, "").strip() or current_user()
    keys = generate_key(Path(args.out) if args.out else config_dir())
    log.info("signing key: %s (mode 0600; keep it private); public key: %s", keys.private, keys.public)
    if args.no_trust:
        log.info("add to the trust file: %s: %s", name, keys.public_text)
        return 0
    trust = Path(args.trust) if args.trust else default_trust_path()
    if add_signer(trust, name, keys.public_text):
        log.info("trust file %s: %s may now sign registry decisions", trust, name)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    ac = subparsers.add_parser("access", help="users and permissions of an authenticated MLflow server")
    verbs = ac.add_subparsers(dest="access_command", required=True, metavar="VERB")

    init = verbs.add_parser(
        "init",
        help="create/update the pipeline identity, release managers and reviewers (as an MLflow admin)",
        description=(
            "Passwords: $CESSL_PASSWORD_<USER> (upper case, other characters as _) or --passwords FILE "
            "(user:password lines; - reads stdin). Never on the command line."
        ),
    )
    init.add_argument("--pipeline-user", required=True, help="the pipeline's MLflow user (its Secret)")
    init.add_argument(
        "--release-manager", action="append", default=[], metavar="USER", help="may promote and roll back (repeatable)"
    )
    init.add_argument("--reviewer", action="append", default=[], metavar="USER", help="reads everything (repeatable)")
    init.add_argument(
        "--auditor",
        action="append",
        default=[],
        metavar="USER",
        help="reads everything, anchors verified audit logs (`cessl audit verify --anchor`, the CronJob; repeatable)",
    )
    init.add_argument(
        "--model",
        action="append",
        default=[],
        type=registered_model,
        metavar="NAME",
        help="a production model (repeatable; default cessl-ecg); its <NAME>-candidates model is set up too",
    )
    init.add_argument("--site", action="append", default=[], metavar="SITE", help="also <model>-<SITE> (repeatable)")
    init.add_argument("--all-sites", action="store_true", help="also <model>-<site> of every site of --sites")
    init.add_argument(
        "--sites", type=optional(as_text(existing_file)), default="", help="site registry file (default: ./sites.yaml)"
    )
    init.add_argument("--passwords", default="", metavar="FILE", help="user:password lines ('-': stdin)")
    add_tracking_uri_flag(init)
    init.set_defaults(func=cmd_access_init)

    check = verbs.add_parser("check", help="who this process is on the server, and its permission on a model")
    check.add_argument("name", type=registered_model, help="a registered model")
    add_tracking_uri_flag(check)
    check.set_defaults(func=cmd_access_check)

    keygen = verbs.add_parser(
        "keygen",
        help="an Ed25519 key pair that signs your registry decisions, listed in a trust file",
        description=(
            "Writes DIR/signing-key.pem (mode 0600, never overwritten) and DIR/signing-key.pub, and lists "
            "NAME with the public key in the trust file. promote/rollback find the key through --signing-key, "
            "$CESSL_SIGNING_KEY or ~/.config/cessl/signing-key.pem."
        ),
    )
    keygen.add_argument("--out", default="", metavar="DIR", help="where the key pair goes (default ~/.config/cessl)")
    keygen.add_argument(
        "--name",
        default="",
        help="who signs: your MLflow user (default $CESSL_USER, $MLFLOW_TRACKING_USERNAME or the OS user)",
    )
    where = keygen.add_mutually_exclusive_group()
    where.add_argument(
        "--trust",
        default="",
        metavar="FILE",
        help="trust file to list NAME in (default ~/.config/cessl/trust.yaml; the cluster's: "
        "deploy/trust/release-managers.yaml)",
    )
    where.add_argument("--no-trust", action="store_true", help="only print the trust file's line")
    keygen.set_defaults(func=cmd_access_keygen)
