"""The frozen test set of each registered model, in the MLflow registry (and a DVC file).

The first registration of a model name freezes the test part of its run's split
(:class:`ml.data.testset.FrozenTestSet`: record ids + content hashes + classes):

- the set is the run's artifact :data:`ARTIFACT` (``testset/testset.json``; its bytes are
  canonical, so its md5 is the md5 DVC records), and an MLflow dataset input of that run
  (context ``frozen_testset``);
- the registered model's tag :data:`TAG_TESTSET` points at it (version, run, md5, size,
  classes, who/when/why); :data:`TAG_HISTORY` lists every version; every version of the
  model carries :data:`TAG_VERSION`, the test-set version it (and the champion) was scored on;
- ``cessl run`` writes it to ``testsets/<model>.json`` and ``dvc add``s it where the project
  uses DVC (:func:`export`).

Later runs: the pipeline's ``resolve_testset`` step (:func:`resolve_reference`, not cached)
names the current version; the split step fetches it (:func:`materialize`) and builds the
split around it (``ml.data.testset``), so challenger and champion are scored on the same
frozen records by ``score_champion``, and nobody trains on them.

``cessl testset refresh MODEL --reason`` (:func:`refresh`) is the only way the set changes:
it records a pending version (status ``redraw``; who, when, why in the tag and the audit
log); the next run draws a new stratified test set from the records no past champion
trained on (by id and by content hash: a byte-identical copy of a training record is never
drawn), scores the champion on it and freezes it at registration. Until then the
gate refuses (``pipeline.registry.policy``: a challenger must be scored on the current version).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.data.splits import Splits
from ml.data.testset import FROZEN, REDRAW, FrozenTestSet, freeze
from ml.errors import CesslError
from pipeline.registry.audit import AuditEntry, current_user, record
from pipeline.registry.store import TrackingConfig
from pipeline.registry.tracking import CHAMPION, current_alias, production_model_name

log = logging.getLogger(__name__)

TAG_TESTSET = "frozen_testset"  # registered-model tag: the current version's pointer (JSON)
TAG_HISTORY = "frozen_testset_history"  # registered-model tag: every version, oldest first (JSON)
TAG_VERSION = "testset_version"  # model-version tag: the test-set version it was scored on
TAG_CHANGED = "testset_changed"  # model-version tag: frozen records whose content changed
TAG_MISSING = "testset_missing"  # model-version tag: frozen records no longer in the data
ARTIFACT_DIR = "testset"
ARTIFACT = f"{ARTIFACT_DIR}/testset.json"
SPLITS_ARTIFACT = "data/splits.json"  # components.register: every run's split (ids)
DATASET_CONTEXT = "frozen_testset"
NONE = "none"  # the frozen_testset pipeline parameter: draw a fresh test set, use no frozen one
EXPORT_DIR = "testsets"
MAX_REASON = 500


class TestSetError(CesslError):
    """The frozen test set cannot be read, refreshed or exported."""


@dataclass
class TestSetPointer:
    """The registered-model tag: which version is current, where it is, who made it and why."""

    version: int
    status: str = FROZEN  # FROZEN, or REDRAW: a refresh waits for the next run
    run_id: str = ""  # the run holding ARTIFACT (FROZEN)
    md5: str = ""
    n_records: int = 0
    test_split_hash: str = ""
    classes: list[str] = field(default_factory=list)
    exclude_run: str = ""  # REDRAW: the current champion's run
    exclude_runs: list[str] = field(default_factory=list)  # REDRAW: every past champion's run (records avoided)
    created_at: str = ""
    created_by: str = ""
    reason: str = ""

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, text: str) -> TestSetPointer:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def summary(self) -> dict[str, Any]:
        """A history entry (small: the tag holds every version)."""
        return {
            "version": self.version,
            "status": self.status,
            "run_id": self.run_id,
            "md5": self.md5,
            "n_records": self.n_records,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "reason": self.reason[:200],
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- reading


def current(client, model: str) -> TestSetPointer | None:
    """The model's current frozen test set (or pending refresh); None when it has none (or
    the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model).tags or {}
    except MlflowException:
        return None
    raw = tags.get(TAG_TESTSET)
    if not raw:
        return None
    try:
        return TestSetPointer.from_tag(raw)
    except (ValueError, TypeError) as err:
        raise TestSetError(f"model {model}: tag {TAG_TESTSET} is not a test-set pointer ({err})") from err


