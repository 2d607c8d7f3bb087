"""Steps: score the fine-tuned model on the test split; score the current champion on it too.

:func:`evaluate_step` writes into the evaluation folder: ``metrics.json`` (ranking loss,
coverage, macro AUROC, macro mAP, F-beta2 and G-beta2, the Challenge 2021 scores; each
defined in ``ml.eval.metrics.METRIC_DEFINITIONS``, each with its 95% jackknife-t interval over
the test records: ``<metric>_low`` / ``_high``, ``ml.eval.intervals.metric_intervals``),
``per_class.csv``, ``predictions.npz`` (test ids, probabilities, labels, thresholds),
``roc.png`` and ``pr.png``; and an HTML report with the tables, what each metric is, and both
plots embedded.

:func:`score_champion_step` scores another model (the registry's current champion, which
the pipeline fetches) on the same test split with the same code, keeps its per-record
predictions, computes the paired bootstrap of the new model against it on those records
(:mod:`ml.eval.bootstrap`; for the run's report: ``cessl promote`` recomputes it with
:func:`score_records` and :func:`compare_predictions`, ``pipeline.registry.evidence``) and
writes a :class:`ChampionEvaluation` folder (its version and metrics, or why there are none).
"""

from __future__ import annotations

import base64
import html
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import StepError, read_json, write_json
from components.data_access import dataset, open_store, scored_labels
from ml.data.splits import Splits
from ml.eval.bootstrap import BootstrapConfig, PairedBootstrap, paired_bootstrap
from ml.eval.intervals import BOUNDS, interval_text, metric_intervals, with_intervals
from ml.eval.metrics import confusion_markdown
from ml.eval.predictor import load_predictor

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion.md"  # per class TP/FP/FN/TN and F-beta2 (the KFP UI's Markdown)
PREDICTIONS_FILE = "predictions.npz"
CHAMPION_FILE = "champion.json"
GATE_FILE = "paired_bootstrap.json"
ROC_FILE = "roc.png"
PR_FILE = "pr.png"
MAX_CURVE_POINTS = 200  # KFP ClassificationMetrics metadata stays small


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    per_class: pd.DataFrame
    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    test_split_hash: str
    out_dir: Path

    @property
    def n_test(self) -> int:
        return len(self.labels)

    def micro_roc(self) -> tuple[list[float], list[float], list[float]]:
        """Micro-averaged ROC curve (all classes pooled), at most MAX_CURVE_POINTS points."""
        from sklearn.metrics import roc_curve

        y, p = self.labels.ravel(), self.probs.ravel()
        if y.min() == y.max():
            return [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]
        fpr, tpr, thr = roc_curve(y, p)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), MAX_CURVE_POINTS)).astype(int))
        thr = np.clip(thr[keep], 0.0, 1.0)  # sklearn's first threshold is +inf
        return fpr[keep].tolist(), tpr[keep].tolist(), thr.tolist()


