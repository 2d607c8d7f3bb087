"""The promotion gate's evidence, recomputed by whoever promotes: nothing the pipeline wrote is trusted.

``cessl promote`` (:func:`pipeline.registry.policy.promote`) does not read the numbers a run
logged (metrics, ``champion/paired_bootstrap.json``). It

- loads each model it compares (:func:`fetch_model`): the version's ``backbone/`` and
  ``adapter/`` artifacts are downloaded, their sha256 digests (:func:`pipeline.registry.tracking.model_digests`)
  must equal the ones recorded on the version (:data:`~pipeline.registry.tracking.TAG_DIGEST_BACKBONE`,
  :data:`~pipeline.registry.tracking.TAG_DIGEST_ADAPTER`), and the model is rebuilt with
  this checkout's code (:func:`ml.eval.predictor.load_predictor`; the code logged with the
  model is never run). A version without a loadable model, or whose artifacts do not match
  their digests, raises :class:`EvidenceError` (one line);
- reads the records of the model's frozen test set from the data (:func:`frozen_test_records`):
  each record's content hash (sha256 of its files, as ingest computes it) must equal the
  test set's; records that are gone or changed are left out and counted;
- scores both models on those records with the evaluation's code
  (:func:`components.evaluate.score_records`) and computes the paired interval (jackknife-t)
  and the per-class F-beta2 itself (:func:`components.evaluate.compare_predictions`,
  :mod:`ml.eval.bootstrap`).

Cheap on a CPU: the frozen test set is 10% of a site's labelled records, read and
preprocessed once, and predicted once per model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import CesslError
from pipeline.registry.tracking import TAG_DIGEST_ADAPTER, TAG_DIGEST_BACKBONE, TAG_METHOD, model_digests

log = logging.getLogger(__name__)

DIGEST_TAGS = {"backbone": TAG_DIGEST_BACKBONE, "adapter": TAG_DIGEST_ADAPTER}


class EvidenceError(CesslError):
    """A version cannot be judged: no loadable model, artifacts that do not match their
    digests, or no readable frozen test record (the message is one line)."""


@dataclass(frozen=True)
class LoadedModel:
    """A registered version, its artifacts checked against their digests and rebuilt."""

    name: str
    version: str
    predictor: Any  # ml.eval.predictor.Predictor
    digests: dict[str, str]  # tag -> sha256
    method: str  # the adapter's own record of its training method

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


@dataclass
class TestRecords:
    """The frozen test records found in the data with their frozen content, preprocessed."""

    store_dir: Path
    ids: list[str]
    classes: list[str]
    testset_version: int
    testset_md5: str
    n_frozen: int
    left_out: dict[str, str] = field(default_factory=dict)  # record key -> why

    def describe(self) -> str:
        text = f"{len(self.ids)} of the {self.n_frozen} records of frozen test set v{self.testset_version}"
        return text + (f" ({len(self.left_out)} gone or changed, left out)" if self.left_out else "")


@dataclass(frozen=True)
class Scores:
    """One model's per-record predictions on the test records."""

    ids: list[str]
    probs: np.ndarray
    labels: np.ndarray
    thresholds: np.ndarray
    metrics: dict[str, float]

    def as_predictions(self) -> dict[str, np.ndarray]:
        """The layout of ``predictions.npz`` (:func:`components.evaluate.load_predictions`)."""
        return {"ids": np.asarray(self.ids), "probs": self.probs, "labels": self.labels, "thresholds": self.thresholds}


# --------------------------------------------------------------------------- models


def _download(client, name: str, version: str, dst: Path) -> dict[str, Path]:
    """The version's model, downloaded into ``dst``: its ``backbone`` and ``adapter`` folders
    (where its ``MLmodel`` puts the pyfunc's artifacts); EvidenceError when there is none."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from pipeline.registry.access import client_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    label = f"{name} v{version}"
    uri = client.get_model_version_download_uri(name, version)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=client_tracking_uri(client)
            )
        )
    except (MlflowException, OSError):
        raise EvidenceError(f"{label} has no loadable model: its model files cannot be downloaded from {uri}") from None
    try:
        artifacts = Model.load(str(local / "MLmodel")).flavors["python_function"]["artifacts"]
        folders = {part: local / str(artifacts[part]["path"]) for part in DIGEST_TAGS}
    except (MlflowException, OSError, KeyError, TypeError, ValueError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EvidenceError(f"{label} has no loadable model: {why}") from None
    missing = [part for part, folder in folders.items() if not folder.is_dir()]
    if missing:
        raise EvidenceError(f"{label} has no loadable model: its {' and '.join(missing)} artifacts are not in {uri}")
    return folders


def check_digests(label: str, tags: dict[str, str], actual: dict[str, str]) -> None:
    """EvidenceError unless every recorded digest is there and equals the artifacts' own."""
    absent = [tag for tag in DIGEST_TAGS.values() if not tags.get(tag)]
    if absent:
        raise EvidenceError(
            f"{label} has no recorded artifact digests ({', '.join(absent)}): registered before digests were "
            "recorded or not by the pipeline; re-run the pipeline"
        )
    for part, tag in DIGEST_TAGS.items():
        if actual[tag] != tags[tag]:
            raise EvidenceError(
                f"{label}: its {part} artifacts do not match their recorded digest (sha256 {actual[tag][:16]}..., "
                f"recorded {tags[tag][:16]}...): refused"
            )


