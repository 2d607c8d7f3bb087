"""What the drift checks (:mod:`ml.eval.drift`) read: the champion's outputs on a set of records.

For each record: read it (the file and header checks of ``cessl predict``,
:func:`ml.eval.predictor.read_wfdb`), check its signal quality (:func:`ml.data.quality.check_signal`:
one that fails is counted unreadable, never embedded), preprocess it as the pipeline does,
then one forward pass of the champion gives both its pooled embedding (``ECGTransformer.pool``:
the (N, d) features its classifier reads, as :func:`ml.eval.evaluate.features_with_labels`)
and its sigmoid probabilities, thresholded with the champion's own per-class thresholds.

Records come from a folder (:func:`folder_records`: every ``*.hea`` below it) or from a data
source by record key (:func:`source_records`: a local folder or ``s3://`` prefix, what the
champion's run names as its ``source``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml.errors import ParameterError
from ml.eval.drift import Observations

log = logging.getLogger(__name__)

# (record name, a function reading it -> ECGRecord) of each record to observe
Reader = tuple[str, Callable[[], object]]


@dataclass
class Signals:
    """Preprocessed readable records ``(N, 12, 6144)``, their names and Dx codes, and the
    unreadable records' reasons."""

    signals: np.ndarray
    names: list[str]
    dx: list[list[str] | None]
    unreadable: dict[str, str] = field(default_factory=dict)


def folder_records(folder: Path) -> list[Reader]:
    """Every WFDB record (``*.hea``) below ``folder``, sorted; ParameterError naming the folder when none."""
    from ml.data.quality import STRUCTURAL_CHECKS
    from ml.data.records import read_record_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder of WFDB records not found")
    headers = sorted(folder.rglob("*.hea"))
    if not headers:
        raise ParameterError(f"{folder}: no WFDB records (*.hea) in it")

    def reader(header: Path) -> Callable[[], object]:
        return lambda: read_record_file(header, STRUCTURAL_CHECKS)

    return [(str(h.relative_to(folder).with_suffix("")), reader(h)) for h in headers]


def source_records(source: str, keys: Iterable[str]) -> list[Reader]:
    """The records ``keys`` (record ids, paths inside ``source`` without ``.hea``) of a data source."""
    from ml.data.quality import STRUCTURAL_CHECKS
    from ml.data.records import read_record
    from ml.data.sources import HEADER_SUFFIX, open_source

    src = open_source(source)

    def reader(key: str) -> Callable[[], object]:
        header = key + HEADER_SUFFIX
        return lambda: read_record(
            src.read(header), src.sibling_reader(header), f"{source}/{header}", STRUCTURAL_CHECKS, record_id=key
        )

    return [(key, reader(key)) for key in keys]


def records_of(source: str) -> list[Reader]:
    """Every WFDB record of a data source: a folder (:func:`folder_records`) or an
    ``s3://bucket/prefix``; a listed key that must not be read (e.g. one escaping the prefix) is
    kept as a reader that fails, so it is counted unreadable with its reason, never dropped."""
    if "://" not in str(source):
        return folder_records(Path(source))
    from ml.data.sources import open_source

    refs = open_source(source).list_records()
    if not refs:
        raise ParameterError(f"{source}: no WFDB records (*.hea) in it")

    def refused(problem: str) -> Callable[[], object]:
        def read() -> object:
            raise ValueError(problem)

        return read

    readable = source_records(source, [r.record_id for r in refs if r.problem is None])
    return readable + [(r.record_id, refused(r.problem)) for r in refs if r.problem is not None]


def read_signals(records: Sequence[Reader]) -> Signals:
    """Read, quality-check and preprocess ``records``; unreadable ones are counted with their reason."""
    from ml.data.quality import check_signal
    from ml.data.records import RecordError
    from ml.eval.predictor import preprocess_signal

    kept, names, dx, unreadable = [], [], [], {}
    for name, read in records:
        try:
            record = read()
            signal, fs = np.asarray(record.signal), float(record.fs)  # type: ignore[attr-defined]
            quality = check_signal(signal, fs)
            if not quality.ok:
                unreadable[name] = f"signal quality: {quality.summary()}"
                continue
            kept.append(preprocess_signal(signal, fs))
        except (OSError, ValueError, RecordError) as err:
            unreadable[name] = f"{type(err).__name__}: {err}"
            continue
        names.append(name)
        dx.append(record.dx)  # type: ignore[attr-defined]
    for name, why in list(unreadable.items())[:5]:
        log.debug("%s: unreadable (%s)", name, why)
    signals = np.stack(kept).astype(np.float32) if kept else np.zeros((0, 12, 6144), np.float32)
    return Signals(signals, names, dx, unreadable)


def embed(model, signals: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings (N, d), probabilities (N, C))`` of preprocessed ``signals`` (N, 12, 6144)
    from one forward pass of ``model`` (an ``ECGTransformer``) in eval mode on the CPU."""
    import torch

    model.eval()
    feats, probs = [], []
    with torch.no_grad():
        for start in range(0, len(signals), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(signals[start : start + batch_size]))[:, :, None, :]
            pooled = model.pooled(x)
            logits = model.classify(pooled)
            feats.append(pooled.float().numpy())
            probs.append(torch.sigmoid(logits.float()).numpy())
    if not feats:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(feats).astype(np.float64), np.concatenate(probs).astype(np.float64)


def label_matrix(dx: Sequence[list[str] | None], classes: Sequence[str]) -> np.ndarray | None:
    """(N, C) labels from each record's Dx codes; None when any record has no Dx line."""
    if not dx or any(d is None for d in dx):
        return None
    return np.array([[c in set(d or ()) for c in classes] for d in dx], dtype=bool)


def observe(predictor, records: Sequence[Reader], with_labels: bool = False) -> Observations:
    """The champion's (a :class:`ml.eval.predictor.Predictor`) outputs on ``records``."""
    read = read_signals(records)
    n_classes = len(predictor.classes)
    if len(read.names):
        embeddings, probs = embed(predictor.model, read.signals, predictor.batch_size)
    else:
        embeddings, probs = np.zeros((0, 1)), np.zeros((0, n_classes))
    positive = probs >= np.asarray(predictor.thresholds)[None, :]
    labels = label_matrix(read.dx, predictor.classes) if with_labels and read.names else None
    return Observations(embeddings, probs, positive, len(read.unreadable), labels)
