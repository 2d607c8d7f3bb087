"""Preprocessing (the paper's recipe) and building the dataset store from a manifest.

Per record, vectorised over the 12 leads: resample to 500 Hz (polyphase), band-pass
1-47 Hz (Butterworth order 3, zero-phase, second-order sections), standardise each lead,
crop or zero-pad to 6144 samples. Records are processed in parallel (processes, in
chunks); each worker writes its rows straight into the store file being built.

One bad record never aborts the store: a record that cannot be read again (changed since
it was ingested, removed, damaged) is left out, logged, and listed in ``store.json``
(``quarantined``: id, key, reason, detail); the store holds the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import signal as sps

from ml.data.parallel import process_pool, progress_bar
from ml.data.records import Reason, RecordError
from ml.data.store import ECGStore, StoreWriter, split_codes, write_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    fs: float = 500.0
    low_hz: float = 1.0
    high_hz: float = 47.0
    order: int = 3
    length: int = 6144


def resample(x: np.ndarray, fs_in: float, fs_out: float = 500.0) -> np.ndarray:
    """Polyphase resampling along the last axis (a no-op copy when the rates agree)."""
    if fs_in == fs_out:
        return np.asarray(x, dtype=np.float64)
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


@lru_cache(maxsize=16)
def bandpass_sos(fs: float, low_hz: float, high_hz: float, order: int) -> np.ndarray:
    return sps.butter(order, [low_hz, high_hz], btype="bandpass", fs=fs, output="sos")


def bandpass(x: np.ndarray, fs: float, low_hz: float = 1.0, high_hz: float = 47.0, order: int = 3) -> np.ndarray:
    """Zero-phase Butterworth band-pass (second-order sections) along the last axis."""
    return sps.sosfiltfilt(bandpass_sos(float(fs), low_hz, high_hz, order), x, axis=-1)


def standardise(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Zero mean, unit variance per lead; a constant lead becomes zeros."""
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return np.where(std > eps, (x - mean) / np.maximum(std, eps), 0.0)


def fix_length(x: np.ndarray, length: int = 6144) -> np.ndarray:
    """Crop (keep the start) or zero-pad (at the end) to ``length`` samples."""
    n = x.shape[-1]
    if n >= length:
        return x[..., :length]
    out = np.zeros((*x.shape[:-1], length), dtype=x.dtype)
    out[..., :n] = x
    return out


