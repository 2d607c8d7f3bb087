"""Build the model each fine-tuning method starts from.

- ``cessl``: LoRA at the allocated ranks (``rank_map``, default r elsewhere) with random
  deactivation ``p``; only LoRA tensors, biases and classifier.1.weight train.
- ``lora``: LoRA at a uniform rank r, p = 0; same trainable set.
- ``full`` / ``fixmatch``: the plain backbone (no LoRA), every parameter trains.

The pre-trained weights are loaded into the backbone; ``classifier.1`` (the source task's
class head) is skipped and stays freshly initialised for the downstream classes, as in the
reference fine-tuning code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from ml.model.adapter import load_backbone_weights
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, count_parameters, mark_trainable

log = logging.getLogger(__name__)


def lora_config_for_method(
    method: str, rank_map: Mapping[str, int] | None = None, p: float = 0.2, r: int = 16, seed: int = 0
) -> LoRAConfig | None:
    """The LoRA configuration of ``method`` (None for the full fine-tuning methods)."""
    if method == "cessl":
        return LoRAConfig(r=r, rank_map=dict(rank_map or {}), p=p, seed=seed)
    if method == "lora":
        if rank_map:
            log.warning("method 'lora' uses a uniform rank r=%d; the rank map is ignored", r)
        return LoRAConfig(r=r, p=0.0, seed=seed)
    if method in ("full", "fixmatch"):
        return None
    raise ValueError(f"unknown method {method!r}; expected cessl, lora, full or fixmatch")


def build_model_for_method(
    backbone_state: Mapping[str, Tensor] | None,
    config: BackboneConfig,
    method: str,
    rank_map: Mapping[str, int] | None = None,
    p: float = 0.2,
    r: int = 16,
    seed: int = 0,
) -> ECGTransformer:
    """The model ``method`` fine-tunes, pre-trained weights loaded, trainable set marked.

    ``backbone_state`` None keeps the random initialisation (demos and tests only). The new
    parameters (LoRA A, classifier.1) are initialised from ``seed`` without touching the
    caller's global RNG.
    """
    lora = lora_config_for_method(method, rank_map, p, r, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ECGTransformer(config, lora)
    if backbone_state is None:
        log.warning("no pre-trained backbone given: fine-tuning starts from a random initialisation")
    else:
        load_backbone_weights(model, backbone_state, drop_head=True)  # keep the fresh downstream head
    mark_trainable(model, "lora" if lora is not None else "full")
    trainable, total = count_parameters(model)
    log.info("%s model (%s): %s trainable of %s parameters", method, config.name, f"{trainable:,}", f"{total:,}")
    return model
