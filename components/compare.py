"""Comparing training methods: the grid, one cell's result, and the table over seeds.

``cessl compare`` fine-tunes every method of a grid (methods x labelled ratios x seeds) on
the same data; a cell is one normal split -> allocate_ranks -> finetune -> evaluate chain,
and the cells of one (labelled ratio, seed) share their split, so the methods are compared
on the same records (:func:`check_paired` verifies it from the split fingerprints).

- :class:`CompareGrid` / :class:`Cell`: the grid and its points (methods from the registry of
  :mod:`ml.train.methods`).
- :class:`CellResult`: what one cell produced: its test metrics and its cost (ms per training
  step, peak memory over the steps and how it was measured, trainable parameters), read
  from the step outputs by :func:`read_cell`.
- :func:`comparison_table`: mean and standard deviation over seeds per (method, labelled
  ratio) of :data:`COLUMNS`; :func:`table_markdown`, :func:`plot_comparison` (macro F-beta2
  vs labelled ratio, one line per method, error bars = std) and :func:`write_comparison`
  (CSV + Markdown + PNG + the cells as JSON).

The standard deviation is the sample one (ddof = 1) over the seeds; with a single seed it is
undefined (NaN, shown as "n/a"). A metric a cell could not compute (e.g. AUROC on a test
split with a single class) is left out of that cell's mean, and ``n_<column>`` counts the
seeds behind each mean. No kfp or mlflow here: the pipeline logs the files.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common import read_json, write_json
from components.evaluate import METRICS_FILE, load_predictions
from ml.train.methods import get_method

log = logging.getLogger(__name__)

# Test metrics of the table (keys of the evaluation's metrics.json) and their headings.
METRICS: dict[str, str] = {
    "macro_f_beta": "F-beta2",
    "macro_g_beta": "G-beta2",
    "macro_auroc": "AUROC",
    "macro_map": "mAP",
    "challenge_score": "Challenge",
}
# Cost of a method (the finetune step's measurements).
COST: dict[str, str] = {
    "ms_per_step": "ms/step",
    "peak_memory_mb": "peak MB",
    "trainable_params": "trainable",
}
COLUMNS: dict[str, str] = METRICS | COST
PLOT_METRIC = "macro_f_beta"
# The run parameters a grid cell chooses (every other parameter is shared by the cells).
GRID_FIELDS: tuple[str, ...] = ("method", "labelled_ratio", "seed")

TABLE_CSV = "comparison.csv"
PAIRED_CSV = "paired.csv"
REFERENCE_METHOD = "cessl"  # the paired differences are against it
PAIRED_METRICS: dict[str, str] = {"macro_f_beta": "F-beta2", "macro_g_beta": "G-beta2"}
TABLE_MD = "comparison.md"
PLOT_PNG = "comparison.png"
CELLS_JSON = "cells.json"


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a method trained at a labelled ratio with a seed."""

    method: str
    labelled_ratio: float
    seed: int
    test_seed: int = 0  # the test cut's seed: one for every cell of a grid (one shared test split)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.labelled_ratio:g}-s{self.seed}"

    def item(self) -> dict[str, Any]:
        """The pipeline's loop item (JSON)."""
        return asdict(self)


def _unique(values: Sequence[Any], what: str) -> None:
    if not values:
        raise ValueError(f"the grid needs at least one {what}")
    if len(set(values)) != len(values):
        raise ValueError(f"repeated {what} in {list(values)}")


