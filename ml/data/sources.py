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

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.data.paths import UnsafePathError, inside, resolve_inside, unsafe_key_problem
from ml.errors import ParameterError

HEADER_SUFFIX = ".hea"
SIGNAL_SUFFIXES = (".mat", ".dat")  # signal files: one without a header is listed as an orphan


@dataclass(frozen=True, slots=True)
class RecordRef:
    """One record found in a source: its header key and a change stamp of its files."""

    source: str  # the source's URI
    key: str  # header path relative to the source root (POSIX)
    record_id: str  # the key without ".hea" (record_id_of): unique within the source
    stamp: str  # sizes + mtimes (local) or ETags (S3) of the record's files
    problem: str | None = None  # set for a key that must not be read (path traversal...)

    @property
    def where(self) -> str:
        return f"{self.source.rstrip('/')}/{self.key}"


def extend_stamp(stamp: str, extra_parts: list[str]) -> str:
    """A record's stamp with the stamps of the other files it was read from (sorted, after its own)."""
    own = {part.rsplit(":", 2)[0] for part in stamp.split("|")}
    extra = sorted({p for p in extra_parts if p.rsplit(":", 2)[0] not in own}, key=lambda p: p.rsplit(":", 2)[0])
    return "|".join([stamp, *extra]) if extra else stamp


def record_id_of(key: str) -> str:
    """A record's id within its source: the header's path relative to the source root,
    POSIX, without ``.hea`` (``g1/00001.hea`` -> ``g1/00001``; ``A0001.hea`` -> ``A0001``).

    The path, not the bare name: two folders of one source that both number their records
    ``00001`` hold two records, not one record twice.
    """
    path = key.replace("\\", "/").strip("/")
    return path[: -len(HEADER_SUFFIX)] if path.lower().endswith(HEADER_SUFFIX) else path


# A site name: a DNS label (it ends up in model names and Kubernetes objects); the same
# rule as pipeline.core.sites.SITE_NAME, which ml cannot import.
SITE_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$")


def check_site(site: str) -> str:
    """``site`` when it is "" (no site) or a DNS label; :class:`ml.errors.ParameterError` otherwise."""
    if site and not SITE_NAME.match(site):
        raise ParameterError(
            f"site name {site!r} must be a DNS label: lower-case letters, digits and '-', "
            "starting with a letter, ending with a letter or digit, at most 40 characters"
        )
    return site


def record_key(site: str, record_id: str) -> str:
    """A record's key in every table shared between sites (the store, splits, frozen test
    sets): ``<site>/<id>``, or the bare id for records of no site (single-site data keeps
    the ids it always had)."""
    return f"{site}/{record_id}" if site else record_id


def derived_site_name(uri: str) -> str:
    """A stable site name for a source given none: its last path part as a DNS label plus a
    short hash of the whole URI (``/data/Hospital B`` -> ``hospital-b-3f2a1c``), so two
    sources with the same folder name still differ."""
    last = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    stem = re.sub(r"[^a-z0-9]+", "-", last).strip("-")
    stem = re.sub(r"^[^a-z]+", "", stem)[:30].strip("-") or "source"
    return f"{stem}-{hashlib.sha256(uri.encode('utf-8')).hexdigest()[:6]}"


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


