"""The one path check of the data layer: keys and file names stay inside their root.

Every place that turns a name it did not choose into a path (ingestion from a local folder
or S3, the signal files a header names, ``cessl predict`` reading a record) goes through
these functions:

- :func:`unsafe_key_problem`: a relative key (``a/b/X.hea``) that could leave its root
  (``..``, absolute, backslashes, percent-encoded separators) or that carries control
  characters; any other name, non-ASCII included (``Müller_001``, ``心电_01``), is fine;
- :func:`file_name_problem`: the same for a bare file name (no ``/`` at all);
- :func:`resolve_inside`: the path of a key under a local root, refused when it resolves
  (symbolic links followed) outside that root.

A refused name raises :class:`UnsafePathError` and is never opened.
"""

from __future__ import annotations

import re
from pathlib import Path

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f\u2028\u2029]")
_ENCODED = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


class UnsafePathError(PermissionError):
    """A key or file name that would leave its folder (never read)."""


def unsafe_key_problem(key: str) -> str | None:
    """Why a relative key is unsafe to use as a path, or None when it is a plain path."""
    if not key:
        return "empty key"
    if _CONTROL.search(key):
        return "control character in key"
    if "\\" in key:
        return "backslash in key"
    if _ENCODED.search(key):
        return "percent-encoded '.', '/' or '\\' in key"
    if key.startswith("/"):
        return "absolute key"
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'.', '..' or empty path segment in key (path traversal)"
    return None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name of the folder it is looked up in, or None."""
    if "/" in name:
        return "a path, not a plain file name"
    return unsafe_key_problem(name)


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (resolved: symbolic links followed) is ``root`` or under it (``root`` resolved)."""
    real, base = path.resolve(), root.resolve()
    return real == base or base in real.parents


def resolve_inside(root: str | Path, key: str, what: str = "its folder") -> Path:
    """``root / key``, refused (UnsafePathError) for an unsafe key or one that resolves outside ``root``."""
    root = Path(root)
    problem = unsafe_key_problem(key)
    if problem:
        raise UnsafePathError(f"{root}: refusing key {key!r}: {problem}")
    path = root / key
    if not inside(root, path):
        raise UnsafePathError(f"{root}: {key!r} resolves outside {what} (symbolic link to {path.resolve()})")
    return path
