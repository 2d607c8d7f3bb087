"""Small helpers the steps share: JSON files, content hashes, step-level errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ml.errors import CesslError
from ml.io import atomic_write_text


class StepError(CesslError):
    """A step cannot go on; the message names the file or record and the problem."""


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise StepError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StepError(f"{path}: {what} is not valid JSON ({err})") from err


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """Hash of several files: their paths relative to ``root`` and their bytes."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def sha256_dir(folder: Path) -> str:
    folder = Path(folder)
    return sha256_files((p for p in folder.rglob("*") if p.is_file()), folder)


def write_metadata_file(artifact: Any) -> Path:
    """Write a metrics-like artifact's metadata as JSON at its path.

    KFP keeps Metrics / ClassificationMetrics in metadata only; a file at the artifact's
    path makes the output complete for caches that check files (kfp.local's) and
    readable as a plain file too.
    """
    return write_json(Path(artifact.path), dict(artifact.metadata))
