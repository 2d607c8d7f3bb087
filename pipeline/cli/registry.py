"""`cessl promote | rollback | predict | models`: the MLflow model registry from the shell.

- ``promote NAME``: the ``challenger`` of ``NAME-candidates`` (what the pipeline registered) is
  copied into the production model ``NAME`` and becomes its ``champion`` only if the
  gate passes on evidence recomputed here (``pipeline.registry.policy``,
  ``pipeline.registry.evidence``: both models loaded with their digests checked, scored on the
  frozen test records read from ``--source`` (default: the run's source), lower bound of the
  paired jackknife-t interval of challenger - champion above ``--margin`` >= 0, no class's F-beta2 lower by
  more than ``--max-class-drop``, a production method; the level is spent over the attempts on
  one frozen test set: attempt k at one-sided ``--alpha / 2^k``). Exit 0 when promoted, 1 when
  refused (the recomputed numbers are printed; a missing or altered model or a baseline in one
  line), 7 when the evidence is insufficient: the interval contains the margin and the frozen
  test set holds fewer records than needed to detect an improvement of ``--effect`` above the
  margin with ``--power`` (the decision says how many; several models: 1 if any was refused,
  else 7 if any could not be decided). ``--force --reason TEXT`` overrides the statistics
  only, and records who and why.
- ``rollback NAME``: the previous champion gets ``champion`` back.
- Both, against an MLflow server with authentication, first check that the authenticated user
  (``MLFLOW_TRACKING_USERNAME``) holds ``MANAGE`` on every target model (release managers,
  ``cessl access init``): one line naming who, which model and the missing permission
  (exit 3), before any change.
- ``predict --model models:/NAME@champion RECORDS...``: per-record probabilities and
  thresholded diagnoses, as CSV or JSON; a record that cannot be read or fails the
  signal-quality check (:mod:`ml.data.quality`) is a row with ``status`` ``unreadable`` and
  its ``reason``, never diagnoses.
- ``models [NAME] [--history]``: every model with its aliases; a model's versions, aliases,
  methods, data versions and last decisions; ``--history``: its audit log, oldest first.

Signed decisions (:mod:`pipeline.registry.signing`): ``promote`` and ``rollback`` sign what they
record with the caller's key (``--signing-key`` / ``$CESSL_SIGNING_KEY`` /
``~/.config/cessl/signing-key.pem``), which the trust file (``--trust-file`` /
``$CESSL_TRUST_FILE`` / ``~/.config/cessl/trust.yaml``) must list for the caller. ``models``,
``--history`` and ``predict --model models:/NAME@champion`` verify the audit log and the
champion first (:mod:`pipeline.registry.verify`): a broken log or a champion that is not the
version the last valid signed decision names exits 1 with one line (``models`` after its table;
``predict`` refuses before loading anything, and loads the verified version itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from ml.errors import EXIT_INSUFFICIENT, EXIT_REFUSED, ParameterError
from ml.eval.power import PowerConfig
from pipeline.cli.audit import add_trust_flag, require_verified, signing_flags, verify
from pipeline.core.constraints import (
    add_tracking_uri_flag,
    as_text,
    existing_file,
    model_uri,
    non_negative_float,
    number,
    optional,
    output_file,
    positive_float,
    registered_model,
)
from pipeline.core.params import PRECISION_CHOICES
from pipeline.registry.access import require_model_permission
from pipeline.registry.audit import history
from pipeline.registry.model_card import log_decision_card
from pipeline.registry.policy import (
    DEFAULT_MODEL_NAME,
    FORCED,
    GATE_METRICS,
    INSUFFICIENT,
    PROMOTED,
    REFUSED,
    GateConfig,
    PromotionDecision,
    RegistryError,
    describe_models,
    describe_versions,
    promote,
    rollback,
    site_model_name,
)
from pipeline.registry.signing import Signer, Trust, find_signer, find_trust
from pipeline.registry.store import TrackingConfig
from pipeline.registry.tracking import CHAMPION
from pipeline.registry.verify import Verification

log = logging.getLogger(__name__)

COLOUR = {PROMOTED: "green", FORCED: "yellow", REFUSED: "red", INSUFFICIENT: "magenta"}


def _tracking(args: argparse.Namespace, name: str = "") -> TrackingConfig:
    """The registry's store; it must exist (these commands never create one) and answer."""
    from pipeline.cli.preflight import registry_tracking

    return registry_tracking(args.tracking_uri, name)


