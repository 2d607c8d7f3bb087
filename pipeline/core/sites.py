"""The hospital network: the site registry file (``sites.yaml``, versioned in git).

One shared backbone, one CE-SSL adapter per site. The file names each site, where its
WFDB records are, and the pipeline parameters it overrides::

    # sites.yaml
    version: 1
    sites:
      hospital-a:
        source: network/hospital-a      # a folder (relative to this file) or s3://bucket/prefix
      hospital-b:
        source: s3://ecg-b/records
        labelled_ratio: 0.1                  # optional overrides of the run's parameters
        method: fixmatch
        min_class_count: 50

Schema:

- ``version``: 1.
- ``sites``: a mapping of site name -> site. A name is a DNS label (lower-case letters,
  digits and ``-``, starting with a letter, at most 40 characters): it becomes part of the
  registered model's name (``<model>-<site>``), of KFP task names and of Kubernetes objects.
- a site: ``source`` (required), ``description`` (free text), and any of
  :data:`OVERRIDABLE` (the run's parameters a site may change), checked by the same
  constraints as the command-line flags (:class:`pipeline.core.params.PipelineParams`).

Every problem is reported with the file and line it is on (``sites.yaml:7: ...``), all at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml.errors import BadFileError, ParameterError
from ml.io import atomic_write_text
from pipeline.core.params import PipelineParams

SCHEMA_VERSION = 1
SITE_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$")
# the run's parameters a site may override (the rest are the network's: one backbone, one schedule)
OVERRIDABLE: tuple[str, ...] = (
    "labelled_ratio",
    "method",
    "min_class_count",
    "seed",
    "r",
    "p",
    "compress",
    "batch_size",
    "lr",
)
SITE_KEYS = ("source", "description", *OVERRIDABLE)
DEFAULT_SITES_FILE = "sites.yaml"


class SitesFileError(BadFileError):
    """A site registry file that cannot be used: names the file, the line and the problem."""


def site_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a site name (None: nothing)."""
    if not isinstance(name, str) or not SITE_NAME.match(name):
        return (
            f"site name {name!r} must be a DNS label: lower-case letters, digits and '-', "
            "starting with a letter, ending with a letter or digit, at most 40 characters"
        )
    return None


def check_site_name(name: str) -> str:
    """``name`` when it is a valid site name, else :class:`ml.errors.ParameterError`."""
    problem = site_name_problem(name)
    if problem:
        raise ParameterError(problem)
    return name


@dataclass(frozen=True)
class Site:
    """One hospital: its name, its records and the parameters it overrides."""

    name: str
    source: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def params(self, base: PipelineParams) -> PipelineParams:
        """The run's parameters for this site: ``base`` with the site's source and overrides
        (validated: :class:`ml.errors.ParameterError` names the bad value)."""
        return base.replace(source=self.source, **dict(self.overrides))

    def to_yaml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.source}
        if self.description:
            entry["description"] = self.description
        entry.update(self.overrides)
        return entry