def _test_metrics(report: Any, classes: list[str]) -> dict[str, float]:
    """A report's defined test metrics, each with its 95% interval over the records
    (:func:`ml.eval.intervals.metric_intervals`) where it has one."""
    intervals = metric_intervals(report.labels, report.probs, report.thresholds, classes, report.scored_labels)
    return _finite(with_intervals(report.metrics, intervals))


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Drop undefined (NaN) metrics, e.g. AUROC when the test split has a single class, and
    undefined interval bounds (fewer than 2 records, or a metric undefined without a record)."""
    out = {}
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
        elif key.endswith(BOUNDS) and key.rsplit("_", 1)[0] in metrics:
            log.debug("test metric %s: no 95%% interval bound on this split", key)
        else:
            log.warning("test metric %s is undefined on this split (NaN): not reported", key)
    return out


def _plot(kind: str, labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    from ml.eval.metrics import class_labels

    abbreviations, _ = class_labels(classes)
    legend = [name if abbr == name else f"{abbr} ({name})" for abbr, name in zip(abbreviations, classes, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 5))
    for k in range(len(classes)):
        y = labels[:, k]
        if y.min() == y.max():
            continue  # undefined for a class with no positive (or no negative) test record
        if kind == "roc":
            x_vals, y_vals, _ = roc_curve(y, probs[:, k])
        else:
            y_vals, x_vals, _ = precision_recall_curve(y, probs[:, k])
        ax.plot(x_vals, y_vals, lw=1, label=legend[k])
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test split)")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test split)")
    if ax.lines:
        ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _html_report(result: EvaluationResult, images: dict[str, Path]) -> str:
    from ml.eval.metrics import METRIC_DEFINITIONS

    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(interval_text(result.metrics, k))}</td>"
        f"<td style='text-align:left'>{html.escape(METRIC_DEFINITIONS.get(k, ''))}</td></tr>"
        for k in sorted(k for k in result.metrics if not k.endswith(BOUNDS))
    )
    n_missing = int(result.per_class["no_test_positive"].sum())
    embedded = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, p in images.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>CE-SSL evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:480px}</style></head><body>"
        f"<h1>Test split evaluation</h1><p>{result.n_test} records, {len(result.classes)} classes, "
        f"test split <code>{result.test_split_hash[:16]}</code></p>"
        "<h2>Metrics</h2><p>Each metric with its 95% jackknife-t interval over the test records.</p>"
        f"<table><tr><th>metric</th><th>value [95% interval]</th><th>what it is</th></tr>{rows}</table>"
        f"<h2>Per class</h2><p>{n_missing} of {len(result.classes)} classes have no positive test record "
        "(<code>no_test_positive</code>): their average precision, F-beta and G-beta are 0, as the macro means "
        "count them; AUROC is undefined there.</p>"
        f"{result.per_class.to_html(index=False, float_format=lambda v: f'{v:.4f}')}"
        f"<h2>Curves</h2>{embedded}</body></html>"
    )


def score_records(predictor: Any, store_dir: Path, ids: list[str], classes: list[str]):
    """The predictor's :class:`ml.eval.evaluate` report on the records ``ids`` of a store, at
    its own thresholds (its classes must be ``classes``: ValueError otherwise)."""
    from ml.eval.evaluate import evaluate

    if list(predictor.classes) != list(classes):
        raise ValueError(
            f"the model predicts {list(predictor.classes)}, the test records' classes are {list(classes)}: "
            "not comparable"
        )
    store = open_store(store_dir)
    return evaluate(
        predictor.model,
        dataset(store, list(ids), list(classes)),
        thresholds=predictor.thresholds,
        classes=list(classes),
        scored_labels=scored_labels(store, ids),
    )


def _score(predictor: Any, store_dir: Path, splits: Splits):
    """The predictor's :class:`ml.eval.evaluate` report on the test split (classes must match)."""
    return score_records(predictor, store_dir, list(splits.test), list(splits.classes))


CONSTANT_TOLERANCE = 1e-6  # probabilities closer than this across records count as equal