def print_decision(decision: PromotionDecision, console=None) -> None:
    """The decision, once: verdict and why, the numbers, who forced it, the champion history."""
    from rich.console import Console
    from rich.text import Text

    colour = COLOUR[decision.label]
    console = console or Console()
    console.print(Text(decision.label.upper(), style=f"bold {colour}") + Text(f": {decision.reason}"), soft_wrap=True)
    if decision.integrity:
        return  # the challenger cannot be judged at all: the one line says why
    c = decision.comparison
    console.print(Text(c.describe()), soft_wrap=True)
    if decision.production_version is not None:
        console.print(
            Text(
                f"{decision.candidates} v{c.challenger_version} copied as production version v{decision.production_version}"
            ),
            soft_wrap=True,
        )
    if decision.forced:
        console.print(Text(f"forced by {decision.who}: {decision.force_reason}"), soft_wrap=True)
    if decision.history:
        console.print(Text(f"champion history: {' -> '.join('v' + v for v in decision.history)}"), soft_wrap=True)


def run_promote(
    tracking: TrackingConfig,
    metric: str,
    margin: float,
    force: bool = False,
    reason: str = "",
    max_class_drop: float = GateConfig.max_class_drop,
    signer: Signer | None = None,
    trust: Trust | None = None,
    source: str = "",
    evidence: PowerConfig = PowerConfig(),
) -> PromotionDecision:
    gate = GateConfig(metric=metric, margin=margin, max_class_drop=max_class_drop, evidence=evidence)
    decision = promote(
        tracking.client(),
        tracking.model_name,
        gate,
        force=force,
        reason=reason,
        signer=signer,
        trust=trust,
        source=source,
    )
    print_decision(decision)
    if decision.promoted:
        log_decision_card(tracking.client(), tracking.model_name, trust or find_trust())
    return decision


def target_models(args: argparse.Namespace) -> list[str]:
    """The registered models a registry verb acts on: ``NAME``; or, for a hospital network,
    ``<NAME>-<site>`` of each ``--site`` (or of every site of ``--sites FILE`` with
    ``--all-sites``), NAME defaulting to the default model name. Site names are checked
    against the registry file when one is given or exists."""
    from pipeline.core.sites import DEFAULT_SITES_FILE, check_site_name, load_sites

    sites: list[str] = list(args.site or [])
    if not sites and not args.all_sites:
        if not args.name:
            raise ParameterError("name a registered model, or a site with --site NAME / --all-sites")
        return [args.name]
    if args.force and (args.all_sites or len(sites) > 1):
        raise ParameterError("--force promotes one model at a time: name one --site, not several or --all-sites")
    file = Path(args.sites or DEFAULT_SITES_FILE)
    if args.all_sites or args.sites or file.exists():
        registry = load_sites(file)
        sites = registry.names if args.all_sites else [registry.get(s).name for s in sites]
        if not sites:
            raise ParameterError(f"{file}: no sites (add one with `cessl sites add NAME SOURCE`)")
    base = args.name or DEFAULT_MODEL_NAME
    return [site_model_name(base, check_site_name(s)) for s in sites]


def require_all(args: argparse.Namespace, names: list[str], action: str) -> None:
    """The caller may change every target model, or nothing changes (``--all-sites``)."""
    for name in names:
        require_model_permission(_tracking(args, name).tracking_uri, name, action)


def _keys(args: argparse.Namespace) -> tuple[Signer, Trust]:
    """The caller's signing key and the trust file (before any change)."""
    return find_signer(args.signing_key), find_trust(args.trust_file)


def cmd_promote(args: argparse.Namespace) -> int:
    names = target_models(args)
    require_all(args, names, "promote")
    signer, trust = _keys(args)
    evidence = _evidence(args)
    outcomes: dict[str, str] = {}
    for name in names:
        if len(names) > 1:
            log.info("-- %s", name)
        decision = run_promote(
            _tracking(args, name),
            args.metric,
            args.margin,
            args.force,
            args.reason or "",
            args.max_class_drop,
            signer=signer,
            trust=trust,
            source=_promote_source(args, name, names),
            evidence=evidence,
        )
        outcomes[name] = decision.label
    not_promoted = [name for name, label in outcomes.items() if label not in (PROMOTED, FORCED)]
    if len(names) > 1:
        log.info("%d of %d site models promoted%s", len(names) - len(not_promoted), len(names), _refused(not_promoted))
    return promote_exit_code(outcomes.values())


