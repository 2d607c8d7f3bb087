"""Step: the network's cross-site evaluation (``ml.eval.cross_site``).

Every site's adapter scored on every site's test split, and on each site's own test split the
references: the head-only baseline (the frozen backbone with a linear head fit on the site's
labelled records, ``ml.eval.head_only``), the site's plain LoRA adapter (trained on its labelled
records alone, the network DAG's baseline chain), the backbone without adaptation (an
ablation) and predict-everything: a matrix of the official Challenge 2021 score (against the records' labels of all
26 scored classes) and the macro F-beta2, written as CSV, Markdown,
JSON and a heat-map PNG. The test splits are the ones the sites' own evaluate steps used
(the same store and split files), so the diagonal is each site's own test score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.common import StepError, write_json
from components.data_access import dataset, open_store, scored_labels

if TYPE_CHECKING:
    from torch.utils.data import Dataset

log = logging.getLogger(__name__)

MATRIX_CSV, MATRIX_MD, MATRIX_JSON, MATRIX_PNG = "cross_site.csv", "cross_site.md", "cross_site.json", "cross_site.png"


@dataclass(frozen=True)
class SiteArtifacts:
    """What the cross-site step reads of one site: its name, store, split file, adapter and its
    plain-LoRA baseline adapter (None: none trained)."""

    name: str
    store_dir: Path
    splits_path: Path
    adapter_dir: Path
    baseline_dir: Path | None = None


@dataclass(frozen=True)
class CrossSiteFiles:
    csv: Path
    markdown: Path
    json: Path
    heatmap: Path

    def artifacts(self) -> dict[str, Path]:
        return {f"cross_site/{p.name}": p for p in (self.csv, self.markdown, self.json, self.heatmap)}


@dataclass(frozen=True)
class _TestSplit:
    """A site's test split: the records, its classes, their labels over those classes and over
    every Challenge-scored class; and its labelled training and validation records (the
    head-only baseline's)."""

    records: Dataset
    classes: list[str]
    labels: np.ndarray
    scored: np.ndarray
    train: Dataset | None
    valid: Dataset | None


def _test_set(site: SiteArtifacts) -> _TestSplit:
    from ml.data.splits import Splits

    splits = Splits.load(site.splits_path)
    if not splits.test:
        raise StepError(f"site {site.name}: {site.splits_path} has an empty test split")
    store = open_store(site.store_dir)
    classes = list(splits.classes)
    return _TestSplit(
        dataset(store, splits.test, classes),
        classes,
        store.label_matrix(classes, list(splits.test)),
        scored_labels(store, splits.test),
        dataset(store, splits.train, classes) if splits.train else None,
        dataset(store, splits.valid, classes) if splits.valid else None,
    )


@dataclass(frozen=True)
class _Scored:
    """A model's probabilities on a target's test records, its classes and thresholds."""

    probs: np.ndarray
    classes: list[str]
    thresholds: np.ndarray

    def cell(self, row: str, target: str, test: _TestSplit):
        from ml.eval.cross_site import score_cell

        return score_cell(
            row, target, self.probs, self.classes, self.thresholds, test.labels, test.classes, test.scored
        )

    def predictions(self, classes: Sequence[str], test: _TestSplit) -> np.ndarray:
        """Thresholded predictions over ``classes`` (the target's order; each one the model's)."""
        from ml.eval.metrics import binarize

        y_pred = binarize(self.probs, self.thresholds)
        return y_pred[:, [self.classes.index(c) for c in classes]]


def _head_only(model, target: str, test: _TestSplit, batch_size: int) -> _Scored | None:
    """The head-only baseline on ``target`` (``model``: the frozen backbone, LoRA off), or None
    where the site has no labelled training record."""
    from ml.eval.evaluate import features_with_labels
    from ml.eval.head_only import fit_linear_probe

    if test.train is None:
        log.warning("head-only baseline on %s: no labelled training record", target)
        return None
    train_x, train_y = features_with_labels(model, test.train, batch_size)
    valid_x, valid_y = np.zeros((0, train_x.shape[1])), np.zeros((0, train_y.shape[1]))
    if test.valid is not None:
        valid_x, valid_y = features_with_labels(model, test.valid, batch_size)
    probe = fit_linear_probe(train_x, train_y, valid_x, valid_y)
    features, _ = features_with_labels(model, test.records, batch_size)
    return _Scored(probe.probabilities(features), list(test.classes), np.asarray(probe.thresholds))


def _compare(site: str, adapter: _Scored, baseline: _Scored, row: str, test: _TestSplit):
    """The site's adapter against a baseline on its own test split, over the classes the
    adapter predicts and the split labels."""
    from ml.eval.cross_site import paired_comparison, shared_classes

    classes = [c for c in shared_classes(adapter.classes, test.classes) if c in baseline.classes]
    labels = test.labels[:, [test.classes.index(c) for c in classes]]
    return paired_comparison(site, row, labels, adapter.predictions(classes, test), baseline.predictions(classes, test))


def cross_site_matrix(backbone_dir: Path, sites: Sequence[SiteArtifacts], batch_size: int = 64):
    """The :class:`ml.eval.cross_site.CrossSiteMatrix` of ``sites`` (each model on each test
    split), with each site's adapter compared with the head-only baseline and its plain-LoRA
    adapter on its own split."""
    from ml.eval.cross_site import (
        BACKBONE_ROW,
        HEAD_ONLY_ROW,
        PLAIN_LORA_ROW,
        CrossSiteMatrix,
        everything_cell,
        without_adaptation,
    )
    from ml.eval.evaluate import predict_with_labels
    from ml.eval.predictor import load_predictor
    from ml.model.pretrained import read_backbone

    if not sites:
        raise StepError("cross-site evaluation: no site to evaluate")
    backbone_state = read_backbone(backbone_dir).state
    tests = {site.name: _test_set(site) for site in sites}

    def scored(predictor, target: str) -> _Scored:
        """``predictor`` (a site's adapter, or the backbone) on ``target``'s test split."""
        probs, _ = predict_with_labels(predictor.model, tests[target].records, batch_size)
        return _Scored(probs, list(predictor.classes), np.asarray(predictor.thresholds))

    cells, own = [], {}
    for model_site in sites:
        predictor = load_predictor(backbone_dir, model_site.adapter_dir)
        for target in sites:
            result = scored(predictor, target.name)
            cells.append(result.cell(model_site.name, target.name, tests[target.name]))
            if target.name == model_site.name:
                own[target.name] = result
    comparisons = []
    for target in sites:  # the backbone row: the target's own head, nothing else adapted
        test = tests[target.name]
        predictor = load_predictor(backbone_dir, target.adapter_dir)
        switched = without_adaptation(predictor.model, backbone_state)
        cells.append(scored(predictor, target.name).cell(BACKBONE_ROW, target.name, test))
        log.debug("backbone on %s: %d LoRA layers off", target.name, switched)
        head_only = _head_only(predictor.model, target.name, test, batch_size)
        if head_only is not None:
            cells.append(head_only.cell(HEAD_ONLY_ROW, target.name, test))
            comparisons.append(_compare(target.name, own[target.name], head_only, HEAD_ONLY_ROW, test))
        if target.baseline_dir is not None:  # the site's plain LoRA adapter, on its own test split
            lora = scored(load_predictor(backbone_dir, target.baseline_dir), target.name)
            cells.append(lora.cell(PLAIN_LORA_ROW, target.name, test))
            comparisons.append(_compare(target.name, own[target.name], lora, PLAIN_LORA_ROW, test))
    for name, test in tests.items():  # the reference: every class of the target, for every record
        cells.append(everything_cell(name, test.labels, test.classes, test.scored))
    return CrossSiteMatrix(tuple(cells), tuple(comparisons))


def plot_heatmap(matrix, path: Path) -> Path:
    """Every metric side by side as annotated heat maps (rows: models, columns: test splits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ml.eval.cross_site import METRIC_TITLES, METRICS
    from ml.io import atomic_path

    models, targets = matrix.models, matrix.targets
    fig, axes = plt.subplots(
        1, len(METRICS), figsize=(2.5 + 1.6 * len(targets) * len(METRICS), 1.5 + 0.6 * len(models)), squeeze=False
    )
    for ax, metric in zip(axes[0], METRICS, strict=True):
        values = np.asarray(matrix.table(metric), dtype=np.float64)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=np.nanmin([0.0, *values.ravel()]))
        ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_xlabel("test split of site")
        ax.set_ylabel("model")
        ax.set_title(METRIC_TITLES[metric])
        for i in range(len(models)):
            for j in range(len(targets)):
                text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_cross_site(matrix, out_dir: Path) -> CrossSiteFiles:
    """The matrix as CSV (long format), Markdown tables, JSON cells and a heat map in ``out_dir``."""
    from ml.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = atomic_write_text(out_dir / MATRIX_CSV, matrix.csv())
    md = atomic_write_text(out_dir / MATRIX_MD, matrix.markdown())
    js = write_json(out_dir / MATRIX_JSON, matrix.to_records())
    png = plot_heatmap(matrix, out_dir / MATRIX_PNG)
    return CrossSiteFiles(csv, md, js, png)


def cross_site_step(backbone_dir: Path, sites: Sequence[SiteArtifacts], out_dir: Path):
    """Score every model on every test split; write the files; return (matrix, files)."""
    matrix = cross_site_matrix(backbone_dir, sites)
    return matrix, write_cross_site(matrix, out_dir)
