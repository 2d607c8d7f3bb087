"""Step: ingest WFDB records from a folder or ``s3://`` prefix (``ml.data.ingest``).

Every record ends accepted or quarantined with a reason. A record is (site, path): with
``site`` set (the hospital network) its key in the store and splits is ``<site>/<id>``;
only byte-identical copies are quarantined as duplicates. With a ``state_dir`` the
manifest persists across runs there, so a record seen before (same files) is not read
again; the step's output holds the manifest rows of this source as it is now (records
that disappeared from the source are left out) and the quarantine report.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.common import StepError, sha256_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    n_records: int  # accepted
    n_quarantined: int
    fingerprint: str  # hash of the output manifest
    read: int = 0  # records parsed in this run
    reused: int = 0  # unchanged since an earlier run: not read again
    source_version: str = ""  # an s3:// source's data version from its listing (ml.data.dvc.objects_version)


def state_folder(state_dir: str | Path | None, source_uri: str, site: str = "") -> Path:
    """Where the incremental manifest of ``source_uri`` (as site ``site``) lives between runs
    (one per source and site; without a site, the folder it always had)."""
    root = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cessl-ingest-"))
    key = f"{site}\n{source_uri}" if site else source_uri
    return root / "ingest" / hashlib.sha256(key.encode()).hexdigest()[:16]


CONTENT_COLUMNS = ("id", "site", "source", "key", "content_hash", "status", "reason", "labels", "labelled")


def manifest_fingerprint(manifest) -> str:
    """Hash of what the records are (not when they were read): stable across re-ingestion."""
    rows = manifest[list(CONTENT_COLUMNS)].astype(str).sort_values(["source", "key"]).to_dict("records")
    return sha256_json(rows)


def ingest_step(
    source: str,
    out_dir: Path,
    quarantine_path: Path,
    state_dir: str | Path | None = None,
    workers: int | None = None,
    site: str = "",
) -> IngestResult:
    """Ingest ``source``; write ``manifest.parquet`` (+ reports) to ``out_dir``, the quarantine report to ``quarantine_path``.

    ``site``: the hospital the source belongs to (a DNS label, "" for none): its records are
    keyed ``<site>/<id>`` in the store and splits (``ml.data.ingest``)."""
    from ml.data.dvc import objects_version
    from ml.data.ingest import (
        ACCEPTED,
        MANIFEST_FILE,
        QUARANTINE_FILE,
        REPORT_FILE,
        IngestConfig,
        ingest,
        read_manifest,
        write_manifest,
    )
    from ml.data.parallel import default_workers
    from ml.data.sources import S3Source, check_site, open_source
    from ml.errors import ParameterError

    try:
        check_site(site)
    except ParameterError as err:
        raise StepError(f"{source}: {err}") from None
    src = open_source(source)
    work = state_folder(state_dir, src.uri, site)
    source_version = ""
    if isinstance(src, S3Source):  # the version of the objects as this run lists them
        objects = src.objects()
        source_version = objects_version(objects) if objects else ""
    report = ingest(src, work, config=IngestConfig(workers=workers or default_workers()), progress=False, site=site)
    current = {r.key for r in src.list_records()}
    manifest = read_manifest(work / MANIFEST_FILE)
    mine = manifest[(manifest["source"] == src.uri) & manifest["key"].isin(current)].reset_index(drop=True)
    if mine.empty:
        raise StepError(f"{source}: no WFDB record (.hea) found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(mine, out_dir / MANIFEST_FILE)
    shutil.copyfile(work / REPORT_FILE, out_dir / REPORT_FILE)
    shutil.copyfile(work / QUARANTINE_FILE, out_dir / QUARANTINE_FILE)
    Path(quarantine_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / QUARANTINE_FILE, quarantine_path)
    n_ok = int((mine["status"] == ACCEPTED).sum())
    if n_ok == 0:
        raise StepError(f"{source}: all {len(mine)} records were quarantined; see {quarantine_path}")
    log.info(
        "ingested %s%s: %d accepted, %d quarantined (read %d, unchanged %d)",
        src.uri,
        f" (site {site})" if site else "",
        n_ok,
        len(mine) - n_ok,
        report.read,
        report.reused,
    )
    return IngestResult(
        n_records=n_ok,
        n_quarantined=len(mine) - n_ok,
        fingerprint=manifest_fingerprint(mine),
        read=report.read,
        reused=report.reused,
        source_version=source_version,
    )