def promote_exit_code(labels) -> int:
    """0 when every model was promoted (or forced); 1 when any was refused; else 7 when any
    could not be decided (insufficient evidence)."""
    labels = set(labels)
    if REFUSED in labels:
        return EXIT_REFUSED
    return EXIT_INSUFFICIENT if INSUFFICIENT in labels else 0


def _evidence(args: argparse.Namespace) -> PowerConfig:
    """The gate's level and power from ``--alpha``, ``--power`` and ``--effect`` (their ranges checked by argparse)."""
    return PowerConfig(alpha=args.alpha, power=args.power, effect=args.effect)


def _promote_source(args: argparse.Namespace, name: str, names: list[str]) -> str:
    """Where promote reads the frozen test records: ``--source`` (one model only), else "" (the
    challenger's run's source)."""
    if args.source and len(names) > 1:
        raise ParameterError("--source names one model's data: promote one --site at a time with it")
    return args.source or ""


def _refused(names: list[str]) -> str:
    return f"; not promoted: {', '.join(names)}" if names else ""


def cmd_rollback(args: argparse.Namespace) -> int:
    names = target_models(args)
    require_all(args, names, "roll back")
    signer, trust = _keys(args)
    for name in names:
        client = _tracking(args, name).client()
        result = rollback(client, name, reason=args.reason or "", signer=signer, trust=trust)  # RegistryError: exit 2
        log_decision_card(client, name, trust)
        log.info("%s: champion is v%s again (was v%s)", name, result.restored, result.replaced)
    return 0


def _check_device(device: str) -> None:
    """``--device cuda`` on a machine whose torch sees no GPU: one line, before any download."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise ParameterError(f"--device cuda: no CUDA device visible (torch {torch.__version__}, {build} build)")


CHAMPION_URI = re.compile(r"^models:/(?P<name>[^/@]+)@champion$")
VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)$")


def verified_uri(client, uri: str, trust: Trust) -> tuple[str, Verification | None]:
    """``models:/NAME@champion`` -> ``models:/NAME/<the verified champion>`` (AuditMismatchError,
    exit 1, when the log is broken or the alias is not the signed champion); ``models:/NAME/V``
    as given once NAME's log is not broken (a moved alias does not concern a pinned version);
    with the verification (None for any other URI)."""
    match = CHAMPION_URI.match(uri) or VERSION_URI.match(uri)
    if match is None:
        return uri, None
    (result,) = verify(client, trust, [match["name"]])
    if "version" in match.groupdict():
        if result.broken:  # a pinned version is answered with what the log says of it (its calibration)
            require_verified([result])
        return uri, result
    return f"models:/{match['name']}/{champion_of(result)}", result


def verified_champion(client, name: str, trust: Trust) -> str:
    """The version of ``name`` that its last valid signed decision made champion
    (AuditMismatchError, exit 1, when the log is broken or the alias was moved; RegistryError
    when no decision made one)."""
    (result,) = verify(client, trust, [name])
    return champion_of(result)


def champion_of(result: Verification) -> str:
    require_verified([result])
    if result.expected_version is None:
        raise RegistryError(f"model {result.model!r} has no {CHAMPION}: no signed decision made one (`cessl promote`)")
    return result.expected_version


def registry_calibration(result: Verification | None, uri: str, classes: list[str]):
    """The signed calibration that the verified log ``result`` holds for the ``models:/NAME/V``
    version ``uri`` (:mod:`pipeline.registry.calibration`), or None (not calibrated, not a version)."""
    from pipeline.registry.calibration import calibration_of

    match = VERSION_URI.match(uri)
    if match is None or result is None:
        return None
    calibration = calibration_of(result.entries, match["version"], list(classes))
    if calibration is not None:
        log.info("%s v%s: answering with its signed calibration", match["name"], match["version"])
    return calibration


def _read_calibration(path: str):
    """The ``--calibration`` file (``ml.eval.calibration``) through the one safe reader; BadFileError
    (one line naming it) when it is not a usable calibration."""
    from ml.errors import BadFileError
    from ml.eval.calibration import CalibrationSet
    from pipeline.core.files import read_text

    text = read_text(path)  # a regular file of at most 1 MiB of UTF-8 text, else one line naming it
    try:
        return CalibrationSet.from_json(text)
    except (ValueError, KeyError, TypeError) as err:
        raise BadFileError(f"{path}: not a usable calibration.json ({err})") from err


def _check_calibration(path: str, calibration, classes: list[str]) -> None:
    from ml.errors import BadFileError

    if calibration.codes != list(classes):
        raise BadFileError(f"{path}: calibrated for classes {calibration.codes}, the model predicts {list(classes)}")


def cmd_predict(args: argparse.Namespace) -> int:
    from ml.eval.predictor import OK
    from pipeline.registry.pyfunc_model import load_predictor

    _check_device(args.device)
    calibration = _read_calibration(args.calibration) if args.calibration else None  # before any load
    tracking = _tracking(args)
    client, trust = tracking.client(), find_trust(args.trust_file)
    uri, verification = verified_uri(client, args.model, trust)
    predictor = load_predictor(uri, tracking_uri=tracking.tracking_uri)
    predictor.device, predictor.precision = args.device, args.precision
    if calibration is not None:
        _check_calibration(args.calibration, calibration, predictor.classes)
        predictor.calibration = calibration
    else:
        predictor.calibration = registry_calibration(verification, uri, predictor.classes)
    table = predictor.predict_records([Path(r) for r in args.records])  # unreadable: status and reason; notes
    bad = table[table["status"] != OK]
    if len(bad):
        log.warning(
            "%d of %d records are unreadable, answered without diagnoses (see the status and reason columns): %s",
            len(bad),
            len(table),
            ", ".join(bad["record"]),
        )
    for record, note in zip(table["record"], table["notes"], strict=True):
        if note:  # predicted, but the reader of its diagnoses should know (leads not recorded)
            log.warning("%s: %s (see the notes column)", record, note)
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


def _table(title: str, columns: tuple[str, ...], rows: list[dict], console=None) -> None:
    """A table at the console's width; blocks of fields where it would not fit (IDs whole)."""
    from rich.console import Console

    from pipeline.cli.render import print_records

    print_records(console or Console(), title, columns, rows)


