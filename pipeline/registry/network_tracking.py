"""MLflow glue of the hospital network run (``pipeline.dags.network``): one parent run per network run.

- :func:`start_network`: the parent run (tags ``cessl.run_kind = network``, the network
  run's id ``cessl.network_id``; parameters: the sites and the choices they share). It stays
  RUNNING while the sites train; :class:`NetworkRun` (a small JSON file) is how the later
  steps find it.
- each site's register step tags its run and model version with ``site`` and
  ``cessl.network_id`` (:data:`TAG_NETWORK`); its run's name starts with the site's
  (:func:`site_run_name`).
- :func:`finish_network`: the cross-site matrix (CSV, Markdown, JSON, heat map) as artifacts
  of the parent run under ``cross_site/``, one metric per cell, the site runs made its
  children (``mlflow.parentRunId``, so the MLflow UI shows them nested under it; a run
  reused from an earlier network run keeps its first parent), status FINISHED.
- :func:`site_runs`: the registrations of one network run (what the summary reads when the
  run failed before its end).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import read_json, write_json
from pipeline.registry.compare_tracking import TAG_KIND, TAG_PARENT, find_parent_run, log_batch
from pipeline.registry.store import TrackingConfig, ensure_experiment

log = logging.getLogger(__name__)

TAG_NETWORK = "cessl.network_id"
TAG_SITE = "site"
KIND_NETWORK = "network"


@dataclass(frozen=True)
class NetworkRun:
    """The parent run, as the pipeline's steps pass it on (no endpoint or credential in it)."""

    run_id: str
    experiment_id: str
    network_id: str
    sites: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> NetworkRun:
        return cls(**read_json(path, "network run"))


def site_run_name(site: str, run_name: str) -> str:
    """A site's MLflow run name: the site first (``hospital-a-cessl-r8-1a2b3c4d``), so that the
    runs of a network tell their sites apart in the MLflow UI."""
    return f"{site}-{run_name}"


def new_network_id() -> str:
    """E.g. ``20260101-120000-1a2b3c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_network(
    config: TrackingConfig,
    network_id: str,
    sites: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> NetworkRun:
    """Create the parent run (RUNNING) with the sites and the shared parameters."""
    network_id = network_id or new_network_id()
    client = config.client()
    experiment_id = ensure_experiment(config)
    names = [str(s["name"]) for s in sites]
    run = client.create_run(
        experiment_id,
        run_name=f"network-{network_id}",
        tags={TAG_KIND: KIND_NETWORK, TAG_NETWORK: network_id, **{k: v for k, v in dict(tags or {}).items() if v}},
    )
    logged = {"sites": ",".join(names), "n_sites": len(names), **dict(params)}
    logged |= {f"site.{s['name']}.data_version": s.get("data_version", "") for s in sites}
    log_batch(client, run.info.run_id, params={k: v for k, v in logged.items() if v not in ("", None)})
    log.info("network %s: parent run %s (%s)", network_id, run.info.run_id, ", ".join(names))
    return NetworkRun(run.info.run_id, experiment_id, network_id, names)


def finish_network(
    config: TrackingConfig,
    parent: NetworkRun,
    files: Mapping[str, Path],
    cells: Sequence[Mapping[str, Any]],
    site_run_ids: Sequence[str],
) -> None:
    """Attach the matrix's files to the parent run, log its cells, nest the site runs, FINISHED."""
    client = config.client()
    for run_path, local in files.items():
        client.log_artifact(parent.run_id, str(local), artifact_path=str(Path(run_path).parent))
    metrics = {
        f"cross_site.{c['model']}.on.{c['target']}.{metric}": float(c[metric])
        for c in cells
        for name in ("challenge_score", "macro_f_beta")
        for metric in (name, f"{name}_low", f"{name}_high")  # the value and its 95% interval
        if c.get(metric) is not None and math.isfinite(float(c[metric]))
    }
    log_batch(client, parent.run_id, metrics=metrics)
    for run_id in filter(None, site_run_ids):
        run = client.get_run(run_id)
        if TAG_PARENT not in run.data.tags:  # a reused registration keeps the network run that made it
            client.set_tag(run_id, TAG_PARENT, parent.run_id)
    client.set_terminated(parent.run_id, "FINISHED")
    log.info("network %s: cross-site matrix logged to run %s", parent.network_id, parent.run_id)


def find_network(config: TrackingConfig, network_id: str):
    """The parent run of ``network_id`` (None when there is none)."""
    return find_parent_run(config, TAG_NETWORK, network_id, KIND_NETWORK)


def site_runs(config: TrackingConfig, network_id: str) -> dict[str, Any]:
    """Site -> the registration run a network run made for it (reused ones are not tagged again)."""
    experiment = config.client().get_experiment_by_name(config.experiment_name)
    if experiment is None:
        return {}
    runs = config.client().search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{TAG_NETWORK}` = '{network_id}'"
    )
    return {r.data.tags[TAG_SITE]: r for r in runs if TAG_SITE in r.data.tags}


def fail_network(config: TrackingConfig, network_id: str) -> str | None:
    """Mark the network's parent run FAILED if it is still running; its id (or None)."""
    run = find_network(config, network_id)
    if run is None or run.info.status != "RUNNING":
        return None
    config.client().set_terminated(run.info.run_id, "FAILED")
    return str(run.info.run_id)
