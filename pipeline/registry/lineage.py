"""Lineage: what data and what code a run used (the DVC version of the data, the git commit).

The one place that answers "which data version is this folder / this repository on?":
the ``.dvc`` files are read by :func:`ml.data.dvc.dvc_md5` (the only parser), the current
content is hashed the way DVC does (:func:`ml.data.dvc.dir_md5`). ``cessl run``,
``submit``, ``schedule`` and ``retrain`` ask here; the registry and the tracking code
use the tag names. The parameters a run logs are the values its steps recorded they used
(:func:`params_as_run`), not the values the run was given.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.data.dvc import dir_md5, dvc_md5, source_version
from pipeline.core.params import PipelineParams

log = logging.getLogger(__name__)

# Tags a registered model version carries (read back by the registry and by retrain).
TAG_DATA_VERSION = "data_version"
TAG_GIT_COMMIT = "git_commit"


@dataclass(frozen=True)
class DataVersion:
    """What data a run trained on: the DVC md5 of the data folder and the code's commit."""

    md5: str
    git_commit: str
    origin: str  # "dvc:<file>", "content" (no .dvc file tracks it) or "uncommitted (...)"


def git_commit(repo: Path) -> str:
    """``git rev-parse HEAD`` of ``repo`` (``+dirty`` when tracked files changed), or "unknown"."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def find_dvc_file(data_path: Path, repo: Path) -> Path | None:
    """``<data>.dvc`` next to the data folder, else the repo's ``data.dvc`` if it tracks it."""
    for candidate in (data_path.parent / f"{data_path.name}.dvc", repo / "data.dvc"):
        if candidate.is_file() and dvc_md5(candidate, data_path) is not None:
            return candidate
    return None


def read_data_version(data_path: Path, repo: Path | None = None) -> DataVersion:
    """The data version of a local folder: DVC's md5 of its current content.

    When a ``.dvc`` file tracks the folder and records the same md5 the origin is that
    file; when it records another one the folder has changes not added to DVC yet (a
    warning says so and the current content's md5 is used).
    """
    repo = repo or Path.cwd()
    if not data_path.is_dir():
        raise FileNotFoundError(f"{data_path}: data folder not found")
    current = dir_md5(data_path)
    commit = git_commit(repo)
    dvc_file = find_dvc_file(data_path, repo)
    if dvc_file is None:
        log.warning("%s is not tracked by DVC (no %s.dvc): its version is its content md5", data_path, data_path.name)
        return DataVersion(md5=current, git_commit=commit, origin="content")
    recorded = dvc_md5(dvc_file, data_path)
    if recorded != current:
        log.warning(
            "%s has changes not recorded in %s (%s there, %s now): run `dvc add` to version them",
            data_path,
            dvc_file,
            recorded,
            current,
        )
        return DataVersion(md5=current, git_commit=commit, origin=f"uncommitted (not in {dvc_file.name})")
    return DataVersion(md5=current, git_commit=commit, origin=f"dvc:{dvc_file.name}")


def source_data_version(source: str, repo: Path | None = None) -> str:
    """The data version of a run's source, computed from the source itself: a local folder's
    content md5 (checked against its ``.dvc`` file), an ``s3://`` prefix's version from its
    listing (:func:`ml.data.dvc.objects_version`: DVC's directory md5 when the ETags are
    md5s), never the md5 a local ``data.dvc`` records for other data. "" when an S3 source
    cannot be listed from here (a warning says why): ingest then computes it where it runs."""
    if "://" not in source:
        return read_data_version(Path(source).absolute(), repo).md5
    try:
        return source_version(source)
    except Exception as err:  # no credentials / endpoint here, an empty prefix...
        log.warning("cannot list %s from here (%s): its data version is computed by ingest at run time", source, err)
        return ""


def push_data_version(data_path: Path, version: str, repo: Path) -> bool:
    """``dvc push`` the data version a run trained on when the project has a default DVC remote.

    Only a folder tracked by a ``.dvc`` file that records exactly ``version`` is pushed (the
    version a run logged is then retrievable with ``dvc pull``); anything else, and a failed
    push, is a warning naming what to do, never silent. Returns whether it was pushed.
    """
    from ml.data.dvc import default_remote, push

    remote = default_remote(repo)
    if remote is None:
        log.info(
            "no default DVC remote: data version %s not pushed (`cessl data remote add NAME URL --default`)", version
        )
        return False
    dvc_file = find_dvc_file(data_path, repo)
    if dvc_file is None or dvc_md5(dvc_file, data_path) != version:
        log.warning(
            "data version %s not pushed to DVC remote %r: %s does not record it (run `dvc add %s` and commit)",
            version,
            remote,
            dvc_file or f"{data_path.name}.dvc",
            data_path.name,
        )
        return False
    try:
        push(repo, dvc_file.relative_to(repo) if dvc_file.is_relative_to(repo) else dvc_file)
    except RuntimeError as err:
        log.warning("WARNING: data version %s was NOT pushed to DVC remote %r: %s", version, remote, err)
        return False
    log.info("pushed data version %s to DVC remote %r", version, remote)
    return True