@dataclass(frozen=True)
class CompareGrid:
    """Methods x labelled ratios x seeds; every method sees the same splits."""

    methods: tuple[str, ...]
    labelled_ratios: tuple[float, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        _unique(self.methods, "method")
        _unique(self.labelled_ratios, "labelled ratio")
        _unique(self.seeds, "seed")
        for method in self.methods:
            get_method(method)  # a clear error for an unknown name
        for ratio in self.labelled_ratios:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"labelled ratio must be in (0, 1), got {ratio}")

    @classmethod
    def parse(cls, methods: str, ratios: str, seeds: str) -> CompareGrid:
        """From comma-separated lists, e.g. ``"cessl,fixmatch"``, ``"0.05,0.15"``, ``"0,1,2"``."""

        def items(text: str) -> list[str]:
            return [part.strip() for part in text.split(",") if part.strip()]

        return cls(
            methods=tuple(items(methods)),
            labelled_ratios=tuple(float(r) for r in items(ratios)),
            seeds=tuple(int(s) for s in items(seeds)),
        )

    def cells(self) -> list[Cell]:
        """Every cell; the methods of one (ratio, seed) next to each other (they share a split)."""
        return [
            Cell(method, ratio, seed, self.seeds[0])
            for ratio, seed, method in itertools.product(self.labelled_ratios, self.seeds, self.methods)
        ]

    def items(self) -> list[dict[str, Any]]:
        return [cell.item() for cell in self.cells()]

    @classmethod
    def from_items(cls, items: Iterable[Mapping[str, Any]]) -> CompareGrid:
        """The grid of a list of loop items (in their order of first appearance)."""
        cells = [
            Cell(str(i["method"]), float(i["labelled_ratio"]), int(i["seed"]), int(i.get("test_seed", i["seed"])))
            for i in items
        ]
        return cls(
            methods=tuple(dict.fromkeys(c.method for c in cells)),
            labelled_ratios=tuple(dict.fromkeys(c.labelled_ratio for c in cells)),
            seeds=tuple(dict.fromkeys(c.seed for c in cells)),
        )

    def describe(self) -> str:
        return (
            f"{len(self.methods)} methods ({', '.join(self.methods)}) x {len(self.labelled_ratios)} labelled ratios "
            f"({', '.join(f'{r:g}' for r in self.labelled_ratios)}) x {len(self.seeds)} seeds = "
            f"{len(self.cells())} fine-tunes"
        )


# --------------------------------------------------------------------------- one cell


@dataclass
class CellResult:
    """What one cell produced (a JSON record: the pipeline passes it between steps)."""

    method: str
    labelled_ratio: float
    seed: int
    metrics: dict[str, float]  # test metrics (evaluation's metrics.json)
    ms_per_step: float
    peak_memory_mb: float
    memory_measure: str
    trainable_params: int
    total_params: int
    steps: int
    split_fingerprint: str
    test_split_hash: str
    run_id: str = ""  # the cell's MLflow child run
    extra: dict[str, Any] = field(default_factory=dict)
    reads_unlabelled: bool = False  # what the method reads: labelled records only, or unlabelled ones too

    @property
    def cell(self) -> Cell:
        return Cell(self.method, self.labelled_ratio, self.seed)

    def values(self) -> dict[str, float]:
        """The table's :data:`COLUMNS` for this cell (NaN where a figure is missing)."""
        cost = {
            "ms_per_step": self.ms_per_step,
            "peak_memory_mb": self.peak_memory_mb,
            "trainable_params": float(self.trainable_params),
        }
        return {key: float(self.metrics.get(key, cost.get(key, math.nan))) for key in COLUMNS}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> CellResult:
        data = dict(json.loads(text) if isinstance(text, str) else text)
        return cls(**data)


