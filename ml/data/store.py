"""The dataset store the trainer reads: one memory-mapped (N, 12, 6144) float32 array + a table.

Layout of a store folder::

    signals.npy    (N, 12, L) float32, NumPy format, opened with mmap_mode="r"
    table.parquet  one row per record, same order: id, labels, labelled, age, sex, fs, ...
    store.json     classes, preprocessing settings, shape; written last

A store is built in a temporary sibling folder and moved into place only when complete
(:class:`StoreWriter`), so a crash mid-write never leaves a folder that looks like a store;
:meth:`ECGStore.open` also checks that ``store.json`` and the array agree. Loading a batch
reads only the rows asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.data.records import STANDARD_LEADS

SIGNALS_FILE = "signals.npy"
TABLE_FILE = "table.parquet"
META_FILE = "store.json"
STORE_FORMAT = 1


def split_codes(value: Any) -> list[str]:
    """A comma-joined code list from a table cell -> list (empty for blanks/missing)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [c for c in value.split(",") if c]
    return [str(c) for c in value]


def join_codes(codes: Sequence[str] | None) -> str:
    return ",".join(codes or [])


class ECGStore:
    """A read-only, memory-mapped dataset store (see the module docstring for the layout)."""

    def __init__(self, path: Path, signals: np.ndarray, table: pd.DataFrame, meta: dict[str, Any]):
        self.path = path
        self.signals = signals
        self.table = table
        self.meta = meta
        self.classes: list[str] = list(meta.get("classes", []))
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | Path) -> ECGStore:
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete dataset store (no {META_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        signals = np.load(path / SIGNALS_FILE, mmap_mode="r")
        table = pd.read_parquet(path / TABLE_FILE)
        expected = (int(meta["n_records"]), len(STANDARD_LEADS), int(meta["length"]))
        if signals.shape != expected or len(table) != expected[0] or signals.dtype != np.float32:
            raise ValueError(
                f"{path}: inconsistent store: signals {signals.shape} {signals.dtype}, "
                f"table {len(table)} rows, {META_FILE} says {expected} float32"
            )
        return cls(path, signals, table, meta)

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: reopen the memmap there, never copy the array.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = ECGStore.open(state["path"])
        self.__dict__.update(other.__dict__)

    @property
    def ids(self) -> list[str]:
        return self.table["id"].astype(str).tolist()

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids`` (KeyError naming the first unknown id)."""
        if self._row_of is None:
            self._row_of = {rid: i for i, rid in enumerate(self.ids)}
        try:
            return np.fromiter((self._row_of[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as err:
            raise KeyError(f"record {err.args[0]!r} is not in the store {self.path}") from None

    def label_matrix(self, classes: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> np.ndarray:
        """(n, C) float32 multi-hot labels for ``classes`` (default: the store's classes)."""
        from ml.data.labels import canonical_code

        classes = [canonical_code(c) for c in (self.classes if classes is None else classes)]
        column = {c: j for j, c in enumerate(classes)}
        rows = range(len(self.table)) if ids is None else self.rows(ids)
        labels = self.table["labels"].tolist()
        out = np.zeros((len(rows), len(classes)), np.float32)
        for i, r in enumerate(rows):
            for code in split_codes(labels[r]):
                j = column.get(code)
                if j is not None:
                    out[i, j] = 1.0
        return out

    def labelled_mask(self) -> np.ndarray:
        return self.table["labelled"].to_numpy(dtype=bool)

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Copy of the signals of ``rows`` (n, 12, L): reads only those rows from disk."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((0, *self.signals.shape[1:]), np.float32)
        order = np.argsort(rows, kind="stable")
        out = np.empty((rows.size, *self.signals.shape[1:]), np.float32)
        out[order] = self.signals[rows[order]]  # sorted fancy index: sequential reads
        return out


class StoreDataset:
    """``(x, y)`` pairs of a store for the trainer: x float32 (12, 1, L), y float32 (C,).

    A map-style dataset for ``torch.utils.data.DataLoader``; ``__getitems__`` fetches a
    whole batch with one sorted read of the memory map. Picklable (workers reopen the store).
    """

    def __init__(self, store: ECGStore, ids: Sequence[str], classes: Sequence[str] | None = None):
        self.store = store
        self.ids = list(ids)
        self.classes = list(store.classes if classes is None else classes)
        self._rows = store.rows(self.ids)
        self._y = store.label_matrix(self.classes, self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import torch

        if index < 0:
            index += len(self)
        x = np.array(self.store.signals[self._rows[index]], dtype=np.float32)[:, None, :]
        return torch.from_numpy(x), torch.from_numpy(self._y[index].copy())

    def __getitems__(self, indices: Sequence[int]) -> list:
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        x = self.store.read(self._rows[idx])[:, :, None, :]
        y = self._y[idx]
        return [(torch.from_numpy(x[i]), torch.from_numpy(y[i])) for i in range(len(idx))]

    def labels(self) -> np.ndarray:
        """(n, C) label matrix of the dataset's records, in order."""
        return self._y.copy()


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


@dataclass
class StoreWriter:
    """Build a store in a temporary sibling folder; :meth:`commit` moves it into place.

    Rows can be written from other processes with :func:`write_rows` (plain ``pwrite`` at
    :attr:`data_offset`), so no process maps the whole array. Use as a context manager:
    leaving the block with an exception deletes the temporary folder.
    """

    path: Path
    n_records: int
    length: int

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        shape = (self.n_records, len(STANDARD_LEADS), self.length)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        with open(self.signals_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.data_offset = f.tell()
            f.truncate(self.data_offset + int(np.prod(shape)) * 4)  # sparse until written
        self.committed = False

    @property
    def signals_path(self) -> Path:
        return self.tmp / SIGNALS_FILE

    @property
    def row_bytes(self) -> int:
        return len(STANDARD_LEADS) * self.length * 4

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def drop_rows(self, rows: set[int]) -> None:
        """Remove rows (records that could not be written) before :meth:`commit`: the kept
        rows are copied, in order, into a new signals file of ``n_records - len(rows)`` rows."""
        keep = [r for r in range(self.n_records) if r not in rows]
        if len(keep) == self.n_records:
            return
        old_path = self.signals_path
        new_path = self.tmp / (SIGNALS_FILE + ".compact")
        shape = (len(keep), len(STANDARD_LEADS), self.length)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
        with open(new_path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + int(np.prod(shape)) * 4)
        source = np.memmap(
            old_path, np.float32, "r", offset=self.data_offset, shape=(self.n_records, len(STANDARD_LEADS), self.length)
        )
        for start in range(0, len(keep), 256):
            write_rows(new_path, offset, start, np.asarray(source[keep[start : start + 256]]))
        del source
        os.replace(new_path, old_path)
        self.n_records, self.data_offset = len(keep), offset

    def commit(self, table: pd.DataFrame, meta: dict[str, Any]) -> ECGStore:
        if len(table) != self.n_records:
            raise ValueError(f"table has {len(table)} rows, the store {self.n_records}")
        with open(self.signals_path, "rb+") as f:
            os.fsync(f.fileno())
        table.reset_index(drop=True).to_parquet(self.tmp / TABLE_FILE, index=False)
        meta = {
            **meta,
            "format": STORE_FORMAT,
            "n_records": self.n_records,
            "length": self.length,
            "leads": list(STANDARD_LEADS),
            "dtype": "float32",
        }
        meta_tmp = self.tmp / (META_FILE + ".part")
        meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(meta_tmp, self.tmp / META_FILE)  # the folder is complete from here on
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return ECGStore.open(self.path)


def write_rows(signals_path: str | Path, data_offset: int, first_row: int, rows: np.ndarray) -> None:
    """Write consecutive rows (n, 12, L) float32 at row ``first_row`` of a store being built."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    fd = os.open(signals_path, os.O_WRONLY)
    try:
        view = rows.reshape(-1).view(np.uint8).data  # a flat byte memoryview
        offset = data_offset + first_row * rows[0].nbytes if len(rows) else data_offset
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
