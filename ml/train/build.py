"""Build the model a training method fine-tunes.

What the model looks like is the method's business (:mod:`ml.train.methods`):

- ``cessl``: LoRA at the allocated ranks (``rank_map``, r elsewhere) with random
  deactivation p; only LoRA tensors, biases and classifier.1.weight train.
- ``lora``: LoRA at a uniform rank r, p = 0; same trainable set.
- ``full`` / ``fixmatch``: the plain backbone (no LoRA), every parameter trains.

The pre-trained weights are loaded into the backbone; ``classifier.1`` (the source task's
class head) is skipped and stays freshly initialised for the downstream classes, as in the
reference fine-tuning code. :func:`build_scoring_model` builds what the one-shot rank
allocation scores: every adapted layer at rank r, no deactivation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from ml.model.adapter import load_backbone_weights
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, TrainMode, count_parameters, mark_trainable
from ml.train.methods import TrainingMethod, get_method

log = logging.getLogger(__name__)

BackboneState = Mapping[str, Tensor]


def _build(
    backbone_state: BackboneState | None,
    config: BackboneConfig,
    lora: LoRAConfig | None,
    trainable: TrainMode,
    seed: int,
) -> ECGTransformer:
    """``ECGTransformer(config, lora)`` with the backbone weights loaded and ``trainable`` marked.

    The new parameters (LoRA A, classifier.1) are initialised from ``seed`` without touching
    the caller's global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ECGTransformer(config, lora)
    if backbone_state is None:
        log.warning("no pre-trained backbone given: fine-tuning starts from a random initialisation")
    else:
        load_backbone_weights(model, backbone_state, drop_head=True)  # keep the fresh downstream head
    mark_trainable(model, trainable)
    return model


def build_model(
    backbone_state: BackboneState | None,
    backbone_config: BackboneConfig,
    method: str | TrainingMethod,
    lora: LoRAConfig,
    rank_map: Mapping[str, int] | None = None,
    seed: int = 0,
) -> ECGTransformer:
    """The model ``method`` fine-tunes, pre-trained weights loaded, trainable set marked.

    ``lora`` gives r, p and alpha; the method decides which of them apply (``rank_map`` only
    for allocated ranks, p only with deactivation). ``backbone_state`` None keeps the random
    initialisation (demos, benchmarks and tests only).
    """
    entry = get_method(method)
    model = _build(backbone_state, backbone_config, entry.lora_config(lora, rank_map), entry.trainable, seed)
    trainable, total = count_parameters(model)
    log.info(
        "%s model (%s): %s trainable of %s parameters", entry.name, backbone_config.name, f"{trainable:,}", f"{total:,}"
    )
    return model


def build_scoring_model(
    backbone_state: BackboneState | None, backbone_config: BackboneConfig, lora: LoRAConfig, seed: int = 0
) -> ECGTransformer:
    """The model the one-shot rank allocation scores: rank ``lora.r`` everywhere, p = 0."""
    uniform = dataclasses.replace(lora, rank_map={}, p=0.0)
    return _build(backbone_state, backbone_config, uniform, "lora", seed)