def _numbers(metrics: dict) -> str:
    keys = (
        "challenger_value",
        "champion_value",
        "estimate",
        "ci_low",
        "ci_high",
        "margin",
        "n_records",
        "required_records",
        "attempt",
        "alpha",
    )
    shown = {k: metrics[k] for k in keys if metrics.get(k) is not None}
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def cmd_models(args: argparse.Namespace) -> int:
    client = _tracking(args, args.name or "").client()
    trust = find_trust(args.trust_file)
    if args.name:
        client.get_registered_model(args.name)  # an unknown name: RESOURCE_DOES_NOT_EXIST, exit 2
    if not args.name:
        _table("registered models", ("name", "aliases", "latest_version"), describe_models(client))
        require_verified(verify(client, trust))
        return 0
    _show_model(client, args)
    require_verified(verify(client, trust, [args.name]))
    return 0


def _show_model(client, args: argparse.Namespace) -> None:
    if args.history:
        rows = [
            {
                "#": e.seq,
                "when": e.at,
                "who": e.who,
                "signed": "yes" if e.signature else "-",
                "action": e.action,
                "versions": ", ".join(f"{k}=v{v}" for k, v in e.versions.items()),
                "numbers": _numbers(e.metrics),
                "reason": e.reason,
            }
            for e in history(client, args.name)
        ]
        log_columns = ("#", "when", "who", "signed", "action", "versions", "numbers", "reason")
        _table(f"{args.name}: audit log", log_columns, rows)
        return
    columns = ("version", "aliases", "method", "data_version", "decision", "macro_f_beta")
    _table(args.name, columns, describe_versions(client, args.name))


