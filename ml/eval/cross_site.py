"""Cross-site evaluation of a hospital network: does site A's model work at site B?

The matrix has one row per site's adapter and the reference rows (``head-only``: the frozen
backbone with a linear head fit on the target's labelled records, the baseline to beat;
``backbone``: the pre-trained backbone without adaptation, an ablation; ``predict-everything``),
and one column per target site (its test split). A cell is the model's thresholded predictions
scored on the target's labels, each metric with its 95% jackknife-t interval over the target's
test records (:mod:`ml.eval.intervals`):

- ``challenge_score``: the official Challenge 2021 score against the target records' labels
  of all 26 scored classes; a scored class the model does not predict is never output, so
  a model that lacks the target's diagnoses pays for them as the Challenge charges.
- ``macro_f_beta``: over the classes both know, the model's classes intersected with the
  target split's (a model has no F-beta on a diagnosis it does not predict; a target cannot
  score a class it does not label), a class with no positive test record counting 0 (the
  CE-SSL reference). The cell records how many classes that is.
- ``macro_auroc``: threshold-free, over the same classes (those with a positive and a
  negative test record); the head-only row's is the frozen-probe AUROC of the target.

Each site's adapter is compared with the head-only baseline and with its plain LoRA adapter
(:data:`PLAIN_LORA_ROW`) on its own test split (:class:`PairedComparison`): the difference of the macro F-beta2 (the gate's metric) with a
paired interval, and a verdict that says "insufficient evidence" when the interval spans 0.

The backbone row: the pre-trained backbone has no head for a site's classes, so on target
``t`` it is scored with ``t``'s own adapter's classification head and every LoRA update
switched off and every other weight the backbone's (:func:`without_adaptation`): what the site gets from the shared backbone alone.

Pure computation (numpy, plus the model switch): no files, no MLflow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ml.eval.challenge import challenge_score, labels_agree, load_weights, scored_codes
from ml.eval.intervals import AT_MOST_ONE, UNIT, Interval, jackknife_interval, jackknife_intervals
from ml.eval.intervals import METHOD as INTERVAL_METHOD
from ml.eval.metrics import binarize, macro_auroc, thresholded_metrics

BACKBONE_ROW = "backbone"
# The baseline: the frozen backbone with a linear head fit on the target site's own labelled
# records (ml.eval.head_only); an adapter that does not beat it has not earned its adaptation.
HEAD_ONLY_ROW = "head-only"
# The reference row: every class of the target predicted for every record. A model that does not
# beat it on a target has learnt nothing its thresholds can use there (on a small test split,
# over-prediction scores well on F-beta2, which weighs recall 4x).
EVERYTHING_ROW = "predict-everything"
# The site's plain LoRA adapter: the same backbone, ranks and schedule, trained on the site's
# labelled records alone (no unlabelled data, no random deactivation): what CE-SSL's
# semi-supervision and deactivation add over supervised LoRA.
PLAIN_LORA_ROW = "lora"
METRICS = ("challenge_score", "macro_f_beta", "macro_auroc")
METRIC_TITLES = {"challenge_score": "Challenge score", "macro_f_beta": "macro F-beta2", "macro_auroc": "macro AUROC"}
# the metric of the paired comparisons of each site's adapter with its baselines (head-only,
# plain LoRA): the promotion gate's default metric (pipeline.registry.policy)
COMPARED_METRIC = "macro_f_beta"


@dataclass(frozen=True)
class CrossSiteCell:
    """One model scored on one target site's test split."""

    model: str  # a site name, HEAD_ONLY_ROW, BACKBONE_ROW or EVERYTHING_ROW
    target: str
    challenge_score: float
    macro_f_beta: float
    n_classes: int  # classes scored: the model's and the target's in common
    n_records: int
    # the 95% jackknife-t interval of each metric over the target's test records (ml.eval.intervals)
    challenge_score_low: float = math.nan
    challenge_score_high: float = math.nan
    macro_f_beta_low: float = math.nan
    macro_f_beta_high: float = math.nan
    # threshold-free: over the classes in common with a positive and a negative test record (the
    # head-only row's is the frozen-probe AUROC: how much of the target the frozen features already
    # separate; a demo whose targets need adapting keeps it below ~0.8)
    macro_auroc: float = math.nan
    macro_auroc_low: float = math.nan
    macro_auroc_high: float = math.nan

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def interval(self, metric: str) -> Interval:
        return Interval(
            float(getattr(self, metric)),
            float(getattr(self, f"{metric}_low")),
            float(getattr(self, f"{metric}_high")),
            self.n_records,
        )


