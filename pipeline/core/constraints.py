"""Constraints of parameters: one implementation for the pipeline's parameters and every flag.

- :func:`field_problems`: a :class:`pipeline.core.params.PipelineParams` field's value against the
  constraints in its metadata (``minimum``, ``maximum``, ``exclusive_minimum``,
  ``exclusive_maximum``, ``choices``, ``check``), naming the field's flag.
- argparse ``type=`` helpers for the other commands' flags, generated from the same range
  check (:func:`number`): :func:`positive_int`, :func:`non_negative_int`,
  :func:`positive_float`, :func:`non_negative_float`, :func:`probability`, :func:`fraction`,
  and paths: :func:`existing_dir`, :func:`existing_file`, :func:`output_dir`,
  :func:`output_file`, :func:`source` (a folder or ``s3://bucket/prefix``).

Checks here look at values and at the file system only (no network, nothing created);
servers are checked by :mod:`pipeline.cli.preflight`. No kfp, torch or mlflow: the KFP
``validate`` step and every ``cessl`` start-up import this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.trainjob import JOB_NAME  # the one DNS-1035 pattern of a TrainJob name

# ------------------------------------------------------------------------------ numbers


# Every integer has a bound: a value a KFP pipeline, MLflow and numpy take as it is (no silent
# overflow on a cluster). A seed is any 32-bit unsigned value (numpy's and the splits'); a LoRA
# rank at most the width of the widest backbone layer it adapts (d_model 768, rounded up).
MAX_INT = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_RANK = 1024


def _bound(value: float) -> str:
    """A bound as a message shows it: an integer exactly, a float shortest."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def range_problem(
    value: float,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    kind: type | None = None,
) -> str | None:
    """What is wrong with ``value`` for the range (None: nothing); ``kind``: what the value
    must be (int: "an integer", float: "a finite number"; default: the value's own type)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    bounds = []
    if minimum is not None:
        bounds.append(f">= {_bound(minimum)}")
    if exclusive_minimum is not None:
        bounds.append(f"> {_bound(exclusive_minimum)}")
    if maximum is not None:
        bounds.append(f"<= {_bound(maximum)}")
    if exclusive_maximum is not None:
        bounds.append(f"< {_bound(exclusive_maximum)}")
    inside = (
        (minimum is None or value >= minimum)
        and (exclusive_minimum is None or value > exclusive_minimum)
        and (maximum is None or value <= maximum)
        and (exclusive_maximum is None or value < exclusive_maximum)
    )
    integer = kind is int if kind is not None else isinstance(value, int)
    what = "an integer" if integer else "a finite number"
    return None if inside else f"must be {what} " + " and ".join(bounds)


def int_maximum(maximum: float | None, exclusive_maximum: float | None) -> float | None:
    """An integer's upper bound: the one given, else :data:`MAX_INT`."""
    return MAX_INT if maximum is None and exclusive_maximum is None else maximum