def history(client, model: str) -> list[dict[str, Any]]:
    tags = client.get_registered_model(model).tags or {}
    try:
        return list(json.loads(tags.get(TAG_HISTORY) or "[]"))
    except json.JSONDecodeError as err:
        raise TestSetError(f"model {model}: tag {TAG_HISTORY} is not a JSON list ({err})") from err


def download(client, pointer: TestSetPointer, out_path: Path) -> FrozenTestSet:
    """The frozen set ``pointer`` names, written to ``out_path`` (its md5 checked)."""
    from mlflow.exceptions import MlflowException

    if pointer.status != FROZEN or not pointer.run_id:
        raise TestSetError(f"test set v{pointer.version} is not frozen yet (status {pointer.status})")
    with tempfile.TemporaryDirectory(prefix="cessl-testset-") as tmp:
        try:
            path = Path(client.download_artifacts(pointer.run_id, ARTIFACT, tmp))
        except (MlflowException, OSError) as err:
            raise TestSetError(f"test set v{pointer.version}: {ARTIFACT} of run {pointer.run_id}: {err}") from err
        frozen = FrozenTestSet.load(path)
        if pointer.md5 and frozen.md5 != pointer.md5:
            raise TestSetError(
                f"test set v{pointer.version} of run {pointer.run_id}: md5 {frozen.md5} differs from the "
                f"registry's {pointer.md5}"
            )
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_path)
    return frozen


def _training_records(client, run_id: str) -> tuple[set[str], set[str]]:
    """The train / valid / unlabelled ids of a registered run's split and the content hashes
    it recorded for them (empty when not logged; no hashes from splits written before they were)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="cessl-splits-") as tmp:
        try:
            path = client.download_artifacts(run_id, SPLITS_ARTIFACT, tmp)
        except (MlflowException, OSError):
            log.warning(
                "run %s has no %s: a redrawn test set cannot avoid its training records", run_id, SPLITS_ARTIFACT
            )
            return set(), set()
        splits = Splits.load(path)
    return {*splits.train, *splits.valid, *splits.unlabelled}, set(splits.trained_hashes)


def excluded_records(client, run_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """What a redraw avoids: the ids and the content hashes of every record the runs
    ``run_ids`` (the past champions') trained on, sorted."""
    ids: set[str] = set()
    hashes: set[str] = set()
    for run_id in dict.fromkeys(filter(None, run_ids)):
        trained_ids, trained_hashes = _training_records(client, run_id)
        ids |= trained_ids
        hashes |= trained_hashes
    return sorted(ids), sorted(hashes)


# --------------------------------------------------------------------------- the pipeline's side


def resolve_reference(config: TrackingConfig, mode: str = "") -> str:
    """What the split step gets (a pipeline parameter, so that a new version re-runs the split
    and an unchanged one hits the cache): ``""`` for no frozen set (``mode`` "none", or the
    model has none yet), else the current pointer of ``config.model_name`` as JSON."""
    if mode.strip().lower() == NONE:
        return ""
    if mode:
        raise TestSetError(f"frozen_testset {mode!r}: expected '' (the model's frozen test set) or {NONE!r}")
    pointer = current(config.client(), config.model_name)
    if pointer is None:
        log.info("%s has no frozen test set yet: this run draws one (frozen at registration)", config.model_name)
        return ""
    log.info("%s: test set v%d (%s)", config.model_name, pointer.version, pointer.status)
    return json.dumps({"model": config.model_name, **asdict(pointer)}, sort_keys=True)


def materialize(reference: str, tracking_uri: str, out_path: Path) -> Path:
    """The plain file the split step reads (``ml.data.testset.FrozenTestSet``) for a
    :func:`resolve_reference` string: the frozen set itself, or for a pending refresh the
    records the redraw must avoid (every past champion's training records: ids and content hashes)."""
    data = json.loads(reference)
    model = data.pop("model")
    pointer = TestSetPointer(**{k: data[k] for k in TestSetPointer.__dataclass_fields__ if k in data})
    client = TrackingConfig.resolve(tracking_uri, model_name=model).client()
    if pointer.status == FROZEN:
        download(client, pointer, out_path)
        return Path(out_path)
    exclude, exclude_hashes = excluded_records(client, [*pointer.exclude_runs, pointer.exclude_run])
    FrozenTestSet(
        model=model,
        version=pointer.version,
        status=REDRAW,
        exclude=exclude,
        exclude_hashes=exclude_hashes,
        created_at=pointer.created_at,
        created_by=pointer.created_by,
        reason=pointer.reason,
    ).save(out_path)
    return Path(out_path)


def _log_frozen(client, run_id: str, frozen: FrozenTestSet) -> None:
    """The artifact (exact bytes) and an MLflow dataset input of the run."""
    with tempfile.TemporaryDirectory(prefix="cessl-testset-") as tmp:
        path = frozen.save(Path(tmp) / Path(ARTIFACT).name)
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    try:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=f"{frozen.model}-testset-v{frozen.version}",
            digest=frozen.md5[:36],
            source_type="mlflow_artifact",
            source=json.dumps({"run_id": run_id, "path": ARTIFACT}),
            schema=json.dumps({"records": "id -> content sha256", "classes": frozen.classes}),
            profile=json.dumps({"num_rows": len(frozen.records)}),
        )
        client.log_inputs(
            run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", DATASET_CONTEXT)])]
        )
    except Exception as err:  # the artifact and the tag are the record; the dataset is a view
        log.warning("could not log the frozen test set as an MLflow dataset: %s", err)