def _adapter_method(adapter_dir: Path) -> str:
    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("method", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def fetch_model(client, name: str, version: str, work_dir: Path) -> LoadedModel:
    """Download ``name`` v``version``, check its artifacts against their recorded digests and
    rebuild it (see the module doc); EvidenceError otherwise."""
    from ml.eval.predictor import load_predictor

    version = str(version)
    label = f"{name} v{version}"
    tags = dict(client.get_model_version(name, version).tags or {})
    folders = _download(client, name, version, Path(work_dir) / f"{name}-v{version}")
    backbone, adapter = folders["backbone"], folders["adapter"]
    actual = model_digests(backbone, adapter)
    check_digests(label, tags, actual)
    try:
        predictor = load_predictor(backbone, adapter)
    except (CesslError, ValueError, KeyError, OSError, RuntimeError) as err:
        raise EvidenceError(f"{label} has no loadable model: {str(err).splitlines()[0]}") from None
    method = _adapter_method(adapter) or tags.get(TAG_METHOD, "")
    return LoadedModel(name, version, predictor, actual, method)


# --------------------------------------------------------------------------- test records


def _manifest_row(source, record_id: str) -> dict[str, Any] | None:
    """The ingest manifest row of one record of ``source`` (read and validated now), or None
    when the source has no such record."""
    from ml.data.ingest import inspect_record
    from ml.data.paths import unsafe_key_problem
    from ml.data.records import ValidationConfig
    from ml.data.sources import HEADER_SUFFIX, RecordRef

    key = record_id + HEADER_SUFFIX
    problem = unsafe_key_problem(key)
    if problem is not None:
        return None
    try:
        files = source.stem_files(key)
    except (OSError, ValueError):
        return None
    if key not in files:
        return None
    stamp = "|".join(source.file_stamp(k) for k in files)
    return inspect_record(source, RecordRef(source.uri, key, record_id, stamp), ValidationConfig())


def frozen_test_records(client, model: str, source: str, site: str, work_dir: Path) -> TestRecords:
    """The records of ``model``'s current frozen test set, read from ``source`` (the site's
    folder or ``s3://`` prefix), checked against the set's content hashes and preprocessed
    into a store in ``work_dir``."""
    import pandas as pd

    from ml.data.ingest import ACCEPTED
    from ml.data.preprocess import preprocess
    from ml.data.sources import open_source, record_key
    from pipeline.registry.testsets import FROZEN, TestSetError, current, download

    pointer = current(client, model)
    if pointer is None or pointer.status != FROZEN:
        state = "none" if pointer is None else f"v{pointer.version} {pointer.status}"
        raise EvidenceError(f"{model} has no frozen test set to score on (test set: {state}); re-run the pipeline")
    try:
        frozen = download(client, pointer, Path(work_dir) / "testset.json")
        src = open_source(source)
    except (TestSetError, OSError, ValueError, CesslError) as err:
        raise EvidenceError(f"{model}: the frozen test set's records cannot be read: {err}") from None
    rows, left_out = [], {}
    prefix = f"{site}/" if site else ""
    for key, digest in frozen.records.items():
        row = _manifest_row(src, key.removeprefix(prefix)) if key.startswith(prefix) else None
        if row is None:
            left_out[key] = f"not in {source}"
        elif row["content_hash"] != digest:
            left_out[key] = "its content differs from the frozen test set's"
        elif row["status"] != ACCEPTED:
            left_out[key] = f"unreadable ({row['reason']})"
        else:
            rows.append(row | {"site": site})
    if not rows:
        raise EvidenceError(
            f"{model}: none of the {len(frozen.records)} frozen test records is in {source} with its frozen content "
            "(pass the data with --source)"
        )
    store_dir = Path(work_dir) / "testset-store"
    preprocess(pd.DataFrame(rows), store_dir, classes=list(frozen.classes), workers=1, progress=False)
    ids = [record_key(site, str(r["id"])) for r in rows]
    for key, why in left_out.items():
        log.warning("%s: frozen test record %s left out: %s", model, key, why)
    return TestRecords(
        store_dir, ids, list(frozen.classes), pointer.version, pointer.md5, len(frozen.records), left_out
    )


def score(model: LoadedModel, records: TestRecords) -> Scores:
    """``model``'s predictions and metrics on ``records`` (the evaluation's code); EvidenceError
    when its classes are not the test set's."""
    from components.evaluate import score_records

    try:
        report = score_records(model.predictor, records.store_dir, records.ids, records.classes)
    except ValueError as err:
        raise EvidenceError(f"{model.label}: {err}") from None
    metrics = {k: float(v) for k, v in report.metrics.items() if v is not None and np.isfinite(v)}
    return Scores(list(records.ids), report.probs, report.labels, np.asarray(report.thresholds), metrics)


def paired(challenger: Scores, champion: Scores, classes: list[str], config=None):
    """The paired interval of challenger - champion on the same records (:class:`ml.eval.bootstrap.PairedBootstrap`;
    ``config``: its confidence, the gate's one-sided level of this attempt on each side)."""
    from components.evaluate import compare_predictions
    from ml.eval.bootstrap import BootstrapConfig

    return compare_predictions(
        challenger.as_predictions(), champion.as_predictions(), classes, config or BootstrapConfig()
    )