def parse_number(text: str, kind: type) -> int | float:
    """``text`` as an int (``"3"``, not ``"3.5"``) or a finite float; ArgumentTypeError otherwise."""
    text = str(text).strip()
    if kind is int:
        try:
            return int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def number(
    kind: type = float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    name: str | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type=``: an int (at most :data:`MAX_INT` unless bounded otherwise) or a
    finite float in the range."""
    if kind is int:
        maximum = int_maximum(maximum, exclusive_maximum)
    bounds = {
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "exclusive_maximum": exclusive_maximum,
    }
    return _converter(kind, bounds, name or kind.__name__)


def _converter(kind: type, bounds: dict[str, float | None], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> int | float:
        value = parse_number(text, kind)
        problem = range_problem(value, **bounds, kind=kind)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
        return value

    convert.__name__ = name
    convert.bounds = bounds  # type: ignore[attr-defined]  # read by the tests' case generator
    convert.kind = kind  # type: ignore[attr-defined]
    return convert


def typed(kind: type) -> Callable[[str], Any]:
    """The argparse ``type=`` of a generated :class:`PipelineParams` flag: parses the type
    only (its range, bounds included, is checked by ``PipelineParams.validate``, which reports
    every problem)."""
    if kind in (int, float):
        return _converter(
            kind, dict.fromkeys(("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")), kind.__name__
        )
    return kind


positive_int = number(int, minimum=1, name="positive_int")
non_negative_int = number(int, minimum=0, name="non_negative_int")
positive_float = number(float, exclusive_minimum=0, name="positive_float")
non_negative_float = number(float, minimum=0, name="non_negative_float")
probability = number(float, minimum=0, maximum=1, name="probability")  # [0, 1]
fraction = number(float, exclusive_minimum=0, exclusive_maximum=1, name="fraction")  # (0, 1)


# ------------------------------------------------------------------------------ strings

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def s3_problem(uri: str) -> str | None:
    """What is wrong with an ``s3://bucket[/prefix]`` URI (None: nothing): a valid bucket, and
    no ``..`` segment in the prefix (S3 keys are not folders: it would name another prefix)."""
    if not uri.startswith("s3://"):
        return "expected s3://bucket/prefix"
    if "\x00" in uri:
        return "contains a NUL character"
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        return "names no bucket (expected s3://bucket/prefix)"
    if not _BUCKET.match(bucket) or ".." in bucket:
        return f"{bucket!r} is not a valid S3 bucket name"
    if any(part in ("..", ".") for part in prefix.split("/")):
        return "has a '.' or '..' segment (name the prefix itself: s3://bucket/prefix)"
    return None


def source_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    if not value.strip():
        return "must name a folder or s3://bucket/prefix"
    if "://" in value:
        return s3_problem(value) if value.startswith("s3://") else "only folders and s3://bucket/prefix are supported"
    return None


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Syntax of an MLflow tracking URI ('' = the default; None: nothing wrong)."""
    if uri == "":
        return None
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if not parts.scheme or "://" not in uri:
        return "expected a URI such as sqlite:///path/mlflow.db or http://host:5000"
    if scheme not in TRACKING_SCHEMES:
        return f"unsupported scheme {parts.scheme!r} (sqlite, http, https, file, postgresql, mysql, databricks)"
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            return "expected sqlite:///<path to the .db file>"
    elif scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError:
            return "has an invalid port"
        if not parts.hostname:
            return "names no host"
        del port
    return None


def model_name_problem(name: str) -> str | None:
    if name and (name != name.strip() or any(c in name for c in "/@:") or not name.strip()):
        return "a registered model name has no '/', '@', ':' or surrounding spaces"
    return None


def non_empty_problem(value: str) -> str | None:
    return "must not be empty" if not str(value).strip() else None


STRING_CHECKS: dict[str, Callable[[str], str | None]] = {
    "source": source_problem,
    "tracking_uri": tracking_uri_problem,
    "model_name": model_name_problem,
    "non_empty": non_empty_problem,
}


# ------------------------------------------------------------------------------ fields


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def field_kind(field: dataclasses.Field) -> type | None:
    """The field's type (int, float or str; the annotations are strings here)."""
    return field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str}.get(str(field.type))


def field_problems(field: dataclasses.Field, value: Any) -> str | None:
    """``"--flag VALUE: problem"`` when ``value`` breaks the field's constraints, else None."""
    problem = value_problem(field, value)
    return None if problem is None else f"{flag_name(field)} {value!r}: {problem}"