def preprocess_signal(x: np.ndarray, fs: float, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """(12, T) mV at ``fs`` -> (12, length) float32, ready for the model."""
    y = resample(np.asarray(x, dtype=np.float64), fs, config.fs)
    y = bandpass(y, config.fs, config.low_hz, config.high_hz, config.order)
    y = standardise(y)
    return fix_length(y, config.length).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Building the store
# ---------------------------------------------------------------------------------------

# The store's ``id`` is the record's key across sites (ml.data.sources.record_key:
# "<site>/<id>", or the bare id without a site); ``site`` and ``record`` (the id within the
# site) are kept beside it.
TABLE_COLUMNS = (
    "id",
    "site",
    "record",
    "labels",
    "labelled",
    "dx",
    "age",
    "sex",
    "fs",
    "length",
    "source",
    "key",
    "content_hash",
)


def store_table(accepted: pd.DataFrame) -> pd.DataFrame:
    """The store table of accepted manifest rows; ValueError naming the first key two rows share."""
    from ml.data.sources import record_key

    site = accepted["site"] if "site" in accepted.columns else pd.Series([""] * len(accepted), dtype=object)
    keys = [record_key(str(s), str(i)) for s, i in zip(site, accepted["id"], strict=True)]
    table = pd.DataFrame({"id": keys, "site": site.to_numpy(), "record": accepted["id"].to_numpy()})
    for column in TABLE_COLUMNS[3:]:
        table[column] = accepted[column].to_numpy()
    clash = table["id"].duplicated(keep=False)
    if clash.any():
        first = table.loc[clash, "id"].iloc[0]
        where = ", ".join(f"{s.rstrip('/')}/{k}" for s, k in table.loc[table["id"] == first, ["source", "key"]].values)
        raise ValueError(
            f"record {first!r} is in more than one source ({where}): ingest each source under its own site"
        )
    return table


def _process_chunk(job: dict[str, Any]) -> list[tuple[int, str, str]]:
    """Worker: read, check, preprocess records and write them into the store file.

    One ``(row, reason, detail)`` per row; ``reason`` is "" for a record written, else why
    it was left out (its row stays zero and is dropped from the store).
    """
    from ml.data.ingest import StaleRecordError, load_record
    from ml.data.records import RecordError, ValidationConfig

    config = PreprocessConfig(**job["config"])
    # Same bytes as at ingestion (the content hash is checked): checksums passed then.
    checks = ValidationConfig(verify_checksums=False, max_flat_leads=12, min_duration_s=0.0)
    rows = job["rows"]
    out = np.zeros((len(rows), 12, config.length), np.float32)
    outcome: list[tuple[int, str, str]] = []
    for i, (source, key, content_hash, stamp) in enumerate(job["records"]):
        try:
            record = load_record(source, key, expected_hash=content_hash, config=checks, stamp=stamp)
            x = preprocess_signal(record.signal, record.fs, config)
            if not np.isfinite(x).all():
                raise RecordError(Reason.NON_FINITE, f"{source.rstrip('/')}/{key}: preprocessing gave NaN/Inf")
            out[i] = x
        except RecordError as err:
            outcome.append((rows[i], str(err.reason), err.message))
        except StaleRecordError as err:
            outcome.append((rows[i], "changed_since_ingest", str(err)))
        except OSError as err:  # gone, unreadable, refused path
            outcome.append((rows[i], str(Reason.UNREADABLE), f"{source.rstrip('/')}/{key}: {err}"))
        else:
            outcome.append((rows[i], "", ""))
    # Rows of one job are consecutive: one write.
    write_rows(job["signals_path"], job["data_offset"], rows[0], out)
    return outcome


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _consecutive_runs(rows: Sequence[int], size: int) -> Iterator[list[int]]:
    run: list[int] = []
    for r in rows:
        if run and (r != run[-1] + 1 or len(run) >= size):
            yield run
            run = []
        run.append(r)
    if run:
        yield run


def run_jobs(
    jobs: Iterable[dict[str, Any]],
    fn,
    workers: int,
    progress,
    count,
    total: int,
    min_parallel: int = 0,
    on_result: Callable[[Any], None] | None = None,
) -> None:
    """Run ``fn(job)`` for every job (``total`` items in all), in ``workers`` processes, or
    inline when workers <= 1 or there are fewer than ``min_parallel`` items. Jobs are
    drawn lazily and at most ``2 * workers`` are in flight, so memory does not grow with N.
    ``on_result`` receives every job's result (in completion order)."""
    if workers <= 1 or total < max(min_parallel, 1):
        for job in jobs:
            result = fn(job)
            if on_result is not None:
                on_result(result)
            progress.update(count(job))
        return
    with process_pool(workers) as pool:
        pending: set[Future] = set()
        for job in jobs:
            pending.add(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if on_result is not None:
                        on_result(future.result())
                    progress.update(len(future.result()))
        for future in pending:
            if on_result is not None:
                on_result(future.result())
            progress.update(len(future.result()))


def preprocess(
    manifest: str | Path | pd.DataFrame,
    store_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    min_count: int = 200,
    config: PreprocessConfig = PreprocessConfig(),
    workers: int = 2,
    chunk_size: int = 32,
    progress: bool | None = None,
    min_parallel: int = 128,
) -> ECGStore:
    """Build the store at ``store_dir`` from the accepted records of an ingestion manifest.

    ``manifest`` is a manifest DataFrame, its parquet file, or the ingestion folder.
    ``classes``: SNOMED codes to train on; by default the scored diagnoses carried by at
    least ``min_count`` labelled records. Fewer than ``min_parallel`` records to compute
    are processed in this process (a worker pool costs about a second). Rows of an existing store at ``store_dir`` whose
    content hash and settings are unchanged are copied instead of recomputed.
    """
    from ml.data.ingest import read_manifest
    from ml.data.labels import LabelMapping, select_classes

    table = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else manifest
    accepted = table[table["status"] == "accepted"].reset_index(drop=True)
    if accepted.empty:
        raise ValueError("the manifest has no accepted record to preprocess")
    mapping = LabelMapping.from_csv()
    labelled = accepted[accepted["labelled"].astype(bool)]
    if classes is None:
        classes = select_classes((split_codes(v) for v in labelled["labels"]), min_count, mapping)
        if not classes:
            raise ValueError(f"no scored diagnosis has {min_count} labelled records; lower min_count or pass classes")
    classes = [mapping.code_for(c) for c in classes]
    log.info("preprocessing %d records, %d classes", len(accepted), len(classes))

    out_table = store_table(accepted)
    old_rows = _reusable_rows(Path(store_dir), config)
    reuse = [(i, old_rows[h]) for i, h in enumerate(out_table["content_hash"]) if h in old_rows]
    reuse_set = {i for i, _ in reuse}
    todo = [i for i in range(len(out_table)) if i not in reuse_set]

    with StoreWriter(Path(store_dir), len(out_table), config.length) as writer:
        with progress_bar(len(out_table), "preprocess", progress) as bar:
            if reuse:
                old = ECGStore.open(store_dir)
                for chunk in _chunks(reuse, 256):
                    new_idx = [i for i, _ in chunk]
                    data = old.read([j for _, j in chunk])
                    for run in _consecutive_runs(new_idx, len(new_idx)):
                        pos = new_idx.index(run[0])
                        write_rows(writer.signals_path, writer.data_offset, run[0], data[pos : pos + len(run)])
                    bar.update(len(chunk))
                del old
            columns = accepted[["source", "key", "content_hash", "stamp"]]
            jobs = (  # runs are consecutive rows: one slice each, built when submitted
                {
                    "rows": run,
                    "records": list(columns.iloc[run[0] : run[-1] + 1].itertuples(index=False, name=None)),
                    "config": asdict(config),
                    "signals_path": str(writer.signals_path),
                    "data_offset": writer.data_offset,
                }
                for run in _consecutive_runs(todo, chunk_size)
            )
            failed: list[tuple[int, str, str]] = []

            def collect(outcome: list[tuple[int, str, str]]) -> None:
                failed.extend(o for o in outcome if o[1])

            run_jobs(jobs, _process_chunk, workers, bar, lambda job: len(job["rows"]), len(todo), min_parallel, collect)
        quarantined = []
        if failed:
            failed.sort()
            for row, reason, detail in failed:
                log.warning("preprocess: %s left out of the store (%s: %s)", out_table.at[row, "id"], reason, detail)
                quarantined.append(
                    {
                        "id": str(out_table.at[row, "id"]),
                        "key": str(out_table.at[row, "key"]),
                        "reason": reason,
                        "detail": detail,
                    }
                )
            if len(failed) == len(out_table):
                raise RecordError(
                    Reason.UNREADABLE,
                    f"preprocess: none of the {len(out_table)} accepted records could be read again "
                    f"(first: {failed[0][2]}); run the ingestion again",
                )
            dropped = {row for row, _, _ in failed}
            writer.drop_rows(dropped)
            out_table = out_table.drop(index=sorted(dropped)).reset_index(drop=True)
        meta = {
            "classes": classes,
            "class_names": mapping.abbreviations(classes),
            "preprocess": asdict(config),
            "min_count": min_count,
            "reused_rows": len(reuse),
            "quarantined": quarantined,
        }
        return writer.commit(out_table, meta)


def _reusable_rows(store_dir: Path, config: PreprocessConfig) -> dict[str, int]:
    """content hash -> row of an existing store built with the same settings."""
    try:
        old = ECGStore.open(store_dir)
    except (FileNotFoundError, ValueError, OSError):
        return {}
    if old.meta.get("preprocess") != asdict(config):
        return {}
    return {h: i for i, h in enumerate(old.table["content_hash"].astype(str))}
