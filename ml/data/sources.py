"""Where hospital records come from: a local folder (recursive) or ``s3://bucket/prefix``.

A source lists its records as :class:`RecordRef` (one per ``.hea`` header, with a cheap
"stamp" of its files' sizes and modification times or ETags, so an unchanged record is
recognised without reading it) and reads files by key. Keys are POSIX paths relative to
the source root; a key that could escape it (``..``, absolute, backslashes, control
characters) is never read: its record is reported with :attr:`RecordRef.problem` set.

S3 settings (endpoint, region, credentials) come from the standard AWS environment
variables and config files (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``...), as for any boto3 client.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.data.records import UnsafePathError

HEADER_SUFFIX = ".hea"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RecordRef:
    """One record found in a source: its header key and a change stamp of its files."""

    source: str  # the source's URI
    key: str  # header path relative to the source root (POSIX)
    record_id: str
    stamp: str  # sizes + mtimes (local) or ETags (S3) of the record's files
    problem: str | None = None  # set for a key that must not be read (path traversal...)

    @property
    def where(self) -> str:
        return f"{self.source.rstrip('/')}/{self.key}"


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


def record_id_of(key: str) -> str:
    name = key.replace("\\", "/").rsplit("/", 1)[-1]
    return name[: -len(HEADER_SUFFIX)] if name.lower().endswith(HEADER_SUFFIX) else name


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


class Source(ABC):
    """A place holding WFDB records."""

    uri: str

    @abstractmethod
    def list_records(self) -> list[RecordRef]:
        """Every header under the source root, sorted by key."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """Bytes of one file (relative key). Raises FileNotFoundError when it is absent."""

    def sibling_reader(self, header_key: str) -> Callable[[str], bytes]:
        """``read_file(name)`` for the files named by a header (they sit next to it)."""
        folder = header_key.rsplit("/", 1)[0] + "/" if "/" in header_key else ""
        return lambda name: self.read(folder + name)

    @abstractmethod
    def stem_files(self, header_key: str) -> list[str]:
        """Keys of every file next to a header with the same stem (``X.hea``, ``X.mat``...)."""

    def record_files(self, ref: RecordRef) -> list[str]:
        """Keys of the files that belong to a record (same folder, same stem), from its stamp."""
        folder = ref.key.rsplit("/", 1)[0] + "/" if "/" in ref.key else ""
        return sorted(folder + part.rsplit(":", 2)[0] for part in ref.stamp.split("|"))


class LocalSource(Source):
    """Records under a local folder, searched recursively."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"record folder {self.root} does not exist")
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        problem = unsafe_key_problem(key)
        if problem:
            raise UnsafePathError(f"{self.uri}: refusing key {key!r}: {problem}")
        path = self.root / key
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise UnsafePathError(f"{self.uri}: {key!r} resolves outside the source folder")
        return path

    def list_records(self) -> list[RecordRef]:
        refs: list[RecordRef] = []
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            rel_folder = Path(folder).relative_to(self.root).as_posix()
            prefix = "" if rel_folder == "." else rel_folder + "/"
            by_stem: dict[str, list[str]] = {}
            for name in sorted(files):
                by_stem.setdefault(_stem(name), []).append(name)
            for name in sorted(files):
                if not name.lower().endswith(HEADER_SUFFIX):
                    continue
                key = prefix + name
                problem = unsafe_key_problem(key)
                if problem is None:
                    real = (Path(folder) / name).resolve()
                    if self.root not in real.parents:
                        problem = "symbolic link out of the source folder"
                stamp_parts = []
                for member in by_stem.get(_stem(name), [name]):
                    try:
                        st = (Path(folder) / member).stat()
                        stamp_parts.append(f"{member}:{st.st_size}:{st.st_mtime_ns}")
                    except OSError:
                        stamp_parts.append(f"{member}:?")
                refs.append(RecordRef(self.uri, key, record_id_of(name), "|".join(stamp_parts), problem))
        refs.sort(key=lambda r: r.key)
        return refs

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def stem_files(self, header_key: str) -> list[str]:
        folder, _, name = header_key.rpartition("/")
        prefix = folder + "/" if folder else ""
        stem = _stem(name)
        return sorted(
            prefix + e.name for e in os.scandir(self._path(header_key).parent) if e.is_file() and _stem(e.name) == stem
        )


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading/trailing slashes; "" for the whole bucket

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket")
        return cls(bucket, prefix.strip("/"))


class S3Source(Source):
    """Records under ``s3://bucket/prefix`` (boto3; settings from the AWS environment)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, client_kwargs: dict[str, Any] | None = None):
        self.location = S3Location.parse(uri)
        self.uri = f"s3://{self.location.bucket}/{self.location.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.client_kwargs = dict(client_kwargs or {})
        self._client = None

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
            kwargs = {"config": config, **self.client_kwargs}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            self._client = boto3.session.Session().client("s3", **kwargs)
        return self._client

    def _full_key(self, key: str) -> str:
        problem = unsafe_key_problem(key)
        if problem:
            raise UnsafePathError(f"{self.uri}: refusing key {key!r}: {problem}")
        return f"{self.location.prefix}/{key}" if self.location.prefix else key

    def _objects(self) -> list[tuple[str, int, str]]:
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append((obj["Key"][len(prefix) :], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        return out

    def objects(self) -> list[tuple[str, int, str]]:
        """Every object under the prefix as (relative key, size, ETag), folder markers left out."""
        return [o for o in self._objects() if o[0] and not o[0].endswith("/")]

    def list_records(self) -> list[RecordRef]:
        objects = self._objects()
        by_stem: dict[tuple[str, str], list[tuple[str, int, str]]] = {}
        for key, size, etag in objects:
            folder, _, name = key.rpartition("/")
            by_stem.setdefault((folder, _stem(name)), []).append((name, size, etag))
        refs = []
        for key, _, _ in objects:
            if not key.lower().endswith(HEADER_SUFFIX):
                continue
            folder, _, name = key.rpartition("/")
            members = sorted(by_stem[(folder, _stem(name))])
            stamp = "|".join(f"{n}:{s}:{e}" for n, s, e in members)
            refs.append(RecordRef(self.uri, key, record_id_of(key), stamp, unsafe_key_problem(key)))
        refs.sort(key=lambda r: r.key)
        return refs

    def stem_files(self, header_key: str) -> list[str]:
        folder, _, name = header_key.rpartition("/")
        prefix = folder + "/" if folder else ""
        stem = _stem(name)
        full = self._full_key(prefix + stem)
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.location.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(full) - len(stem) :]
                if _stem(rest) == stem and "/" not in rest:
                    keys.append(prefix + rest)
        return sorted(keys)

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.location.bucket, Key=self._full_key(key))
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.uri}/{key} does not exist") from None
            raise OSError(f"{self.uri}/{key}: {code or err}") from None
        return response["Body"].read()


def open_source(source: str | Path | Source) -> Source:
    """A :class:`Source` for a folder path or an ``s3://bucket/prefix`` URI."""
    if isinstance(source, Source):
        return source
    text = str(source)
    if text.startswith("s3://"):
        return S3Source(text)
    return LocalSource(text)
