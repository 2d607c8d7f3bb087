"""One-shot rank allocation (CE-SSL part 2).

Before fine-tuning, the model is built with every adapted layer at rank r and the
pre-trained weights loaded. ONE pass over the labelled training data (train mode,
deactivation off, BCE-with-logits) scores every adapted matrix:

    taylor:  mean((W * ((dL/dB) A))^2)   (first-order Taylor importance of the update)
    fisher:  mean(((dL/dB) A)^2)

For the fused c_attn the score is the mean of its three q/k/v block scores. Scores are
averaged over batches, ranked (ties share the average rank) and the least important
``floor(num_layers * c)`` matrices get ``r_low = (r // 4) * 2``; the others keep r.
``num_layers`` counts the never-adapted classifier.1 too (tinylight, c = 0.6: 8 of 13).

Precision: ``parameter_importance(..., autocast=...)`` runs the forward and the loss inside
the given context (``Precision.autocast()`` of :mod:`ml.train.precision`, bf16 on a GPU); the
loss is computed from float32 logits and the scores from the float32 gradients of B. The
scores are summed on the device and read back once, after the pass (no host stall per batch).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn
from tqdm import tqdm

from ml.model.lora import LoRAConv1D, LoRALayer, lora_layers

logger = logging.getLogger(__name__)

Variant = Literal["taylor", "fisher"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def default_r_low(r: int) -> int:
    """The reference's reduced rank: (r // 4) * 2 (16 -> 8, 4 -> 2)."""
    return (r // 4) * 2


@dataclass(frozen=True)
class RankAllocationConfig:
    """How the one-shot allocation lowers ranks (the rank r itself is ``LoRAConfig.r``).

    compress: the paper's c: the ``floor(num_layers * c)`` least important matrices get r_low.
    variant: the importance score (``taylor``, the paper's, or ``fisher``).
    r_low: the reduced rank; None means the reference's ``(r // 4) * 2``.
    """

    compress: float = 0.6
    variant: Variant = "taylor"
    r_low: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.compress <= 1.0:
            raise ValueError(f"compress ratio must be in [0, 1], got {self.compress}")
        if self.variant not in ("taylor", "fisher"):
            raise ValueError(f"unknown importance variant {self.variant!r}; expected 'taylor' or 'fisher'")
        if self.r_low is not None and self.r_low < 0:
            raise ValueError(f"r_low must be >= 0, got {self.r_low}")


def _mean_square(t: Tensor) -> Tensor:
    """mean(t^2) as a float64 0-d tensor on t's device (no read-back: see layer_score)."""
    return torch.mean(t**2).double()


@torch.no_grad()
def layer_importance(layer: LoRALayer, variant: Variant) -> float:
    """Score of one adapted matrix from the gradient currently held by ``lora_B``.

    (dL/dB) A is the gradient the full weight W would get through the update (for B = 0);
    taylor weighs it by W. c_attn: mean over its q/k/v blocks, each in W's (out, in) view.
    """
    return float(layer_score(layer, variant))


@torch.no_grad()
def layer_score(layer: LoRALayer, variant: Variant) -> Tensor:
    """:func:`layer_importance` as a float64 0-d tensor on the layer's device.

    The pass sums these on the device and reads them back once at its end: a read-back per
    layer and batch would wait for the GPU every time. float64 sums of the float32 scores in
    the same order are exactly the Python float sums they replace.
    """
    if layer.lora_B.grad is None:
        raise RuntimeError("lora_B has no gradient: run a backward pass first")
    grad_b, lora_a = layer.lora_B.grad, layer.lora_A
    if isinstance(layer, LoRAConv1D):
        d_out = layer.out_features // layer.n_blocks
        scores = []
        for i, (g_i, a_i) in enumerate(layer.block_views(grad_b, lora_a)):
            g_w = g_i @ a_i  # (d_out, d_in)
            if variant == "taylor":
                g_w = layer.weight[:, i * d_out : (i + 1) * d_out].t() * g_w
            scores.append(_mean_square(g_w))
        total = scores[0]
        for score in scores[1:]:
            total = total + score
        return total / len(scores)
    g_w = (grad_b @ lora_a).view(layer.weight.shape)
    if variant == "taylor":
        g_w = layer.weight * g_w
    return _mean_square(g_w)


def parameter_importance(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn | None = None,
    variant: Variant = "taylor",
    device: torch.device | str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Importance of every adapted matrix, reference order, averaged over ONE pass.

    ``autocast``: a context factory for the forward and the loss (mixed precision); the
    default runs in float32, as before.

    The pass runs in train mode (BatchNorm uses batch statistics) with random
    deactivation off. The model is left as it was found: mode, deactivation, requires_grad
    flags, gradients and BatchNorm running statistics are restored afterwards.
    """
    if variant not in ("taylor", "fisher"):
        raise ValueError(f"unknown importance variant {variant!r}; expected 'taylor' or 'fisher'")
    loss_fn = loss_fn or nn.BCEWithLogitsLoss()
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no adapted (rank > 0) layers to score")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    was_training = model.training
    saved_p = {n: layer.p for n, layer in layers.items()}
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    sums: dict[str, Tensor] = {}
    n_batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.p = 0.0
            layer.lora_B.requires_grad_(True)
        model.train()
        for x, y in tqdm(loader, desc=f"{variant} importance", leave=False):
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x.to(device)).float(), y.to(device))
            loss.backward()
            for name, layer in layers.items():
                score = layer_score(layer, variant)
                sums[name] = sums[name] + score if name in sums else score
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n])
        for n, layer in layers.items():
            layer.p = saved_p[n]
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("the loader yielded no batches")
    totals = dict(zip(sums, torch.stack(list(sums.values())).tolist(), strict=True))  # one read-back
    logger.info("%s importance over %d batch(es) for %d matrices", variant, n_batches, len(layers))
    return {n: total / n_batches for n, total in totals.items()}


def ranks_from_importance(
    importance: Mapping[str, float], num_layers: int, r: int, compress: float, r_low: int | None = None
) -> dict[str, int]:
    """Rank rule: rank the scores (ties averaged, scipy ``rankdata``); a matrix whose rank
    is <= floor(num_layers * compress) gets r_low (default (r // 4) * 2), others keep r."""
    if not 0.0 <= compress <= 1.0:
        raise ValueError(f"compress ratio must be in [0, 1], got {compress}")
    r_low = default_r_low(r) if r_low is None else r_low
    names = list(importance)
    ranks = rankdata(np.asarray([importance[n] for n in names], dtype=np.float64))
    threshold = math.floor(num_layers * compress)
    return {n: (r_low if rank <= threshold else r) for n, rank in zip(names, ranks, strict=True)}


def allocate_ranks(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    r: int,
    r_low: int | None = None,
    compress: float = 0.6,
    variant: Variant = "taylor",
    loss_fn: LossFn | None = None,
) -> dict[str, int]:
    """One-shot allocation: score ``model`` (built at uniform rank r, pre-trained weights
    loaded) on one pass of ``loader`` and return the per-layer rank map."""
    importance = parameter_importance(model, loader, loss_fn=loss_fn, variant=variant)
    config = getattr(model, "config", None)  # ECGTransformer's BackboneConfig
    num_layers = int(config.num_layers) if config is not None else len(importance) + 1
    rank_map = ranks_from_importance(importance, num_layers, r, compress, r_low)
    logger.info(
        "rank allocation (r=%d, c=%.2f): %d of %d matrices at low rank",
        r,
        compress,
        sum(v != r for v in rank_map.values()),
        len(rank_map),
    )
    return rank_map
