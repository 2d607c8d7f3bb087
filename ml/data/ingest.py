"""Ingestion: every record of a source ends accepted or quarantined with a reason.

:func:`ingest` lists a source (local folder or ``s3://``), reads each record that is new
or changed, validates it (:func:`ml.data.records.read_record`), and merges the result
into a manifest that accumulates over sources and runs:

    ingest_dir/manifest.parquet     one row per record file: id, site, source, key,
                                    content_hash, fs, length, labels, age, sex,
                                    status, reason, detail, ...
    ingest_dir/quarantine.md        human-readable report of the last run
    ingest_dir/ingest_report.json   the same counts, machine-readable

Beyond the reader's checks (:func:`ml.data.records.read_record`), a record that was read is
quarantined as ``signal_quality`` when its signal fails :func:`ml.data.quality.check_record`
(the detail names each failing lead and why: the same check ``cessl predict`` and ``cessl
serve`` answer "unreadable" with; what it tolerates, leads not recorded, is accepted with a
``signal quality: ...`` note in the manifest's ``notes`` and listed in ``quarantine.md``), and as ``unknown_label`` when a ``# Dx`` token is not a
SNOMED CT concept id (:mod:`ml.data.labels`; valid codes the Challenge does not score are
kept). A quarantined record is never trained on, not even as unlabelled.

Incremental: a record whose files have the same stamp (sizes + mtimes / ETags) as in the
manifest is not opened at all; one whose stamp changed but whose content hash is known is
not parsed again. A record's files are its header, the files next to it with its stem, and
every signal file its header names (another record's ``.mat``...): the stamp and the
content hash cover all of them, so a change to any of them reads the record again. Re-ingesting a source replaces its rows (records gone from it leave
the manifest; other sources stay). Counts always add up: ``seen = accepted + quarantined``.

Identity: a record is (site, record path). Its ``id`` is the header's path relative to the
source root without ``.hea`` (``g1/00001``; ``A0001`` at the root), so records of two
folders that share a name are two records. ``site`` names the hospital the source belongs
to (the ``site`` argument of :func:`ingest`); tables shared between sites key a record as
``<site>/<id>`` (:func:`ml.data.sources.record_key`). Without a site the first source of a
manifest keeps ``site == ""`` (bare ids, as before sites existed); any other source
ingested into the same manifest without one gets a stable name derived from its URI
(:func:`ml.data.sources.derived_site_name`), so its records never clash with the first's.
A source keeps the site it was first ingested with when re-ingested without one.

Duplicates: only byte-identical records (same content hash over all of a record's files)
are duplicates. The record ingested first (within one run: the first key in sorted order)
is the original; a copy is quarantined as ``duplicate_id`` with "identical copy of
<site>/<id>" in its detail and in the reports. The original leaving the source hands its
place to the copy. Different content under different paths is never a duplicate; the one
remaining clash is two sources given the same site that hold the same record path with
different content (one site's record paths must be unique): the later one is quarantined
as ``duplicate_id`` with a detail that says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.data.labels import LabelMapping
from ml.data.parallel import process_pool, progress_bar
from ml.data.paths import UnsafePathError, file_name_problem
from ml.data.quality import QualityConfig, check_record
from ml.data.records import (
    ECGRecord,
    Reason,
    RecordError,
    ValidationConfig,
    parse_metadata,
    read_header,
    read_record,
)
from ml.data.sources import (
    RecordRef,
    Source,
    check_site,
    derived_site_name,
    extend_stamp,
    open_source,
    record_id_of,
    record_key,
)
from ml.data.store import join_codes
from ml.errors import BadFileError
from ml.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.md"
REPORT_FILE = "ingest_report.json"
ACCEPTED, QUARANTINED = "accepted", "quarantined"
MIN_PARALLEL = 128  # fewer records than this are processed in the calling process

MANIFEST_COLUMNS: dict[str, str] = {
    "id": "str",  # path of the header relative to the source root, without .hea
    "site": "str",  # the hospital the source belongs to ("" : none given)
    "source": "str",
    "key": "str",
    "content_hash": "str",
    "stamp": "str",
    "status": "str",
    "reason": "str",
    "detail": "str",
    "fs": "float64",
    "length": "Int64",
    "n_signals": "Int64",
    "labelled": "bool",
    "labels": "str",  # scored diagnoses (canonical SNOMED codes), comma-joined
    "dx": "str",  # every code of the # Dx line, as written
    "unscored": "str",  # valid SNOMED codes that the Challenge does not score
    "unknown": "str",  # tokens that are not SNOMED codes
    "age": "float64",
    "sex": "str",
    "notes": "str",
    "ingested_at": "str",
}


@dataclass
class IngestReport:
    """Counts of one ingestion run (``seen == accepted + quarantined``, ``read + reused == seen``)."""

    source: str
    site: str = ""  # the site the source's records were ingested under
    seen: int = 0
    accepted: int = 0
    quarantined: int = 0
    read: int = 0  # records parsed in this run
    reused: int = 0  # unchanged records taken from the manifest
    labelled: int = 0  # accepted with a # Dx line
    unlabelled: int = 0  # accepted without one: for the semi-supervised part
    resampled: int = 0  # accepted at a rate other than 500 Hz
    by_reason: dict[str, int] = field(default_factory=dict)
    unscored_codes: dict[str, int] = field(default_factory=dict)  # code -> accepted records
    unknown_codes: dict[str, int] = field(default_factory=dict)  # token -> records quarantined as unknown_label
    manifest_records: int = 0
    manifest_accepted: int = 0
    # files that are no record's: orphan signal files (no header names them) and entries
    # that could not be listed (unreadable folder, broken link...), key -> reason
    orphans: dict[str, str] = field(default_factory=dict)
    # byte-identical copies quarantined in this run: copy's key -> "<site>/<id>" of the original
    duplicates: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.seen != self.accepted + self.quarantined or self.seen != self.read + self.reused:
            raise AssertionError(f"ingestion counts do not add up: {self}")


# ---------------------------------------------------------------------------------------
# One record (runs in worker processes)
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _cached_source(uri: str) -> Source:
    return open_source(uri)


def content_hash(files: dict[str, bytes]) -> str:
    """sha256 over a record's files (base names and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(name.rsplit("/", 1)[-1].encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