def check_outputs_vary(probs: np.ndarray, where: str) -> None:
    """Refuse a model whose outputs carry no information: a StepError when, for every class,
    every record gets the same probability (a collapsed or NaN-poisoned model scores a macro
    AUROC of 0.5 and must not be registered), or when a probability is not finite."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        return
    if not np.isfinite(probs).all():
        n = int((~np.isfinite(probs)).sum())
        raise StepError(f"{where}: the model outputs {n} NaN/Inf probabilities on the test split; refusing to go on")
    if len(probs) < 2:
        return  # one record: nothing to compare
    spread = probs.max(axis=0) - probs.min(axis=0)
    if float(spread.max()) <= CONSTANT_TOLERANCE:
        raise StepError(
            f"{where}: the model gives every one of the {len(probs)} test records the same probabilities "
            f"(largest spread across records {float(spread.max()):.2g}): a constant-output model, not registered; "
            "check the backbone and the fine-tuning curves"
        )


def evaluate_step(
    store_dir: Path, splits_path: Path, backbone_dir: Path, adapter_dir: Path, out_dir: Path, report_path: Path
) -> EvaluationResult:
    """Evaluate the adapter on the test split; write the evaluation folder and the HTML report."""
    splits = Splits.load(splits_path)
    predictor = load_predictor(backbone_dir, adapter_dir)
    try:
        report = _score(predictor, store_dir, splits)
    except ValueError as err:
        raise ValueError(f"{adapter_dir}: {err}") from err
    check_outputs_vary(report.probs, str(adapter_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = EvaluationResult(
        metrics=_test_metrics(report, list(splits.classes)),
        per_class=report.per_class,
        probs=report.probs,
        labels=report.labels,
        classes=list(splits.classes),
        test_split_hash=splits.test_split_hash,
        out_dir=out_dir,
    )
    write_json(
        out_dir / METRICS_FILE,
        {
            "metrics": result.metrics,
            "test_split_hash": result.test_split_hash,
            "n_test": result.n_test,
            "classes": result.classes,
            "classes_without_positives": report.classes_without_positives,
        },
    )
    report.per_class.to_csv(out_dir / PER_CLASS_FILE, index=False)
    (out_dir / CONFUSION_FILE).write_text(confusion_markdown(report.per_class), encoding="utf-8")
    save_predictions(out_dir / PREDICTIONS_FILE, list(splits.test), report.probs, report.labels, report.thresholds)
    images = {
        "ROC": _plot("roc", report.labels, report.probs, result.classes, out_dir / ROC_FILE),
        "Precision-recall": _plot("pr", report.labels, report.probs, result.classes, out_dir / PR_FILE),
    }
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(_html_report(result, images), encoding="utf-8")
    log.info(
        "test metrics on %d records: %s",
        result.n_test,
        ", ".join(f"{k} {interval_text(result.metrics, k)}" for k in sorted(result.metrics) if not k.endswith(BOUNDS)),
    )
    return result


# --------------------------------------------------------------------------- the champion


@dataclass(frozen=True)
class Champion:
    """The model to compare with: its registry version and its predictor (None when it could
    not be loaded; ``problem`` says why)."""

    version: str
    predictor: Any = None
    problem: str = ""


@dataclass
class ChampionEvaluation:
    """The champion's metrics on a run's test split, or why there are none.

    ``version`` None: there was no champion. ``metrics`` empty with a version: it could
    not be scored on this split (``note`` says why). ``gate``: the paired bootstrap of the
    challenger against the champion on the same records (:meth:`PairedBootstrap.to_json`),
    empty when it could not be computed (``gate_note`` says why).

    On disk a folder: ``champion.json`` (this), ``predictions.npz`` (the champion's
    per-record predictions, keys as :func:`evaluate_step` writes them) and
    ``paired_bootstrap.json`` (``gate``).
    """

    version: str | None
    test_split_hash: str
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    gate: dict[str, Any] = field(default_factory=dict)
    gate_note: str = ""

    @property
    def scored(self) -> bool:
        return self.version is not None and bool(self.metrics)

    def metadata(self) -> dict[str, Any]:
        return {
            "champion_version": self.version or "",
            "scored": self.scored,
            "note": self.note,
            "test_split_hash": self.test_split_hash,
            "paired_bootstrap": bool(self.gate),
            "gate_note": self.gate_note,
        }

    def write(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.gate:
            write_json(out_dir / GATE_FILE, self.gate)
        return write_json(out_dir / CHAMPION_FILE, asdict(self))

    @classmethod
    def read(cls, path: Path) -> ChampionEvaluation:
        """From the step's folder (or a bare ``champion.json``)."""
        path = Path(path)
        data = read_json(path / CHAMPION_FILE if path.is_dir() else path, "champion evaluation")
        return cls(
            version=data["version"],
            test_split_hash=data["test_split_hash"],
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            note=data.get("note", ""),
            gate=dict(data.get("gate", {})),
            gate_note=data.get("gate_note", ""),
        )


