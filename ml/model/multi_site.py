"""Many sites in one forward pass: records of different sites share the backbone's weights.

A hospital network sends interleaved records from many sites. :class:`MultiSiteModel` runs
a batch whose record ``i`` belongs to site ``site[i]`` in ONE pass over the shared
backbone, each record getting exactly what its own site's model computes (the model
:func:`ml.model.adapter.load_adapter` builds, in eval mode):

- every frozen weight W is read once for the whole batch (``conv(x, W)``, ``x W^T``);
- each adapted layer adds the record's own site update ``s_site (x A_site^T) B_site^T``
  (eval: ``s = alpha / r * (1 - p)``; ``classifier.0`` is never deactivated: ``alpha / r``),
  by gathered low-rank matmuls (``bmm`` over records); the LoRA'd convolutions by one
  grouped convolution whose group ``i`` is record ``i``'s own r-channel kernel ``A_site``,
  then ``B_site`` as a per-record (C_out x r) matrix;
- biases, LayerNorm affines and the classifier head (``classifier.1``: each site its own
  classes) are gathered per record by site index;
- BatchNorm in eval mode is a per-channel affine, ``y = x * scale + shift`` with
  ``scale = w / sqrt(var + eps)`` and ``shift = b - mean * scale``: one (scale, shift)
  pair per site, gathered per record.

Ranks differ per layer and per site (one-shot rank allocation, 0 = not adapted). Each
layer's A/B are **zero-padded to that layer's largest rank over the sites** and stacked
(S, r_max, fan_in) / (S, fan_out, r_max), B pre-multiplied by the site's scale: one
gathered matmul per layer whatever the number of sites in the batch, and the padding adds
exact zeros. Grouping by site instead would run one small matmul per (layer, site present)
- ~20 x 13 Python-level kernel launches for 20 sites on tinylight - and scatter the results
back; padding costs ``r_max / r_site`` of the (small) low-rank branch instead, and the
branch is r / d of the frozen layer's work. ``c_attn``'s three q/k/v pairs are one
block-diagonal pair of rank 3 r_max.

The logits are ``(N, C_max)``: record ``i``'s first ``classes[site[i]]`` columns are its
site's, the rest 0 (zero-padded head). Values equal each site's own model up to float32
rounding (the update is added to ``conv(x, W)`` instead of folded into W): within 1e-5.

What it cannot batch: a site whose adapter replaces a frozen weight outside the head (a full
fine-tune, whose every weight is its own) - :class:`UnbatchableAdapterError`; such a site
is answered by switching its adapter in (:class:`ml.model.adapter_bank.SharedBackbone`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.model.adapter_bank import SiteAdapter
from ml.model.backbone import BackboneConfig, CausalSelfAttention, ECGTransformer
from ml.model.lora import LoRAConfig, LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear

log = logging.getLogger(__name__)

HEAD = "classifier."
_LORA_LEAVES = ("lora_A", "lora_B")
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
M = TypeVar("M", bound=nn.Module)


class UnbatchableAdapterError(ValueError):
    """A site adapter that replaces a frozen backbone weight (a full fine-tune): not batchable."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class LowRank:
    """One adapted layer's per-site update, zero-padded to the layer's largest rank.

    ``a`` (S, R, fan_in) and ``b`` (S, fan_out, R), ``b`` already multiplied by the site's
    eval-mode scale; for a conv, fan_in = C_in * kh * kw (A as an R-channel kernel).
    """

    a: Tensor
    b: Tensor


@dataclass(frozen=True)
class BatchNormAffine:
    """A BatchNorm in eval mode as per-site per-channel ``scale`` and ``shift`` (S, C)."""

    scale: Tensor
    shift: Tensor


def _site_scale(lora: LoRAConfig, name: str, rank: int) -> float:
    """The eval-mode factor of the update ``B A``: alpha / r times 1 - p (what merge() folds in)."""
    alpha = float(lora.alpha) if lora.alpha is not None else float(rank)
    return alpha / rank * (1.0 - lora.p_for(name))