def _read_files(source: Source, ref: RecordRef) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for key in source.record_files(ref):
        try:
            files[key.rsplit("/", 1)[-1]] = source.read(key)
        except FileNotFoundError:
            continue  # listed a moment ago, gone now: the reader reports what is missing
    return files


def _referenced_files(source: Source, ref: RecordRef, files: dict[str, bytes]) -> RecordRef:
    """Read the signal files the header names that are not among ``files`` yet (another
    record's signal file...) into ``files``; returns ``ref`` with their stamps added, so the
    content hash and the change stamp cover every file the record is read from. Names the
    reader will refuse (unsafe) or report (missing) are stamped but not read."""
    header_name = ref.key.rsplit("/", 1)[-1]
    if header_name not in files:
        return ref
    try:
        header, _ = read_header(files[header_name], ref.where)
    except RecordError:
        return ref  # the reader reports the header
    folder = ref.key.rsplit("/", 1)[0] + "/" if "/" in ref.key else ""
    names = sorted({s.file_name for s in header.signals} - set(files))
    names = [n for n in names if file_name_problem(n) is None]
    if not names:
        return ref
    parts = []
    for name in names:
        parts.append(source.file_stamp(folder + name))
        try:
            files[name] = source.read(folder + name)
        except FileNotFoundError:
            continue  # reported by the reader as a missing signal file
    return dataclasses.replace(ref, stamp=extend_stamp(ref.stamp, parts))


