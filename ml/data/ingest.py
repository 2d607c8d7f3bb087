"""Ingestion: every record of a source ends accepted or quarantined with a reason.

:func:`ingest` lists a source (local folder or ``s3://``), reads each record that is new
or changed, validates it (:func:`ml.data.records.read_record`), and merges the result
into a manifest that accumulates over sources and runs:

    ingest_dir/manifest.parquet     one row per record file: id, source, key,
                                    content_hash, fs, length, labels, age, sex,
                                    status, reason, detail, ...
    ingest_dir/quarantine.md        human-readable report of the last run
    ingest_dir/ingest_report.json   the same counts, machine-readable

Incremental: a record whose files have the same stamp (sizes + mtimes / ETags) as in the
manifest is not opened at all; one whose stamp changed but whose content hash is known is
not parsed again. Re-ingesting a source replaces its rows (records gone from it leave
the manifest; other sources stay). Counts always add up: ``seen = accepted + quarantined``.

Duplicate record ids: the record ingested first (or, within one run, the first key in
sorted order) keeps the id; any other record with that id, identical or not, is
quarantined as ``duplicate_id``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from ml.data.labels import LabelMapping
from ml.data.records import (
    ECGRecord,
    Reason,
    RecordError,
    UnsafePathError,
    ValidationConfig,
    parse_metadata,
    read_header,
    read_record,
)
from ml.data.sources import RecordRef, Source, open_source, record_id_of
from ml.data.store import join_codes

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.md"
REPORT_FILE = "ingest_report.json"
ACCEPTED, QUARANTINED = "accepted", "quarantined"
MIN_PARALLEL = 128  # fewer records than this are processed in the calling process

MANIFEST_COLUMNS: dict[str, str] = {
    "id": "str",
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
    unknown_codes: dict[str, int] = field(default_factory=dict)
    manifest_records: int = 0
    manifest_accepted: int = 0

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


def _record_from_files(
    ref: RecordRef, files: dict[str, bytes], source: Source, config: ValidationConfig
) -> ECGRecord:
    header_name = ref.key.rsplit("/", 1)[-1]
    if header_name not in files:
        raise RecordError(Reason.UNREADABLE, f"{ref.where}: header file vanished")
    fallback = source.sibling_reader(ref.key)

    def read_file(name: str) -> bytes:
        return files[name] if name in files else fallback(name)

    return read_record(files[header_name], read_file, ref.where, config, record_id=ref.record_id)


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
    if expected_hash is not None and content_hash(files) != expected_hash:
        raise RuntimeError(f"{ref.where} changed since it was ingested; run the ingestion again")
    return _record_from_files(ref, files, src, config)


def _row(ref: RecordRef, **values: Any) -> dict[str, Any]:
    row = {c: None for c in MANIFEST_COLUMNS}
    row.update(id=ref.record_id, source=ref.source, key=ref.key, stamp=ref.stamp, reason="", detail="", notes="",
               labelled=False, labels="", dx="", unscored="", unknown="", content_hash="")
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


def inspect_record(
    source: Source, ref: RecordRef, config: ValidationConfig, known_hashes: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Manifest row of one record. ``status`` is "known" when its content hash is known."""
    mapping = LabelMapping.from_csv()
    if ref.problem:
        return _row(ref, status=QUARANTINED, reason=str(Reason.UNSAFE_PATH), detail=f"{ref.where}: {ref.problem}")
    try:
        files = _read_files(source, ref)
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
    return _row(
        ref,
        status=ACCEPTED,
        content_hash=digest,
        fs=record.fs,
        length=record.n_samples,
        n_signals=None,
        notes="; ".join(record.notes),
        **_metadata_values(record.dx, record.age, record.sex, mapping),
    )


