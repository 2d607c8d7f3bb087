"""Step: preprocess the accepted records into one dataset store (``ml.data.preprocess``).

Resample to 500 Hz, band-pass 1-47 Hz, standardise each lead, crop/pad to 6144 samples;
classes: the scored diagnoses with at least ``min_count`` labelled records. With a
``state_dir`` the previous store of the same source is reused row by row (unchanged
records are copied, not recomputed) and the result is hard-linked (or copied) into the
step's output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.common import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessResult:
    n_records: int
    classes: list[str]
    fingerprint: str


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        target = dst / path.name
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _sources_key(manifest: Path) -> str:
    """Short hash of the (site, source) pairs a manifest covers (one reusable store per set;
    sources of no site are hashed as they always were)."""
    from ml.data.ingest import read_manifest

    table = read_manifest(manifest)
    pairs = set(zip(table["site"].astype(str), table["source"].astype(str), strict=True))
    sources = sorted(f"{site}\t{source}" if site else source for site, source in pairs)
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


def preprocess_step(
    manifest_dir: Path,
    out_dir: Path,
    min_count: int = 200,
    state_dir: str | Path | None = None,
    workers: int | None = None,
) -> PreprocessResult:
    """Build the store in ``out_dir`` from the manifest in ``manifest_dir``."""
    from ml.data.ingest import MANIFEST_FILE
    from ml.data.parallel import default_workers
    from ml.data.preprocess import preprocess
    from ml.data.store import META_FILE, TABLE_FILE

    manifest = Path(manifest_dir) / MANIFEST_FILE
    n_workers = workers or default_workers()
    if state_dir:
        build = Path(state_dir) / "stores" / f"{_sources_key(manifest)}-min{min_count}"
        build.parent.mkdir(parents=True, exist_ok=True)
        store = preprocess(manifest, build, min_count=min_count, workers=n_workers, progress=False)
        _link_or_copy_tree(build, Path(out_dir))
    else:
        store = preprocess(manifest, out_dir, min_count=min_count, workers=n_workers, progress=False)
    out = Path(out_dir)
    fingerprint = hashlib.sha256((sha256_file(out / TABLE_FILE) + sha256_file(out / META_FILE)).encode()).hexdigest()
    log.info("store %s: %d records, %d classes %s", out, len(store), len(store.classes), store.classes)
    return PreprocessResult(n_records=len(store), classes=list(store.classes), fingerprint=fingerprint)
