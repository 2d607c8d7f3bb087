"""What a cluster run must not be given: values that name something on this machine.

A pipeline compiled or submitted for a cluster carries values as parameters (their compiled
defaults, a run's arguments) and as the image of every step. Some only mean something on the
machine that compiles: a folder of this laptop, a relative path, an image in this machine's
own registry (``localhost:5000/...``). :func:`local_values` finds them in a run's arguments
(or a compiled pipeline's defaults) and in its images; :func:`check_local_values` refuses
the ones a cluster can never use and warns about those it may:

- a network site's ``source`` (``sites.yaml``: ``sites[NAME].source``) that is a relative
  path, or a folder of this machine inside the user's home or the current project: refused
  (the site's data must be where the cluster reads it: ``s3://bucket/prefix``);
- any other existing absolute folder of this machine as a site's source: warned (a volume
  mounted at the same path on this machine and in the cluster's pods can be legitimate);
- the single-site ``--source`` (and the pre-training ``--source``) when it is a relative path
  or an existing folder of this machine: warned (the cluster default ``data`` is relative);
- an image on ``localhost``, ``127.0.0.1`` or ``[::1]`` (``--image``, ``$CESSL_IMAGE``,
  ``--trainer-image``): warned (a kind cluster with a local registry pulls it);
- a ``--tracking-uri`` of this machine (``sqlite:``, ``file:``, a path, ``localhost``):
  warned (the steps then read the ConfigMap's unless it is reachable from the pods).

Each message is one line naming the value and the flag or ``sites.yaml`` field to set.
No kfp here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LOCAL_REGISTRY_HOSTS = ("localhost", "127.0.0.1", "[::1]")
IMAGE_FLAG = "--image (or $CESSL_IMAGE)"
# Parameters holding an image, and the flag that sets each.
IMAGE_PARAMS = {"trainer_image": "--trainer-image"}
# Parameters holding a data source, and the flag that sets each.
SOURCE_PARAMS = {"source": "--source"}
TRACKING_FLAG = "--tracking-uri"
LOCAL_STORE_SCHEMES = ("sqlite:", "file:")


@dataclass(frozen=True)
class LocalValue:
    """A value that names something on this machine; ``refused``: a cluster can never use it."""

    value: str
    where: str  # the flag or sites.yaml field that sets it
    why: str
    fix: str
    refused: bool

    def message(self) -> str:
        return f"{self.where} {self.value!r}: {self.why}; {self.fix}"


def is_local_image(image: str) -> bool:
    """True when ``image`` is pulled from this machine's own registry (``localhost:5000/x``)."""
    host = image.split("/", 1)[0] if "/" in image else ""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]" in LOCAL_REGISTRY_HOSTS
    return host.split(":", 1)[0] in LOCAL_REGISTRY_HOSTS


def image_value(image: str, where: str = IMAGE_FLAG) -> LocalValue | None:
    """The warning for an image of this machine's registry (None for any other)."""
    if not image or not is_local_image(image):
        return None
    return LocalValue(
        image,
        where,
        "an image in this machine's registry: only a cluster that pulls from it (kind with a local registry) runs it",
        f"push it to a registry the cluster pulls from and set {where.split(' ')[0]}",
        refused=False,
    )


def tracking_value(uri: str) -> LocalValue | None:
    """The warning for a tracking URI of this machine (None for "" and any other)."""
    if not uri:
        return None
    host = urlsplit(uri).hostname or ""
    local_store = uri.startswith(LOCAL_STORE_SCHEMES) or "://" not in uri
    if not local_store and host.strip("[]") not in ("localhost", "127.0.0.1", "::1"):
        return None
    why = "a tracking store of this machine: the pipeline's pods cannot reach it"
    return LocalValue(uri, TRACKING_FLAG, why, "leave it unset (the ConfigMap's) or name the cluster's", False)


def _inside_laptop(path: Path) -> bool:
    """A folder inside the user's home or the current project: never a cluster's mount."""
    roots = (Path.home().resolve(), Path.cwd().resolve())
    return any(path.resolve().is_relative_to(root) for root in roots if root != Path("/"))


def path_value(source: str, where: str, strict: bool) -> LocalValue | None:
    """Why ``source`` (set by ``where``) cannot (``refused``) or might not reach a cluster's
    pods; None for a URL (``s3://``) or an absolute path this machine does not have.
    ``strict``: a relative path or a laptop folder is refused (else warned)."""
    if not source or "://" in source:
        return None
    path = Path(source)
    fix = "set an s3://bucket/prefix source the cluster reads"
    if not path.is_absolute():
        return LocalValue(source, where, "a relative path: a cluster's pods cannot read it", fix, refused=strict)
    if not path.exists():
        return None  # a path of the cluster's pods (a mounted volume), not of this machine
    if _inside_laptop(path):
        return LocalValue(source, where, "a folder of this machine: a cluster's pods cannot read it", fix, strict)
    why = "a folder of this machine: a cluster's ingest reads it only where its pods mount it at this path"
    return LocalValue(source, where, why, fix + " (or mount that volume in the pipeline's pods)", refused=False)


def site_where(sites_file: str, name: str) -> str:
    return f"{sites_file}: sites[{name}].source"


def local_values(
    values: Mapping[str, Any], sites_file: str = "sites.yaml", images: Iterable[str] = ()
) -> list[LocalValue]:
    """The local values among a run's arguments (or a compiled pipeline's defaults) ``values``
    and the steps' ``images``: the sources, every site's source, the images (once each)."""
    found: list[LocalValue | None] = [image_value(image) for image in images]
    found += [image_value(str(values[name]), flag) for name, flag in IMAGE_PARAMS.items() if name in values]
    found += [
        path_value(str(values[name]), flag, strict=False) for name, flag in SOURCE_PARAMS.items() if name in values
    ]
    found.append(tracking_value(str(values.get("tracking_uri") or "")))
    for item in values.get("sites") or ():
        found.append(
            path_value(str(item.get("source", "")), site_where(sites_file, item.get("name", "?")), strict=True)
        )
    unique: dict[str, LocalValue] = {}
    for value in filter(None, found):
        unique.setdefault(value.value, value)
    return list(unique.values())


def check_local_values(values: Mapping[str, Any], sites_file: str = "sites.yaml", images: Iterable[str] = ()) -> None:
    """Warn (one line each) about the local values a cluster may still use; ValueError (one
    line, every refused value) when any can never be used."""
    found = local_values(values, sites_file, images)
    for value in found:
        if not value.refused:
            log.warning("%s", value.message())
    refused = [value.message() for value in found if value.refused]
    if refused:
        raise ValueError("; ".join(refused))
