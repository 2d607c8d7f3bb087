"""Step: score the fine-tuned model on the test split.

Writes into the evaluation folder: ``metrics.json`` (ranking loss, coverage, macro AUROC,
macro mAP, macro F-beta2, macro G-beta2), ``per_class.csv``, ``predictions.npz`` (test ids,
probabilities, labels, thresholds), ``roc.png`` and ``pr.png``; and an HTML report with
the tables and both plots embedded.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.common import write_json
from components.data_access import dataset, open_store
from ml.data.splits import Splits
from ml.eval.predictor import load_predictor

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.npz"
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
        return int(len(self.labels))

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


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Drop undefined (NaN) metrics, e.g. AUROC when the test split has a single class."""
    out = {}
    for key, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            log.warning("test metric %s is undefined on this split (NaN): not reported", key)
            continue
        out[key] = float(value)
    return out


def _plot(kind: str, labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    for k, name in enumerate(classes):
        y = labels[:, k]
        if y.min() == y.max():
            continue  # undefined for a class with no positive (or no negative) test record
        if kind == "roc":
            x_vals, y_vals, _ = roc_curve(y, probs[:, k])
        else:
            y_vals, x_vals, _ = precision_recall_curve(y, probs[:, k])
        ax.plot(x_vals, y_vals, lw=1, label=name)
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
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(result.metrics.items()))
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
        f"<h2>Metrics</h2><table><tr><th>metric</th><th>value</th></tr>{rows}</table>"
        f"<h2>Per class</h2>{result.per_class.to_html(index=False, float_format=lambda v: f'{v:.4f}')}"
        f"<h2>Curves</h2>{embedded}</body></html>"
    )


def evaluate_step(store_dir: Path, splits_path: Path, backbone_dir: Path, adapter_dir: Path,
                  out_dir: Path, report_path: Path) -> EvaluationResult:
    """Evaluate the adapter on the test split; write the evaluation folder and the HTML report."""
    from ml.eval.evaluate import evaluate

    splits = Splits.load(splits_path)
    predictor = load_predictor(backbone_dir, adapter_dir)
    if predictor.classes != splits.classes:
        raise ValueError(f"{adapter_dir}: adapter classes {predictor.classes} differ from the split's {splits.classes}")
    store = open_store(store_dir)
    test = dataset(store, splits.test, splits.classes)
    report = evaluate(predictor.model, test, thresholds=predictor.thresholds, classes=splits.classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = EvaluationResult(metrics=_finite(report.metrics), per_class=report.per_class, probs=report.probs,
                              labels=report.labels, classes=list(splits.classes),
                              test_split_hash=splits.test_split_hash, out_dir=out_dir)
    write_json(out_dir / METRICS_FILE, {"metrics": result.metrics, "test_split_hash": result.test_split_hash,
                                        "n_test": result.n_test, "classes": result.classes})
    report.per_class.to_csv(out_dir / PER_CLASS_FILE, index=False)
    np.savez_compressed(out_dir / PREDICTIONS_FILE, ids=np.asarray(splits.test), probs=report.probs,
                        labels=report.labels, thresholds=np.asarray(report.thresholds))
    images = {"ROC": _plot("roc", report.labels, report.probs, result.classes, out_dir / ROC_FILE),
              "Precision-recall": _plot("pr", report.labels, report.probs, result.classes, out_dir / PR_FILE)}
    Path(report_path).parent.mkdir(parents=True, exist_ok=True)
    Path(report_path).write_text(_html_report(result, images), encoding="utf-8")
    log.info("test metrics on %d records: %s", result.n_test,
             ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items())))
    return result


def load_evaluation(out_dir: Path) -> dict:
    """The ``metrics.json`` of an evaluation folder."""
    from components.common import read_json

    return read_json(Path(out_dir) / METRICS_FILE, "evaluation metrics")


def score_probs(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """The test metrics of given probabilities (used to score a champion on this split)."""
    from ml.eval.metrics import challenge_metrics

    return _finite(challenge_metrics(labels, probs, np.asarray(thresholds, dtype=np.float64)))