# --------------------------------------------------------------------------- MLflow


# Tags every pipeline run carries besides TAG_DATA_VERSION / TAG_GIT_COMMIT.
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's standard tag (a bare commit hash)
TAG_KFP_RUN_ID = "kfp.run_id"
TAG_KFP_RUN_NAME = "kfp.run_name"
TAG_KFP_PIPELINE_NAME = "kfp.pipeline_name"
DATASET_CONTEXT = "training"
_DIGEST_MAX = 36  # MLflow's dataset digest column


def lineage_tags(
    git_commit: str, kfp_run_id: str = "", kfp_run_name: str = "", pipeline_name: str = ""
) -> dict[str, str]:
    """The standard MLflow git tag (without our ``+dirty`` mark) and the KFP run's identity
    (empty values left out)."""
    tags = {
        TAG_MLFLOW_GIT_COMMIT: git_commit.split("+", 1)[0] if git_commit not in ("", "unknown") else "",
        TAG_KFP_RUN_ID: kfp_run_id,
        TAG_KFP_RUN_NAME: kfp_run_name,
        TAG_KFP_PIPELINE_NAME: pipeline_name,
    }
    return {k: v for k, v in tags.items() if v and not v.startswith("{{$")}


def dataset_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def log_data_input(source: str, data_version: str, context: str = DATASET_CONTEXT) -> None:
    """Record the run's data in the active MLflow run as a dataset input (``mlflow.log_input``):
    source = the folder or ``s3://`` URI, digest = the data version (MLflow keeps 36
    characters: a DVC md5 fits whole)."""
    import time

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    if not source:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        dataset_source = resolve_dataset_source(source)
    digest = (data_version or "unknown")[:_DIGEST_MAX]
    dataset = MetaDataset(dataset_source, name=dataset_name(source), digest=digest)  # type: ignore[abstract]
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException:
            # Two runs logging the same new dataset at once: the store's insert races
            # (UNIQUE constraint on experiment, name, digest); the retry finds it there.
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))


# --------------------------------------------------------------------------- what the steps used

# The run parameters each step records as it ran: its output's own record of the value it
# used (splits.json's params, the rank map's metadata, adapter_config.json). Not the
# adapter's r / p: a method may train with its own (no deactivation: p 0), which the
# adapter's config keeps; the run's choice of r is the rank map's.
RECORDED_BY: dict[str, tuple[str, ...]] = {
    "split": ("labelled_ratio", "seed"),
    "allocate-ranks": ("method", "r", "compress"),
    "finetune": ("method", "lr", "seed"),
}


def step_records(
    splits_path: Path, adapter_dir: Path, rank_metadata: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """What the steps wrote about the values they used, by step (:data:`RECORDED_BY`):
    the split's ``params`` (``splits.json``), the rank map's metadata and the adapter's
    config (``adapter_config.json``: its method and its ``train_config``)."""
    from ml.data.splits import Splits
    from ml.model.adapter import read_adapter_config

    adapter = read_adapter_config(adapter_dir)
    train = dict(adapter.get("extra", {}).get("train_config", {}))
    finetune = {"method": adapter["method"]} if "method" in adapter else {}
    finetune |= {k: train[k] for k in ("lr", "seed") if k in train}
    records = {"split": dict(Splits.load(splits_path).params), "finetune": finetune}
    if rank_metadata:
        records["allocate-ranks"] = dict(rank_metadata)
    return {step: {k: v for k, v in record.items() if k in RECORDED_BY[step]} for step, record in records.items()}


def params_as_run(params: PipelineParams, records: Mapping[str, Mapping[str, Any]]) -> PipelineParams:
    """``params`` with every value a step recorded (:func:`step_records`) in place of the one
    the run was given: what is logged is what ran (one source). A difference is a warning
    naming the parameter, the step and both values (it means the pipeline's wiring passed the
    step something else than the run's parameters)."""
    used: dict[str, Any] = {}
    for step, record in records.items():
        values = PipelineParams.from_mapping({**params.arguments(), **record}).arguments()  # typed like params
        for name in record:
            if name in used and used[name][1] != values[name]:
                log.warning("%s: step %s used %r, step %s %r", name, used[name][0], used[name][1], step, values[name])
            used[name] = (step, values[name])
    changed = {name: value for name, (_, value) in used.items() if value != getattr(params, name)}
    for name, value in changed.items():
        log.warning(
            "%s: the run was given %r but step %s used %r: logging what it used",
            name,
            getattr(params, name),
            used[name][0],
            value,
        )
    return params.replace(**changed)
