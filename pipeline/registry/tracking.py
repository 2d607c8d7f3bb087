"""MLflow tracking glue: where runs go, and logging one pipeline run.

:func:`log_and_register` takes the register step's :class:`components.register.Registration`
bundle and writes one MLflow run: parameters, the data version (DVC md5 + git commit),
the rank map, training curves (step metrics), test metrics, the per-class table, ROC/PR
plots, and the adapter as a registered pyfunc model version of the *candidates* model
(:func:`candidates_model_name`: the pipeline never writes a production model) with the sha256
digests of its backbone and adapter folders (:func:`model_digests`, version tags
:data:`TAG_DIGEST_BACKBONE` / :data:`TAG_DIGEST_ADAPTER`: ``cessl promote`` checks the
artifacts it loads against them), and, for a production method only, the alias
``challenger``. It only logs what it is given: when the ``score_champion`` step scored the
current champion on this run's test split, the bundle carries those numbers and they are
logged as ``champion_test_*`` metrics (with the ``compared_champion_*`` tags) for the run's
report; ``cessl promote`` never reads them (it recomputes, ``pipeline.registry.evidence``).

Local default: a SQLite store ``sqlite:///<cwd>/mlflow.db`` with artifacts in
``<cwd>/mlruns``; on a cluster ``MLFLOW_TRACKING_URI`` (or the pipeline parameter) names a
tracking server. Credentials only ever come from the environment and are never logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.registry.store import TrackingConfig, ensure_experiment

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
TEST_PREFIX = "test_"
CHAMPION_PREFIX = "champion_test_"
GATE_PREFIX = "gate_"  # paired bootstrap of challenger - champion on the same records
# Version tags read back by the registry (promotion compares only on the same test split).
TAG_TEST_SPLIT = "test_split_hash"
TAG_FINGERPRINT = "pipeline_fingerprint"
TAG_RUN_ID = "run_id"
TAG_COMPARED_CHAMPION = "compared_champion_version"
TAG_COMPARED_CHAMPION_SPLIT = "compared_champion_test_split_hash"
TAG_DUPLICATE_OF = "cessl.duplicate_of"  # a run that lost a registration race (deleted)
TAG_METHOD = "method"
# sha256 (components.common.sha256_dir) of the model's backbone/ and adapter/ folders, set at
# registration; copied with the version into the production model by `cessl promote`.
TAG_DIGEST_BACKBONE = "cessl.digest.backbone"
TAG_DIGEST_ADAPTER = "cessl.digest.adapter"
TAG_SOURCE_CANDIDATE = "cessl.source_candidate"  # production version: "<candidates model>/<version>"
CANDIDATES_SUFFIX = "-candidates"
_METRIC_BATCH = 900  # MLflow's log_batch takes at most 1000 metrics per call


# --------------------------------------------------------------------------- where versions go


def candidates_model_name(model_name: str) -> str:
    """The registered model the pipeline registers into for ``model_name``: ``<model>-candidates``.

    The production model ``model_name`` itself only ever receives versions that ``cessl
    promote`` copied there (a release manager's ``MANAGE``); the pipeline holds ``EDIT`` on
    the candidates model and ``READ`` on the production one (``cessl access init``)."""
    return model_name if model_name.endswith(CANDIDATES_SUFFIX) else model_name + CANDIDATES_SUFFIX


def production_model_name(model_name: str) -> str:
    """The production model whose candidates ``model_name`` holds (``model_name`` itself otherwise)."""
    return model_name.removesuffix(CANDIDATES_SUFFIX) if model_name.endswith(CANDIDATES_SUFFIX) else model_name


def is_production_method(method: str) -> bool:
    """Whether ``method`` is a registered training method marked ``production``."""
    from ml.train.methods import METHODS

    entry = METHODS.get(method)
    return bool(entry is not None and entry.production)


def tagged_classes(version) -> list[str]:
    """A model version's classes as its ``classes`` tag lists them (SNOMED codes, the register
    step's comma-joined order); [] when it has none."""
    return [c for c in str((version.tags or {}).get("classes", "")).split(",") if c]


def model_digests(backbone_dir: Path, adapter_dir: Path) -> dict[str, str]:
    """The version tags naming the sha256 digests of a model's backbone and adapter folders."""
    from components.common import sha256_dir

    return {TAG_DIGEST_BACKBONE: sha256_dir(Path(backbone_dir)), TAG_DIGEST_ADAPTER: sha256_dir(Path(adapter_dir))}


# --------------------------------------------------------------------------- logging a run


@dataclass
class RegistrationResult:
    """What :func:`log_and_register` did."""

    model_name: str
    version: str
    run_id: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    reused: bool = False  # an identical run was registered before: nothing new was written

    def markdown(self) -> str:
        lines = [
            f"# Registered `{self.model_name}` version {self.version}",
            "",
            f"- MLflow run: `{self.run_id}` ({_redact(self.tracking_uri)})",
            f"- alias: `{CHALLENGER}`" + (" (reused an identical earlier registration)" if self.reused else ""),
        ]
        if self.champion_version:
            lines.append(f"- champion v{self.champion_version} scored on the same test split")
        lines += ["", "| metric | challenger | champion |", "|---|---|---|"]
        for key, value in sorted(self.metrics.items()):
            champ = self.champion_metrics.get(key)
            lines.append(f"| {key} | {value:.4f} | {'' if champ is None else f'{champ:.4f}'} |")
        return "\n".join(lines) + "\n"


def _redact(uri: str) -> str:
    """A URI without user:password."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _metric_batches(curves: Iterable[Mapping[str, float]], timestamp_ms: int) -> Iterable[list]:
    from mlflow.entities import Metric

    batch: list = []
    for record in curves:
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            batch.append(Metric(key=key, value=float(value), timestamp=timestamp_ms, step=step))
            if len(batch) >= _METRIC_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def log_curves(client, run_id: str, curves: Sequence[Mapping[str, float]]) -> int:
    """Training curves as step metrics; returns the number of points logged."""
    now = int(time.time() * 1000)
    n = 0
    for batch in _metric_batches(curves, now):
        client.log_batch(run_id, metrics=batch)
        n += len(batch)
    return n


def log_files(files: Mapping[str, Path]) -> None:
    """Attach local files to the active run under the given run paths (``folder/name``)."""
    import shutil
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="cessl-artifacts-") as tmp:
        for run_path, local in files.items():
            folder, _, _ = run_path.rpartition("/")
            staged = Path(tmp) / run_path
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, staged)
            mlflow.log_artifact(str(staged), artifact_path=folder or None)


def registered_versions(client, model_name: str, fingerprint: str) -> list:
    """Every model version registered from exactly these inputs (``pipeline_fingerprint`` tag),
    lowest version first."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}' and tags.{TAG_FINGERPRINT} = '{fingerprint}'")
    except MlflowException:  # some stores cannot filter on tags: filter here
        versions = client.search_model_versions(f"name = '{model_name}'")
    mine = [v for v in versions if (v.tags or {}).get(TAG_FINGERPRINT) == fingerprint]
    return sorted(mine, key=lambda v: int(v.version))