def target_flags(parser: argparse.ArgumentParser) -> None:
    """The models a registry verb acts on (:func:`target_models`): ``NAME``, or sites of a network."""
    parser.add_argument(
        "name",
        nargs="?",
        default="",
        type=optional(registered_model),
        help="registered model name (with --site: the network's base name)",
    )
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="SITE",
        help="a site of the network: acts on <name>-<site> (repeatable; name defaults to cessl-ecg)",
    )
    parser.add_argument("--all-sites", action="store_true", help="every site of the registry file (--sites)")
    parser.add_argument(
        "--sites",
        type=optional(as_text(existing_file)),
        default="",
        help="site registry file (default: ./sites.yaml)",
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    tracking_flag = add_tracking_uri_flag

    pr = subparsers.add_parser("promote", help="move 'champion' to the challenger if it beats the champion")
    target_flags(pr)
    pr.add_argument(
        "--metric", default="macro_f_beta", choices=GATE_METRICS, help="test metric of the gate (default: %(default)s)"
    )
    pr.add_argument(
        "--margin",
        type=non_negative_float,
        default=0.0,
        help="the lower bound of the interval of challenger - champion must exceed it (>= 0; default: %(default)s)",
    )
    pr.add_argument(
        "--alpha",
        type=number(float, exclusive_minimum=0, exclusive_maximum=0.5, name="alpha"),
        default=PowerConfig.alpha,
        help="one-sided level over all attempts on one frozen test set; attempt k is tested at alpha/2^k "
        "(default: %(default)s)",
    )
    pr.add_argument(
        "--effect",
        type=positive_float,
        default=PowerConfig.effect,
        help="the improvement above the margin the frozen test set must be able to detect; fewer records than "
        "that needs: insufficient evidence, exit 7 (default: %(default)s)",
    )
    pr.add_argument(
        "--power",
        type=number(float, minimum=0.5, exclusive_maximum=1, name="power"),
        default=PowerConfig.power,
        help="probability of detecting an improvement of --effect (default: %(default)s)",
    )
    pr.add_argument(
        "--max-class-drop",
        type=non_negative_float,
        default=GateConfig.max_class_drop,
        help="largest allowed F-beta2 drop of any scored class (default: %(default)s)",
    )
    pr.add_argument(
        "--source",
        default="",
        help="the data holding the frozen test records (folder or s3://; default: the challenger's run's source)",
    )
    pr.add_argument(
        "--force",
        action="store_true",
        help="promote even if the statistics refuse (needs --reason; never a missing/altered model or a baseline)",
    )
    pr.add_argument(
        "--reason",
        default="",
        help="why (required with --force; recorded with the authenticated MLflow user, or locally $CESSL_USER / the OS user)",
    )
    signing_flags(pr)
    tracking_flag(pr)
    pr.set_defaults(func=cmd_promote)

    rb = subparsers.add_parser("rollback", help="restore the previous champion")
    target_flags(rb)
    rb.set_defaults(force=False)
    rb.add_argument("--reason", default="", help="why (recorded in the audit log)")
    signing_flags(rb)
    tracking_flag(rb)
    rb.set_defaults(func=cmd_rollback)

    pd_ = subparsers.add_parser("predict", help="predict diagnoses of WFDB records with a registered model")
    pd_.add_argument("--model", type=model_uri, required=True, help="model URI, e.g. models:/cessl-ecg@champion")
    pd_.add_argument("records", nargs="+", help="WFDB records (path with or without .hea)")
    pd_.add_argument("-o", "--output", type=as_text(output_file), default=None, help="output file (default: stdout)")
    pd_.add_argument("--format", choices=("csv", "json"), default=None, help="default: from -o's suffix, else csv")
    pd_.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where to predict (auto: a GPU if any)"
    )
    pd_.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help="fp32, bf16 (autocast) or auto (bf16 where the device has it); the probabilities stay float32",
    )
    pd_.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",  # read by pipeline.core.files (regular file, size cap): one line naming it otherwise
        help="calibration.json (ml.eval.calibration): present / absent / refer answers, a refer column",
    )
    add_trust_flag(pd_)
    tracking_flag(pd_)
    pd_.set_defaults(func=cmd_predict)

    md = subparsers.add_parser("models", help="registered models and aliases; a model's versions or audit log")
    md.add_argument(
        "name",
        nargs="?",
        type=optional(registered_model),
        default="",
        help="a registered model (default: list every model)",
    )
    md.add_argument("--history", action="store_true", help="the model's audit log of registry decisions, oldest first")
    add_trust_flag(md)
    tracking_flag(md)
    md.set_defaults(func=cmd_models)
