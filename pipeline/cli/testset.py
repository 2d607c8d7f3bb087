"""``cessl testset show | refresh | export``: a registered model's frozen evaluation set.

- ``show MODEL``: the current version, its status, size, classes, md5, who froze it, when and
  why, and the earlier versions.
- ``refresh MODEL --reason TEXT``: the only way the set changes (e.g. new classes): records a
  new version, pending until the next run draws it from records no past champion trained
  on (by id and by content hash) and freezes it; who and why go to the registry tag and the audit log. The next
  promotion then needs a challenger (and the champion) scored on the new set.
- ``export MODEL``: the frozen set as ``testsets/<MODEL>.json`` (``dvc add``ed where the
  project uses DVC); ``cessl run`` does it after every run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.core.constraints import add_tracking_uri_flag, existing_dir, non_empty, registered_model

log = logging.getLogger(__name__)
# pipeline.registry.testsets (numpy) is imported by each verb when it runs: not at start-up.


def _client(args: argparse.Namespace):
    """The registry's client, once its store exists and answers (``preflight.registry_tracking``:
    the same check as every registry command; a test-set verb never creates a store). A
    production model's name is taken to mean its candidates model, which holds the frozen
    test set the pipeline froze (``args.name`` is set to it)."""
    from pipeline.cli.preflight import registry_tracking
    from pipeline.registry.testsets import current
    from pipeline.registry.tracking import candidates_model_name

    client = registry_tracking(args.tracking_uri, args.name).client()
    if current(client, args.name) is None and current(client, candidates_model_name(args.name)) is not None:
        args.name = candidates_model_name(args.name)
    return client


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.registry.testsets import TestSetError, current, history

    client = _client(args)
    pointer = current(client, args.name)
    if pointer is None:
        raise TestSetError(f"model {args.name!r} has no frozen test set (its first registration freezes one)")
    lines = [
        f"model          {args.name}",
        f"version        {pointer.version} ({pointer.status})",
    ]
    if pointer.status == "redraw":
        lines.append("               pending: the next run draws it from records the champion did not train on")
    else:
        lines += [
            f"records        {pointer.n_records}",
            f"classes        {len(pointer.classes)}: {', '.join(pointer.classes)}",
            f"md5            {pointer.md5}",
            f"frozen by run  {pointer.run_id}",
        ]
    lines += [
        f"created        {pointer.created_at} by {pointer.created_by}",
        f"reason         {pointer.reason}",
    ]
    past = [e for e in history(client, args.name) if e.get("version") != pointer.version]
    for entry in past:
        lines.append(
            f"earlier        v{entry['version']}: {entry.get('n_records', '?')} records, {entry.get('created_at', '')} "
            f"by {entry.get('created_by', '')} ({entry.get('reason', '')})"
        )
    print("\n".join(lines))
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from pipeline.registry.audit import history
    from pipeline.registry.policy import champion_history
    from pipeline.registry.testsets import current, refresh
    from pipeline.registry.tracking import production_model_name

    client = _client(args)
    past: list[str] = []
    production = production_model_name(args.name)
    if current(client, args.name) is not None:
        # every production version ever named champion, by the history tag or by a decision in
        # the audit log: excluding more training records from the redraw is the safe side
        decided = [e.champion["version"] for e in history(client, production) if e.champion.get("version")]
        past = sorted({*champion_history(client, production), *decided}, key=int)
    pending = refresh(client, args.name, args.reason, past_champions=past)
    print(
        f"{args.name}: test set v{pending.version} recorded (by {pending.created_by}: {pending.reason}); "
        "the next run draws and freezes it and scores the champion on it"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.registry.testsets import TestSetError, export

    path = export(_client(args), args.name, Path(args.repo), dvc=not args.no_dvc)
    if path is None:
        raise TestSetError(f"model {args.name!r} has no frozen test set to export")
    print(path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("testset", help="a registered model's frozen test set: show, refresh, export")
    sub = parser.add_subparsers(dest="testset_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", type=registered_model, help="registered model name")
        add_tracking_uri_flag(p)

    p = sub.add_parser("show", help="the current frozen test set: version, size, classes, creation")
    common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("refresh", help="record a new test-set version, drawn by the next run (needs --reason)")
    common(p)
    p.add_argument("--reason", type=non_empty, required=True, help="why (recorded with $CESSL_USER or the OS user)")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("export", help="write testsets/<model>.json (dvc add where the project uses DVC)")
    common(p)
    p.add_argument("--repo", type=existing_dir, default=".", help="project folder (default: here)")
    p.add_argument("--no-dvc", action="store_true", help="write the file only")
    p.set_defaults(func=cmd_export)