def find_registered(client, model_name: str, fingerprint: str):
    """The model version registered earlier from exactly these inputs (the lowest), if any."""
    versions = registered_versions(client, model_name, fingerprint)
    return versions[0] if versions else None


def claim_registration(client, model_name: str, fingerprint: str, version: str):
    """Settle a race between registrations of one fingerprint: the lowest version wins.

    Called right after ``version`` was created *with* its fingerprint tag (one transaction:
    the tag is there the moment the version exists). A store numbers a model's versions in
    creation order (``max + 1`` inside the creating transaction), so every version of this
    fingerprint with a lower number already exists and is visible now: each contender sees
    the same lowest version, exactly one of them finds it is its own. Returns the winner
    (``version`` itself when this registration won).
    """
    versions = registered_versions(client, model_name, fingerprint)
    if not versions:  # a store that filters nothing out yet: this one is the only one seen
        return client.get_model_version(model_name, version)
    return versions[0]


def register_version(model_uri: str, model_name: str, tags: Mapping[str, str]):
    """Create a model version of ``model_uri`` with ``tags`` set at creation (the fingerprint
    among them, which :func:`claim_registration` relies on)."""
    import mlflow

    return mlflow.register_model(model_uri, model_name, tags=dict(tags))


def _withdraw(client, model_name: str, version: str, run_id: str, winner) -> None:
    """The loser of a registration race: its version is deleted and its run marked and deleted,
    so one registration of the fingerprint remains.

    On an authenticated registry the pipeline identity may not delete versions of a
    production model (MANAGE, ``cessl access init``): the version then stays, tagged
    ``cessl.duplicate_of`` (the lowest version of the fingerprint still wins every lookup).
    """
    from mlflow.exceptions import MlflowException

    duplicate_of = f"{model_name}/{winner.version}"
    try:
        client.delete_model_version(model_name, version)
    except MlflowException as err:
        if err.error_code != "PERMISSION_DENIED":
            raise
        log.warning(
            "%s version %s duplicates %s; not allowed to delete it: tagged instead", model_name, version, duplicate_of
        )
        client.set_model_version_tag(model_name, version, TAG_DUPLICATE_OF, duplicate_of)
    client.set_tag(run_id, TAG_DUPLICATE_OF, duplicate_of)
    client.delete_run(run_id)


