"""``cessl serve``: the hospital network's champions over HTTP (KServe, Open Inference Protocol v2).

One process, one backbone in memory, one adapter per site switched in per request (see
:mod:`pipeline.serving.server`). Sites come from ``--sites sites.yaml`` and/or ``--site NAME``;
site ``S`` answers with the ``champion`` of the registered model ``<--model-name>-S``::

    cessl serve --sites sites.yaml --tracking-uri http://mlflow:5000 --port 8080
    curl -s localhost:8080/v2/models/hospital-a/infer -H 'content-type: application/json' \\
      -d '{"inputs": [{"name": "signals", "datatype": "FP32", "shape": [1, 12, 5000], "data": [...]}]}'
"""

from __future__ import annotations

import argparse
import logging

from pipeline.core.constraints import model_name_problem, number, positive_float, positive_int, tracking_uri
from pipeline.registry.policy import DEFAULT_MODEL_NAME
from pipeline.registry.store import TRACKING_URI_ENV

log = logging.getLogger(__name__)

port = number(int, minimum=1, maximum=65535, name="port")
non_negative_seconds = number(float, minimum=0, name="seconds")


def model_name(text: str) -> str:
    problem = model_name_problem(text) or (None if text else "must not be empty")
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def site_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The sites of ``--sites FILE`` then ``--site NAME`` flags, each once, in that order."""
    from pipeline.core.sites import check_site_name, load_sites

    names: list[str] = []
    if args.sites:
        names += load_sites(args.sites).names
    for name in args.site or []:
        names.append(check_site_name(name))
    return tuple(dict.fromkeys(names))


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.cli.preflight import check_tracking
    from pipeline.serving.server import ServeConfig, check_bindable, serve

    config = ServeConfig(
        sites=site_names(args),
        tracking_uri=args.tracking_uri,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        max_adapters=args.max_adapters,
        refresh_seconds=args.refresh_seconds,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_records=args.max_records,
        batch_window_ms=args.batch_window_ms,
        max_batch_records=args.max_batch_records,
        max_queue=args.max_queue,
        mixed_batches=args.mixed_batches,
    )
    check_bindable(config.host, config.port)  # before the registry and any model
    check_tracking(args.tracking_uri, writes=False)
    serve(config)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve every site's champion from one process (KServe, Open Inference Protocol v2)",
        description=(
            "One backbone in memory, one adapter per site (LRU, unmerged). POST /v2/models/SITE/infer "
            "(or SITE:VERSION) with a 'signals' FP32 [n, 12, samples] tensor (parameter sample_rate, "
            "default 500 Hz) or 'records' BYTES [n, 2] (WFDB header, base64 signal file)."
        ),
    )
    p.add_argument("--sites", default="", help="site registry file (sites.yaml) whose sites to serve")
    p.add_argument("--site", action="append", metavar="NAME", help="a site to serve (repeatable; adds to --sites)")
    p.add_argument(
        "--model-name",
        type=model_name,
        default=DEFAULT_MODEL_NAME,
        help="base registered model name; site S is <model-name>-S (default: %(default)s)",
    )
    p.add_argument(
        "--tracking-uri",
        type=tracking_uri,
        default="",
        help=f"MLflow tracking/registry URI (default: ${TRACKING_URI_ENV} or sqlite:///./mlflow.db)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port, default=8080, help="HTTP port (default: %(default)s)")
    p.add_argument(
        "--max-adapters", type=positive_int, default=32, help="adapters kept in memory, LRU (default: %(default)s)"
    )
    p.add_argument(
        "--refresh-seconds",
        type=non_negative_seconds,
        default=30.0,
        help="re-resolve the champion aliases when older than this (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-mb", type=positive_float, default=64.0, help="largest request body, MiB (default: %(default)s)"
    )
    p.add_argument("--max-records", type=positive_int, default=256, help="records per request (default: %(default)s)")
    p.add_argument(
        "--batch-window-ms",
        type=number(float, minimum=0, maximum=1000, name="milliseconds"),
        default=5.0,
        help="how long a request waits for others (any site) to share its forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch-records",
        type=positive_int,
        default=64,
        help="records of one batched forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests admitted at once; more are answered 429 (default: %(default)s)",
    )
    p.add_argument(
        "--mixed-batches",
        choices=("by-site", "one-pass"),
        default="by-site",
        help="a batch of several sites' records: each site's through its adapter (by-site: faster on CPU, "
        "bench/RESULTS.md) or all in one multi-site forward pass (one-pass) (default: %(default)s)",
    )
    p.set_defaults(func=cmd_serve)