def shared_classes(model_classes: Sequence[str], target_classes: Sequence[str]) -> list[str]:
    """The classes a model can be scored on at a target, in the target's order."""
    known = set(model_classes)
    return [c for c in target_classes if c in known]


def score_cell(
    model: str,
    target: str,
    probs: np.ndarray,
    model_classes: Sequence[str],
    thresholds: np.ndarray | Sequence[float],
    labels: np.ndarray,
    target_classes: Sequence[str],
    scored_labels: np.ndarray,
) -> CrossSiteCell:
    """Score ``probs`` (records x ``model_classes``) on the target's records: the Challenge
    score on ``scored_labels`` (records x the 26 :func:`ml.eval.challenge.scored_codes`), the
    macro F-beta2 on ``labels`` (records x ``target_classes``) over the classes in common. NaN
    scores when there are no records; NaN F-beta when the model and target share no class."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"{model} on {target}: {probs.shape[0]} predictions for {labels.shape[0]} records")
    if not labels_agree(labels, target_classes, scored_labels):
        raise ValueError(f"{target}: the records' labels of the scored classes disagree with the split's labels")
    classes = shared_classes(model_classes, target_classes)
    if len(labels) == 0:
        return CrossSiteCell(model, target, math.nan, math.nan, len(classes), 0)
    y_pred = binarize(probs, np.asarray(thresholds, dtype=np.float64))
    codes, weights = scored_codes(), load_weights()
    score = jackknife_interval(
        lambda keep: challenge_score(scored_labels[keep], codes, y_pred[keep], model_classes, weights),
        len(labels),
        support=AT_MOST_ONE,
    )
    shared = {"macro_f_beta": Interval(math.nan, math.nan, math.nan, len(labels))}
    shared["macro_auroc"] = shared["macro_f_beta"]
    if classes:
        y_true, p_shared, y_shared = in_common(labels, target_classes, probs, y_pred, model_classes)

        def statistics(keep: np.ndarray) -> dict[str, float]:
            return {
                "macro_f_beta": thresholded_metrics(y_true[keep], y_shared[keep])["macro_f_beta"],
                "macro_auroc": macro_auroc(y_true[keep], p_shared[keep]),
            }

        shared = jackknife_intervals(statistics, len(labels), {"macro_f_beta": UNIT, "macro_auroc": UNIT})
    f_beta, auroc = shared["macro_f_beta"], shared["macro_auroc"]
    return CrossSiteCell(
        model,
        target,
        score.value,
        f_beta.value,
        len(classes),
        len(labels),
        challenge_score_low=score.low,
        challenge_score_high=score.high,
        macro_f_beta_low=f_beta.low,
        macro_f_beta_high=f_beta.high,
        macro_auroc=auroc.value,
        macro_auroc_low=auroc.low,
        macro_auroc_high=auroc.high,
    )


def in_common(
    labels: np.ndarray,
    target_classes: Sequence[str],
    probs: np.ndarray,
    y_pred: np.ndarray,
    model_classes: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, thresholded predictions) over the classes the model and the
    target share (:func:`shared_classes`), in the target's order."""
    classes = shared_classes(model_classes, target_classes)
    model_index = [list(model_classes).index(c) for c in classes]
    target_index = [list(target_classes).index(c) for c in classes]
    return np.asarray(labels)[:, target_index].astype(np.int64), probs[:, model_index], y_pred[:, model_index]


