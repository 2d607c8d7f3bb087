"""One training step of each method: the loss of a batch (the trainer does backward/step).

- :func:`semi_supervised_step` - CE-SSL's lightweight semi-supervised learning
  ("semi-supervised BatchNorm"), the third part of the method.
- :func:`supervised_step` - the supervised baselines (plain LoRA, full fine-tuning).
- :func:`fixmatch_step` - the FixMatch baseline, multi-label.

Every step augments under ``torch.no_grad()`` with the caller's generator and returns a
:class:`StepOutput`: the scalar loss to back-propagate and detached tensors to log (the
trainer reads them back every ``log_every`` steps, never here).

Mixed precision: the trainer runs a step inside :meth:`ml.train.precision.Precision.autocast`;
the losses and the pseudo-label probabilities are computed from float32 logits
(:func:`_fp32`), whatever dtype the model computed them in (a no-op in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ml.train.augment import CUTMIX_ALPHA, Generator, cutmix, strong_augment, weak_augment


@runtime_checkable
class EncoderHeadModel(Protocol):
    """What the steps need from :class:`ml.model.backbone.ECGTransformer`."""

    def encode(self, x: Tensor) -> Tensor: ...  # (N, 12, 1, T) -> (N, d, 1, T/64)

    def head(self, features: Tensor) -> Tensor: ...  # (N, d, 1, T/64) -> logits (N, C)

    def __call__(self, x: Tensor) -> Tensor: ...  # head(encode(x))


def _fp32(logits: Tensor) -> Tensor:
    """Logits as float32 for the loss (bf16 autocast leaves the classifier's output in bfloat16)."""
    return logits.float()


def _bce(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """BCE-with-logits in float32 (targets too: Cutmix's mixed labels are float32 already)."""
    return F.binary_cross_entropy_with_logits(_fp32(logits), targets.float(), reduction=reduction)


@dataclass
class StepOutput:
    """The loss to back-propagate and detached scalars to log."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


def semi_supervised_step(
    model: EncoderHeadModel,
    x_labelled: Tensor,
    y_labelled: Tensor,
    x_unlabelled: Tensor,
    generator: Generator,
    cutmix_alpha: float = CUTMIX_ALPHA,
) -> StepOutput:
    """CE-SSL's lightweight semi-supervised step (semi-supervised BatchNorm).

    1. The labelled batch gets Cutmix (one lambda ~ Beta(0.75, 0.75) and one leads x time
       box per batch, labels mixed by the box's area); the unlabelled batch (same size)
       gets ONE weak augmentation drawn for the whole batch.
    2. Both batches go through the convolutional encoder TOGETHER, so every BatchNorm
       layer normalises with - and updates its running statistics from - a batch that
       contains the unlabelled distribution.
    3. The unlabelled half is dropped before the transformer: only the labelled features
       reach ``model.head`` (positional encoding, transformer, pooling, classifier).
    4. The loss is BCE-with-logits on the labelled half only: no pseudo-labels, no second
       forward pass.
    """
    n = x_labelled.shape[0]
    with torch.no_grad():
        x_labelled, y_labelled = cutmix(x_labelled, y_labelled, generator, cutmix_alpha)
        x_unlabelled = weak_augment(x_unlabelled, generator)
    features = model.encode(torch.cat([x_labelled, x_unlabelled]))  # (N + M, d, 1, 96)
    logits = model.head(features[:n])  # (N, C): the unlabelled half stops here
    loss = _bce(logits, y_labelled)
    return StepOutput(loss, {"loss": loss.detach()})


def supervised_step(
    model: EncoderHeadModel,
    x_labelled: Tensor,
    y_labelled: Tensor,
    generator: Generator,
    cutmix_alpha: float = CUTMIX_ALPHA,
) -> StepOutput:
    """Supervised fine-tuning (plain LoRA or full): Cutmix + BCE-with-logits."""
    with torch.no_grad():
        x_labelled, y_labelled = cutmix(x_labelled, y_labelled, generator, cutmix_alpha)
    loss = _bce(model(x_labelled), y_labelled)
    return StepOutput(loss, {"loss": loss.detach()})


def pseudo_labels(probs: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Multi-label FixMatch targets from weak-view probabilities (N, C).

    Per class: positive when p > tau, negative when p < 1 - tau, masked otherwise.
    Returns ``(targets, mask)`` as float tensors.
    """
    positive = probs > tau
    mask = positive | (probs < 1.0 - tau)
    return positive.to(probs.dtype), mask.to(probs.dtype)


def fixmatch_step(
    model: EncoderHeadModel,
    x_labelled: Tensor,
    y_labelled: Tensor,
    x_unlabelled: Tensor,
    generator: Generator,
    tau: float = 0.95,
    lambda_u: float = 1.0,
    cutmix_alpha: float = CUTMIX_ALPHA,
) -> StepOutput:
    """FixMatch, multi-label: ``L = L_x + lambda_u * L_u``.

    The labelled batch (Cutmix), the weak view and the strong view of the unlabelled
    batch go through the whole model in ONE forward pass (as in FixMatch, so BatchNorm
    sees all three). Pseudo-labels come from the detached weak-view probabilities
    (:func:`pseudo_labels`); ``L_u`` is the BCE of the strong-view logits against them,
    summed over confident (record, class) pairs and divided by the number of all pairs
    (FixMatch's normalisation by the full unlabelled batch).
    """
    n, m = x_labelled.shape[0], x_unlabelled.shape[0]
    with torch.no_grad():
        x_labelled, y_labelled = cutmix(x_labelled, y_labelled, generator, cutmix_alpha)
        weak = weak_augment(x_unlabelled, generator)
        strong = strong_augment(x_unlabelled, generator)
    logits = model(torch.cat([x_labelled, weak, strong]))  # (N + 2M, C)
    logits_l, logits_weak, logits_strong = _fp32(logits).split([n, m, m])
    targets, mask = pseudo_labels(logits_weak.detach().sigmoid(), tau)
    loss_x = _bce(logits_l, y_labelled)
    loss_u = (_bce(logits_strong, targets, reduction="none") * mask).mean()
    loss = loss_x + lambda_u * loss_u
    logs = {
        "loss": loss.detach(),
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "mask_rate": mask.mean(),
    }
    return StepOutput(loss, logs)