def _record_from_files(ref: RecordRef, files: dict[str, bytes], source: Source, config: ValidationConfig) -> ECGRecord:
    header_name = ref.key.rsplit("/", 1)[-1]
    if header_name not in files:
        raise RecordError(Reason.UNREADABLE, f"{ref.where}: header file vanished")
    fallback = source.sibling_reader(ref.key)

    def read_file(name: str) -> bytes:
        return files[name] if name in files else fallback(name)

    return read_record(files[header_name], read_file, ref.where, config, record_id=ref.record_id)


class StaleRecordError(BadFileError, RuntimeError):
    """A record whose files no longer hash to the manifest's content hash."""


def load_record(
    source: str | Source,
    key: str,
    expected_hash: str | None = None,
    config: ValidationConfig = ValidationConfig(),
    stamp: str | None = None,
) -> ECGRecord:
    """Read one accepted record again (preprocessing) and check that its content is unchanged.

    ``stamp`` (the manifest's) names the record's files without listing the folder.
    """
    src = _cached_source(source) if isinstance(source, str) else source
    ref = RecordRef(src.uri, key, record_id_of(key), stamp or "")
    keys = src.record_files(ref) if stamp else src.stem_files(key)
    files = {k.rsplit("/", 1)[-1]: src.read(k) for k in keys}
    if not stamp:
        _referenced_files(src, ref, files)
    if expected_hash is not None and content_hash(files) != expected_hash:
        raise StaleRecordError(
            f"{ref.where} (or a signal file its header names) changed since it was ingested; run the ingestion again"
        )
    return _record_from_files(ref, files, src, config)