def _float(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


def read_cell(
    cell: Cell,
    evaluation_dir: Path,
    finetune_meta: Mapping[str, Any],
    splits_meta: Mapping[str, Any],
) -> CellResult:
    """One cell's result from its step outputs: the evaluation folder (test metrics), the
    finetune step's metadata (:meth:`components.finetune.FinetuneResult.metadata`) and the
    split's (fingerprint)."""
    evaluation = read_json(Path(evaluation_dir) / METRICS_FILE, "evaluation metrics")
    return CellResult(
        method=cell.method,
        labelled_ratio=cell.labelled_ratio,
        seed=cell.seed,
        metrics={k: float(v) for k, v in evaluation["metrics"].items()},
        ms_per_step=_float(finetune_meta.get("ms_per_step")),
        peak_memory_mb=_float(finetune_meta.get("peak_memory_mb")),
        memory_measure=str(finetune_meta.get("memory_measure", "")),
        trainable_params=int(finetune_meta.get("trainable_params", 0)),
        total_params=int(finetune_meta.get("total_params", 0)),
        steps=int(finetune_meta.get("steps", 0)),
        split_fingerprint=str(splits_meta.get("fingerprint", "")),
        test_split_hash=str(evaluation.get("test_split_hash", "")),
        extra={"device": str(finetune_meta.get("device", "")), "schedule": str(finetune_meta.get("schedule", ""))},
        reads_unlabelled=get_method(cell.method).reads_unlabelled,
    )


def check_paired(results: Sequence[CellResult]) -> None:
    """Raise ValueError unless the methods of each (labelled ratio, seed) used the same split
    and every cell was tested on the same test split."""
    by_split: dict[tuple[float, int], set[str]] = {}
    for result in results:
        by_split.setdefault((result.labelled_ratio, result.seed), set()).add(result.split_fingerprint)
    for (ratio, seed), fingerprints in sorted(by_split.items()):
        if len(fingerprints) > 1:
            raise ValueError(f"labelled ratio {ratio:g}, seed {seed}: the methods were trained on different splits")
    tests = {r.test_split_hash for r in results if r.test_split_hash}
    if len(tests) > 1:
        raise ValueError(f"the cells were tested on {len(tests)} different test splits; a comparison shares one")


# --------------------------------------------------------------------------- the table


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def comparison_table(results: Sequence[CellResult]) -> pd.DataFrame:
    """One row per (method, labelled ratio), in grid order: ``n_seeds`` and for each of
    :data:`COLUMNS` ``<column>_mean``, ``<column>_std`` (sample std over seeds) and
    ``n_<column>`` (seeds with a value); ``memory_measure`` says what peak memory is."""
    if not results:
        raise ValueError("no cell results to compare")
    methods = list(dict.fromkeys(r.method for r in results))
    ratios = sorted({r.labelled_ratio for r in results})
    frame = pd.DataFrame(
        [{"method": r.method, "labelled_ratio": r.labelled_ratio, "seed": r.seed, **r.values()} for r in results]
    )
    measures = {r.cell: r.memory_measure for r in results}
    rows = []
    for ratio, method in itertools.product(ratios, methods):
        group = frame[(frame["method"] == method) & (frame["labelled_ratio"] == ratio)]
        if group.empty:
            continue
        row: dict[str, Any] = {"method": method, "labelled_ratio": ratio, "n_seeds": int(group["seed"].nunique())}
        for column in COLUMNS:
            values = group[column].dropna()
            row[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{column}_std"] = _std(group[column])
            row[f"n_{column}"] = len(values)
        kinds = sorted({m for cell, m in measures.items() if cell.method == method and cell.labelled_ratio == ratio})
        row["memory_measure"] = " / ".join(k for k in kinds if k) or "unknown"
        cells = [r for r in results if r.method == method and r.labelled_ratio == ratio]
        row["reads"] = "labelled + unlabelled" if cells[0].reads_unlabelled else "labelled"
        shares = [r.trainable_params / r.total_params for r in cells if r.total_params]
        row["trainable_share"] = float(np.mean(shares)) if shares else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_value(mean: float, std: float, column: str) -> str:
    """``"0.512 +- 0.013"`` (std omitted when undefined), ``"n/a"`` for a missing mean."""
    if not math.isfinite(mean):
        return "n/a"
    if column == "trainable_params":
        text = f"{mean:,.0f}"
        return text if not math.isfinite(std) or std == 0 else f"{text} +- {std:,.0f}"
    digits = 1 if column in COST else 3
    text = f"{mean:.{digits}f}"
    return text if not math.isfinite(std) else f"{text} +- {std:.{digits}f}"


def memory_heading(table: pd.DataFrame) -> str:
    """``"peak MB (cpu peak RSS growth)"``: the measure every row shares, or ``mixed``."""
    return f"peak MB ({memory_measure(table)})"


def memory_measure(table: pd.DataFrame) -> str:
    """What the peak memory column measured (``mixed: see CSV`` when the rows differ)."""
    kinds = sorted(set(table["memory_measure"])) if "memory_measure" in table else []
    return kinds[0] if len(kinds) == 1 else "mixed: see CSV"


def ratio_label(ratio: float) -> str:
    """``0.05`` -> ``"5%"``."""
    return f"{ratio * 100:g}%"


def table_rows(table: pd.DataFrame, memory: bool = True) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted rows (mean +- std), for the Markdown file and the terminal
    (``memory`` False: the peak memory heading without its measure, for narrow tables)."""
    headings = ["method", "labelled", "seeds"] + [
        memory_heading(table) if key == "peak_memory_mb" and memory else title for key, title in COLUMNS.items()
    ]
    headings += ["trainable share", "reads"]
    rows = [
        [str(row["method"]), ratio_label(row["labelled_ratio"]), str(row["n_seeds"])]
        + [format_value(row[f"{key}_mean"], row[f"{key}_std"], key) for key in COLUMNS]
        + [_share(row.get("trainable_share", math.nan)), str(row.get("reads", ""))]
        for _, row in table.iterrows()
    ]
    return headings, rows


def _share(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value * 100:.3g}%"


def table_markdown(table: pd.DataFrame, title: str = "Method comparison") -> str:
    """The table as Markdown: mean +- sample std over seeds."""
    headings, rows = table_rows(table)
    lines = [
        f"# {title}",
        "",
        "Mean +- standard deviation over seeds (sample std, n/a for a single seed). One test split for every "
        "method, labelled ratio and seed (the differences below are paired on its records). F-beta2 / G-beta2 / "
        "mAP: macro F-beta (beta 2) / G-beta (beta 2) / mean average "
        "precision over all classes, a class with no positive test record counting 0 (CE-SSL reference); "
        "Challenge: the official PhysioNet/CinC 2021 Challenge score (all 26 scored classes); ms/step: mean "
        "training step, validations left out; peak MB: "
        "peak memory over the training steps (both n/a for head-only, which takes no gradient step); trainable: trainable parameters, and their share of the model. "
        "reads: what each step of the method reads; a method that reads only labelled records does less work "
        "per step, so compare ms/step between methods that read the same.",
        "",
        "| " + " | ".join(headings) + " |",
        "|" + "|".join("---" if i < 1 else "---:" for i in range(len(headings))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_comparison(table: pd.DataFrame, path: Path, metric: str = PLOT_METRIC) -> Path:
    """``metric`` vs labelled ratio, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, group in table.groupby("method", sort=False):
        group = group.sort_values("labelled_ratio")
        ax.errorbar(
            group["labelled_ratio"] * 100,
            group[f"{metric}_mean"],
            yerr=np.nan_to_num(group[f"{metric}_std"].to_numpy(dtype=float)),
            marker="o",
            capsize=3,
            label=str(method),
        )
    ax.set(
        xlabel="labelled records (%)",
        ylabel=COLUMNS.get(metric, metric),
        title=f"{COLUMNS.get(metric, metric)} on the test split (mean +- std over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- paired differences


@dataclass(frozen=True)
class CellPredictions:
    """One cell's thresholded predictions on the shared test split, by record id."""

    ids: tuple[str, ...]
    labels: np.ndarray  # (N, C) 0/1
    predicted: np.ndarray  # (N, C) 0/1

    @classmethod
    def load(cls, path: Path) -> CellPredictions:
        """From a cell's ``predictions.npz`` (components.evaluate), in record id order."""
        from ml.eval.metrics import binarize

        data = load_predictions(path)
        order = np.argsort(data["ids"].astype(str), kind="stable")
        return cls(
            tuple(str(i) for i in data["ids"][order]),
            data["labels"][order].astype(np.int64),
            binarize(data["probs"][order], data["thresholds"]).astype(np.int64),
        )


Pair = tuple[CellPredictions, CellPredictions]


def _mean_difference(pairs: Sequence[Pair], metric: str, keep: np.ndarray) -> float:
    """``metric`` of the method minus the reference's on records ``keep``, averaged over the pairs."""
    from ml.eval.metrics import thresholded_metrics

    differences = [
        thresholded_metrics(method.labels[keep], method.predicted[keep])[metric]
        - thresholded_metrics(reference.labels[keep], reference.predicted[keep])[metric]
        for method, reference in pairs
    ]
    return float(np.mean(differences))


def _pairs(
    results: Sequence[CellResult],
    predictions: Mapping[str, CellPredictions],
    method: str,
    ratio: float,
    reference: str,
) -> list[Pair]:
    """(method, reference) predictions of each seed both have at ``ratio``."""
    found = []
    for result in results:
        if result.method != method or result.labelled_ratio != ratio:
            continue
        partner = Cell(reference, ratio, result.seed).name
        if result.cell.name in predictions and partner in predictions:
            found.append((predictions[result.cell.name], predictions[partner]))
    return found


def paired_differences(
    results: Sequence[CellResult], predictions: Mapping[str, CellPredictions], reference: str = REFERENCE_METHOD
) -> pd.DataFrame:
    """Per (method, labelled ratio) other than ``reference``: each of :data:`PAIRED_METRICS`
    of the method minus the reference's, averaged over the seeds both have, on the same test
    records, with its 95% jackknife-t interval over those records (``ml.eval.intervals``: the
    test-sampling uncertainty of the mean difference; the seeds' spread is the table's std).
    ``predictions``: :attr:`Cell.name` -> the cell's predictions. Empty when there is no
    reference cell or no predictions."""
    from functools import partial

    from ml.eval.intervals import jackknife_interval

    rows = []
    for ratio in sorted({r.labelled_ratio for r in results}):
        for method in dict.fromkeys(r.method for r in results if r.method != reference):
            pairs = _pairs(results, predictions, method, ratio, reference)
            if not pairs:
                continue
            ids = pairs[0][0].ids
            if any(a.ids != ids or b.ids != ids for a, b in pairs):
                raise ValueError(f"{method} at {ratio_label(ratio)}: the cells were not tested on the same records")
            row: dict[str, Any] = {
                "method": method,
                "reference": reference,
                "labelled_ratio": ratio,
                "n_seeds": len(pairs),
                "n_records": len(ids),
            }
            for metric in PAIRED_METRICS:
                interval = jackknife_interval(partial(_mean_difference, pairs, metric), len(ids), support=(-1.0, 1.0))
                row |= {metric: interval.value, f"{metric}_low": interval.low, f"{metric}_high": interval.high}
            rows.append(row)
    return pd.DataFrame(rows)


def paired_rows(paired: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted rows of the paired differences (Markdown and the terminal)."""
    headings = ["method", "labelled", "seeds", "records"]
    headings += [f"{title} - {REFERENCE_METHOD} [95% CI]" for title in PAIRED_METRICS.values()]
    rows = []
    for _, row in paired.iterrows():
        cells = [str(row["method"]), ratio_label(row["labelled_ratio"]), str(row["n_seeds"]), str(row["n_records"])]
        for metric in PAIRED_METRICS:
            value, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
            text = "n/a" if not math.isfinite(value) else f"{value:+.3f}"
            cells.append(text + (f" [{low:+.3f}, {high:+.3f}]" if math.isfinite(value) and math.isfinite(low) else ""))
        rows.append(cells)
    return headings, rows


PAIRED_NOTE = (
    f"each method minus {REFERENCE_METHOD} on the same test records, averaged over the seeds both have, with "
    "the 95% jackknife-t interval over those records: an interval that contains 0 does not tell the two "
    "methods apart on this test split"
)


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired differences as a Markdown section ("" when there are none)."""
    if paired.empty:
        return ""
    headings, rows = paired_rows(paired)
    lines = [
        "",
        f"## Paired differences against {REFERENCE_METHOD}",
        "",
        PAIRED_NOTE[0].upper() + PAIRED_NOTE[1:] + ".",
        "",
        "| " + " | ".join(headings) + " |",
        "|---|---|---:|---:|" + "---:|" * len(PAIRED_METRICS),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ComparisonFiles:
    csv: Path
    markdown: Path
    plot: Path
    cells: Path
    paired: Path | None = None

    def artifacts(self) -> dict[str, Path]:
        """Run paths (``comparison/<name>``) -> local files."""
        files = (self.csv, self.markdown, self.plot, self.cells, self.paired)
        return {f"comparison/{p.name}": p for p in files if p is not None}


def write_comparison(
    results: Sequence[CellResult], out_dir: Path, predictions: Mapping[str, CellPredictions] | None = None
) -> ComparisonFiles:
    """Check the pairing, aggregate, write CSV + Markdown + PNG + the cells (JSON) to
    ``out_dir``; with the cells' ``predictions``, the paired differences too (CSV, and in the
    Markdown)."""
    check_paired(results)
    table = comparison_table(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / TABLE_CSV
    table.to_csv(csv, index=False)
    paired = paired_differences(results, predictions or {})
    paired_csv = None
    if not paired.empty:
        paired_csv = out_dir / PAIRED_CSV
        paired.to_csv(paired_csv, index=False)
    markdown = out_dir / TABLE_MD
    markdown.write_text(table_markdown(table) + paired_markdown(paired), encoding="utf-8")
    plot = plot_comparison(table, out_dir / PLOT_PNG)
    cells = write_json(out_dir / CELLS_JSON, [asdict(r) for r in results])
    log.info("comparison of %d cells (%d rows) written to %s", len(results), len(table), out_dir)
    return ComparisonFiles(csv=csv, markdown=markdown, plot=plot, cells=cells, paired=paired_csv)


def read_cells(path: Path) -> list[CellResult]:
    """The cells of a :data:`CELLS_JSON` file."""
    return [CellResult.from_json(item) for item in read_json(path, "comparison cells")]