def _factors(layer: LoRALayer, adapter: SiteAdapter, name: str, r_max: int) -> tuple[Tensor, Tensor]:
    """The site's (A, B * scale) of ``layer`` as one plain low-rank pair padded to ``r_max``
    (``c_attn``: 3 blocks -> block-diagonal, rank 3 r_max)."""
    rank = adapter.ranks.get(name, 0)
    blocks = layer.n_blocks if isinstance(layer, LoRAConv1D) else 1
    fan_out = layer.out_features if isinstance(layer, LoRAConv1D) else _fan_out(layer)
    fan_in = _fan_in(layer)
    a = torch.zeros(blocks * r_max, fan_in)
    b = torch.zeros(fan_out, blocks * r_max)
    if rank == 0:
        return a, b
    site_a, site_b = adapter.tensors[f"{name}.lora_A"].detach(), adapter.tensors[f"{name}.lora_B"].detach()
    scale = _site_scale(adapter.lora_config(), name, rank)
    rows = fan_out // blocks
    for i in range(blocks):
        a[i * r_max : i * r_max + rank] = site_a[i * rank : (i + 1) * rank]
        b[i * rows : (i + 1) * rows, i * r_max : i * r_max + rank] = site_b[i * rows : (i + 1) * rows] * scale
    return a, b


def _fan_in(layer: LoRALayer) -> int:
    if isinstance(layer, LoRAConv2d):
        return layer.conv.weight[0].numel()
    assert isinstance(layer, LoRALinear | LoRAConv1D)
    return layer.in_features


def _fan_out(layer: LoRALayer) -> int:
    if isinstance(layer, LoRAConv2d):
        return layer.conv.out_channels
    assert isinstance(layer, LoRALinear | LoRAConv1D)
    return layer.out_features


