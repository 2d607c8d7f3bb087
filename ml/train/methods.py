"""The training methods: one registry entry per method, asked by every other layer.

A method says how the backbone is adapted (its rank policy), whether its adapters are
randomly deactivated, whether each step also reads an unlabelled batch, which step function
computes its loss, and which parameters train. Everything that depends on "which method"
(the model builder, the rank-allocation step, the trainer, the pipeline's parameter
validation, the registry's naming) asks :func:`get_method` instead of comparing names.

- ``cessl``   : LoRA at the one-shot allocated ranks + random deactivation (p) + semi-
                supervised BatchNorm (:func:`ml.train.steps.semi_supervised_step`). The
                paper's method.
- ``lora``    : LoRA at a uniform rank r, no deactivation, supervised only.
- ``full``    : full fine-tuning, supervised only.
- ``fixmatch``: full fine-tuning + FixMatch (weak/strong views, confidence-thresholded
                multi-label pseudo-labels).
- ``head-only``: no gradient step: the backbone stays as pre-trained and its classifier
                becomes a linear head fitted on the labelled records' pooled features
                (:mod:`ml.eval.head_only`, :func:`ml.train.recipe.fit_head_only`), the
                baseline an adaptation has to beat (the cross-site matrix's head-only row).

Adding a method = one :class:`TrainingMethod` entry in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from ml.model.lora import LoRAConfig
from ml.train.augment import Generator
from ml.train.steps import EncoderHeadModel, StepOutput, fixmatch_step, semi_supervised_step, supervised_step

if TYPE_CHECKING:
    from ml.train.config import TrainConfig

RankPolicy = Literal["allocated", "uniform", "none"]
Trainable = Literal["lora", "full", "head"]
# (model, labelled x, labelled y, unlabelled x or None, augmentation generator, config) -> loss
StepFn = Callable[[EncoderHeadModel, Tensor, Tensor, "Tensor | None", Generator, "TrainConfig"], StepOutput]


def _cessl_step(
    model: EncoderHeadModel, x: Tensor, y: Tensor, x_u: Tensor | None, gen: Generator, config: TrainConfig
) -> StepOutput:
    assert x_u is not None
    return semi_supervised_step(model, x, y, x_u, gen, config.cutmix_alpha)


def _supervised_step(
    model: EncoderHeadModel, x: Tensor, y: Tensor, x_u: Tensor | None, gen: Generator, config: TrainConfig
) -> StepOutput:
    return supervised_step(model, x, y, gen, config.cutmix_alpha)


def _fixmatch_step(
    model: EncoderHeadModel, x: Tensor, y: Tensor, x_u: Tensor | None, gen: Generator, config: TrainConfig
) -> StepOutput:
    assert x_u is not None
    return fixmatch_step(model, x, y, x_u, gen, config.fixmatch_tau, config.fixmatch_lambda_u, config.cutmix_alpha)


@dataclass(frozen=True)
class TrainingMethod:
    """One way of fine-tuning the backbone.

    rank_policy: ``allocated`` (one-shot rank allocation, part 2 of CE-SSL), ``uniform``
    (rank r on every adapted layer) or ``none`` (no adapters: full fine-tuning).
    deactivation: the adapters are randomly switched off with probability p (part 1).
    reads_unlabelled: every step also draws an unlabelled batch.
    step: the loss of a training step; None for a method that takes no gradient step (its
    classifier is fitted in closed form on the frozen backbone: ``head-only``).
    production: a candidate for the production model name (the baselines are experiments).
    """

    name: str
    summary: str
    rank_policy: RankPolicy
    deactivation: bool
    reads_unlabelled: bool
    step: StepFn | None
    production: bool = False

    @property
    def uses_adapters(self) -> bool:
        return self.rank_policy != "none"

    @property
    def allocates_ranks(self) -> bool:
        return self.rank_policy == "allocated"

    @property
    def fits_head_only(self) -> bool:
        """No gradient step: only the classifier changes, fitted on the frozen backbone's features."""
        return self.step is None

    @property
    def trainable(self) -> Trainable:
        """Which parameters train: LoRA tensors + biases + head (``lora``), all (``full``) or
        the classifier alone (``head``)."""
        if self.fits_head_only:
            return "head"
        return "lora" if self.uses_adapters else "full"

    def lora_config(self, lora: LoRAConfig, rank_map: Mapping[str, int] | None = None) -> LoRAConfig | None:
        """The adapter configuration this method trains with (None: no adapters).

        ``rank_map`` is used only by the ``allocated`` policy; ``p`` only with deactivation.
        """
        if not self.uses_adapters:
            return None
        return dataclasses.replace(
            lora,
            rank_map=dict(rank_map or {}) if self.allocates_ranks else {},
            p=lora.p if self.deactivation else 0.0,
        )


METHODS: dict[str, TrainingMethod] = {
    m.name: m
    for m in (
        TrainingMethod(
            "cessl",
            "CE-SSL: allocated-rank LoRA, random deactivation, semi-supervised BatchNorm",
            rank_policy="allocated",
            deactivation=True,
            reads_unlabelled=True,
            step=_cessl_step,
            production=True,
        ),
        TrainingMethod(
            "lora",
            "LoRA at a uniform rank, supervised",
            rank_policy="uniform",
            deactivation=False,
            reads_unlabelled=False,
            step=_supervised_step,
        ),
        TrainingMethod(
            "full",
            "full fine-tuning, supervised",
            rank_policy="none",
            deactivation=False,
            reads_unlabelled=False,
            step=_supervised_step,
        ),
        TrainingMethod(
            "fixmatch",
            "full fine-tuning + FixMatch pseudo-labels",
            rank_policy="none",
            deactivation=False,
            reads_unlabelled=True,
            step=_fixmatch_step,
        ),
        TrainingMethod(
            "head-only",
            "frozen backbone, a linear head fitted on the labelled records",
            rank_policy="none",
            deactivation=False,
            reads_unlabelled=False,
            step=None,
        ),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
NO_GRADIENT_STEP = "no gradient step"  # the schedule of a method that takes none (head-only)
DEFAULT_METHOD = "cessl"


def get_method(method: str | TrainingMethod) -> TrainingMethod:
    """The registry entry of ``method`` (a name or an entry); a clear error for unknown names."""
    if isinstance(method, TrainingMethod):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}") from None