def _row(ref: RecordRef, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(
        id=ref.record_id,
        site="",  # set by the run (ingest's site)
        source=ref.source,
        key=ref.key,
        stamp=ref.stamp,
        reason="",
        detail="",
        notes="",
        labelled=False,
        labels="",
        dx="",
        unscored="",
        unknown="",
        content_hash="",
    )
    row.update(values)
    return row


def _metadata_values(dx: list[str] | None, age: float | None, sex: str | None, mapping: LabelMapping) -> dict:
    scored, unscored, unknown = mapping.split_codes(dx or [])
    return {
        "labelled": dx is not None,
        "labels": join_codes(scored),
        "dx": join_codes(dx),
        "unscored": join_codes(unscored),
        "unknown": join_codes(unknown),
        "age": age,
        "sex": sex,
    }


QUALITY_NOTE = "signal quality: "  # the prefix of a manifest note of the signal-quality check


def record_problem(
    record: ECGRecord, mapping: LabelMapping, quality: QualityConfig | None = QualityConfig()
) -> tuple[tuple[Reason, str] | None, list[str]]:
    """``(problem, notes)`` of a record that was read. ``problem``: why it cannot be accepted, its
    signal's quality (``quality``; None: not checked) then labels that are not SNOMED CT codes;
    None when it can. ``notes``: the record's notes for the manifest: the reader's, with what
    the signal-quality check tolerated (``signal quality: V2, V4, V6 not recorded (all samples
    0)``), which replaces the reader's ``flat lead(s)`` note (every lead the reader found flat
    is one the check judged: a fault, or not recorded)."""
    notes = list(record.notes)
    if quality is not None:
        result = check_record(record, quality)
        if not result.ok:
            return (Reason.SIGNAL_QUALITY, f"signal quality: {result.summary()}"), notes
        if record.flat_leads:
            notes = [n for n in notes if n != f"flat lead(s) {', '.join(record.flat_leads)}"]
        notes += [QUALITY_NOTE + note for note in result.notes]
    unknown = mapping.split_codes(record.dx or [])[2]
    if unknown:
        return (Reason.UNKNOWN_LABEL, mapping.unknown_label_detail(unknown)), notes
    return None, notes


def inspect_record(
    source: Source,
    ref: RecordRef,
    config: ValidationConfig,
    known_hashes: frozenset[str] = frozenset(),
    quality: QualityConfig | None = QualityConfig(),
) -> dict[str, Any]:
    """Manifest row of one record. ``status`` is "known" when its content hash is known.
    ``quality``: the signal-quality thresholds (None: no signal-quality check)."""
    mapping = LabelMapping.from_csv()
    if ref.problem:
        return _row(ref, status=QUARANTINED, reason=str(Reason.UNSAFE_PATH), detail=f"{ref.where}: {ref.problem}")
    try:
        files = _read_files(source, ref)
        ref = _referenced_files(source, ref, files)
    except UnsafePathError as err:
        return _row(ref, status=QUARANTINED, reason=str(Reason.UNSAFE_PATH), detail=f"{ref.where}: {err}")
    except OSError as err:
        return _row(ref, status=QUARANTINED, reason=str(Reason.UNREADABLE), detail=f"{ref.where}: {err}")
    digest = content_hash(files)
    if digest in known_hashes:
        return _row(ref, status="known", content_hash=digest)
    try:
        record = _record_from_files(ref, files, source, config)
    except RecordError as err:
        row = _row(ref, status=QUARANTINED, reason=str(err.reason), detail=err.message, content_hash=digest)
        try:  # keep what the header says, when it can be read
            header, _ = read_header(files[ref.key.rsplit("/", 1)[-1]], ref.where)
            row.update(fs=header.fs, length=header.sig_len, n_signals=header.n_sig)
            row.update(_metadata_values(*parse_metadata(header), mapping))
        except (RecordError, KeyError):
            pass
        return row
    except UnsafePathError as err:
        return _row(ref, status=QUARANTINED, reason=str(Reason.UNSAFE_PATH), detail=str(err), content_hash=digest)
    problem, notes = record_problem(record, mapping, quality)
    outcome = (
        {"status": ACCEPTED}
        if problem is None
        else {"status": QUARANTINED, "reason": str(problem[0]), "detail": f"{ref.where}: {problem[1]}"}
    )
    return _row(
        ref,
        **outcome,
        content_hash=digest,
        fs=record.fs,
        length=record.n_samples,
        n_signals=record.n_signals,
        notes="; ".join(notes),
        **_metadata_values(record.dx, record.age, record.sex, mapping),
    )


_COLUMNS = tuple(MANIFEST_COLUMNS)
_worker_known: frozenset[str] = frozenset()  # content hashes already in the manifest (per worker)


def _init_worker(known: frozenset[str]) -> None:
    """Pool initializer: the known hashes travel once per worker, not with every job."""
    global _worker_known
    _worker_known = known


def _inspect_chunk(job: dict[str, Any]) -> list[tuple]:
    """Worker: manifest rows (tuples in MANIFEST_COLUMNS order: compact to send and keep)."""
    source = _cached_source(job["source"]) if isinstance(job["source"], str) else job["source"]
    config = ValidationConfig(**job["config"])
    quality = QualityConfig(**job["quality"]) if job.get("quality") is not None else None
    known = job.get("known", _worker_known)
    rows = (inspect_record(source, ref, config, known, quality) for ref in job["refs"])
    return [tuple(row[c] for c in _COLUMNS) for row in rows]


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    """Manifest columns, in order, with their types ("" for missing text). Columns that
    already have the right type are left alone (no per-cell Python objects)."""
    table = table.reindex(columns=list(MANIFEST_COLUMNS))
    for column, dtype in MANIFEST_COLUMNS.items():
        values = table[column]
        if dtype == "str":
            if not (pd.api.types.is_string_dtype(values.dtype) and values.dtype != object):
                values = values.astype(object).where(values.notna(), "").astype(str)
            elif values.isna().any():
                values = values.fillna("")
        elif dtype == "bool":
            if values.dtype != bool:
                values = values.fillna(False).astype(bool)
        elif str(values.dtype) != dtype:
            values = pd.to_numeric(values, errors="coerce").astype(dtype)
        table[column] = values
    return table.reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest of an ingestion folder (or a manifest parquet path)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ingestion manifest at {path}")
    return _normalise(pd.read_parquet(path))


def write_manifest(table: pd.DataFrame, path: Path, normalised: bool = False) -> None:
    """Write a manifest atomically (``normalised``: its columns already have the manifest types)."""
    with atomic_path(path) as tmp:
        (table if normalised else _normalise(table)).to_parquet(tmp, index=False)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestConfig:
    validation: ValidationConfig = ValidationConfig()
    quality: QualityConfig | None = QualityConfig()  # the signal-quality check (None: off)
    workers: int = 2
    chunk_size: int = 32
    min_parallel: int = MIN_PARALLEL  # fewer new records: no worker processes (~1 s to start)


def ingest(
    source: str | Path | Source,
    out_dir: str | Path,
    *,
    config: IngestConfig = IngestConfig(),
    progress: bool | None = None,
    site: str = "",
) -> IngestReport:
    """Ingest every record of ``source`` into the manifest in ``out_dir`` (see module doc).

    ``site``: the hospital the source belongs to (a DNS label; "" for none, see the module
    doc for what a source without one is keyed by).

    Memory: the main process holds the listing and the manifest (a few hundred bytes per
    record, in Arrow-backed columns); signals only ever live in one worker at a time.
    """
    check_site(site)
    src = open_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_FILE
    previous = read_manifest(manifest_path) if manifest_path.exists() else empty_manifest()
    # ids from the keys: a manifest written before ids were paths gets them here
    previous["id"] = pd.Series([record_id_of(k) for k in previous["key"]], dtype=previous["id"].dtype)
    refs = src.list_records()
    log.info("%s: %d record headers", src.uri, len(refs))

    # Other sources stay as they are; this source's rows are replaced by what it holds
    # now (records that disappeared from it leave the manifest).
    mine = (previous["source"] == src.uri).to_numpy()
    base = previous[~mine].reset_index(drop=True)
    prev_this = previous[mine].reset_index(drop=True)
    site = _effective_site(site, src.uri, prev_this, base)
    prev_stamp = dict(zip(prev_this["key"], prev_this["stamp"], strict=True))
    # Compared with the stamp as it is now: the record's own files AND the other files its
    # header named when it was read (restamped), so a changed signal file of another record
    # that this header uses reads it again.
    unchanged = {
        r.key
        for r in refs
        if not r.problem and r.key in prev_stamp and prev_stamp[r.key] == src.current_stamp(r, prev_stamp[r.key])
    }
    del prev_stamp
    # A duplicate lost its own validation outcome: reuse it only while its original is still
    # there (same content hash, or the same site and id for a clash of record paths).
    dup = (prev_this["reason"] == Reason.DUPLICATE_ID).to_numpy()
    base_owners = base[base["reason"] != Reason.DUPLICATE_ID]
    kept_owners = prev_this[~dup & prev_this["key"].isin(unchanged)]
    owner_hashes = (set(base_owners["content_hash"]) | set(kept_owners["content_hash"])) - {""}
    owner_ids = set(zip(base_owners["site"], base_owners["id"], strict=True)) | {(site, i) for i in kept_owners["id"]}
    orphaned = dup & ~(
        prev_this["content_hash"].isin(owner_hashes).to_numpy()
        | np.array([(site, i) in owner_ids for i in prev_this["id"]], dtype=bool)
    )
    unchanged -= set(prev_this.loc[orphaned, "key"])
    to_read = [r for r in refs if r.key not in unchanged]
    reusable = previous[(previous["reason"] != Reason.DUPLICATE_ID) & (previous["content_hash"] != "")]
    known_row = dict(zip(reusable["content_hash"], reusable.index, strict=True))  # hash -> row of previous

    now = datetime.now(UTC).isoformat(timespec="seconds")
    job_source: str | Source = src.uri if isinstance(source, (str, Path)) else src
    base_job = {
        "source": job_source,
        "config": asdict(config.validation),
        "quality": None if config.quality is None else asdict(config.quality),
    }
    jobs = ({**base_job, "refs": to_read[i : i + config.chunk_size]} for i in range(0, len(to_read), config.chunk_size))
    frames: list[pd.DataFrame] = []
    buffer: list[tuple] = []

    def collect(rows: list[tuple], final: bool = False) -> None:
        buffer.extend(rows)
        if buffer and (final or len(buffer) >= 2048):  # to Arrow-backed columns, in batches
            frames.append(_normalise(pd.DataFrame(buffer, columns=list(_COLUMNS))))
            buffer.clear()

    with progress_bar(len(to_read), f"ingest {src.uri}", progress) as bar:
        if config.workers <= 1 or len(to_read) < config.min_parallel:
            known = frozenset(known_row)
            for job in jobs:
                out = _inspect_chunk({**job, "known": known})
                collect(out)
                bar.update(len(out))
        else:
            with process_pool(config.workers, _init_worker, (frozenset(known_row),)) as pool:
                for out in pool.map(_inspect_chunk, jobs):
                    collect(out)
                    bar.update(len(out))
        collect([], final=True)

    new = pd.concat(frames, ignore_index=True) if frames else empty_manifest()
    frames.clear()
    is_known = (new["status"] == "known").to_numpy()
    n_parsed = int((~is_known).sum())
    new.loc[~is_known, "ingested_at"] = now
    if is_known.any():  # same bytes as a record already in the manifest: take its row
        copied = previous.loc[[known_row[h] for h in new.loc[is_known, "content_hash"]]].reset_index(drop=True)
        for column in ("id", "source", "key", "stamp"):
            copied[column] = new.loc[is_known, column].to_numpy()
        new = pd.concat([new[~is_known], copied], ignore_index=True)
    kept = prev_this[prev_this["key"].isin(unchanged)].copy()
    kept["site"] = site
    new["site"] = site
    new = _mark_duplicates(pd.concat([base, kept], ignore_index=True), new.sort_values("key"), src.uri, site)
    run = pd.concat([kept, new], ignore_index=True).sort_values("key", kind="stable").reset_index(drop=True)
    run = _normalise(run)
    manifest = pd.concat([base, run], ignore_index=True)
    write_manifest(manifest, manifest_path, normalised=True)

    report = _report(src.uri, run, n_parsed, len(refs) - n_parsed, manifest)
    report.site = site
    report.orphans = _orphans(src, run)
    report.check()
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(asdict(report), indent=2))
    atomic_write_text(out_dir / QUARANTINE_FILE, quarantine_report(report, run))
    log.info(
        "%s: seen %d = accepted %d + quarantined %d (read %d, unchanged %d)",
        src.uri,
        report.seen,
        report.accepted,
        report.quarantined,
        report.read,
        report.reused,
    )
    return report