def save_predictions(path: Path, ids: list[str], probs: np.ndarray, labels: np.ndarray, thresholds: Any) -> Path:
    """Per-record predictions (the layout of ``predictions.npz``)."""
    np.savez_compressed(
        path, ids=np.asarray(ids), probs=probs, labels=labels, thresholds=np.asarray(thresholds, dtype=np.float64)
    )
    return Path(path)


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in ("ids", "probs", "labels", "thresholds")}


def compare_predictions(
    challenger: dict[str, np.ndarray], champion: dict[str, np.ndarray], classes: list[str], config: BootstrapConfig
) -> PairedBootstrap:
    """The paired bootstrap of two models' predictions on identical records (same ids in the
    same order, same labels); ValueError otherwise."""
    if [str(i) for i in challenger["ids"]] != [str(i) for i in champion["ids"]]:
        raise ValueError("the challenger and the champion were not scored on the same records")
    if not np.array_equal(challenger["labels"], champion["labels"]):
        raise ValueError("the challenger's and the champion's labels differ on the same records")
    return paired_bootstrap(
        challenger["labels"],
        challenger["probs"],
        challenger["thresholds"],
        champion["probs"],
        champion["thresholds"],
        classes,
        config,
    )


def _gate(
    result: ChampionEvaluation,
    challenger_evaluation: Path | None,
    champion_predictions: dict[str, np.ndarray],
    classes: list[str],
    config: BootstrapConfig,
) -> None:
    """Fill ``result.gate`` (or ``gate_note``) from the challenger's ``predictions.npz``."""
    path = None if challenger_evaluation is None else Path(challenger_evaluation) / PREDICTIONS_FILE
    if path is None or not path.is_file():
        result.gate_note = "no challenger predictions to compare with"
        return
    try:
        gate = compare_predictions(load_predictions(path), champion_predictions, classes, config)
    except ValueError as err:
        result.gate_note = str(err)
        return
    result.gate = gate.to_json()
    interval = gate.intervals["macro_f_beta"]
    log.info(
        "paired %s interval over %d records: macro_f_beta challenger - champion %.4f, %.4g%% CI [%.4f, %.4f]",
        interval.method,
        gate.n_records,
        interval.estimate,
        100 * gate.confidence,
        interval.ci_low,
        interval.ci_high,
    )


def score_champion_step(
    store_dir: Path,
    splits_path: Path,
    champion: Champion | None,
    out_dir: Path,
    challenger_evaluation: Path | None = None,
    bootstrap: BootstrapConfig | None = None,
) -> ChampionEvaluation:
    """Score ``champion`` on the test split the way :func:`evaluate_step` scores the new model,
    keep its per-record predictions, and (given the challenger's evaluation folder) compute
    the paired bootstrap of the two on the same records."""
    splits = Splits.load(splits_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if champion is None:
        result = ChampionEvaluation(None, splits.test_split_hash, note="no champion")
    elif champion.predictor is None:
        result = ChampionEvaluation(
            champion.version, splits.test_split_hash, note=f"could not be loaded: {champion.problem}"
        )
    else:
        try:
            report = _score(champion.predictor, store_dir, splits)
        except ValueError as err:
            result = ChampionEvaluation(champion.version, splits.test_split_hash, note=str(err))
        else:
            result = ChampionEvaluation(
                champion.version, splits.test_split_hash, _test_metrics(report, list(splits.classes)), "scored"
            )
            save_predictions(
                out_dir / PREDICTIONS_FILE, list(splits.test), report.probs, report.labels, report.thresholds
            )
            _gate(
                result,
                challenger_evaluation,
                load_predictions(out_dir / PREDICTIONS_FILE),
                list(splits.classes),
                bootstrap or BootstrapConfig(),
            )
    if champion is not None and not result.scored:
        log.warning("champion v%s not scored on this test split: %s", champion.version, result.note)
    result.write(out_dir)
    return result
