"""Lineage: what data and what code a run used (the DVC version of the data, the git commit).

The one place that answers "which data version is this folder / this repository on?":
the ``.dvc`` files are read by :func:`ml.data.dvc.dvc_md5` (the only parser), the current
content is hashed the way DVC does (:func:`ml.data.dvc.dir_md5`). ``cessl run``,
``submit``, ``schedule`` and ``retrain`` ask here; the registry and the tracking code
use the tag names.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ml.data.dvc import dir_md5, dvc_md5

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


def source_data_version(source: str, dvc_file: Path, repo: Path | None = None) -> str:
    """The data version of a run's source: a local folder's content md5, else (``s3://``) the
    md5 that ``dvc_file`` records; "" when neither tells."""
    if "://" not in source and Path(source).is_dir():
        return read_data_version(Path(source).absolute(), repo).md5
    return dvc_md5(dvc_file) or ""