def _orphans(src: Source, run: pd.DataFrame) -> dict[str, str]:
    """The source's unlisted entries, less the signal files a header of this run was read from."""
    unlisted = dict(getattr(src, "unlisted", {}) or {})
    if not unlisted:
        return {}
    claimed: set[str] = set()
    for key, stamp in zip(run["key"], run["stamp"], strict=True):
        folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        claimed.update(folder + part.rsplit(":", 2)[0] for part in str(stamp).split("|") if part)
    orphans = {k: v for k, v in sorted(unlisted.items()) if k not in claimed}
    if orphans:
        log.warning("%s: %d file(s) belong to no record or could not be listed (see the report)", src.uri, len(orphans))
    return orphans


def _effective_site(site: str, uri: str, prev_this: pd.DataFrame, others: pd.DataFrame) -> str:
    """The site a source's records are ingested under (see the module doc): the one given,
    else the one it had, else "" for the manifest's first site-less source, else a name
    derived from its URI."""
    if site:
        return site
    if len(prev_this):
        return str(prev_this["site"].iloc[0])
    if (others["site"] == "").any():
        derived = derived_site_name(uri)
        log.info("%s: no site given and the manifest has a site-less source: site %s", uri, derived)
        return derived
    return ""


def _where(source: str, key: str) -> str:
    return f"{source.rstrip('/')}/{key}"