def current_alias(client, model_name: str, alias: str):
    """The model version holding ``alias``, or None (also when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _reused(client, config: TrackingConfig, existing) -> RegistrationResult:
    run = client.get_run(existing.run_id)
    metrics = {k.removeprefix(TEST_PREFIX): v for k, v in run.data.metrics.items() if k.startswith(TEST_PREFIX)}
    return RegistrationResult(
        config.model_name, str(existing.version), existing.run_id, config.tracking_uri, metrics=metrics, reused=True
    )


def log_and_register(bundle, config: TrackingConfig, lineage: Mapping[str, str] | None = None) -> RegistrationResult:
    """Log ``bundle`` (a :class:`components.register.Registration`) as one run and register it.

    ``config.model_name`` is the registration target (the candidates model,
    :func:`candidates_model_name`). The version carries the digests of its backbone and
    adapter (:func:`model_digests`); ``challenger`` moves to it only when it was trained with
    a production method (a baseline is registered, never a challenger).

    ``lineage``: run tags saying where the run came from (``pipeline.registry.lineage.lineage_tags``:
    ``mlflow.source.git.commit``, ``kfp.run_id``, ``kfp.pipeline_name``...); the data is
    recorded as a dataset input (source = the bundle's ``source`` parameter, digest = its
    data version). One fingerprint is registered once, even by concurrent registrations
    (:func:`claim_registration`): a run that loses the race withdraws its version and run and
    reports the winner's, as a reuse.
    """
    import mlflow

    from pipeline.registry.lineage import log_data_input
    from pipeline.registry.pyfunc_model import log_adapter_model

    config.activate()
    client = config.client()
    existing = find_registered(client, config.model_name, bundle.fingerprint)
    if existing is not None:
        log.info(
            "inputs identical to %s v%s (fingerprint %s): not registering again",
            config.model_name,
            existing.version,
            bundle.fingerprint[:12],
        )
        return _reused(client, config, existing)
    lineage = dict(lineage or {})

    experiment_id = ensure_experiment(config)
    champion = bundle.champion
    champion_version = champion.version if champion is not None and champion.scored else None
    champion_metrics = dict(champion.metrics) if champion_version is not None else {}
    with mlflow.start_run(experiment_id=experiment_id, run_name=bundle.run_name) as run:
        run_id = run.info.run_id
        mlflow.log_params({k: param_value(v) for k, v in bundle.params.items()})
        mlflow.set_tags({**bundle.tags, **lineage, TAG_FINGERPRINT: bundle.fingerprint})
        log_data_input(str(bundle.params.get("source", "")), bundle.data_version)
        mlflow.log_metrics({f"{TEST_PREFIX}{k}": v for k, v in bundle.test_metrics.items()})
        if champion_metrics:
            mlflow.log_metrics({f"{CHAMPION_PREFIX}{k}": v for k, v in champion_metrics.items()})
            mlflow.set_tags(
                {TAG_COMPARED_CHAMPION: champion_version, TAG_COMPARED_CHAMPION_SPLIT: bundle.tags[TAG_TEST_SPLIT]}
            )
        gate = dict(champion.gate) if champion_version is not None else {}
        if gate:
            mlflow.log_metrics(gate_metrics(gate))
        n_points = log_curves(client, run_id, bundle.curves)
        mlflow.log_dict(bundle.rank_map, "rank_map.json")
        mlflow.log_dict(bundle.data_info(), "data_version.json")
        log_files(bundle.artifacts)
        info = log_adapter_model(
            bundle.backbone_dir, bundle.adapter_dir, classes=bundle.classes, registered_model_name=None
        )
    version_tags = {
        **bundle.tags,
        **model_digests(bundle.backbone_dir, bundle.adapter_dir),
        **{k: v for k, v in lineage.items() if k.startswith("kfp.")},
        TAG_RUN_ID: run_id,
        TAG_FINGERPRINT: bundle.fingerprint,
        **{f"{TEST_PREFIX}{k}": f"{v:.6g}" for k, v in bundle.test_metrics.items()},
    }
    if champion_metrics:
        version_tags |= {
            TAG_COMPARED_CHAMPION: champion_version,
            TAG_COMPARED_CHAMPION_SPLIT: bundle.tags[TAG_TEST_SPLIT],
        }
    version = str(register_version(info.model_uri, config.model_name, version_tags).version)
    winner = claim_registration(client, config.model_name, bundle.fingerprint, version)
    if str(winner.version) != version:
        log.info(
            "a concurrent run registered the same inputs first (%s v%s, fingerprint %s): withdrawing v%s",
            config.model_name,
            winner.version,
            bundle.fingerprint[:12],
            version,
        )
        _withdraw(client, config.model_name, version, run_id, winner)
        return _reused(client, config, winner)
    method = str(bundle.tags.get(TAG_METHOD, ""))
    if is_production_method(method):
        previous = current_alias(client, config.model_name, CHALLENGER)
        client.set_registered_model_alias(config.model_name, CHALLENGER, version)
        _audit_challenger(client, config.model_name, version, run_id, previous, bundle.test_metrics, gate)
        role = CHALLENGER
    else:
        role = f"a {method or 'non-production'} baseline (no {CHALLENGER} alias)"
    log.info("run %s: %d curve points, registered %s v%s as %s", run_id, n_points, config.model_name, version, role)
    return RegistrationResult(
        config.model_name,
        version,
        run_id,
        config.tracking_uri,
        metrics=dict(bundle.test_metrics),
        champion_metrics=champion_metrics,
        champion_version=champion_version,
    )


def gate_metrics(gate: Mapping[str, Any]) -> dict[str, float]:
    """The paired bootstrap's numbers as run metrics: ``gate_<metric>_{estimate,ci_low,ci_high}``
    and ``gate_n_records`` (the full evidence is the ``champion/paired_bootstrap.json`` artifact)."""
    out = {"gate_n_records": float(gate["n_records"]), "gate_n_resamples": float(gate["n_resamples"])}
    for metric, interval in gate.get("intervals", {}).items():
        for key in ("estimate", "ci_low", "ci_high"):
            value = interval.get(key)
            if value is not None and value == value:  # not NaN
                out[f"{GATE_PREFIX}{metric}_{key}"] = float(value)
    return out


def _audit_challenger(
    client, model: str, version: str, run_id: str, previous, metrics: Mapping[str, float], gate: Mapping[str, Any]
) -> None:
    """The pipeline's alias move, in the model's audit log."""
    from pipeline.registry.audit import AuditEntry, record

    versions = {"challenger": version}
    if previous is not None and str(previous.version) != version:
        versions["previous_challenger"] = str(previous.version)
    numbers: dict[str, Any] = {f"{TEST_PREFIX}{k}": v for k, v in metrics.items()}
    if gate:
        numbers |= gate_metrics(gate)
    record(
        client,
        AuditEntry(
            model=model,
            action="challenger",
            versions=versions,
            reason=f"registered by pipeline run {run_id}",
            metrics=numbers,
        ),
    )


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a parameter value
