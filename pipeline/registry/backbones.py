"""Backbones in the MLflow model registry.

A backbone folder (``ml.model.pretrained``: ``backbone.safetensors`` +
``backbone_config.json``) becomes one MLflow run in the experiment ``cessl-backbones``
(its files as artifacts under ``backbone/``, the config as parameters) and one version of
the registered model ``cessl-backbone-<config>`` whose source is that artifact folder.
Version tags: ``identity`` (the sha256 every adapter records as its ``backbone_id``),
``config``, ``data_version``, ``source``, ``num_classes``.

Registering the same weights twice returns the existing version (matched by identity).
:func:`fetch_backbone` downloads a version (``models:/cessl-backbone-tiny/3``,
``models:/cessl-backbone-tiny@alias``, or just the model name for its newest version) and
verifies it; :func:`find_backbone` looks a version up by identity, e.g. to find the exact
backbone an adapter was trained on.

Tracking URI: the argument, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
(:class:`pipeline.registry.tracking.TrackingConfig`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.registry.store import TrackingConfig, ensure_experiment

log = logging.getLogger(__name__)

BACKBONE_EXPERIMENT = "cessl-backbones"
MODEL_PREFIX = "cessl-backbone-"
ARTIFACT_PATH = "backbone"
TAG_KIND = "kind"
TAG_IDENTITY = "identity"


def backbone_model_name(config_name: str) -> str:
    """Registered-model name of a backbone size: ``cessl-backbone-<config>``."""
    return f"{MODEL_PREFIX}{config_name}"


@dataclass(frozen=True)
class BackboneRegistration:
    """Where a backbone went in the registry."""

    model_name: str
    version: str
    run_id: str
    identity: str
    tracking_uri: str
    reused: bool = False  # the same weights were registered before

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


def _tracking(tracking_uri: str, model_name: str) -> TrackingConfig:
    return TrackingConfig.resolve(tracking_uri, BACKBONE_EXPERIMENT, model_name)


def _versions_with_identity(client, identity: str, model_name: str | None = None) -> list:
    from mlflow.exceptions import MlflowException

    query = f"tags.{TAG_IDENTITY} = '{identity}'"
    if model_name:
        query = f"name = '{model_name}' and {query}"
    try:
        versions = client.search_model_versions(query)
    except MlflowException:  # stores that cannot filter on tags: filter here
        versions = [
            v
            for v in client.search_model_versions(f"name = '{model_name}'" if model_name else "")
            if v.tags.get(TAG_IDENTITY) == identity
        ]
    if not model_name:  # any backbone model, not an adapter model that happens to carry the tag
        versions = [v for v in versions if v.tags.get(TAG_KIND) == "backbone"]
    return sorted(versions, key=lambda v: int(v.version))


def _tag(value: Any) -> str:
    return "" if value is None else str(value)


def register_backbone(
    backbone_dir: str | Path,
    *,
    tracking_uri: str = "",
    model_name: str | None = None,
    alias: str | None = None,
    run_name: str | None = None,
) -> BackboneRegistration:
    """Log ``backbone_dir`` as a run and register it as a version of ``cessl-backbone-<config>``.

    The folder is verified first (identity and shapes). Idempotent: weights already
    registered under that model name (same identity) give back the existing version.
    ``alias`` (e.g. ``default``) is pointed at the version in both cases.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from ml.model.pretrained import read_backbone

    backbone_dir = Path(backbone_dir)
    backbone = read_backbone(backbone_dir)
    config, meta = backbone.config, backbone.meta
    identity = meta["identity"]
    name = model_name or backbone_model_name(config.name)
    tracking = _tracking(tracking_uri, name)
    client = tracking.client()
    tags = {
        TAG_KIND: "backbone",
        TAG_IDENTITY: identity,
        "config": config.name,
        "data_version": _tag(meta.get("data_version")),
        "source": _tag(meta.get("source")),
        "num_classes": str(config.num_classes),
    }

    existing = _versions_with_identity(client, identity, name)
    if existing:
        version = existing[0]
        log.info("backbone %s is already registered as %s v%s", identity[:12], name, version.version)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
        return BackboneRegistration(
            name, str(version.version), version.run_id or "", identity, tracking.tracking_uri, reused=True
        )

    tracking.activate()
    experiment_id = ensure_experiment(tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"backbone-{config.name}") as run:
        mlflow.log_params({f"backbone.{k}": v for k, v in meta["config"].items()})
        mlflow.log_params(
            {
                "classes": json.dumps(meta["classes"])[:6000],
                "source": _tag(meta.get("source")),
                "data_version": _tag(meta.get("data_version")),
            }
        )
        mlflow.set_tags(tags)
        for step, loss in (meta.get("training") or {}).get("losses", []):
            mlflow.log_metric("pretrain_loss", float(loss), step=int(step))
        mlflow.log_artifacts(str(backbone_dir), artifact_path=ARTIFACT_PATH)
        source = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
        run_id = run.info.run_id
    try:
        client.create_registered_model(
            name, tags={TAG_KIND: "backbone"}, description=f"CE-SSL pre-trained backbones of size {config.name}"
        )
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags=tags, description=f"{meta.get('source')} backbone, identity {identity}"
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    log.info("registered backbone %s as %s v%s (run %s)", identity[:12], name, version.version, run_id)
    return BackboneRegistration(name, str(version.version), run_id, identity, tracking.tracking_uri)


def find_backbone(identity: str, *, tracking_uri: str = "") -> tuple[str, str] | None:
    """(model name, version) of the registered backbone with this identity, or None."""
    client = _tracking(tracking_uri, "").client()
    versions = _versions_with_identity(client, identity)
    return (versions[0].name, str(versions[0].version)) if versions else None


def _model_uri(spec: str) -> str:
    if spec.startswith("models:/"):
        return spec
    if spec.startswith(MODEL_PREFIX) and "/" not in spec and "@" not in spec:
        return spec  # resolved to the newest version by fetch_backbone
    return f"models:/{spec}"


def fetch_backbone(spec: str, out_dir: str | Path, *, tracking_uri: str = "") -> Path:
    """Download a registered backbone into ``out_dir`` and verify it; returns ``out_dir``.

    ``spec``: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``<name>/<version>``
    or a bare ``cessl-backbone-<config>`` (its newest version).
    """
    import mlflow

    from ml.model.pretrained import read_backbone

    tracking = _tracking(tracking_uri, "")
    tracking.activate()  # models:/ URIs resolve through the registry URI
    uri = _model_uri(spec)
    if not uri.startswith("models:/"):
        versions = tracking.client().search_model_versions(f"name = '{uri}'")
        if not versions:
            raise ValueError(f"no registered backbone named {uri!r} in {tracking.tracking_uri}")
        uri = f"models:/{uri}/{max(int(v.version) for v in versions)}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out_dir), tracking_uri=tracking.tracking_uri)
    )
    read_backbone(local)  # identity and shapes
    log.info("fetched %s into %s", uri, local)
    return local