@dataclass(frozen=True)
class SiteRegistry:
    """The network's sites, in file order."""

    sites: tuple[Site, ...] = ()
    path: Path | None = None

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def get(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise ParameterError(f"{self.where}: no site named {name!r} (sites: {', '.join(self.names) or 'none'})")

    def select(self, names: list[str] | None) -> SiteRegistry:
        """The registry limited to ``names`` (None or empty: all of them)."""
        if not names:
            return self
        return SiteRegistry(tuple(self.get(n) for n in names), self.path)

    def add(self, site: Site, replace: bool = False) -> SiteRegistry:
        check_site_name(site.name)
        if site.name in self.names and not replace:
            raise ParameterError(f"{self.where}: site {site.name!r} exists (--replace to change it)")
        kept = tuple(s if s.name != site.name else site for s in self.sites)
        return SiteRegistry(kept if site.name in self.names else (*self.sites, site), self.path)

    def remove(self, name: str) -> SiteRegistry:
        self.get(name)
        return SiteRegistry(tuple(s for s in self.sites if s.name != name), self.path)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else DEFAULT_SITES_FILE

    def to_yaml(self) -> str:
        body = {"version": SCHEMA_VERSION, "sites": {s.name: s.to_yaml() for s in self.sites}}
        header = "# The hospital network: site -> source and overrides (schema: pipeline/core/sites.py)\n"
        return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------ reading


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _scalar(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _resolve_source(text: str, base_dir: Path | None) -> str:
    """A relative folder is relative to the registry file's folder; ``s3://`` URIs and
    absolute paths are kept."""
    if text.startswith("s3://") or base_dir is None or Path(text).is_absolute():
        return text
    return str((base_dir / text).resolve())


def _site_problems(name: str, node: yaml.Node, where: str, base: PipelineParams) -> tuple[Site | None, list[str]]:
    problems: list[str] = []
    at = f"{where}:{_line(node)}"
    if (problem := site_name_problem(name)) is not None:
        problems.append(f"{at}: {problem}")
    if not isinstance(node, yaml.MappingNode):
        return None, [*problems, f"{at}: site {name!r} must be a mapping with at least 'source'"]
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if key not in SITE_KEYS:
            problems.append(
                f"{where}:{_line(key_node)}: site {name!r}: unknown key {key!r} (allowed: {', '.join(SITE_KEYS)})"
            )
            continue
        values[key] = _scalar(value_node)
        if key in OVERRIDABLE:
            try:
                base.replace(**{key: values[key]})
            except (ParameterError, TypeError) as err:
                detail = str(err).removeprefix("invalid parameters: ")
                problems.append(f"{where}:{_line(value_node)}: site {name!r}: {detail}")
    source = values.pop("source", None)
    if not isinstance(source, str) or not source.strip():
        problems.append(f"{at}: site {name!r} needs a 'source' (a folder or s3://bucket/prefix)")
        return None, problems
    description = str(values.pop("description", "") or "")
    site = Site(name, _resolve_source(source, base_dir=None), values, description)
    return site, problems


def parse_sites(text: str, path: Path | None = None, base: PipelineParams | None = None) -> SiteRegistry:
    """The registry in ``text`` (the content of ``path``); :class:`SitesFileError` listing
    every problem with its line."""
    where = str(path) if path else DEFAULT_SITES_FILE
    base = base or PipelineParams()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SitesFileError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if root is None:
        return SiteRegistry((), path)
    if not isinstance(root, yaml.MappingNode):
        raise SitesFileError(f"{where}:{_line(root)}: must be a mapping with 'version' and 'sites'")
    problems: list[str] = []
    sites: list[Site] = []
    seen: set[str] = set()
    top = {_scalar(k): (k, v) for k, v in root.value}
    for key, (key_node, _) in top.items():
        if key not in ("version", "sites"):
            problems.append(f"{where}:{_line(key_node)}: unknown key {key!r} (allowed: version, sites)")
    if "version" in top and _scalar(top["version"][1]) != SCHEMA_VERSION:
        problems.append(f"{where}:{_line(top['version'][1])}: version must be {SCHEMA_VERSION}")
    sites_node = top.get("sites", (None, None))[1]
    if sites_node is not None and not isinstance(sites_node, yaml.MappingNode):
        if _scalar(sites_node) is not None:
            problems.append(f"{where}:{_line(sites_node)}: 'sites' must be a mapping of site name -> site")
        sites_node = None
    for name_node, site_node in sites_node.value if sites_node is not None else []:
        name = _scalar(name_node)
        if name in seen:
            problems.append(f"{where}:{_line(name_node)}: site {name!r} is listed twice")
            continue
        seen.add(name)
        site, site_problems = _site_problems(str(name), site_node, where, base)
        problems.extend(site_problems)
        if site is not None:
            base_dir = path.resolve().parent if path else None
            sites.append(Site(site.name, _resolve_source(site.source, base_dir), site.overrides, site.description))
    if problems:
        raise SitesFileError("; ".join(problems))
    return SiteRegistry(tuple(sites), path)


def load_sites(path: str | Path, base: PipelineParams | None = None) -> SiteRegistry:
    """Read and validate the registry file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such site registry (create one with `cessl sites add`)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SitesFileError(f"{path}: cannot be read ({err})") from None
    return parse_sites(text, path, base)


def save_sites(registry: SiteRegistry, path: str | Path) -> Path:
    """Write ``registry`` to ``path`` atomically. Sources under the file's folder are
    written relative to it (the file can be moved with its data)."""
    path = Path(path)
    base_dir = path.resolve().parent

    def relative(source: str) -> str:
        if source.startswith("s3://"):
            return source
        try:
            return str(Path(source).resolve().relative_to(base_dir))
        except ValueError:
            return source

    portable = SiteRegistry(
        tuple(Site(s.name, relative(s.source), s.overrides, s.description) for s in registry.sites), path
    )
    return atomic_write_text(path, portable.to_yaml())
