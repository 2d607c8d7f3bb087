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
   semi-supervised methods), then per-class thresholds fitted on the valid split (F-beta,
   beta = 2, the challenge's).

The pipeline steps (``components.allocate_ranks``, ``components.finetune``), ``cessl
method-demo`` and the training-step benchmark call these instead of assembling the steps
themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from ml.eval.evaluate import predict_with_labels
from ml.eval.metrics import fit_thresholds
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, count_parameters
from ml.model.rank_allocation import RankAllocationConfig, parameter_importance, ranks_from_importance
from ml.train.build import BackboneState, build_model, build_scoring_model
from ml.train.config import TrainConfig, resolve_device
from ml.train.loaders import EpochStream, dataset_size, fetch
from ml.train.methods import TrainingMethod, get_method
from ml.train.precision import resolve_precision
from ml.train.trainer import Callback, TrainResult, fit

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
    """Build ``train.method``'s model, fit it and fit its thresholds on ``valid``."""
    model = build_model(backbone_state, backbone_config, train.method, lora, rank_map, seed=train.seed)
    trainable, total = count_parameters(model)
    unlabelled = unlabelled_for(train.training_method, labelled, unlabelled)
    result = fit(model, labelled, unlabelled, valid, train, callbacks)
    thresholds = valid_thresholds(model, valid, train.eval_batch_size)
    return FinetuneOutcome(model=model, result=result, thresholds=thresholds, trainable=trainable, total=total)
