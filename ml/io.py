"""Writes that either complete or leave nothing behind.

- :func:`atomic_path`: a file is written under a hidden temporary name beside its target
  and renamed over it only when the writer finished; a failure (a full disk, an interrupt,
  a bug) removes the temporary file and leaves the target as it was.
- :func:`atomic_write_bytes` / :func:`atomic_write_text`: the same for data in memory.
- :func:`staged_folder`: a NEW output folder is built as a hidden sibling and renamed into
  place at the end; a failure removes it, so a command that did not finish leaves no folder
  it was asked to create. An existing folder (incremental work) is written in place, file
  by file, with the atomic writes above.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _name_the_target(err: OSError, target: Path) -> None:
    """A write error without a file name (e.g. ENOSPC from ``write``) names ``target``."""
    if err.filename is None:
        err.filename = str(target)


def _hidden_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(target, "part")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        _name_the_target(err, target)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """The folder to write ``path``'s content in: a hidden sibling renamed to ``path`` on
    success when ``path`` does not exist yet (removed on failure), else ``path`` itself."""
    target = Path(path)
    if target.exists():
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(target, "staging")
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, target)
    except OSError as err:
        _name_the_target(err, target)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