def _stack_padded(tensors: Sequence[Tensor]) -> Tensor:
    """Stack per-site tensors, zero-padding dim 0 to the longest (the heads' class counts)."""
    if tensors[0].dim() == 0:
        return torch.stack(list(tensors))
    rows = max(t.shape[0] for t in tensors)
    out = torch.zeros((len(tensors), rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


class MultiSiteModel:
    """The shared backbone and ``adapters``' sites, answering mixed-site batches in one pass.

    ``base``: the backbone's own tensors by state-dict name (the r = 0 model's, e.g.
    :attr:`ml.model.adapter_bank.SharedBackbone.base`); they are used, never copied.
    Site ``i`` is ``adapters[i]`` (:meth:`index` by key).
    """

    def __init__(self, base: Mapping[str, Tensor], config: BackboneConfig, adapters: Sequence[SiteAdapter]) -> None:
        if not adapters:
            raise ValueError("a multi-site model needs at least one site adapter")
        with torch.device("meta"):
            self.structure = ECGTransformer(config)  # layer hyper-parameters only (strides, eps, heads)
        self.config = config
        self.keys = [a.key for a in adapters]
        self._index = {key: i for i, key in enumerate(self.keys)}
        self.n_classes = [len(a.classes) for a in adapters]
        self.base = {name: t.detach() for name, t in base.items()}
        norms = {n for n, m in self.structure.named_modules() if isinstance(m, nn.BatchNorm2d | nn.LayerNorm)}
        for adapter in adapters:
            _check_batchable(adapter, self.base, norms)
        self.site: dict[str, Tensor] = self._per_site_tensors(adapters)
        self.lora: dict[str, LowRank] = self._low_rank_stacks(adapters)
        self.bn: dict[str, BatchNormAffine] = self._batchnorm_affines()

    # -- building
    def _per_site_tensors(self, adapters: Sequence[SiteAdapter]) -> dict[str, Tensor]:
        """(S, ...) stacks of every non-LoRA tensor some site replaces (biases, norms, the head)."""
        names = sorted({n for a in adapters for n in a.tensors if n.rsplit(".", 1)[-1] not in _LORA_LEAVES})
        return {
            name: _stack_padded([a.tensors.get(name, self.base[name]).detach() for a in adapters]) for name in names
        }

    def _low_rank_stacks(self, adapters: Sequence[SiteAdapter]) -> dict[str, LowRank]:
        stacks = {}
        for name in self.structure.adapted_layer_names():
            r_max = max(a.ranks.get(name, 0) for a in adapters)
            if r_max == 0:
                continue
            layer = self.structure._lora_layer(name)
            pairs = [_factors(layer, a, name, r_max) for a in adapters]
            stacks[name] = LowRank(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
        return stacks

    def _batchnorm_affines(self) -> dict[str, BatchNormAffine]:
        affines = {}
        for name, module in self.structure.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                w, b, mean, var = (self._stacked(f"{name}.{leaf}") for leaf in _BN_STATE[:4])
                scale = w / torch.sqrt(var + module.eps)
                affines[name] = BatchNormAffine(scale, b - mean * scale)
        return affines

    def _stacked(self, name: str) -> Tensor:
        """(S, ...) of ``name``: the sites' own, or the backbone's broadcast to every site."""
        if name in self.site:
            return self.site[name]
        return self.base[name].expand(len(self.keys), *self.base[name].shape)

    def _module(self, name: str, kind: type[M]) -> M:
        """The backbone's module ``name`` (its hyper-parameters), checked to be a ``kind``."""
        module = self.structure.get_submodule(name)
        if not isinstance(module, kind):
            raise TypeError(f"{name} is a {type(module).__name__}, not a {kind.__name__}")
        return module

    # -- the batch
    def index(self, key: str) -> int:
        """Site index of adapter ``key`` (KeyError when it is not in this model)."""
        return self._index[key]

    @torch.no_grad()
    def forward(self, x: Tensor, site: Tensor) -> Tensor:
        """Logits ``(N, C_max)`` of preprocessed records ``(N, 12, 1, T)``, record i for site ``site[i]``."""
        if site.shape != (x.shape[0],):
            raise ValueError(f"one site index per record: {tuple(site.shape)} for {x.shape[0]} records")
        h = x.contiguous(memory_format=torch.channels_last)
        for b in range(len(self.structure.encoder_layers)):
            h = self._residual_block(f"encoder_layers.{b}", h, site)
        tokens = h.squeeze(2).transpose(1, 2)  # (N, T, d)
        tokens = tokens + self.base["position_encoding.positional_encoding"][: tokens.size(1)]
        for i in range(len(self.structure.transformer_layers)):
            tokens = self._transformer_layer(f"transformer_layers.{i}", tokens, site)
        pooled = tokens.amax(dim=1)  # (N, d)
        return self._linear("classifier.1", self._linear("classifier.0", pooled, site), site)

    __call__ = forward

    def probabilities(self, x: Tensor, site: Tensor) -> list[Tensor]:
        """Per record its own site's sigmoid probabilities (C_site,)."""
        logits = self.forward(x, site)
        return [torch.sigmoid(row[: self.n_classes[int(s)]]) for row, s in zip(logits, site, strict=True)]

    # -- layers
    def _residual_block(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        h = F.leaky_relu(self._batchnorm(f"{name}.bn1", self._conv(f"{name}.conv1", x, site), site))
        h = F.leaky_relu(self._batchnorm(f"{name}.bn2", self._conv(f"{name}.conv2", h, site), site))
        pool = self._module(f"{name}.shortcut_pool", nn.AvgPool2d)
        return h + self._conv(f"{name}.conv3", pool(x), site)

    def _transformer_layer(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        x = x + self._attention(f"{name}.self_attention", self._layernorm(f"{name}.norm1", x, site), site)
        hidden = F.leaky_relu(self._linear(f"{name}.fc1", self._layernorm(f"{name}.norm2", x, site), site))
        return x + self._linear(f"{name}.fc2", hidden, site)

    def _attention(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        n, t, d = x.shape
        heads = self._module(name, CausalSelfAttention).n_heads
        qkv = self._linear(f"{name}.c_attn", x, site)
        q, k, v = (z.view(n, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        return self._linear(f"{name}.c_proj", y, site)

    def _bias(self, name: str, site: Tensor) -> Tensor | None:
        """(N, C) of ``name`` per record, or the shared (C,) one, or None."""
        if name in self.site:
            return self.site[name][site]
        return self.base.get(name)

    def _conv(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        """``conv(x, W) + b_site + B_site conv(x, A_site)`` (a LoRAConv2d's eval forward, per record)."""
        conv = self._module(name, LoRAConv2d).conv
        y = F.conv2d(x, self.base[f"{name}.conv.weight"], None, conv.stride, conv.padding)
        bias = self._bias(f"{name}.conv.bias", site)
        if bias is not None:
            y = y + (bias.view(-1, y.shape[1], 1, 1) if bias.dim() == 2 else bias.view(1, -1, 1, 1))
        if name in self.lora:
            y = y + self._conv_update(self.lora[name], x, site, conv)
        return y

    @staticmethod
    def _conv_update(pair: LowRank, x: Tensor, site: Tensor, conv: nn.Conv2d) -> Tensor:
        """Per record ``B_site conv(x, A_site)``: one grouped convolution (group i: record i's
        R-channel kernel), then a batched (C_out x R) matrix product."""
        n, c_in, h, w = x.shape
        rank = pair.a.shape[1]
        kernel = pair.a[site].reshape(n * rank, c_in, *conv.kernel_size)
        hidden = F.conv2d(x.reshape(1, n * c_in, h, w), kernel, None, conv.stride, conv.padding, groups=n)
        h_out, w_out = hidden.shape[-2:]
        update = torch.bmm(pair.b[site], hidden.view(n, rank, h_out * w_out))  # (N, C_out, H'W')
        return update.view(n, -1, h_out, w_out)

    def _linear(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        """``x W^T + b_site + (x A_site^T) B_site^T`` for (N, in) or (N, T, in); c_attn / c_proj
        store W as (in, out) (GPT-2's Conv1D); a head weight may be the site's own."""
        weight_name = f"{name}.weight"
        conv1d_style = name.endswith(("c_attn", "c_proj"))
        tokens = x if x.dim() == 3 else x.unsqueeze(1)  # (N, T, in)
        if weight_name in self.site:  # the site's own weight (the head): gathered per record
            w = self.site[weight_name][site]
            y = torch.bmm(tokens, w if conv1d_style else w.transpose(1, 2))
        else:
            w = self.base[weight_name]
            y = tokens @ w if conv1d_style else F.linear(tokens, w)
        bias = self._bias(f"{name}.bias", site)
        if bias is not None:
            y = y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        if name in self.lora:
            pair = self.lora[name]
            y = y + torch.bmm(torch.bmm(tokens, pair.a[site].transpose(1, 2)), pair.b[site].transpose(1, 2))
        return y if x.dim() == 3 else y.squeeze(1)

    def _layernorm(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        norm = self._module(name, nn.LayerNorm)
        y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        w, b = self._bias(f"{name}.weight", site), self._bias(f"{name}.bias", site)
        if w is not None:
            y = y * (w.unsqueeze(1) if w.dim() == 2 else w)
        if b is not None:
            y = y + (b.unsqueeze(1) if b.dim() == 2 else b)
        return y

    def _batchnorm(self, name: str, x: Tensor, site: Tensor) -> Tensor:
        affine = self.bn[name]
        c = x.shape[1]
        return x * affine.scale[site].view(-1, c, 1, 1) + affine.shift[site].view(-1, c, 1, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-site stacks (the shared backbone's tensors are not counted)."""
        stacks = [*self.site.values(), *(t for p in self.lora.values() for t in (p.a, p.b))]
        stacks += [t for a in self.bn.values() for t in (a.scale, a.shift)]
        return sum(t.numel() * t.element_size() for t in stacks)


def _check_batchable(adapter: SiteAdapter, base: Mapping[str, Tensor], norms: set[str]) -> None:
    """Refuse an adapter that replaces a frozen weight outside the head and the norms."""
    for name, tensor in adapter.tensors.items():
        owner, _, leaf = name.rpartition(".")
        if leaf in _LORA_LEAVES or leaf == "bias" or owner in norms or name.startswith(HEAD):
            continue
        if name in base and tensor.shape == base[name].shape and torch.equal(tensor, base[name]):
            continue
        raise UnbatchableAdapterError(
            adapter.key,
            f"{adapter.key}: replaces the backbone weight {name} (a full fine-tune): answered one site at a time",
        )