def _mark_duplicates(owners: pd.DataFrame, new: pd.DataFrame, uri: str, site: str) -> pd.DataFrame:
    """Quarantine the new rows that are byte-identical copies of a record ingested before
    (an owner row: earlier runs, other sources, unchanged records) or of an earlier new row
    in key order; and those whose (site, id) another source of the same site already holds."""
    owners = owners[owners["reason"] != Reason.DUPLICATE_ID]
    original: dict[str, tuple[str, str]] = {}  # content hash -> (site/id, where)
    holder: dict[tuple[str, str], str] = {}  # (site, id) -> where
    for s, i, src, k, h in zip(
        owners["site"], owners["id"], owners["source"], owners["key"], owners["content_hash"], strict=True
    ):
        if h:
            original.setdefault(h, (record_key(s, i), _where(src, k)))
        holder.setdefault((s, i), _where(src, k))
    new = new.reset_index(drop=True)
    for pos, (rid, key, digest) in enumerate(zip(new["id"], new["key"], new["content_hash"], strict=True)):
        where = _where(uri, key)
        if digest and digest in original:
            name, at = original[digest]
            detail = f"{where}: identical copy of {name} ({at})"
        elif (site, rid) in holder:
            detail = (
                f"{where}: site {site or '(none)'} already holds a record {rid} with different content "
                f"({holder[(site, rid)]}); a site's record paths must be unique: ingest that source under its own site"
            )
        else:
            if digest:
                original[digest] = (record_key(site, rid), where)
            holder[(site, rid)] = where
            continue
        new.loc[pos, ["status", "reason", "detail"]] = [QUARANTINED, str(Reason.DUPLICATE_ID), detail]
    return new