def after_registration(client, model: str, version: str, run_id: str, splits: Splits) -> TestSetPointer | None:
    """After the register step: freeze this run's test set when the model has none yet (its
    first registration) or when a refresh is pending and this run drew it; tag the version
    with the test-set version it was scored on. Returns the current pointer."""
    report = splits.testset
    pointer = current(client, model)
    frozen_now: TestSetPointer | None = None
    if pointer is None and not report:
        frozen_now = _freeze(client, model, run_id, splits, 1, "first registration", current_user())
    elif (
        pointer is not None
        and pointer.status == REDRAW
        and report.get("status") == REDRAW
        and int(report.get("version", -1)) == pointer.version
    ):
        frozen_now = _freeze(client, model, run_id, splits, pointer.version, pointer.reason, pointer.created_by)
    current_pointer = frozen_now or pointer
    if report:
        scored_on = str(report["version"])
    elif current_pointer is not None and current_pointer.test_split_hash == splits.test_split_hash:
        scored_on = str(current_pointer.version)  # drawn fresh, but exactly the frozen records (it froze them)
    else:
        scored_on = NONE
    client.set_model_version_tag(model, version, TAG_VERSION, scored_on)
    if report.get("changed"):
        client.set_model_version_tag(model, version, TAG_CHANGED, ",".join(report["changed"])[:5000])
    if report.get("missing"):
        client.set_model_version_tag(model, version, TAG_MISSING, ",".join(report["missing"])[:5000])
    return current_pointer


def _freeze(client, model: str, run_id: str, splits: Splits, number: int, reason: str, who: str) -> TestSetPointer:
    frozen = freeze(splits, model, number, created_at=_now(), created_by=who, reason=reason, source_run=run_id)
    _log_frozen(client, run_id, frozen)
    pointer = TestSetPointer(
        version=number,
        run_id=run_id,
        md5=frozen.md5,
        n_records=len(frozen.records),
        test_split_hash=frozen.test_split_hash,
        classes=list(frozen.classes),
        created_at=frozen.created_at,
        created_by=who,
        reason=reason,
    )
    _set_pointer(client, model, pointer)
    record(
        client,
        AuditEntry(
            model=model,
            action="testset_freeze",
            versions={"testset": str(number)},
            reason=f"test set v{number} frozen from run {run_id}: {reason}",
            metrics={"n_records": pointer.n_records, "md5": pointer.md5, "classes": pointer.classes},
            who=who,
        ),
    )
    log.info("%s: test set v%d frozen (%d records, md5 %s)", model, number, pointer.n_records, pointer.md5)
    return pointer


def _set_pointer(client, model: str, pointer: TestSetPointer) -> None:
    past = [entry for entry in history(client, model) if entry.get("version") != pointer.version]
    client.set_registered_model_tag(model, TAG_TESTSET, pointer.to_tag())
    client.set_registered_model_tag(model, TAG_HISTORY, json.dumps([*past, pointer.summary()]))


