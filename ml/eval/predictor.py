"""A fine-tuned model ready to predict: backbone + adapter, class list and thresholds.

Used by the evaluate step, by the MLflow pyfunc model (``pipeline.registry.pyfunc_model``) and by
``cessl predict``; not a pipeline step itself. Inputs are either preprocessed signals ``(N, 12, 6144)`` (what the store
holds), raw 12-lead signals ``(N, 12, T)`` at a known sample rate, or WFDB records (paths
without or with the ``.hea`` suffix), which go through the pipeline's preprocessing.

A WFDB record is first checked for signal quality (:mod:`ml.data.quality`, the check
ingestion quarantines with): one that fails is answered ``unreadable`` with the reasons per
lead, never with diagnoses; one that passes with leads not recorded is predicted, with a note.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.eval.calibration import ABSENT, PRESENT, REFER, CalibrationSet
from ml.model.backbone import ECGTransformer
from ml.model.pretrained import read_backbone

log = logging.getLogger(__name__)

SEQ_LEN = 6144
N_LEADS = 12
TARGET_FS = 500.0
OK, UNREADABLE = "ok", "unreadable"  # the ``status`` of a record's row


@dataclass
class Predictor:
    """A fine-tuned model in eval mode with its classes and decision thresholds."""

    model: ECGTransformer
    classes: list[str]
    thresholds: np.ndarray
    backbone_id: str
    batch_size: int = 64
    device: str = "cpu"  # cpu | cuda | auto (ml.train.config.resolve_device)
    precision: str = "fp32"  # fp32 | bf16 | auto (ml.train.precision): the forward's autocast
    calibration: CalibrationSet | None = None  # present / absent / refer answers (ml.eval.calibration)

    def predict_proba(self, signals: np.ndarray) -> np.ndarray:
        """Sigmoid probabilities ``(N, C)`` of preprocessed signals ``(N, 12, 6144)`` or ``(N, 12, 1, 6144)``.

        Runs on :attr:`device` in :attr:`precision` (bf16: the forward under autocast, the
        sigmoid on float32 logits); the default, CPU fp32, is the plain float32 forward.
        """
        import torch

        from ml.train.config import resolve_device
        from ml.train.precision import resolve_precision

        x = np.asarray(signals, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, :, None, :]
        if x.ndim != 4 or x.shape[1] != N_LEADS or x.shape[3] != SEQ_LEN:
            raise ValueError(f"expected preprocessed signals (N, 12, {SEQ_LEN}), got {tuple(np.shape(signals))}")
        device = resolve_device(self.device)
        mixed = resolve_precision(self.precision, device)
        model = self.model.to(device)
        model.eval()
        out = []
        with torch.no_grad(), mixed.autocast():
            for start in range(0, len(x), self.batch_size):
                batch = torch.from_numpy(x[start : start + self.batch_size])
                if device.type == "cuda":
                    batch = batch.pin_memory().to(device, non_blocking=True)
                logits = model(batch)
                out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(self.classes)))

    def predict_raw(self, signals: np.ndarray, sample_rate: float = TARGET_FS) -> np.ndarray:
        """Probabilities of raw signals ``(N, 12, T)`` in mV at ``sample_rate`` (preprocessed here)."""
        raw = np.asarray(signals, dtype=np.float64)
        if raw.ndim == 2:
            raw = raw[None]
        if raw.ndim != 3 or raw.shape[1] != N_LEADS:
            raise ValueError(f"expected raw signals (N, 12, T), got {tuple(raw.shape)}")
        return self.predict_proba(np.stack([preprocess_signal(r, sample_rate) for r in raw]))

    def diagnoses(self, probs: np.ndarray) -> list[list[str]]:
        """Class names whose probability reaches the class threshold, per record (with a
        :attr:`calibration`: the classes it answers ``present``)."""
        if self.calibration is not None:
            return [
                [c for c, d in zip(self.classes, row, strict=True) if d == PRESENT] for row in self.decisions(probs)
            ]
        positive = np.asarray(probs) >= self.thresholds[None, :]
        return [[c for c, on in zip(self.classes, row, strict=True) if on] for row in positive]

    def decisions(self, probs: np.ndarray) -> np.ndarray:
        """``present`` / ``absent`` / ``refer`` per record and class ``(N, C)`` by the
        :attr:`calibration` (without one: present / absent by the thresholds); ``""`` for NaN."""
        return decisions_of(probs, self.classes, self.thresholds, self.calibration)

    def predict_records(self, records: Sequence[str | Path]) -> pd.DataFrame:
        """One row per WFDB record, in the order given: ``record``, ``p_<class>`` per class,
        ``diagnoses`` and ``codes`` (';'-joined), ``threshold_<class>`` per class (its decision
        threshold, the same on every row), ``error``, ``status``, ``reason`` and ``notes``.

        ``status`` is ``ok`` for a predicted record and ``unreadable`` for one that cannot be
        read or preprocessed, or whose signal fails the quality check
        (:func:`ml.data.quality.check_signal`: ``reason`` names each failing lead and why, e.g.
        ``signal quality: V3: flat (peak-to-peak 0.021 mV < 0.05 mV: an electrode off?)``).
        ``notes``: what the check tolerated in a predicted record, for the reader of its
        diagnoses (``signal quality: V2, V4, V6 not recorded (all samples 0)``), ``""`` when
        nothing; ``reason`` stays ``""`` for every ``ok`` row. An unreadable record
        does not stop the others: its row has empty probabilities (NaN) and diagnoses, and the
        reason in ``reason`` and in ``error`` (the older name, kept: ``""`` exactly for the
        records that were predicted). Only when no record at all can be read is the first
        record's error raised.
        """
        records = list(records)
        if not records:
            raise ValueError("no records given")
        signals, good, failures, unreadable, notes = [], [], {}, {}, {}
        for i, record in enumerate(records):
            try:
                signal, fs = read_wfdb(record, structural_only=True)
            except (OSError, ValueError) as err:  # FileNotFoundError, unusable or damaged records
                failures[i] = err
                continue
            problem, note = signal_quality(signal, fs)
            if problem:
                unreadable[i] = problem
                continue
            if note:
                notes[i] = note
            try:
                signals.append(preprocess_signal(signal, fs))
            except ValueError as err:
                failures[i] = err
                continue
            good.append(i)
        if len(failures) == len(records):
            raise failures[0]  # nothing could be read at all: the caller learns why
        reasons = {i: f"{type(e).__name__}: {e}" for i, e in failures.items()} | unreadable
        for i in sorted(reasons):
            log.warning("%s: unreadable (%s)", records[i], reasons[i])
        probs = np.full((len(records), len(self.classes)), np.nan)
        if good:
            probs[good] = self.predict_proba(np.stack(signals))
        diagnoses: list[list[str]] = [[] for _ in records]
        for i, d in zip(good, self.diagnoses(probs[good]), strict=True):
            diagnoses[i] = d
        table = predictions_table([_record_id(r) for r in records], probs, self.classes, diagnoses, self.thresholds)
        table["error"] = [reasons.get(i, "") for i in range(len(records))]
        table["status"] = [UNREADABLE if i in reasons else OK for i in range(len(records))]
        table["reason"] = table["error"]
        table["notes"] = [notes.get(i, "") for i in range(len(records))]
        if self.calibration is not None:
            self._add_calibrated_columns(table, probs)
        return table

    def _add_calibrated_columns(self, table: pd.DataFrame, probs: np.ndarray) -> None:
        """With a :attr:`calibration`: ``decision_<code>`` and ``miss_rate_<code>`` (the class's
        conformal miss-rate bound, NaN where none) per class, ``refer`` / ``refer_codes`` (the
        classes to refer to a cardiologist, ';'-joined) and ``calibration_notes`` (why a
        referred class has no absent answer: insufficient calibration positives)."""
        assert self.calibration is not None
        decisions = self.decisions(probs)
        abbreviation = class_names(self.classes)
        for j, (code, cal) in enumerate(zip(self.classes, self.calibration.classes, strict=True)):
            table[f"decision_{code}"] = decisions[:, j]
            table[f"miss_rate_{code}"] = np.nan if cal.miss_rate_bound is None else cal.miss_rate_bound
        refer = [[c for c, d in zip(self.classes, row, strict=True) if d == REFER] for row in decisions]
        table["refer"] = [";".join(abbreviation[c] for c in r) for r in refer]
        table["refer_codes"] = [";".join(r) for r in refer]
        note = {c.code: c.note for c in self.calibration.classes if c.note}
        table["calibration_notes"] = ["; ".join(f"{abbreviation[c]}: {note[c]}" for c in r if c in note) for r in refer]

    def answers(self, table: pd.DataFrame) -> pd.DataFrame:
        """The calibrated answers of a :meth:`predict_records` table, one row per record and
        class: ``record``, ``code``, ``class`` (abbreviation), ``probability``, ``decision``
        (present / absent / refer; ``""`` for an unreadable record), ``miss_rate_bound`` and
        ``miss_rate_upper`` (:class:`ml.eval.calibration.Calibration`; NaN where none) and ``note``."""
        probs = table[[f"p_{c}" for c in self.classes]].to_numpy(dtype=np.float64)
        decisions = self.decisions(probs)
        abbreviation = class_names(self.classes)
        cals = list(self.calibration.classes) if self.calibration is not None else [None] * len(self.classes)
        rows = []
        for i, record in enumerate(table["record"]):
            for j, (code, cal) in enumerate(zip(self.classes, cals, strict=True)):
                rows.append(
                    {
                        "record": record,
                        "code": code,
                        "class": abbreviation[code],
                        "probability": probs[i, j],
                        "decision": decisions[i, j],
                        "miss_rate_bound": np.nan
                        if cal is None or cal.miss_rate_bound is None
                        else cal.miss_rate_bound,
                        "miss_rate_upper": np.nan
                        if cal is None or cal.miss_rate_upper is None
                        else cal.miss_rate_upper,
                        "note": cal.note if cal is not None else "",
                    }
                )
        return pd.DataFrame(rows)


def decisions_of(
    probs: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float] | np.ndarray,
    calibration: CalibrationSet | None = None,
) -> np.ndarray:
    """``present`` / ``absent`` / ``refer`` per record and class ``(N, C)`` of probabilities
    ``(N, C)``: by ``calibration`` (a :class:`ml.eval.calibration.CalibrationSet` for ``classes``),
    else present / absent by ``thresholds``; ``""`` for NaN (an unreadable record)."""
    p = np.asarray(probs, dtype=np.float64)
    if calibration is None:
        out = np.where(p >= np.asarray(thresholds, dtype=np.float64)[None, :], PRESENT, ABSENT).astype(object)
        out[np.isnan(p)] = ""
        return out
    if calibration.codes != list(classes):
        raise ValueError(f"the calibration is for classes {calibration.codes}, the model predicts {list(classes)}")
    return calibration.decide(p)


def signal_quality(signal: np.ndarray, sample_rate: float) -> tuple[str, str]:
    """``(problem, notes)`` of a raw record ``(12, T)`` in mV by :func:`ml.data.quality.check_signal`:
    ``problem`` is ``"signal quality: <reasons>"`` when it fails (``""`` when it passes), ``notes``
    what it tolerated, ``"signal quality: <notes>"`` (``signal quality: V2, V4, V6 not recorded
    (all samples 0)``; ``""`` when nothing)."""
    from ml.data.quality import check_signal

    result = check_signal(signal, sample_rate)
    if not result.ok:
        return f"signal quality: {result.summary()}", ""
    return "", f"signal quality: {'; '.join(result.notes)}" if result.notes else ""


def class_names(classes: Sequence[str]) -> dict[str, str]:
    """SNOMED code -> Challenge abbreviation (the code itself when it has none)."""
    try:
        from ml.data.labels import LabelMapping

        names = LabelMapping.from_csv().abbreviations(list(classes))
    except (ValueError, KeyError, OSError):
        return {c: c for c in classes}
    return {c: str(n or c) for c, n in zip(classes, names, strict=True)}


def predictions_table(
    names: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    diagnoses: Sequence[Sequence[str]],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """``record``, ``p_<code>`` per class, ``diagnoses`` (abbreviations, ';'-joined) and their
    ``codes``; with ``thresholds``, a ``threshold_<code>`` column per class (the same value on
    every row: a class is diagnosed when ``p_<code>`` reaches its ``threshold_<code>``)."""
    table = pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])
    table.insert(0, "record", list(names))
    abbreviation = class_names(classes)
    table["diagnoses"] = [";".join(abbreviation[c] for c in d) for d in diagnoses]
    table["codes"] = [";".join(d) for d in diagnoses]
    if thresholds is not None:
        for code, threshold in zip(classes, np.asarray(thresholds, dtype=np.float64), strict=True):
            table[f"threshold_{code}"] = float(threshold)
    return table


def _record_id(record: str | Path) -> str:
    path = Path(record)
    return path.stem if path.suffix in (".hea", ".mat", ".dat") else path.name


def read_wfdb(record: str | Path, structural_only: bool = False) -> tuple[np.ndarray, float]:
    """``(signal (12, T) in mV, sample rate)`` of one WFDB record, strictly validated (ValueError
    naming the file and the problem). ``structural_only``: only the file and header checks;
    what the signal holds is left to :func:`signal_quality` (``ml.data.quality.STRUCTURAL_CHECKS``)."""
    from ml.data.quality import STRUCTURAL_CHECKS
    from ml.data.records import RecordError, ValidationConfig, read_record_file

    path = Path(record)
    if path.suffix in (".mat", ".dat"):
        path = path.with_suffix(".hea")
    elif path.suffix != ".hea":
        path = path.with_name(path.name + ".hea")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: WFDB header not found")
    try:
        rec = read_record_file(path, STRUCTURAL_CHECKS if structural_only else ValidationConfig())
    except RecordError as err:
        raise ValueError(f"{path}: not a usable 12-lead record ({err})") from err
    return np.asarray(rec.signal), float(rec.fs)


def preprocess_signal(signal: np.ndarray, sample_rate: float) -> np.ndarray:
    """The pipeline's preprocessing of one record ``(12, T)`` -> ``(12, 6144)`` float32."""
    from ml.data import preprocess

    return np.asarray(preprocess.preprocess_signal(np.asarray(signal), float(sample_rate)), dtype=np.float32)


def load_predictor(
    backbone_dir: Path,
    adapter_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
    calibration: Path | None = None,
) -> Predictor:
    """Rebuild the fine-tuned model from a backbone folder and an adapter folder.

    ``device`` / ``precision``: where and in which precision it predicts (the default, CPU
    float32, whatever precision the adapter was trained in: its config records that one).
    ``calibration``: a ``calibration.json`` (or its folder) for calibrated answers.
    """
    from ml.model.adapter import load_adapter

    model, meta = load_adapter(adapter_dir, read_backbone(backbone_dir).state)
    model.eval()
    thresholds = np.asarray(
        meta.thresholds if meta.thresholds is not None else [0.5] * len(meta.classes), dtype=np.float64
    )
    return Predictor(
        model=model,
        classes=list(meta.classes),
        thresholds=thresholds,
        backbone_id=meta.backbone_id,
        device=device,
        precision=precision,
        calibration=CalibrationSet.load(calibration) if calibration is not None else None,
    )