@dataclass(frozen=True)
class PairedComparison:
    """A site's adapter against a baseline on the site's own test split: the difference of
    ``metric`` (adapter - baseline) with its paired 95% jackknife-t interval (both scored on
    the same records, each leave-one-out set dropping the record from both), and the verdict."""

    site: str
    baseline: str
    metric: str
    difference: float
    low: float
    high: float
    n_records: int
    differing_records: int = -1  # records on which the two models decide otherwise (-1: not recorded)

    @property
    def verdict(self) -> str:
        if self.differing_records == 0:
            return (
                f"not told apart: the same decisions on all {self.n_records} records (the adapter decides as "
                f"{self.baseline} on every one; nothing to compare)"
            )
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "insufficient evidence (no interval)"
        if self.low > 0:
            return f"the adapter beat {self.baseline}"
        if self.high < 0:
            return f"{self.baseline} beat the adapter"
        return f"not told apart: insufficient evidence (the interval spans 0 over {self.n_records} records)"

    def text(self) -> str:
        title = METRIC_TITLES.get(self.metric, self.metric)
        interval = Interval(self.difference, self.low, self.high, self.n_records)
        return (
            f"{self.site}: CE-SSL adapter - {self.baseline}, {title}: {interval.text(3)} "
            f"over {self.n_records} test records: {self.verdict}"
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PairedComparison:
        """The comparison of :meth:`to_dict` (its verdict is derived again, not read; a comparison
        recorded before ``differing_records`` existed reads as not recorded)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})  # type: ignore[arg-type]


def paired_comparison(
    site: str, baseline: str, labels: np.ndarray, adapter_pred: np.ndarray, baseline_pred: np.ndarray
) -> PairedComparison:
    """:class:`PairedComparison` of two models' thresholded predictions (records x the same
    classes) against ``labels``, on :data:`COMPARED_METRIC`."""
    y_true = np.asarray(labels).astype(np.int64)

    def difference(keep: np.ndarray) -> float:
        a = thresholded_metrics(y_true[keep], adapter_pred[keep])[COMPARED_METRIC]
        b = thresholded_metrics(y_true[keep], baseline_pred[keep])[COMPARED_METRIC]
        return a - b

    found = jackknife_interval(difference, len(y_true), support=(-1.0, 1.0))
    differing = int(np.any(np.asarray(adapter_pred) != np.asarray(baseline_pred), axis=1).sum())
    return PairedComparison(site, baseline, COMPARED_METRIC, found.value, found.low, found.high, len(y_true), differing)


def everything_cell(target: str, labels: np.ndarray, target_classes: Sequence[str], scored_labels: np.ndarray):
    """:data:`EVERYTHING_ROW` on ``target``: every one of its classes predicted for every record."""
    labels = np.asarray(labels)
    every = np.ones(labels.shape, dtype=np.float64)
    return score_cell(
        EVERYTHING_ROW,
        target,
        every,
        target_classes,
        np.full(len(target_classes), 0.5),
        labels,
        target_classes,
        scored_labels,
    )


@dataclass(frozen=True)
class CrossSiteMatrix:
    """The cells of a network's cross-site evaluation; rows are models, columns targets; and
    each site's adapter compared with its baselines (head-only, plain LoRA) on its own test split."""

    cells: tuple[CrossSiteCell, ...]
    comparisons: tuple[PairedComparison, ...] = ()

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys(c.target for c in self.cells))

    def value(self, model: str, target: str, metric: str) -> float:
        for cell in self.cells:
            if cell.model == model and cell.target == target:
                return float(getattr(cell, metric))
        return math.nan

    def table(self, metric: str) -> list[list[float]]:
        """Rows (models) x columns (targets) of ``metric``."""
        return [[self.value(m, t, metric) for t in self.targets] for m in self.models]

    def to_records(self) -> list[dict[str, object]]:
        return [c.to_dict() for c in self.cells]

    @classmethod
    def from_records(cls, records: Sequence[dict], comparisons: Sequence[Mapping] = ()) -> CrossSiteMatrix:
        return cls(
            tuple(CrossSiteCell(**r) for r in records), tuple(PairedComparison.from_dict(c) for c in comparisons)
        )

    def comparison_records(self) -> list[dict[str, object]]:
        return [c.to_dict() for c in self.comparisons]

    def cell(self, model: str, target: str) -> CrossSiteCell | None:
        return next((c for c in self.cells if c.model == model and c.target == target), None)

    def csv(self) -> str:
        """One row per cell (long format: model, target, each metric with its 95% interval, classes, records)."""
        columns = [f"{m}{part}" for m in METRICS for part in ("", "_low", "_high")]
        lines = [",".join(["model", "target", *columns, "n_classes", "n_records"])]
        lines += [
            ",".join(
                [
                    c.model,
                    c.target,
                    *(_num(float(getattr(c, name))) for name in columns),
                    str(c.n_classes),
                    str(c.n_records),
                ]
            )
            for c in self.cells
        ]
        return "\n".join(lines) + "\n"

    def n_records(self, target: str) -> int:
        """The size of ``target``'s test split."""
        return max((c.n_records for c in self.cells if c.target == target), default=0)

    def interval_text(self, model: str, target: str, metric: str, digits: int = 3) -> str:
        found = self.cell(model, target)
        return "n/a" if found is None else found.interval(metric).text(digits)

    def markdown(self) -> str:
        """One Markdown table per metric (rows: models, columns: target sites), and what was scored."""
        parts = []
        for metric in METRICS:
            head = f"| {METRIC_TITLES[metric]} [95% CI]: model \\ test split | " + " | ".join(
                f"{t} (n={self.n_records(t)})" for t in self.targets
            )
            head += " |"
            rule = "|---|" + "---:|" * len(self.targets)
            rows = [
                f"| {m} | " + " | ".join(self.interval_text(m, t, metric) for t in self.targets) + " |"
                for m in self.models
            ]
            parts.append("\n".join([head, rule, *rows]))
        note = (
            f"Each cell: the model's thresholded predictions on the target site's test split (n records), and the 95% "
            f"{INTERVAL_METHOD} interval over those records (ml/eval/intervals.py): cells whose intervals overlap are "
            "not told apart by this test split. Challenge score: the "
            "official Challenge 2021 score against the records' labels of all 26 scored classes (a class the model "
            "does not predict is never output). Macro F-beta2: over the classes the model predicts and the target "
            "labels (the intersection, `n_classes` in the CSV), a class with no positive test record counting 0. "
            "`head-only`: the baseline, the frozen pre-trained backbone with a linear head fit on the target site's "
            "labelled training records (thresholds on its validation split). "
            "`backbone`: the pre-trained backbone with every LoRA update off and the target site's own adapter's head "
            "(an ablation, not a baseline). `lora`: the site's plain LoRA adapter (its labelled records alone). "
            "`predict-everything`: every class of the target predicted for every "
            "record, the reference a model must beat to have learnt anything its thresholds use. Macro AUROC: "
            "threshold-free, over the classes in common with a positive and a negative test record; the head-only "
            "row's is the frozen-probe AUROC (how much of the target the frozen features already separate)."
        )
        verdicts = ""
        if self.comparisons:
            verdicts = (
                "\n\n**Each site's adapter against its baselines** (paired difference on its own test split):\n\n"
            )
            verdicts += "\n".join(f"- {c.text()}" for c in self.comparisons)
        return "\n\n".join(parts) + verdicts + "\n\n" + note + "\n"


def _num(value: float, digits: int = 6) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


HEAD_PREFIX = "classifier."


def without_adaptation(model: object, backbone_state: Mapping[str, object]) -> int:
    """Turn a fine-tuned model into "the pre-trained backbone with this site's head": every
    weight outside the classification head back to ``backbone_state`` (undoing a full or
    partial fine-tune) and every LoRA update outside the head switched off. The head
    (``classifier.*``, with its own LoRA) stays: the backbone has none for the site's classes.
    Returns the number of LoRA layers switched off."""
    from ml.model.lora import LoRALayer

    current = model.state_dict()  # type: ignore[attr-defined]
    restore = {
        k: v
        for k, v in backbone_state.items()
        if k in current and not k.startswith(HEAD_PREFIX) and tuple(current[k].shape) == tuple(v.shape)  # type: ignore[attr-defined]
    }
    model.load_state_dict(restore, strict=False)  # type: ignore[attr-defined]
    switched = 0
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if isinstance(module, LoRALayer) and module.r > 0 and not f"{name}.".startswith(HEAD_PREFIX):
            if module.merged:
                module.unmerge()
            module.r = 0  # LoRALayer._update_factor: r == 0 -> the update is off
            switched += 1
    return switched