class Source(ABC):
    """A place holding WFDB records."""

    uri: str
    # Set by list_records: entries that belong to no header (an orphan signal file) or that
    # could not be listed (a folder that cannot be read, a symbolic link to a folder, a
    # broken link), key -> reason. Ingestion keeps an orphan that a header names after all.
    unlisted: dict[str, str]

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

    @abstractmethod
    def file_stamp(self, key: str) -> str:
        """``name:size:mtime`` (local) or ``name:size:etag`` (S3) of one file; ``name:?`` when it is absent."""

    def current_stamp(self, ref: RecordRef, recorded: str) -> str:
        """The stamp ``recorded`` (a manifest's) would have now: the record's listing stamp
        plus, restamped, the other files its header named (another record's signal file...),
        so a change of any file a record was read from makes it read again."""
        own = {part.rsplit(":", 2)[0] for part in ref.stamp.split("|")}
        folder = ref.key.rsplit("/", 1)[0] + "/" if "/" in ref.key else ""
        extra = [name for name in (p.rsplit(":", 2)[0] for p in recorded.split("|")) if name not in own]
        return extend_stamp(ref.stamp, [self.file_stamp(folder + name) for name in extra])

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
        self.unlisted = {}

    def _path(self, key: str) -> Path:
        return resolve_inside(self.root, key, "the source folder")

    def list_records(self) -> list[RecordRef]:
        refs: list[RecordRef] = []
        unlisted: dict[str, str] = {}

        def rel(path: str | Path) -> str:
            return Path(path).relative_to(self.root).as_posix()

        def walk_error(err: OSError) -> None:
            unlisted[rel(err.filename) if err.filename else "."] = f"cannot list folder ({err.strerror or err})"

        for folder, dirs, files in os.walk(self.root, onerror=walk_error):
            dirs.sort()
            rel_folder = rel(folder)
            prefix = "" if rel_folder == "." else rel_folder + "/"
            for name in dirs:
                if (Path(folder) / name).is_symlink():
                    unlisted[prefix + name] = "symbolic link to a folder (not followed)"
            by_stem: dict[str, list[str]] = {}
            for name in sorted(files):
                by_stem.setdefault(_stem(name), []).append(name)
            headed = {_stem(n) for n in files if n.lower().endswith(HEADER_SUFFIX)}
            for name in sorted(files):
                path = Path(folder) / name
                if path.is_symlink() and not path.exists():
                    unlisted[prefix + name] = "broken symbolic link"
                elif _stem(name) not in headed and name.lower().endswith(SIGNAL_SUFFIXES):
                    unlisted[prefix + name] = "signal file without a header (not read)"
            for name in sorted(files):
                if not name.lower().endswith(HEADER_SUFFIX):
                    continue
                key = prefix + name
                problem = unsafe_key_problem(key)
                if problem is None and not inside(self.root, Path(folder) / name):
                    problem = "symbolic link out of the source folder"
                stamp_parts = []
                for member in by_stem.get(_stem(name), [name]):
                    try:
                        st = (Path(folder) / member).stat()
                        stamp_parts.append(f"{member}:{st.st_size}:{st.st_mtime_ns}")
                    except OSError:
                        stamp_parts.append(f"{member}:?")
                refs.append(RecordRef(self.uri, key, record_id_of(key), "|".join(stamp_parts), problem))
        refs.sort(key=lambda r: r.key)
        self.unlisted = unlisted
        return refs

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def file_stamp(self, key: str) -> str:
        name = key.rsplit("/", 1)[-1]
        try:
            st = self._path(key).stat()
        except OSError:  # absent, or refused (the reader reports why)
            return f"{name}:?"
        return f"{name}:{st.st_size}:{st.st_mtime_ns}"

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
        self._listed: dict[str, str] = {}  # key -> stamp part, from the last listing
        self.unlisted = {}

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
        self._listed = {key: f"{key.rsplit('/', 1)[-1]}:{size}:{etag}" for key, size, etag in objects}
        by_stem: dict[tuple[str, str], list[tuple[str, int, str]]] = {}
        for key, size, etag in objects:
            folder, _, name = key.rpartition("/")
            by_stem.setdefault((folder, _stem(name)), []).append((name, size, etag))
        refs = []
        headed = {
            (k.rpartition("/")[0], _stem(k.rpartition("/")[2]))
            for k, _, _ in objects
            if k.lower().endswith(HEADER_SUFFIX)
        }
        self.unlisted = {
            key: "signal file without a header (not read)"
            for key, _, _ in objects
            if key.lower().endswith(SIGNAL_SUFFIXES)
            and (key.rpartition("/")[0], _stem(key.rpartition("/")[2])) not in headed
        }
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

    def file_stamp(self, key: str) -> str:
        from botocore.exceptions import ClientError

        name = key.rsplit("/", 1)[-1]
        if key in self._listed:
            return self._listed[key]
        try:
            head = self.client.head_object(Bucket=self.location.bucket, Key=self._full_key(key))
        except (ClientError, UnsafePathError):
            return f"{name}:?"
        return f"{name}:{int(head['ContentLength'])}:{str(head.get('ETag', '')).strip(chr(34))}"

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
