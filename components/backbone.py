"""Step: resolve the pre-trained backbone into one backbone folder the later steps read.

The folder is ``ml.model.pretrained``'s format: ``backbone.safetensors`` (an r = 0 state
dict in the reference names) + ``backbone_config.json`` (size, pre-training classes,
identity hash, provenance). Accepted specs:

- ``default``: the embedded default backbone of the requested size
  (``ml.train.default_backbone.ensure_default_backbone``: pre-trained once on a synthetic source
  hospital, then cached in ``cache_dir``); in a Kubernetes pod (a cluster run) the step
  warns loudly (:data:`SYNTHETIC_BACKBONE_WARNING`): it is a demo backbone;
- a backbone folder (``cessl backbone pretrain``/``import`` output);
- a released reference checkpoint file (``.pt``/``.pth``; unpickled with
  ``weights_only=True`` only), imported as size ``backbone_config``;
- ``s3://bucket/key`` of such a folder or file (boto3; endpoint and credentials from the
  standard AWS environment variables).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import StepError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".tar")
SYNTHETIC_SOURCE = "embedded-default"  # backbone_config.json "source" of the embedded default
# Set in every pod of a Kubernetes cluster: a run there with the synthetic backbone warns.
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
SYNTHETIC_BACKBONE_WARNING = (
    "SYNTHETIC BACKBONE: backbone 'default' is the embedded demo backbone, pre-trained on a "
    "synthetic source hospital, not on real ECGs; adapters fine-tuned on it are not fit for "
    "clinical use. Import the authors' released checkpoint (cessl backbone import CKPT.pt "
    "--config base --out DIR --register) and run with backbone=models:/cessl-backbone-base@<alias> "
    "(or an s3:// URI of the folder) and backbone_config=base"
)


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in a Kubernetes pod (e.g. a KFP step on a cluster)."""
    return bool((os.environ if environ is None else environ).get(IN_CLUSTER_ENV))


@dataclass(frozen=True)
class BackboneInfo:
    """What the resolved backbone folder holds."""

    name: str  # size: tinylight, tiny, base, medium, large
    identity: str  # ml.model.adapter.state_dict_identity of the weights
    origin: str  # the spec it was resolved from ("default", a path, s3://...)
    source: str  # pretrain | import | embedded-default
    path: Path

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "identity": self.identity, "origin": self.origin, "source": self.source}


def _download_s3(uri: str, dest: Path) -> Path:
    """Download an s3:// object, or every object under an s3:// prefix, into ``dest``."""
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise StepError(f"backbone {uri!r}: expected s3://bucket/key")
    s3 = boto3.client("s3")
    dest.mkdir(parents=True, exist_ok=True)
    prefix = key.rstrip("/") + "/"
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    if not keys:  # a single object
        target = dest / Path(key).name
        s3.download_file(bucket, key, str(target))
        return target
    for obj in keys:
        target = dest / obj[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj, str(target))
    return dest


def _copy_folder(src: Path, dst: Path) -> None:
    from ml.model.pretrained import BACKBONE_CONFIG, BACKBONE_WEIGHTS

    dst.mkdir(parents=True, exist_ok=True)
    for name in (BACKBONE_WEIGHTS, BACKBONE_CONFIG):
        shutil.copyfile(src / name, dst / name)


def resolve_backbone_step(
    spec: str, config_name: str, out_dir: Path, cache_dir: str | Path | None = None
) -> BackboneInfo:
    """Write the backbone ``spec`` (of size ``config_name``) as a backbone folder in ``out_dir``."""
    from ml.model.pretrained import import_reference_checkpoint, read_backbone
    from ml.train.default_backbone import ensure_default_backbone

    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else None
    origin = spec or "default"
    if origin == "default":
        _copy_folder(ensure_default_backbone(cache, name=config_name, progress=False), out_dir)
    else:
        path = Path(spec)
        if spec.startswith("s3://"):
            path = _download_s3(spec, Path(tempfile.mkdtemp(prefix="cessl-backbone-")))
        if path.is_dir():
            read_backbone(path)  # verifies identity, keys and shapes before anything is copied
            _copy_folder(path, out_dir)
        elif path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            import_reference_checkpoint(path, config_name, out_dir)
        else:
            raise StepError(
                f"backbone {spec!r}: not 'default', a backbone folder, a checkpoint file "
                f"({', '.join(CHECKPOINT_SUFFIXES)}) or an s3:// URI of one"
            )
    backbone = read_backbone(out_dir)
    if backbone.name != config_name:
        raise StepError(f"backbone {spec!r} is a {backbone.name!r} backbone, but backbone_config is {config_name!r}")
    source = str(backbone.meta.get("source", ""))
    if source == SYNTHETIC_SOURCE and in_cluster():  # however it came: "default", a folder, models:/
        log.warning("%s", SYNTHETIC_BACKBONE_WARNING)
    log.info("backbone %s from %s (%s): identity %s", backbone.name, origin, source, backbone.identity[:12])
    return BackboneInfo(name=backbone.name, identity=backbone.identity, origin=origin, source=source, path=out_dir)
