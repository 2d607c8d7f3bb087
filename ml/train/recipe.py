"""The fine-tuning recipe, one spelling for every caller: allocate -> build -> fit -> thresholds.

1. :func:`allocate_ranks_for`: CE-SSL part 2, for the methods whose rank policy is
   ``allocated``. The backbone is built with every adapted layer at rank r (pre-trained
   weights loaded, no deactivation) and ONE pass over the labelled train split with the
   training loader's batch size, in a shuffled order seeded from the run's seed, scores
   each adapted matrix (:mod:`ml.model.rank_allocation`); the ``floor(num_layers * c)``
   least important get r_low. Other methods get an empty rank map (``uniform``: rank
   ``LoRAConfig.r`` everywhere; ``none``: no adapters).
2. :func:`finetune`: the method's model (:func:`ml.train.build.build_model`), trained by
   :func:`ml.train.trainer.fit` on the labelled split (+ the unlabelled split for the
   semi-supervised methods), or for ``head-only`` its classifier fitted in closed form on the
   frozen backbone (:func:`fit_head_only`), then per-class thresholds fitted on the valid
   split (F-beta, beta = 2, the challenge's). With ``train.head_init`` ``linear-probe`` the
   classifier of a method with gradient steps starts from that same fitted head
   (:func:`init_head`, LP-FT) instead of its random initialisation.

The pipeline steps (``components.allocate_ranks``, ``components.finetune``), ``cessl
method-demo`` and the training-step benchmark call these instead of assembling the steps
themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ml.eval.evaluate import features_with_labels, predict_with_labels
from ml.eval.head_only import fit_head
from ml.eval.metrics import fit_thresholds
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, count_parameters
from ml.model.rank_allocation import RankAllocationConfig, parameter_importance, ranks_from_importance
from ml.train.build import BackboneState, build_model, build_scoring_model
from ml.train.config import TrainConfig, resolve_device
from ml.train.loaders import EpochStream, dataset_size, fetch
from ml.train.methods import TrainingMethod, get_method
from ml.train.precision import resolve_precision
from ml.train.trainer import Callback, TrainResult, fit, validation_metrics

log = logging.getLogger(__name__)

THRESHOLD_BETA = 2.0  # thresholds maximise F-beta2 on the valid split, the challenge's metric


@dataclass(frozen=True)
class RankAllocation:
    """A rank map and the importance scores it came from (both empty without allocation)."""

    rank_map: dict[str, int]
    importance: dict[str, float]


@dataclass
class FinetuneOutcome:
    """The fine-tuned model (best state, on the training device) and what came with it."""

    model: ECGTransformer
    result: TrainResult
    thresholds: np.ndarray  # per class, fitted on the valid split
    trainable: int
    total: int
    head_init_seconds: float = 0.0  # the linear-probe start's cost (init_head), 0 for a random start


def allocation_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``dataset`` in full batches of ``batch_size`` (clamped to its size), shuffled by ``seed``."""
    size = dataset_size(dataset)
    batch = max(1, min(batch_size, size))
    stream = EpochStream(size, batch, seed)
    for _ in range(size // batch):
        yield fetch(dataset, stream.next_indices())


def allocate_ranks_for(
    method: str | TrainingMethod,
    backbone_state: BackboneState | None,
    backbone_config: BackboneConfig,
    lora: LoRAConfig,
    allocation: RankAllocationConfig,
    train_ds: Dataset,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> RankAllocation:
    """The rank map ``method`` fine-tunes with (empty unless its ranks are allocated).

    ``precision`` (``fp32 | bf16 | auto``): the scoring pass's, resolved for ``device``.
    """
    entry = get_method(method)
    if not entry.allocates_ranks:
        log.info("method %s (%s ranks): no rank allocation", entry.name, entry.rank_policy)
        return RankAllocation(rank_map={}, importance={})
    target = resolve_device(device)
    mixed = resolve_precision(precision, target)
    model = build_scoring_model(backbone_state, backbone_config, lora, seed).to(target)
    batches = allocation_batches(train_ds, batch_size, seed)
    importance = parameter_importance(model, batches, variant=allocation.variant, autocast=mixed.autocast)
    rank_map = ranks_from_importance(
        importance, backbone_config.num_layers, lora.r, allocation.compress, allocation.r_low
    )
    return RankAllocation(rank_map={k: int(v) for k, v in rank_map.items()}, importance=importance)


def unlabelled_for(method: TrainingMethod, labelled: Dataset, unlabelled: Dataset | None) -> Dataset | None:
    """The unlabelled data ``method`` reads; the labelled split stands in when there is none."""
    if not method.reads_unlabelled:
        return unlabelled
    if unlabelled is None or dataset_size(unlabelled) == 0:
        log.warning("method %s reads unlabelled data but there is none: the labelled split stands in", method.name)
        return labelled
    return unlabelled


def valid_thresholds(model: ECGTransformer, valid: Dataset, batch_size: int) -> np.ndarray:
    """Per-class thresholds maximising F-beta2 on ``valid``."""
    probs, labels = predict_with_labels(model, valid, batch_size)
    return fit_thresholds(labels, probs, beta=THRESHOLD_BETA)


def load_head(model: ECGTransformer, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` (classifier parameter name -> values) into ``model``'s classifier."""
    with torch.no_grad():
        for name, value in state.items():
            model.get_parameter(name).copy_(torch.as_tensor(value))


def fit_probe_head(model: ECGTransformer, labelled: Dataset, batch_size: int, device: torch.device) -> int:
    """Write the linear probe of :mod:`ml.eval.head_only` into ``model``'s classifier: per class
    a logistic regression fitted on the frozen backbone's pooled features of ``labelled`` (eval
    mode, every LoRA update off); nothing but the classifier changes. Returns the number of
    records it was fitted on. The ``head-only`` method's head and the ``linear-probe`` start's."""
    model.to(device)
    features, labels = features_with_labels(model, labelled, batch_size, device)
    load_head(model, fit_head(features, labels).head_state())
    return len(labels)


def init_head(model: ECGTransformer, labelled: Dataset, train: TrainConfig) -> float:
    """Before the first gradient step: the classifier as ``train.head_init`` says (``random``:
    as built, untouched; ``linear-probe``: :func:`fit_probe_head`, LP-FT). Returns the seconds
    it took (0 for ``random``)."""
    if train.head_init == "random":
        return 0.0
    start = time.perf_counter()
    count = fit_probe_head(model, labelled, train.eval_batch_size, resolve_device(train.device))
    seconds = time.perf_counter() - start
    log.info("head init: a linear probe on %d labelled records' frozen features (%.2f s)", count, seconds)
    return seconds


def fit_head_only(
    model: ECGTransformer, labelled: Dataset, valid: Dataset, train: TrainConfig, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """The ``head-only`` method: no gradient step. The classifier becomes the linear head of
    :mod:`ml.eval.head_only` (per class a logistic regression, fitted to its optimum, on the
    frozen backbone's pooled features of the labelled records: the cross-site matrix's
    head-only row), then the model is validated once (step 0: its curves' only point)."""
    start = time.perf_counter()
    device = resolve_device(train.device)
    count = fit_probe_head(model, labelled, train.eval_batch_size, device)
    metrics = validation_metrics(*predict_with_labels(model, valid, train.eval_batch_size, device))
    record = {"step": 0.0, **metrics}
    result = TrainResult(
        best_step=0,
        best_score=metrics[train.monitor],
        best_metrics=metrics,
        steps=0,
        stopped_early=False,
        history=[record],
        seconds=time.perf_counter() - start,
        device=str(device),
        monitor=train.monitor,
    )
    log.info("head-only: a linear head on %d labelled records; valid %s %.4f", count, train.monitor, result.best_score)
    for callback in callbacks:
        callback.on_validation(0, record)
        callback.on_end(result)
    return result


def finetune(
    backbone_state: BackboneState | None,
    backbone_config: BackboneConfig,
    lora: LoRAConfig,
    rank_map: Mapping[str, int] | None,
    train: TrainConfig,
    labelled: Dataset,
    unlabelled: Dataset | None,
    valid: Dataset,
    callbacks: Sequence[Callback] = (),
) -> FinetuneOutcome:
    """Build ``train.method``'s model, fit it (:func:`ml.train.trainer.fit`, or
    :func:`fit_head_only` for a method without gradient steps; its classifier first set by
    :func:`init_head`) and fit its thresholds on ``valid``."""
    model = build_model(backbone_state, backbone_config, train.method, lora, rank_map, seed=train.seed)
    trainable, total = count_parameters(model)
    method = train.training_method
    head_init_seconds = 0.0
    if method.fits_head_only:
        result = fit_head_only(model, labelled, valid, train, callbacks)
    else:
        head_init_seconds = init_head(model, labelled, train)
        result = fit(model, labelled, unlabelled_for(method, labelled, unlabelled), valid, train, callbacks)
    thresholds = valid_thresholds(model, valid, train.eval_batch_size)
    return FinetuneOutcome(
        model=model,
        result=result,
        thresholds=thresholds,
        trainable=trainable,
        total=total,
        head_init_seconds=head_init_seconds,
    )
