"""Low-rank adaptation with random deactivation (CE-SSL part 1).

Every adapted weight W gets an update ``B @ A * scale`` (scale = alpha / r, alpha = r by
default, so scale = 1); B = 0 and A ~ N(0, 0.02^2), except the fused ``c_attn`` whose A is
initialised like nn.Linear's weight (kaiming_uniform_, a = sqrt(5): U(-1/sqrt(d), 1/sqrt(d)),
as the reference does); W is frozen. Random deactivation: on each
*training* forward pass an adapted layer independently skips its low-rank branch with
probability ``p`` -- and then does not compute it at all (that is the saving in forward and
backward). In eval mode the layer is deterministic and uses the expected update
``(1 - p) B A``, which is exactly what ``merge()`` folds into W; ``classifier.0`` is never
deactivated, so it uses (and merges) the full ``B A``.

The shape follows huggingface/peft ``tuners/lora``: a config dataclass with a per-module
rank map, a layer base class with one subclass per wrapped layer type, each giving
``get_delta_weight()``, ``merge()`` and ``unmerge()``. Three wrapped types exist here:

- ``LoRAConv2d``: the encoder's 1xK and 1x1 convolutions, A (r, C_in*kh*kw), B (C_out, r);
  state-dict names ``<name>.lora_A``, ``<name>.lora_B``, ``<name>.conv.weight``/``.bias``.
- ``LoRALinear``: fc1, fc2, classifier.0, weight (out, in); names ``<name>.weight``,
  ``<name>.bias``, ``<name>.lora_A``, ``<name>.lora_B``.
- ``LoRAConv1D``: GPT-2's fused q/k/v projection ``c_attn`` stored "Conv1D" style as
  (d, 3d); one low-rank pair per q/k/v block (A (3r, d), B (3d, r), block-diagonal), so
  the update is added transposed.

A rank of 0 means "not adapted": the layer is a plain layer with no LoRA tensors.

Cost of a training step (what makes CE-SSL cheaper than full fine-tuning): the encoder's
convolutions dominate, and autograd through ``conv(x, W + B A)`` would build the full
(C_out, C_in*9) kernel gradient only to project it onto A and B. ``LoRAConv2d`` trains
through ``_LoRAConvFunction`` instead, whose backward gets A's and B's gradients from an
r-channel view of the input; a switched-off (or unadapted) conv computes only its input
gradient. The linear layers keep plain autograd (measured: a separate low-rank branch is
no faster at these sizes on CPU).

Fewer kernels: the updated kernel ``W + s B A`` is ONE ``addmm`` (``baddbmm`` for c_attn's
blocks) with ``alpha = s`` instead of a matmul, a scaling and an addition - where that is
bit-identical to the three separate operations in float32, i.e. when ``s`` is a power of
two (the scaling is then exact; s = 1 in training with the reference's alpha = r), and
always under mixed precision. Otherwise (e.g. the eval-mode factor 1 - p = 0.8) the
separate operations are kept, so fp32 results do not change by a bit.

Mixed precision (bf16 autocast, :mod:`ml.train.precision`): ``_LoRAConvFunction`` is
autocast-aware. It computes the kernel ``W + s B A`` in float32 (the master weights' dtype),
casts the input, the kernel and A once to the autocast dtype and runs the convolutions, the
backward and the r-channel products in that dtype with autocast off inside; the gradients
go back in the dtypes of their inputs (float32 for A, B and the bias). Without autocast
every cast is a no-op and the function is exactly the float32 one.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LORA_INIT_STD = 0.02
TrainMode = Literal["lora", "full", "head"]
HEAD_PREFIX = "classifier."  # the classification head: Linear(d, d) -> Linear(d, C)


@dataclass(frozen=True)
class LoRAConfig:
    """How the backbone is adapted.

    r: default rank of every adapted layer; rank_map overrides it per module name
    (e.g. ``{"encoder_layers.0.conv3": 8}``), 0 meaning "not adapted".
    p: random-deactivation probability of each adapted layer (0 disables deactivation).
    never_deactivate: modules that always apply their update (reference: classifier.0).
    alpha: LoRA alpha; None means alpha = r, i.e. scale 1 (the reference rule).

    The deactivation draws are seeded by whoever trains the model
    (:func:`seed_deactivation`; the trainer derives the seed from ``TrainConfig.seed``).
    """

    r: int = 16
    rank_map: Mapping[str, int] = field(default_factory=dict)
    p: float = 0.2
    never_deactivate: tuple[str, ...] = ("classifier.0",)
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.r < 0 or any(v < 0 for v in self.rank_map.values()):
            raise ValueError(f"LoRA ranks must be >= 0, got r={self.r}, rank_map={dict(self.rank_map)}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"deactivation probability p must be in [0, 1], got {self.p}")

    def rank_for(self, name: str) -> int:
        """Rank of module ``name``: its rank_map entry, else the default r."""
        return int(self.rank_map.get(name, self.r))

    def p_for(self, name: str) -> float:
        """Deactivation probability of module ``name`` (0 for never-deactivated modules)."""
        return 0.0 if name in self.never_deactivate else self.p


class LoRALayer(nn.Module):
    """Base class: a frozen weight W and an optional low-rank update with random deactivation.

    Subclasses give ``weight`` (the W parameter, in the wrapped layer's own layout),
    ``_low_rank(B, A)`` (B A in W's layout) and ``_forward_with(x, w)`` (the wrapped op), and
    may override ``forward_with_update`` (how the update is applied when it is on).
    """

    r: int
    scale: float
    p: float
    merged: bool

    if TYPE_CHECKING:  # declared for the type checker only: a runtime property would clash with nn.Parameter

        @property
        def weight(self) -> Tensor:
            """W, in the wrapped layer's own layout (a Parameter or a property of the subclass)."""
            ...

    def _init_lora(self, r: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], alpha: float | None) -> None:
        """Register lora_A / lora_B (only when r > 0) and the deactivation state."""
        self.r = int(r)
        self.scale = (float(alpha) if alpha is not None else float(r)) / r if r > 0 else 0.0
        self.p = 0.0
        self.merged = False
        self.rng: random.Random = random.Random(0)
        self._unmerged_weight: Tensor | None = None
        if r > 0:
            w = self.weight
            self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
            self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=w.dtype, device=w.device))
            self.reset_lora_parameters()
            w.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        """A ~ N(0, 0.02^2), B = 0: the update starts at exactly zero."""
        if self.r > 0:
            nn.init.normal_(self.lora_A, mean=0.0, std=LORA_INIT_STD)
            nn.init.zeros_(self.lora_B)

    # --- the update -------------------------------------------------------------------
    def _low_rank(self, lora_B: Tensor, lora_A: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_with(self, x: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def low_rank_delta(self) -> Tensor:
        """The full update ``B A * scale`` in W's layout (no deactivation factor)."""
        return self._low_rank(self.lora_B, self.lora_A) * self.scale

    @property
    def expected_factor(self) -> float:
        """E[branch on] = 1 - p: the factor of the eval-mode / merged update."""
        return 1.0 - self.p

    def get_delta_weight(self) -> Tensor:
        """What ``merge()`` adds to W: ``(1 - p) B A * scale`` (``B A * scale`` when p = 0)."""
        return self.low_rank_delta() * self.expected_factor

    def _update_factor(self) -> float | None:
        """The factor of the update in this forward pass, or None when the branch is off.

        Training with p > 0: off with probability p (and then never computed), else 1.
        Eval: the expected factor 1 - p, deterministic. Not adapted, or merged: off.
        """
        if self.r == 0 or self.merged:
            return None
        if self.p > 0.0 and self.training:
            return None if self.rng.random() < self.p else 1.0
        return self.expected_factor

    def _fused_weight(self, lora_B: Tensor, lora_A: Tensor, s: float) -> Tensor:  # pragma: no cover
        """``W + s B A`` in W's layout as ONE (b)addmm with alpha = s (float32, autocast off)."""
        raise NotImplementedError

    def updated_weight(self, factor: float) -> Tensor:
        """The kernel ``W + factor * B A * scale`` (fused where exact or under autocast).

        Under autocast it is computed in W's dtype (float32) with autocast off, so the
        low-rank update is added to the full-precision W and rounded to bfloat16 once, by
        the wrapped op's own autocast cast.
        """
        s = self.scale * factor
        device_type = self.weight.device.type
        if not _fuse(s, device_type):
            return self.weight + self.low_rank_delta() * factor
        with torch.autocast(device_type, enabled=False):
            return self._fused_weight(self.lora_B, self.lora_A, s)

    def forward_with_update(self, x: Tensor, factor: float) -> Tensor:
        """The wrapped op with the kernel W + factor * B A * scale."""
        return self._forward_with(x, self.updated_weight(factor))

    def forward(self, x: Tensor) -> Tensor:
        factor = self._update_factor()
        if factor is None:
            return self._forward_with(x, self.weight)
        return self.forward_with_update(x, factor)

    # --- merging ----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the expected update into W (W <- W + (1 - p) B A * scale); keeps W for unmerge."""
        if self.r == 0 or self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.add_(self.get_delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pre-merge W bit-exactly."""
        if not self.merged:
            return
        assert self._unmerged_weight is not None
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, p={self.p:g}, merged={self.merged}"


def _exact_scale(s: float) -> bool:
    """True when multiplying by ``s`` is exact in binary floating point: +-2**k (or 0).

    Only then is ``addmm(W, B, A, alpha=s)`` bit-identical to ``W + (B @ A) * s`` (measured
    on oneDNN/MKL; s = 0.8 differs in the last bit).
    """
    return s == 0.0 or math.frexp(s)[0] in (0.5, -0.5)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _fuse(s: float, device_type: str) -> bool:
    """Whether the kernel ``W + s B A`` is computed by one fused (b)addmm (see the module doc)."""
    return _exact_scale(s) or _autocast_dtype(device_type) is not None


def _uniform_fan_in_(t: Tensor, fan_in: int) -> None:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default Linear/Conv initialisation."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(t, -bound, bound)


class _LoRAConvFunction(torch.autograd.Function):
    """y = conv(x, W + s B A) + b with the exact LoRA gradients, without the kernel gradient.

    Autograd through ``conv(x, W + s B A)`` would compute the full (C_out, C_in*kh*kw) kernel
    gradient G and then project it (dB = s G A^T, dA = s B^T G) - as costly as full
    fine-tuning. Here the projections are computed directly from a rank-r view of the input:

        h  = conv(x, A as an r-channel kernel)        (N, r, H', W'), saved in forward
        dB = s * sum over positions of dY (x) h        a (C_out x r) matrix product
        dA = s * kernel gradient of conv(x, A) for the output gradient B^T dY   (r channels)

    so the backward costs one full input gradient plus two r-channel operations. The
    values equal autograd's up to float rounding.

    Autocast-aware: under autocast the forward computes in the autocast dtype (the kernel
    is built in float32 first, then cast once) and saves the cast tensors; the backward
    replays that dtype (autocast off) and returns each gradient in its input's dtype. With
    autocast off every cast is a no-op.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        s: float,
        layer: LoRAConv2d,
    ) -> Tensor:
        device_type = x.device.type
        dtype = _autocast_dtype(device_type) or x.dtype
        with torch.autocast(device_type, enabled=False):
            kernel = (
                layer._fused_weight(lora_B, lora_A, s)
                if _exact_scale(s) or dtype != weight.dtype
                else weight + layer._low_rank(lora_B, lora_A) * s
            ).to(dtype)
            a_kernel = lora_A.view(lora_A.shape[0], *weight.shape[1:]).to(dtype)
            xc = x.to(dtype)
            h = None  # only dB needs it (the allocation pass, for one, trains B alone)
            if ctx.needs_input_grad[4]:
                h = layer.conv._conv_forward(xc, a_kernel, None)
            out = layer.conv._conv_forward(xc, kernel, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xc, kernel, a_kernel, lora_B, h)
        ctx.s, ctx.conv, ctx.dtype = s, layer.conv, dtype
        ctx.input_dtypes = (x.dtype, bias.dtype if bias is not None else None, lora_A.dtype, lora_B.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, kernel, a_kernel, lora_B, h = ctx.saved_tensors
        conv, s, dtype = ctx.conv, ctx.s, ctx.dtype
        x_dtype, bias_dtype, a_dtype, b_dtype = ctx.input_dtypes
        args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
        grad_x = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = torch.ops.aten.convolution_backward(grad_out, x, kernel, None, *args, [True, False, False])[0]
                grad_x = grad_x.to(x_dtype)
            if ctx.needs_input_grad[2]:  # False when there is no bias
                grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=bias_dtype)
            g = _positions(grad_out)  # (positions, C_out)
            grad_A = grad_B = None
            if ctx.needs_input_grad[4]:
                grad_B = _scaled(g.t() @ _positions(h), s).to(b_dtype)  # (C_out, r)
            if ctx.needs_input_grad[3]:
                n, _, h_out, w_out = grad_out.shape
                grad_h = _scaled(g @ lora_B.to(dtype), s).view(n, h_out, w_out, -1).permute(0, 3, 1, 2)  # B^T dY
                grad_A = torch.ops.aten.convolution_backward(grad_h, x, a_kernel, None, *args, [False, True, False])[1]
                grad_A = grad_A.reshape(a_kernel.shape[0], -1).to(a_dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def _scaled(t: Tensor, s: float) -> Tensor:
    """``t * s``, skipping the kernel launch when s = 1 (exactly the same values)."""
    return t if s == 1.0 else t * s


def _positions(t: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C): one row per position (a view for channels-last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class LoRAConv2d(LoRALayer):
    """A Conv2d (1xK or 1x1 in the encoder) with LoRA: A (r, C_in*kh*kw), B (C_out, r).

    B A has shape (C_out, C_in*kh*kw) and is viewed as the kernel (C_out, C_in, kh, kw).
    Training with a frozen kernel goes through ``_LoRAConvFunction``, whose backward
    gives A and B their gradients without computing the full kernel gradient.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        bias: bool = True,
        r: int = 0,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        kh, kw = self.conv.kernel_size
        self._init_lora(r, (r, in_channels * kh * kw), (out_channels, r), alpha)

    @property
    def weight(self) -> Tensor:
        return self.conv.weight

    def _low_rank(self, lora_B: Tensor, lora_A: Tensor) -> Tensor:
        return (lora_B @ lora_A).view(self.conv.weight.shape)

    def _fused_weight(self, lora_B: Tensor, lora_A: Tensor, s: float) -> Tensor:
        w = self.conv.weight
        return torch.addmm(w.view(w.shape[0], -1), lora_B, lora_A, alpha=s).view(w.shape)

    def forward_with_update(self, x: Tensor, factor: float) -> Tensor:
        if torch.is_grad_enabled() and not self.weight.requires_grad:
            return _LoRAConvFunction.apply(
                x, self.weight, self.conv.bias, self.lora_A, self.lora_B, self.scale * factor, self
            )
        return super().forward_with_update(x, factor)

    def _forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        bias = self.conv.bias
        if bias is not None and bias.requires_grad and not weight.requires_grad and torch.is_grad_enabled():
            # Frozen kernel (deactivated or not adapted), trainable bias: add the bias apart.
            # oneDNN's CPU convolution backward computes the kernel gradient whenever it is
            # asked for the bias gradient, which would undo the saving of deactivation.
            # Under autocast the bias is added in the convolution's dtype (bfloat16), as autocast would.
            y = self.conv._conv_forward(x, weight, None)
            return y + bias.view(-1, 1, 1).to(y.dtype)
        return self.conv._conv_forward(x, weight, bias)


class LoRALinear(LoRALayer):
    """A Linear layer (weight (out, in)) with LoRA: A (r, in), B (out, r)."""

    weight: nn.Parameter

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, r: int = 0, alpha: float | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _uniform_fan_in_(self.weight, in_features)
        if self.bias is not None:
            _uniform_fan_in_(self.bias, in_features)
        self._init_lora(r, (r, in_features), (out_features, r), alpha)

    def _low_rank(self, lora_B: Tensor, lora_A: Tensor) -> Tensor:
        return lora_B @ lora_A

    def _fused_weight(self, lora_B: Tensor, lora_A: Tensor, s: float) -> Tensor:
        return torch.addmm(self.weight, lora_B, lora_A, alpha=s)

    def _forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class LoRAConv1D(LoRALayer):
    """GPT-2 fused q/k/v projection ``c_attn`` with one low-rank pair per block.

    The weight is stored "Conv1D" style, (d_in, n_blocks*d_out) = (d, 3d), and the layer
    computes x @ W + b. A (3r, d), B (3d, r): block i uses B[i*d:(i+1)*d] @ A[i*r:(i+1)*r]
    (shape (d, d), out x in), so the block-diagonal update (3d, d) is added transposed.
    """

    weight: nn.Parameter

    def __init__(
        self, in_features: int, out_features: int, n_blocks: int = 3, r: int = 0, alpha: float | None = None
    ) -> None:
        super().__init__()
        if out_features % n_blocks:
            raise ValueError(f"out_features {out_features} is not divisible by {n_blocks} blocks")
        self.in_features, self.out_features, self.n_blocks = in_features, out_features, n_blocks
        self.weight = nn.Parameter(torch.empty(in_features, out_features))  # (d_in, d_out)
        self.bias = nn.Parameter(torch.empty(out_features))
        _uniform_fan_in_(self.weight, in_features)
        _uniform_fan_in_(self.bias, in_features)
        self._init_lora(r, (n_blocks * r, in_features), (out_features, r), alpha)

    def reset_lora_parameters(self) -> None:
        """A like nn.Linear's weight (kaiming_uniform_, a = sqrt(5), fan_in = d: bound
        1/sqrt(d)), B = 0. The scale of A matters beyond training: c_attn's Taylor
        importance grows with |A|^4."""
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _low_rank(self, lora_B: Tensor, lora_A: Tensor) -> Tensor:
        k, d_out = self.n_blocks, self.out_features // self.n_blocks
        blocks = lora_B.view(k, d_out, self.r) @ lora_A.view(k, self.r, self.in_features)
        return blocks.reshape(self.out_features, self.in_features).t()  # (d, 3d), like W

    def _fused_weight(self, lora_B: Tensor, lora_A: Tensor, s: float) -> Tensor:
        # W.t() (3d, d) viewed as (k, d_out, d): block i of the transposed weight, plus B_i A_i.
        k, d_out = self.n_blocks, self.out_features // self.n_blocks
        w_blocks = self.weight.t().view(k, d_out, self.in_features)
        b, a = lora_B.view(k, d_out, self.r), lora_A.view(k, self.r, self.in_features)
        return torch.baddbmm(w_blocks, b, a, alpha=s).reshape(self.out_features, self.in_features).t()

    def block_views(self, lora_B: Tensor, lora_A: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per q/k/v block: (B_i (d_out, r), A_i (r, d_in))."""
        d_out = self.out_features // self.n_blocks
        return [
            (lora_B[i * d_out : (i + 1) * d_out], lora_A[i * self.r : (i + 1) * self.r]) for i in range(self.n_blocks)
        ]

    def _forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        # x (..., d) -> (..., 3d)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), weight)
        return out.view(*x.shape[:-1], self.out_features)


# --- model-level helpers ----------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Adapted layers (rank > 0) by module name, in the reference order.

    The reference order is: encoder convs (block by block, conv1, conv2, conv3), then per
    transformer layer c_attn, fc1, fc2, then classifier.0. Models that define
    ``adapted_layer_names()`` (ECGTransformer) give that order; otherwise module order.
    """
    adapted_layer_names = getattr(model, "adapted_layer_names", None)
    if callable(adapted_layer_names):
        names: Iterable[str] = adapted_layer_names()
        found = ((n, model.get_submodule(n)) for n in names)
    else:
        found = ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer))
    return {n: m for n, m in found if isinstance(m, LoRALayer) and m.r > 0}


def _never_deactivate(model: nn.Module, never_deactivate: Iterable[str] | None) -> set[str]:
    if never_deactivate is not None:
        return set(never_deactivate)
    config = getattr(model, "lora_config", None)
    return set(config.never_deactivate) if config is not None else {"classifier.0"}


def set_deactivation(model: nn.Module, p: float, never_deactivate: Iterable[str] | None = None) -> None:
    """Set the deactivation probability of every adapted layer (0 switches it off).

    Layers in ``never_deactivate`` (default: the model's LoRAConfig, i.e. classifier.0)
    keep p = 0. Merged layers are not affected until unmerged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"deactivation probability p must be in [0, 1], got {p}")
    keep = _never_deactivate(model, never_deactivate)
    for name, layer in lora_layers(model).items():
        layer.p = 0.0 if name in keep else float(p)


def seed_deactivation(model: nn.Module, seed: int) -> None:
    """Give all adapted layers one shared, freshly seeded RNG for their deactivation draws."""
    rng = random.Random(seed)
    for layer in lora_layers(model).values():
        layer.rng = rng


def merge_lora(model: nn.Module) -> None:
    """Merge every adapted layer: W <- W + (1 - p) B A * scale (classifier.0: B A * scale)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` exactly (the pre-merge weights are restored bit for bit)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def is_lora_trainable(name: str) -> bool:
    """The reference rule: lora_A/lora_B, every bias (norm biases too) and classifier.1.weight."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B", "bias") or name == "classifier.1.weight"


def mark_trainable(model: nn.Module, mode: TrainMode) -> None:
    """Set ``requires_grad`` for fine-tuning.

    "lora": exactly lora_A/lora_B, every bias and classifier.1.weight train; all other
    weights (norm weights included) are frozen. BatchNorm running statistics still update
    in train mode. "full": everything trains. "head": the classifier's weights and biases
    only (the head-only baseline: the backbone stays as pre-trained).
    """
    if mode not in ("lora", "full", "head"):
        raise ValueError(f"unknown training mode {mode!r}; expected 'lora', 'full' or 'head'")
    for name, param in model.named_parameters():
        trains = name.startswith(HEAD_PREFIX) if mode == "head" else mode == "full" or is_lora_trainable(name)
        param.requires_grad_(trains)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; buffers are not parameters."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