# --------------------------------------------------------------------------- the commands' side


def refresh(
    client, model: str, reason: str, who: str | None = None, past_champions: Sequence[str] = ()
) -> TestSetPointer:
    """Record that ``model``'s test set must be drawn anew (a new version, pending until the
    next run draws and freezes it), with who and why (tag + audit log). The redraw avoids
    what the current champion and every version of ``past_champions`` (production versions)
    trained on."""
    if not reason.strip():
        raise TestSetError("a test-set refresh needs --reason TEXT: it is recorded with who asked")
    pointer = current(client, model)
    if pointer is None:
        raise TestSetError(f"model {model!r} has no frozen test set yet: its first registration freezes one")
    who = who or current_user()
    production = production_model_name(model)  # <model> for its -candidates: where champions are
    champion = current_alias(client, production, CHAMPION)
    number = pointer.version + 1 if pointer.status == FROZEN else pointer.version
    pending = TestSetPointer(
        version=number,
        status=REDRAW,
        exclude_run="" if champion is None else str(champion.run_id),
        exclude_runs=champion_runs(
            client, production, [*past_champions, *([] if champion is None else [champion.version])]
        ),
        created_at=_now(),
        created_by=who,
        reason=reason.strip()[:MAX_REASON],
    )
    _set_pointer(client, model, pending)
    record(
        client,
        AuditEntry(
            model=model,
            action="testset_refresh",
            versions={"testset": str(number), "previous_testset": str(pointer.version)}
            | ({} if champion is None else {"champion": str(champion.version)}),
            reason=pending.reason,
            metrics={"previous_md5": pointer.md5, "previous_n_records": pointer.n_records},
            who=who,
        ),
    )
    return pending


def champion_runs(client, model: str, versions: Sequence[str]) -> list[str]:
    """The runs of ``model``'s versions ``versions`` (a version gone from the registry: a warning)."""
    from mlflow.exceptions import MlflowException

    runs = []
    for version in dict.fromkeys(str(v) for v in versions):
        try:
            runs.append(str(client.get_model_version(model, version).run_id))
        except MlflowException as err:
            log.warning("%s v%s: %s; a redraw cannot avoid its training records", model, version, err)
    return runs


def gate_problem(client, model: str, challenger) -> str:
    """Why ``challenger`` was not scored on the model's current frozen test set ("" when it was,
    or when the model has no frozen set)."""
    pointer = current(client, model)
    if pointer is None:
        return ""
    if pointer.status == REDRAW:
        return (
            f"the test set of {model} was refreshed (v{pointer.version} pending): re-run the pipeline so that "
            "the challenger and the champion are scored on the new set"
        )
    scored_on = challenger.tags.get(TAG_VERSION, "")
    if scored_on != str(pointer.version):
        where = f"test set v{scored_on}" if scored_on not in ("", NONE) else "a freshly drawn test set"
        return (
            f"v{challenger.version} was scored on {where}, the frozen test set of {model} is "
            f"v{pointer.version}; re-run the pipeline"
        )
    return ""


def export_path(repo: Path, model: str) -> Path:
    return Path(repo) / EXPORT_DIR / f"{model}.json"


def export(client, model: str, repo: Path, *, dvc: bool = True) -> Path | None:
    """Write the current frozen set to ``<repo>/testsets/<model>.json`` (byte-identical to the
    registry's, md5 checked) and ``dvc add`` it when ``repo`` uses DVC; None when there is no
    frozen set (yet)."""
    pointer = current(client, model)
    if pointer is None or pointer.status != FROZEN:
        return None
    path = export_path(repo, model)
    if path.is_file():
        frozen = FrozenTestSet.load(path)
        if frozen.md5 == pointer.md5 and frozen.version == pointer.version:
            return path
    download(client, pointer, path)
    if dvc and (Path(repo) / ".dvc").is_dir():
        from ml.data.dvc import run_dvc

        run_dvc("add", "-q", str(path.relative_to(repo)), cwd=repo)
        log.info("%s: test set v%d in %s (dvc: %s.dvc; commit it)", model, pointer.version, path, path.name)
    return path
