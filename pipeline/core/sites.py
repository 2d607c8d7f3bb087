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
- ``x-...``: any top-level key starting with ``x-`` is ignored: a place for the anchors that
  sites merge (``x-defaults: &defaults {method: fixmatch}``, then ``<<: *defaults`` in a site).
- ``sites``: a mapping of site name -> site. A name is a DNS label (lower-case letters,
  digits and ``-``, starting with a letter, at most 40 characters): it becomes part of the
  registered model's name (``<model>-<site>``), of KFP task names and of Kubernetes objects.
- a site: ``source`` (required), ``description`` (free text), and any of
  :data:`OVERRIDABLE` (the run's parameters a site may change), checked by the same
  constraints as the command-line flags (:class:`pipeline.core.params.PipelineParams`).
  ``source``: ``s3://bucket/prefix`` (no ``..`` segment), a folder relative to the file's
  folder that stays inside it, or an absolute folder.

The file is read by :mod:`pipeline.core.files` (a regular file of at most 1 MiB, safe YAML:
merge keys, no tags, bounded nesting and aliases). ``cessl sites add`` checks a new site
with the same function as the file's (:func:`site_problems`). Every problem is reported with
the file and line it is on (``sites.yaml:7: ...``), all at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml.errors import BadFileError, ParameterError
from ml.io import atomic_write_text
from pipeline.core.constraints import source_problem
from pipeline.core.files import MissingFileError, UserFileError, YamlFile, parse_yaml, read_yaml
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
EXTENSION_PREFIX = "x-"  # top-level keys that only hold YAML anchors for merge keys ("x-defaults: &d")


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


# ------------------------------------------------------------------------------ one site's checks
# A site read from the file and a site `cessl sites add` writes go through the same checks
# (:func:`site_problems`): what one refuses, the other refuses too; `sites add` also needs the
# folder to exist now (a folder that goes missing later fails its site's run, not the file).


def source_root(registry_file: Path | None) -> Path | None:
    """The folder a site's relative source is relative to: the registry file's."""
    return registry_file.resolve().parent if registry_file is not None else None


def site_source_problem(source: Any, root: Path | None, must_exist: bool = False) -> str | None:
    """What is wrong with a site's ``source`` (None: nothing): an ``s3://bucket/prefix``
    (:func:`pipeline.core.constraints.source_problem`: a bucket, no ``..`` segment), a folder
    relative to ``root`` that stays inside it, or an absolute folder. ``must_exist`` (`sites
    add`): the folder is there now; in a file a folder that is gone is the run's problem (that
    site fails alone: ``pipeline.cli.sites.preflight_sites``)."""
    if not isinstance(source, str) or not source.strip():
        return "needs a 'source' (a folder or s3://bucket/prefix)"
    problem = source_problem(source)
    if problem:
        return f"source {source!r}: {problem}"
    if "://" in source:
        return None
    folder = Path(source)
    if not folder.is_absolute():
        normal = os.path.normpath(source)
        if normal == os.pardir or normal.startswith(os.pardir + os.sep):
            inside = f" ({root})" if root is not None else ""
            return (
                f"source {source!r} leaves the registry file's folder{inside}: "
                "name a folder inside it, or an absolute path"
            )
        folder = root / normal if root is not None else Path(normal)
    if must_exist and not folder.is_dir():
        return f"source {source!r}: " + (
            "is a file, expected a folder" if folder.exists() else f"folder {folder} not found"
        )
    return None


def override_problem(key: str, value: Any, base: PipelineParams) -> str | None:
    """What is wrong with a site's override of parameter ``key`` (None: nothing): the
    parameter's own constraints, as its flag has them (names the flag)."""
    try:
        base.replace(**{key: value})
    except (ParameterError, TypeError) as err:
        return str(err).removeprefix("invalid parameters: ")
    return None


def site_problems(
    name: Any, values: Mapping[str, Any], root: Path | None, base: PipelineParams, must_exist: bool = False
) -> dict[str, str]:
    """Each problem of one site, by the key it is on (``"name"`` for the name): the name, the
    source (:func:`site_source_problem`), the description and each override."""
    problems: dict[str, str] = {}
    if (problem := site_name_problem(name)) is not None:
        problems["name"] = problem
    if "source" not in values:
        problems["source"] = "needs a 'source' (a folder or s3://bucket/prefix)"
    for key, value in values.items():
        if key not in SITE_KEYS:
            problem = f"unknown key {key!r} (allowed: {', '.join(SITE_KEYS)})"
        elif key == "source":
            problem = site_source_problem(value, root, must_exist)
        elif key == "description":
            problem = None if value is None or isinstance(value, str) else "description must be text"
        else:
            problem = override_problem(key, value, base)
        if problem is not None:
            problems[str(key)] = problem
    return problems


def resolve_source(source: str, root: Path | None) -> str:
    """A relative folder is relative to ``root`` (the registry file's folder); ``s3://`` URIs
    and absolute paths are kept."""
    if source.startswith("s3://") or root is None or Path(source).is_absolute():
        return source
    return str((root / source).resolve())


def new_site(
    name: str,
    source: str,
    overrides: Mapping[str, Any],
    description: str,
    registry_file: Path,
    base: PipelineParams | None = None,
) -> Site:
    """The site `cessl sites add` writes to ``registry_file``, checked as the file's sites are
    (and its folder exists now); :class:`ml.errors.ParameterError` naming every problem."""
    root = source_root(registry_file)
    values = {"source": source, **overrides, **({"description": description} if description else {})}
    problems = site_problems(name, values, root, base or PipelineParams(), must_exist=True)
    if problems:
        raise ParameterError(
            "; ".join(problem if key == "name" else f"site {name!r}: {problem}" for key, problem in problems.items())
        )
    return Site(name, resolve_source(source, root), dict(overrides), description)


# ------------------------------------------------------------------------------ reading


def _read_site(
    doc: YamlFile, name: Any, name_node: yaml.Node, node: yaml.Node, root: Path | None, base: PipelineParams
) -> tuple[Site | None, list[str]]:
    at = doc.at(name_node)
    if not isinstance(node, yaml.MappingNode):
        problem = site_name_problem(name)
        return None, [
            *([f"{at}: {problem}"] if problem else []),
            f"{at}: site {name!r} must be a mapping with 'source'",
        ]
    values: dict[Any, Any] = {}
    lines: dict[str, str] = {}
    for key, key_node, value_node in doc.pairs(node):
        values[key] = doc.value(value_node)
        lines[str(key)] = doc.at(value_node if key in SITE_KEYS else key_node)
    problems = site_problems(name, values, root, base)
    if problems:
        return None, [
            f"{at}: {problem}" if key == "name" else f"{lines.get(key, at)}: site {name!r}: {problem}"
            for key, problem in problems.items()
        ]
    overrides = {key: values[key] for key in OVERRIDABLE if key in values}
    return Site(name, resolve_source(values["source"], root), overrides, values.get("description") or ""), []


def _registry(doc: YamlFile, path: Path | None, base: PipelineParams) -> SiteRegistry:
    """The registry of a checked YAML document; :class:`SitesFileError` listing every problem."""
    root = doc.root
    if root is None:
        return SiteRegistry((), path)
    if not isinstance(root, yaml.MappingNode):
        raise SitesFileError(f"{doc.at(root)}: must be a mapping with 'version' and 'sites'")
    problems: list[str] = []
    top = {key: (key_node, value_node) for key, key_node, value_node in doc.pairs(root)}
    for key, (key_node, _) in top.items():
        if key not in ("version", "sites") and not (isinstance(key, str) and key.startswith(EXTENSION_PREFIX)):
            problems.append(f"{doc.at(key_node)}: unknown key {key!r} (allowed: version, sites, x-...)")
    if "version" in top:
        version = doc.value(top["version"][1])
        if type(version) is not int or version != SCHEMA_VERSION:
            problems.append(f"{doc.at(top['version'][1])}: version must be {SCHEMA_VERSION}")
    sites_node = top["sites"][1] if "sites" in top else None
    if sites_node is not None and not isinstance(sites_node, yaml.MappingNode):
        if doc.value(sites_node) is not None:
            problems.append(f"{doc.at(sites_node)}: 'sites' must be a mapping of site name -> site")
        sites_node = None
    sites: list[Site] = []
    folder = source_root(path)
    for name, name_node, site_node in doc.pairs(sites_node) if sites_node is not None else []:
        site, site_problems_ = _read_site(doc, name, name_node, site_node, folder, base)
        problems.extend(site_problems_)
        if site is not None:
            sites.append(site)
    if problems:
        raise SitesFileError("; ".join(problems))
    return SiteRegistry(tuple(sites), path)


def parse_sites(text: str, path: Path | None = None, base: PipelineParams | None = None) -> SiteRegistry:
    """The registry in ``text`` (the content of ``path``), read by :mod:`pipeline.core.files`;
    :class:`SitesFileError` listing every problem with its line."""
    where = str(path) if path else DEFAULT_SITES_FILE
    try:
        return _registry(parse_yaml(text, where), path, base or PipelineParams())
    except UserFileError as err:
        raise SitesFileError(str(err)) from None


def load_sites(path: str | Path, base: PipelineParams | None = None) -> SiteRegistry:
    """Read and validate the registry file at ``path`` (a regular file of at most
    :data:`pipeline.core.files.MAX_FILE_BYTES`)."""
    path = Path(path)
    try:
        return _registry(read_yaml(path), path, base or PipelineParams())
    except MissingFileError:
        raise ParameterError(f"{path}: no such site registry (create one with `cessl sites add`)") from None
    except UserFileError as err:
        raise SitesFileError(str(err)) from None


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