def _split(value: Any) -> list[str]:
    return [c for c in str(value or "").split(",") if c]


def _report(uri: str, run: pd.DataFrame, n_read: int, n_reused: int, manifest: pd.DataFrame) -> IngestReport:
    accepted = run[run["status"] == ACCEPTED]
    quarantined = run[run["status"] != ACCEPTED]
    unscored: Counter = Counter(c for v in accepted["unscored"] for c in _split(v))
    refused = quarantined[quarantined["reason"] == Reason.UNKNOWN_LABEL]
    unknown: Counter = Counter(c for v in refused["unknown"] for c in _split(v))
    return IngestReport(
        source=uri,
        seen=len(run),
        accepted=len(accepted),
        quarantined=len(quarantined),
        read=n_read,
        reused=n_reused,
        labelled=int(accepted["labelled"].sum()),
        unlabelled=int((~accepted["labelled"]).sum()),
        resampled=int((accepted["fs"] != 500.0).sum()),
        by_reason=dict(sorted(quarantined["reason"].value_counts().to_dict().items())),
        unscored_codes=dict(unscored.most_common()),
        unknown_codes=dict(unknown.most_common()),
        manifest_records=len(manifest),
        manifest_accepted=int((manifest["status"] == ACCEPTED).sum()),
        duplicates=_duplicates(quarantined),
    )


IDENTICAL_COPY = ": identical copy of "


