"""Step: the network's cross-site evaluation (``ml.eval.cross_site``).

Every site's adapter scored on every site's test split, and on each site's own test split the
references: the head-only baseline (the frozen backbone with a linear head fit on the site's
labelled records, ``ml.eval.head_only``), the backbone without adaptation (an ablation) and
predict-everything: a matrix of the official Challenge 2021 score (against the records' labels of all
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
    """What the cross-site step reads of one site: its name, store, split file and adapter."""

    name: str
    store_dir: Path
    splits_path: Path
    adapter_dir: Path


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


def _head_only_cell(model, target: str, test: _TestSplit, batch_size: int):
    """The head-only baseline on ``target`` (``model``: the frozen backbone, LoRA off), or None
    where the site has no labelled training record."""
    from ml.eval.cross_site import HEAD_ONLY_ROW, score_cell
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
    features, labels = features_with_labels(model, test.records, batch_size)
    probs = probe.probabilities(features)
    return score_cell(HEAD_ONLY_ROW, target, probs, test.classes, probe.thresholds, labels, test.classes, test.scored)


def cross_site_matrix(backbone_dir: Path, sites: Sequence[SiteArtifacts], batch_size: int = 64):
    """The :class:`ml.eval.cross_site.CrossSiteMatrix` of ``sites`` (each model on each test split)."""
    from ml.eval.cross_site import BACKBONE_ROW, CrossSiteMatrix, everything_cell, score_cell, without_adaptation
    from ml.eval.evaluate import predict_with_labels
    from ml.eval.predictor import load_predictor
    from ml.model.pretrained import read_backbone

    if not sites:
        raise StepError("cross-site evaluation: no site to evaluate")
    backbone_state = read_backbone(backbone_dir).state
    tests = {site.name: _test_set(site) for site in sites}

    def score_on(row: str, predictor, target: str):
        """The cell of ``row`` (a site's adapter, or the backbone) on ``target``'s test split."""
        test = tests[target]
        probs, labels = predict_with_labels(predictor.model, test.records, batch_size)
        return score_cell(
            row, target, probs, predictor.classes, predictor.thresholds, labels, test.classes, test.scored
        )

    cells = []
    for model_site in sites:
        predictor = load_predictor(backbone_dir, model_site.adapter_dir)
        cells += [score_on(model_site.name, predictor, target.name) for target in sites]
    for target in sites:  # the backbone row: the target's own head, nothing else adapted
        predictor = load_predictor(backbone_dir, target.adapter_dir)
        switched = without_adaptation(predictor.model, backbone_state)
        cells.append(score_on(BACKBONE_ROW, predictor, target.name))
        log.debug("backbone on %s: %d LoRA layers off", target.name, switched)
        head_only = _head_only_cell(predictor.model, target.name, tests[target.name], batch_size)
        cells += [head_only] if head_only is not None else []
    for name, test in tests.items():  # the reference: every class of the target, for every record
        cells.append(everything_cell(name, test.labels, test.classes, test.scored))
    return CrossSiteMatrix(tuple(cells))


def plot_heatmap(matrix, path: Path) -> Path:
    """Both metrics side by side as annotated heat maps (rows: models, columns: test splits)."""
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