def _integer_problem(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return (
            f"must be an integer (write {int(value)})" if value.is_integer() else "must be an integer, not a fraction"
        )
    return "must be an integer"


def value_problem(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the field's constraints (None: nothing); no flag named."""
    meta, kind = field.metadata, field_kind(field)
    problem: str | None = None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        problem = _integer_problem(value)
    elif kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        problem = "must be a number"
    elif kind is str and not isinstance(value, str):
        problem = "must be text"
    elif kind in (int, float):
        bounds = {k: meta.get(k) for k in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")}
        if kind is int:
            bounds["maximum"] = int_maximum(bounds["maximum"], bounds["exclusive_maximum"])
        problem = range_problem(value, **bounds, kind=kind)
    if problem is None and meta.get("choices") and value not in meta["choices"]:
        problem = f"must be one of {', '.join(meta['choices'])}"
    if problem is None and meta.get("check"):
        problem = STRING_CHECKS[meta["check"]](value)
    return problem


def field_value(field: dataclasses.Field) -> Callable[[str], Any]:
    """An argparse ``type=`` for one value of ``field`` (its type, range, choices and check),
    for flags that take the field's values in another shape (e.g. ``compare --seeds 0,1,2``)."""
    kind = field_kind(field) or str

    def convert(text: str) -> Any:
        value = parse_number(text, kind) if kind in (int, float) else text
        problem = value_problem(field, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
        return value

    convert.__name__ = field.name
    convert.field = field  # type: ignore[attr-defined]  # read by the tests' case generator
    return convert


def comma_list(item: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type=``: a non-empty comma-separated list of distinct values, each
    checked by ``item`` (``example``: a valid list, shown in the message)."""

    def convert(text: str) -> tuple[Any, ...]:
        parts = [part.strip() for part in str(text).split(",")]
        if not any(parts) or not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list without gaps, e.g. {example}")
        values = tuple(item(part) for part in parts)
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(repeated)} given more than once")
        return values

    convert.__name__ = f"list of {getattr(item, '__name__', 'values')}"
    convert.item = item  # type: ignore[attr-defined]  # read by the tests' case generator
    return convert


# ------------------------------------------------------------------------------ paths


def _path_error(text: str, problem: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text}: {problem}")


def existing_dir(text: str) -> Path:
    """An existing folder (not a file)."""
    path = Path(text).expanduser()
    if path.is_file():
        raise _path_error(text, "is a file, expected a folder")
    if not path.is_dir():
        raise _path_error(text, "folder not found")
    return path


def existing_file(text: str) -> Path:
    """An existing, readable file (not a folder)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise _path_error(text, "is a folder, expected a file")
    if not path.is_file():
        raise _path_error(text, "file not found")
    if not os.access(path, os.R_OK):
        raise _path_error(text, "file is not readable")
    return path


def _writable_parent(text: str, path: Path) -> None:
    parent = path.absolute().parent
    if not parent.is_dir():
        raise _path_error(text, f"its parent folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _path_error(text, f"its parent folder {parent} is not writable")


def output_dir(text: str) -> Path:
    """A folder a command writes: an existing writable folder, or a new one in an existing,
    writable parent; never an existing file. Nothing is created here."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise _path_error(text, "exists and is not a folder (expected an output folder)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise _path_error(text, "folder is not writable")
    else:
        _writable_parent(text, path)
    return path


def output_file(text: str) -> Path:
    """A file a command writes: not a folder, in an existing writable folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise _path_error(text, "is a folder, expected a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise _path_error(text, "file is not writable")
    _writable_parent(text, path)
    return path


def source(text: str) -> str:
    """A records source: an existing folder, or a well-formed ``s3://bucket/prefix``."""
    problem = source_problem(text)
    if problem:
        raise _path_error(text, problem)
    if not text.startswith("s3://"):
        existing_dir(text)
    return text


def tracking_uri(text: str) -> str:
    """An MLflow tracking URI's syntax ('' = the default); its server is checked later."""
    problem = tracking_uri_problem(text)
    if problem:
        raise _path_error(text, problem)
    return text


def http_url(text: str) -> str:
    """An http(s) URL with a host (a KFP endpoint)."""
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise _path_error(text, "has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _path_error(text, "expected http(s)://host[:port]")
    return text


def output_root(text: str) -> Path:
    """A folder a command creates as needed (``--pipeline-root``, ``--state-dir``): no part of
    the path is a file, and its nearest existing folder is writable. Nothing is created here."""
    path = Path(text).expanduser().absolute()
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise _path_error(text, f"{ancestor} is a file, expected a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise _path_error(text, f"folder {ancestor} is not writable")
            break
    return Path(text).expanduser()


def cron(text: str) -> str:
    """A cron expression of 5 fields (``m h dom mon dow``) or KFP's 6 (with seconds first)."""
    fields = text.split()
    if len(fields) not in (5, 6) or not all(re.fullmatch(r"[0-9*/,\-?A-Za-z#LW]+", f) for f in fields):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a cron expression of 5 or 6 fields (e.g. '0 3 * * 1')")
    return text


def as_text(check: Callable[[str], Any]) -> Callable[[str], str]:
    """``check``, keeping the value as the text given (for code that expects a str)."""

    def convert(text: str) -> str:
        check(text)
        return text

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def registered_model(text: str) -> str:
    """A registered model name: not empty, no '/', '@', ':' or surrounding spaces."""
    problem = non_empty_problem(text) or model_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def add_tracking_uri_flag(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri`` as every registry command takes it (its syntax checked when parsed;
    the store itself by :func:`pipeline.cli.preflight.check_tracking` before any work)."""
    parser.add_argument(
        "--tracking-uri",
        type=tracking_uri,
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)",
    )


def optional(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """``check`` for a set value; '' (unset) stays '' (argparse also converts a text default)."""

    def convert(text: str) -> Any:
        return check(text) if text else ""

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+|latest)|@(?P<alias>[A-Za-z0-9_\-]+))$")


def model_uri(text: str) -> str:
    """A registered model's URI: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (or
    ``runs:/RUN_ID/PATH``)."""
    if text.startswith("runs:/") and len(text.removeprefix("runs:/").strip("/").split("/")) >= 2:
        return text
    found = _MODEL_URI.match(text)
    if not found or model_name_problem(found["name"]):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS (e.g. models:/cessl-ecg@champion)"
        )
    return text


def non_empty(text: str) -> str:
    """Text with something in it (a reason, a name)."""
    problem = non_empty_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


# ------------------------------------------------------------------------------ DVC

_REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
DVC_URL_SCHEMES = ("s3", "gs", "azure", "ssh", "hdfs", "webhdfs", "oss", "gdrive", "http", "https", "webdav", "webdavs")


def dvc_repo(text: str) -> Path:
    """A project a ``data`` verb configures: an existing folder that is a DVC repository
    (``.dvc/``) or the top of a git work tree (``dvc init`` adds DVC there). Nothing is
    created here, and no verb creates the folder."""
    path = existing_dir(text)
    if not (path / ".dvc").is_dir() and not (path / ".git").exists():
        raise _path_error(
            text, "is neither a DVC repository (.dvc/) nor a git work tree (.git): run `git init` there first"
        )
    return path


def dvc_remote_name(text: str) -> str:
    """A DVC remote's name: letters, digits, '_', '.', '-' (it becomes a config section)."""
    if not _REMOTE_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a remote name is 1-64 letters, digits, '_', '.' or '-'")
    return text


def dvc_remote_url_problem(url: str, repo: Path) -> str | None:
    """What is wrong with a DVC remote URL (None: nothing): ``s3://bucket/path`` (a valid
    bucket), another DVC scheme with a host, or a local folder (relative ones are relative to
    ``repo``) whose parent folder exists and that is not a file."""
    if not url.strip():
        return "must name s3://bucket/path or a folder"
    if "://" in url:
        scheme = url.partition("://")[0]
        if scheme == "s3":
            return s3_problem(url)
        if scheme not in DVC_URL_SCHEMES:
            return f"unsupported scheme {scheme!r} (DVC remotes: {', '.join(DVC_URL_SCHEMES)} or a folder)"
        if not urlsplit(url).netloc:
            return f"names no host or bucket (expected {scheme}://HOST/path)"
        return None
    folder = Path(url).expanduser()
    folder = folder if folder.is_absolute() else Path(repo) / folder
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, expected a folder"
    if not folder.parent.is_dir():
        return f"its parent folder {folder.parent} does not exist (create it first, or mount the share)"
    return None


# ------------------------------------------------------------------------------ names


_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,255}$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._\-/:@]*[A-Za-z0-9_.\-]$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([a-z0-9\-.]*[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9_.\-]*[A-Za-z0-9])?$")
_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")  # DNS-1123 label
_QUANTITY = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[numk])?$")


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not regex.match(text) or ".." in text.split("/"):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return text

    check.__name__ = what.split(" (")[0]
    return check


# one folder or file name: no separators, no "..", nothing that escapes its root
path_part = _pattern(_PATH_PART, "a plain name (letters, digits, '_', '.', '-'; no '/' or '..')")
# an MLflow registered-model alias (what MlflowClient.set_registered_model_alias accepts)
alias = _pattern(_ALIAS, "an alias (a letter or '_', then letters, digits, '_' or '-')")
# a container image reference: [registry/]repository[:tag][@digest]
image = _pattern(_IMAGE, "an image reference such as registry:5000/cessl:0.1.0")
# a Kubernetes extended resource name, e.g. nvidia.com/gpu
resource_name = _pattern(_RESOURCE_NAME, "a Kubernetes resource name such as nvidia.com/gpu")
# a Kubernetes object name (DNS-1123 label): a namespace, ServiceAccount, Secret, PVC or runtime
k8s_name = _pattern(_K8S_NAME, "a Kubernetes name (lower-case letters, digits and '-', at most 63)")
# a TrainJob name (DNS-1035 label: its JobSet and Services need a letter first)
job_name = _pattern(JOB_NAME, "a TrainJob name (lower-case letters, digits and '-', a letter first, <= 63)")


def quantity(text: str) -> str:
    """A Kubernetes resource quantity ("4", "500m", "16Gi"), not zero."""
    if not _QUANTITY.match(text) or not any(c in "123456789" for c in text.split("e")[0].split("E")[0]):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a Kubernetes quantity above 0, such as 4, 500m or 16Gi")
    return text


def _problem_of(check: Callable[[str], Any], *, empty_ok: bool = False) -> Callable[[str], str | None]:
    """A :data:`STRING_CHECKS` entry from an argparse ``type=`` check (its message without the
    value, which :func:`field_problems` names already); ``empty_ok``: '' means "unset"."""

    def problem(value: str) -> str | None:
        if empty_ok and value == "":
            return None
        try:
            check(value)
        except argparse.ArgumentTypeError as err:
            return str(err).removeprefix(f"{value!r}: ")
        return None

    return problem


STRING_CHECKS.update(
    {
        "image_or_empty": _problem_of(image, empty_ok=True),
        "quantity_or_empty": _problem_of(quantity, empty_ok=True),
        "alias_or_empty": _problem_of(alias, empty_ok=True),
        "k8s_name": _problem_of(k8s_name),
        "k8s_name_or_empty": _problem_of(k8s_name, empty_ok=True),
    }
)