def _duplicates(quarantined: pd.DataFrame) -> dict[str, str]:
    """Byte-identical copies among quarantined rows: key -> "<site>/<id>" of the original."""
    out = {}
    for key, reason, detail in zip(quarantined["key"], quarantined["reason"], quarantined["detail"], strict=True):
        if reason == Reason.DUPLICATE_ID and IDENTICAL_COPY in detail:
            out[str(key)] = detail.split(IDENTICAL_COPY, 1)[1].rsplit(" (", 1)[0]
    return dict(sorted(out.items()))


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def quarantine_report(report: IngestReport, run: pd.DataFrame) -> str:
    """Markdown report of one run: counts, reasons, every quarantined record with its reason."""
    lines = [
        f"# Ingestion report: {report.source}",
        "",
        f"- Site: {report.site or '(none: records keyed by their path alone)'}",
        f"- Seen **{report.seen}** = accepted **{report.accepted}** + quarantined **{report.quarantined}**"
        f" (parsed {report.read}, unchanged since the last run {report.reused})",
        f"- Accepted: {report.labelled} labelled, {report.unlabelled} unlabelled (no `# Dx`),"
        f" {report.resampled} to be resampled to 500 Hz",
        f"- Codes outside the scored diagnoses: {sum(report.unscored_codes.values())} unscored SNOMED CT codes"
        f" in {len(report.unscored_codes)} kinds (accepted, kept in the manifest, not learnt);"
        f" {sum(report.unknown_codes.values())} tokens that are not SNOMED CT codes (quarantined as unknown_label)",
        f"- Manifest: {report.manifest_records} records, {report.manifest_accepted} accepted",
        f"- Orphans/unreadable entries (no record's, not read): {len(report.orphans)}",
        f"- Duplicates (byte-identical copies of another record, quarantined): {len(report.duplicates)};"
        " records are (site, path): same-named records with other content are kept",
        "",
        "## Quarantined by reason",
        "",
    ]
    if report.by_reason:
        lines += ["| reason | records |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in report.by_reason.items()]
    else:
        lines.append("Nothing quarantined.")
    quarantined = run[run["status"] == QUARANTINED]
    if len(quarantined):
        lines += ["", "## Quarantined records", "", "| record | file | reason | detail |", "|---|---|---|---|"]
        for rid, rsite, key, reason, detail in zip(
            quarantined["id"],
            quarantined["site"],
            quarantined["key"],
            quarantined["reason"],
            quarantined["detail"],
            strict=True,
        ):
            lines.append(f"| {_md(record_key(rsite, rid))} | {_md(key)} | {reason} | {_md(detail)} |")
    if report.duplicates:
        lines += ["", "## Duplicates", "", "Byte-identical copies (same content hash of all files).", ""]
        lines += ["| copy | original |", "|---|---|"]
        lines += [f"| {_md(key)} | {_md(original)} |" for key, original in report.duplicates.items()]
    if report.orphans:
        lines += [
            "",
            "## Orphans/unreadable",
            "",
            "Files that are no record's (not read) and entries that could not be listed.",
            "",
            "| file | reason |",
            "|---|---|",
        ]
        lines += [f"| {_md(key)} | {_md(reason)} |" for key, reason in report.orphans.items()]
    noted = run[(run["status"] == ACCEPTED) & run["notes"].fillna("").str.contains(QUALITY_NOTE, regex=False)]
    if len(noted):
        lines += [
            "",
            "## Accepted with signal-quality notes",
            "",
            "Accepted and learnt from; what the signal-quality check tolerated (leads not recorded).",
            "",
            "| record | file | note |",
            "|---|---|---|",
        ]
        for rid, rsite, key, notes in zip(noted["id"], noted["site"], noted["key"], noted["notes"], strict=True):
            quality_notes = [n for n in str(notes).split("; ") if n.startswith(QUALITY_NOTE)]
            lines.append(f"| {_md(record_key(rsite, rid))} | {_md(key)} | {_md('; '.join(quality_notes))} |")
    if report.unscored_codes:
        lines += ["", "## Unscored codes (accepted records)", "", "| code | records |", "|---|---:|"]
        lines += [f"| {c} | {n} |" for c, n in report.unscored_codes.items()]
    if report.unknown_codes:
        lines += ["", "## Unknown label tokens (quarantined records)", "", "| token | records |", "|---|---:|"]
        lines += [f"| {_md(c)} | {n} |" for c, n in report.unknown_codes.items()]
    return "\n".join(lines) + "\n"