def _inspect_chunk(job: dict[str, Any]) -> list[dict[str, Any]]:
    source = _cached_source(job["source"]) if isinstance(job["source"], str) else job["source"]
    config = ValidationConfig(**job["config"])
    return [inspect_record(source, ref, config, job["known"]) for ref in job["refs"]]


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    table = table.reindex(columns=list(MANIFEST_COLUMNS))
    for column, dtype in MANIFEST_COLUMNS.items():
        if dtype == "str":
            table[column] = table[column].astype(object).where(table[column].notna(), "").astype(str)
        elif dtype == "bool":
            table[column] = table[column].fillna(False).astype(bool)
        else:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype(dtype)
    return table.reset_index(drop=True)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest of an ingestion folder (or a manifest parquet path)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ingestion manifest at {path}")
    return _normalise(pd.read_parquet(path))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    _normalise(table).to_parquet(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestConfig:
    validation: ValidationConfig = ValidationConfig()
    workers: int = 2
    chunk_size: int = 32
    min_parallel: int = MIN_PARALLEL  # fewer new records: no worker processes (~1 s to start)


def ingest(
    source: str | Path | Source,
    out_dir: str | Path,
    *,
    config: IngestConfig = IngestConfig(),
    progress: bool | None = None,
) -> IngestReport:
    """Ingest every record of ``source`` into the manifest in ``out_dir`` (see module doc)."""
    from ml.data.preprocess import _progress

    src = open_source(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_FILE
    previous = read_manifest(manifest_path) if manifest_path.exists() else empty_manifest()
    refs = src.list_records()
    log.info("%s: %d record headers", src.uri, len(refs))

    # The manifest keeps other sources as they are; this source's rows are replaced by
    # what it holds now (records that disappeared from it leave the manifest).
    mine = (previous["source"] == src.uri).to_numpy()
    base = previous[~mine]
    previous_rows = previous[mine].to_dict("records")
    prev_by_key = {row["key"]: row for row in previous_rows}
    # Rows marked duplicate lost their own validation outcome: never reuse them.
    known = {
        row["content_hash"]: row
        for row in previous.to_dict("records")
        if row["content_hash"] and row["reason"] != Reason.DUPLICATE_ID
    }

    now = datetime.now(UTC).isoformat(timespec="seconds")
    rows: dict[str, dict[str, Any]] = {}
    unchanged: set[str] = set()  # same key, same stamp as in the last run
    to_read: list[RecordRef] = []
    for ref in refs:
        old = prev_by_key.get(ref.key)
        if old is not None and old["stamp"] == ref.stamp and not ref.problem and old["reason"] != Reason.DUPLICATE_ID:
            rows[ref.key] = dict(old)
            unchanged.add(ref.key)
        else:
            to_read.append(ref)

    job_source: str | Source = src.uri if isinstance(source, (str, Path)) else src
    base_job = {"source": job_source, "config": asdict(config.validation), "known": frozenset(known)}
    jobs = [
        {**base_job, "refs": list(refs_chunk)}
        for refs_chunk in (to_read[i : i + config.chunk_size] for i in range(0, len(to_read), config.chunk_size))
    ]
    results: list[dict[str, Any]] = []
    with _progress(len(to_read), f"ingest {src.uri}", progress) as bar:
        if config.workers <= 1 or len(to_read) < config.min_parallel:
            outputs = map(_inspect_chunk, jobs)
            for out in outputs:
                results.extend(out)
                bar.update(len(out))
        else:
            from ml.data.parallel import process_pool

            with process_pool(config.workers) as pool:
                for out in pool.map(_inspect_chunk, jobs):
                    results.extend(out)
                    bar.update(len(out))

    n_parsed = 0
    for row in results:
        if row["status"] == "known":  # same bytes as a record already in the manifest
            old = known[row["content_hash"]]
            row = {**old, "source": row["source"], "key": row["key"], "stamp": row["stamp"], "id": row["id"]}
        else:
            n_parsed += 1
            row["ingested_at"] = now
        rows[row["key"]] = row

    # Duplicate ids: the first owner keeps the id (other sources and records unchanged
    # since the last run first, then new records in key order), so an accepted record
    # never loses its place to a newcomer.
    owner: dict[str, dict[str, Any]] = {}
    for row in base.to_dict("records") + [rows[r.key] for r in refs if r.key in unchanged]:
        if row["reason"] != Reason.DUPLICATE_ID:
            owner.setdefault(row["id"], row)
    for ref in refs:
        if ref.key in unchanged:
            continue
        row = rows[ref.key]
        first = owner.get(row["id"])
        if first is None:
            owner[row["id"]] = row
            continue
        same = first["content_hash"] == row["content_hash"] and row["content_hash"]
        row.update(
            status=QUARANTINED,
            reason=str(Reason.DUPLICATE_ID),
            detail=(
                f"{ref.where}: record id {row['id']} already ingested from "
                f"{first['source'].rstrip('/')}/{first['key']}"
                + (" (identical copy)" if same else " with different content")
            ),
        )

    run_rows = [rows[r.key] for r in refs]
    manifest = pd.concat([base, _normalise(pd.DataFrame(run_rows, columns=list(MANIFEST_COLUMNS)))],
                         ignore_index=True) if run_rows else base
    manifest = _normalise(manifest)
    write_manifest(manifest, manifest_path)

    report = _report(src.uri, run_rows, n_parsed, len(refs) - n_parsed, manifest)
    report.check()
    _write_atomic(out_dir / REPORT_FILE, json.dumps(asdict(report), indent=2).encode())
    _write_atomic(out_dir / QUARANTINE_FILE, quarantine_report(report, run_rows).encode("utf-8"))
    log.info(
        "%s: seen %d = accepted %d + quarantined %d (read %d, unchanged %d)",
        src.uri, report.seen, report.accepted, report.quarantined, report.read, report.reused,
    )
    return report


def _report(
    uri: str, rows: Sequence[dict[str, Any]], n_read: int, n_reused: int, manifest: pd.DataFrame
) -> IngestReport:
    report = IngestReport(source=uri, seen=len(rows), read=n_read, reused=n_reused)
    reasons: Counter = Counter()
    unscored: Counter = Counter()
    unknown: Counter = Counter()
    for row in rows:
        if row["status"] == ACCEPTED:
            report.accepted += 1
            report.labelled += bool(row["labelled"])
            report.unlabelled += not row["labelled"]
            report.resampled += bool(row["fs"] is not None and float(row["fs"]) != 500.0)
            unscored.update(c for c in str(row["unscored"] or "").split(",") if c)
            unknown.update(c for c in str(row["unknown"] or "").split(",") if c)
        else:
            report.quarantined += 1
            reasons[row["reason"]] += 1
    report.by_reason = dict(sorted(reasons.items()))
    report.unscored_codes = dict(unscored.most_common())
    report.unknown_codes = dict(unknown.most_common())
    report.manifest_records = len(manifest)
    report.manifest_accepted = int((manifest["status"] == ACCEPTED).sum())
    return report


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def quarantine_report(report: IngestReport, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown report of one run: counts, reasons, every quarantined record with its reason."""
    lines = [
        f"# Ingestion report: {report.source}",
        "",
        f"- Seen **{report.seen}** = accepted **{report.accepted}** + quarantined **{report.quarantined}**"
        f" (parsed {report.read}, unchanged since the last run {report.reused})",
        f"- Accepted: {report.labelled} labelled, {report.unlabelled} unlabelled (no `# Dx`),"
        f" {report.resampled} to be resampled to 500 Hz",
        f"- Codes outside the scored diagnoses (kept in the manifest): "
        f"{sum(report.unscored_codes.values())} unscored SNOMED codes in {len(report.unscored_codes)} kinds, "
        f"{sum(report.unknown_codes.values())} unknown tokens",
        f"- Manifest: {report.manifest_records} records, {report.manifest_accepted} accepted",
        "",
        "## Quarantined by reason",
        "",
    ]
    if report.by_reason:
        lines += ["| reason | records |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in report.by_reason.items()]
    else:
        lines.append("Nothing quarantined.")
    quarantined = [r for r in rows if r["status"] == QUARANTINED]
    if quarantined:
        lines += ["", "## Quarantined records", "", "| record | file | reason | detail |", "|---|---|---|---|"]
        for r in quarantined:
            lines.append(f"| {_md(r['id'])} | {_md(r['key'])} | {r['reason']} | {_md(r['detail'])} |")
    if report.unscored_codes:
        lines += ["", "## Unscored codes (accepted records)", "", "| code | records |", "|---|---:|"]
        lines += [f"| {c} | {n} |" for c, n in report.unscored_codes.items()]
    return "\n".join(lines) + "\n"
