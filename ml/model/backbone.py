"""The ECG transformer backbone, top-down (config, encoder, attention, transformer, model).

Load-compatible with the reference checkpoints: state-dict names, order and shapes
(buffers included) are those of the authors' ``NN_default``. Data flow for one record:

    x (N, 12, 1, 6144)
      -> 3 residual conv blocks, each /4 in time        (N, d, 1, 96)    = encode(x)
      -> tokens + sinusoidal positional encoding        (N, 96, d)
      -> pre-norm transformer layers (causal attention) (N, 96, d)
      -> max-pool over time                             (N, d)
      -> classifier Linear(d, d) -> Linear(d, C)        (N, C)           = head(features)

``encode`` and ``head`` are separate so that the semi-supervised step can push labelled
and unlabelled records through the encoder together (BatchNorm sees both) and drop the
unlabelled half before the transformer.

The adapted layers (LoRA, see ``ml.model.lora``) are the three convs of every encoder
block, c_attn / fc1 / fc2 of every transformer layer and classifier.0; c_proj and
classifier.1 are never adapted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.model.lora import LoRAConfig, LoRAConv1D, LoRAConv2d, LoRALayer, LoRALinear, seed_deactivation

logger = logging.getLogger(__name__)

ENCODER_BLOCKS = 3
ENCODER_STRIDE = 4
KERNEL_SIZE = 9
CLASSIFIER_LAYERS = 2


@dataclass(frozen=True)
class BackboneConfig:
    """Backbone size. ``num_layers`` counts weight matrices like the paper's table:
    3 per encoder block + 3 per transformer layer + 2 classifier layers."""

    name: str
    d_model: int
    n_transformer_layers: int
    num_classes: int
    n_leads: int = 12
    n_heads: int = 16
    seq_len: int = 6144
    max_len: int = 200

    @property
    def num_layers(self) -> int:
        return 3 * ENCODER_BLOCKS + 3 * self.n_transformer_layers + CLASSIFIER_LAYERS

    @property
    def n_tokens(self) -> int:
        """Tokens after the encoder: 6144 / 4^3 = 96."""
        return self.seq_len // ENCODER_STRIDE**ENCODER_BLOCKS


# num_classes 6: the CODE-15% pre-training head. Use backbone_config(name, C) downstream.
BACKBONE_CONFIGS: dict[str, BackboneConfig] = {
    "tinylight": BackboneConfig("tinylight", d_model=64, n_transformer_layers=1, num_classes=6),
    "tiny": BackboneConfig("tiny", d_model=128, n_transformer_layers=4, num_classes=6),
    "base": BackboneConfig("base", d_model=256, n_transformer_layers=8, num_classes=6),
    "medium": BackboneConfig("medium", d_model=512, n_transformer_layers=12, num_classes=6),
    "large": BackboneConfig("large", d_model=768, n_transformer_layers=12, num_classes=6),
}


def backbone_config(name: str, num_classes: int) -> BackboneConfig:
    """The named size with a ``num_classes``-way classifier."""
    if name not in BACKBONE_CONFIGS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONE_CONFIGS)}")
    return replace(BACKBONE_CONFIGS[name], num_classes=num_classes)


def adapted_layer_names(config: BackboneConfig) -> list[str]:
    """Every LoRA-adaptable matrix in the reference order (num_layers - 1 names)."""
    names = [f"encoder_layers.{b}.conv{j}" for b in range(ENCODER_BLOCKS) for j in (1, 2, 3)]
    for i in range(config.n_transformer_layers):
        names += [
            f"transformer_layers.{i}.self_attention.c_attn",
            f"transformer_layers.{i}.fc1",
            f"transformer_layers.{i}.fc2",
        ]
    return [*names, "classifier.0"]


# --- encoder ------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """conv(1x9, /4) -> BN -> leaky ReLU -> conv(1x9) -> BN -> leaky ReLU, plus a shortcut
    AvgPool(1x4, /4) -> conv 1x1.  (N, C_in, 1, T) -> (N, C_out, 1, T/4)."""

    def __init__(self, c_in: int, c_out: int, ranks: tuple[int, int, int], alpha: float | None = None) -> None:
        super().__init__()
        pad = (0, (KERNEL_SIZE - 1) // 2)
        self.conv1 = LoRAConv2d(
            c_in, c_out, (1, KERNEL_SIZE), stride=(1, ENCODER_STRIDE), padding=pad, r=ranks[0], alpha=alpha
        )
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = LoRAConv2d(c_out, c_out, (1, KERNEL_SIZE), padding=pad, r=ranks[1], alpha=alpha)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_pool = nn.AvgPool2d((1, ENCODER_STRIDE), stride=(1, ENCODER_STRIDE))
        self.conv3 = LoRAConv2d(c_in, c_out, (1, 1), r=ranks[2], alpha=alpha)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)))  # (N, C_out, 1, T/4)
        h = F.leaky_relu(self.bn2(self.conv2(h)))
        return h + self.conv3(self.shortcut_pool(x))  # shortcut: (N, C_in, 1, T/4) -> C_out


# --- transformer --------------------------------------------------------------------------
class SinusoidalPositionalEncoding(nn.Module):
    """PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(...); a (max_len, d) buffer."""

    positional_encoding: Tensor  # buffer

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("positional_encoding", pe)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.positional_encoding[: x.size(1)]  # x (N, T, d)


class Conv1D(nn.Module):
    """GPT-2 "Conv1D": a linear layer whose weight is stored (in, out); y = x W + b."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.weight.size(1))


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: fused q,k,v projection c_attn (d -> 3d), causal softmax(q k^T / sqrt(hd)) v,
    output projection c_proj. The (1, 1, n_ctx, n_ctx) lower-triangular buffer ``bias`` is the
    reference's mask (kept in the state dict); SDPA's ``is_causal`` applies the same mask."""

    bias: Tensor  # buffer

    def __init__(self, d_model: int, n_heads: int, n_ctx: int, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.register_buffer("bias", torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx))
        self.c_attn = LoRAConv1D(d_model, 3 * d_model, n_blocks=3, r=rank, alpha=alpha)
        self.c_proj = Conv1D(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        if t > self.bias.size(-1):
            raise ValueError(f"{t} tokens exceed the causal mask size {self.bias.size(-1)}")
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (N, T, d)
        q, k, v = (z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, T, hd)
        y = y.transpose(1, 2).reshape(n, t, d)  # (N, T, d)
        return self.c_proj(y)


class TransformerLayer(nn.Module):
    """Pre-norm: x + Attn(LN(x)); x + FFN(LN(x)), FFN = fc2(leaky_relu(fc1(.))) with 4d hidden."""

    def __init__(
        self, d_model: int, n_heads: int, n_ctx: int, ranks: tuple[int, int, int], alpha: float | None = None
    ) -> None:
        super().__init__()
        self.self_attention = CausalSelfAttention(d_model, n_heads, n_ctx, ranks[0], alpha)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = LoRALinear(d_model, 4 * d_model, r=ranks[1], alpha=alpha)
        self.fc2 = LoRALinear(4 * d_model, d_model, r=ranks[2], alpha=alpha)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attention(self.norm1(x))
        return x + self.fc2(F.leaky_relu(self.fc1(self.norm2(x))))  # hidden (N, T, 4d)


# --- the model ----------------------------------------------------------------------------
class ECGTransformer(nn.Module):
    """Conv encoder + causal transformer + 2-layer classifier, optionally with LoRA.

    ``lora=None`` builds the plain (r = 0) backbone a pre-trained checkpoint holds. With a
    LoRAConfig every adapted layer gets ``lora.rank_for(name)`` and deactivation
    probability ``lora.p_for(name)``.
    """

    def __init__(self, config: BackboneConfig, lora: LoRAConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.lora_config = lora if lora is not None else LoRAConfig(r=0, p=0.0)
        names = adapted_layer_names(config)
        unknown = set(self.lora_config.rank_map) - set(names)
        if unknown:
            raise ValueError(f"rank_map names unknown layers {sorted(unknown)}; valid: {names}")
        rank = {n: self.lora_config.rank_for(n) for n in names}
        alpha = self.lora_config.alpha
        d = config.d_model

        def block_ranks(prefix: str, leaves: tuple[str, str, str]) -> tuple[int, int, int]:
            a, b, c = (rank[f"{prefix}.{leaf}"] for leaf in leaves)
            return a, b, c

        # registration order = reference state-dict order
        self.encoder_layers = nn.ModuleList(
            ResidualBlock(
                config.n_leads if b == 0 else d,
                d,
                block_ranks(f"encoder_layers.{b}", ("conv1", "conv2", "conv3")),
                alpha,
            )
            for b in range(ENCODER_BLOCKS)
        )
        self.classifier = nn.ModuleList(
            [
                LoRALinear(d, d, r=rank["classifier.0"], alpha=alpha),
                nn.Linear(d, config.num_classes),
            ]
        )
        self.transformer_layers = nn.ModuleList(
            TransformerLayer(
                d,
                config.n_heads,
                config.n_tokens,
                block_ranks(f"transformer_layers.{i}", ("self_attention.c_attn", "fc1", "fc2")),
                alpha,
            )
            for i in range(config.n_transformer_layers)
        )
        self.position_encoding = SinusoidalPositionalEncoding(d, config.max_len)

        for name in names:
            self._lora_layer(name).p = self.lora_config.p_for(name)
        seed_deactivation(self, 0)  # the trainer re-seeds from its own seed

    def adapted_layer_names(self) -> list[str]:
        """All adaptable matrices, reference order (see ``ml.model.lora.lora_layers``)."""
        return adapted_layer_names(self.config)

    def rank_map(self) -> dict[str, int]:
        """The rank actually built for every adaptable layer (0: not adapted)."""
        return {n: self._lora_layer(n).r for n in self.adapted_layer_names()}

    def _lora_layer(self, name: str) -> LoRALayer:
        """The adaptable layer ``name`` (one of ``adapted_layer_names()``, at any rank, 0 included)."""
        layer = self.get_submodule(name)
        if not isinstance(layer, LoRALayer):
            raise TypeError(f"{name} is a {type(layer).__name__}, not a LoRA layer")
        return layer

    def encode(self, x: Tensor) -> Tensor:
        """Conv encoder only: (N, n_leads, 1, 6144) -> (N, d, 1, 96).

        The encoder runs channels-last (NHWC), measured faster on both kinds of device: on
        CPU oneDNN's convolutions, BatchNorm and pooling need no layout reorders (a training
        step ~25% faster); on CUDA cuDNN's NHWC kernels make steps 7-10% faster (H100, base
        and medium, every training method), and the transformer's (N, 96, d) input is then
        contiguous. The values are the same up to float rounding; the output is a
        (N, d, 1, 96) view either way.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        for block in self.encoder_layers:
            x = block(x)  # time / 4 per block
        return x

    def pool(self, features: Tensor) -> Tensor:
        """Positional encoding, transformer, max-pool: (N, d, 1, 96) -> (N, d)."""
        x = features.squeeze(2).transpose(1, 2)  # (N, 96, d)
        x = self.position_encoding(x)
        for layer in self.transformer_layers:
            x = layer(x)
        return x.amax(dim=1)  # (N, d): adaptive max-pool over time

    def classify(self, pooled: Tensor) -> Tensor:
        """The classifier on pooled features: (N, d) -> (N, C)."""
        x = pooled
        for layer in self.classifier:  # Linear(d, d) -> Linear(d, C), no activation
            x = layer(x)
        return x

    def head(self, features: Tensor) -> Tensor:
        """Positional encoding, transformer, max-pool, classifier: (N, d, 1, 96) -> (N, C)."""
        return self.classify(self.pool(features))

    def pooled(self, x: Tensor) -> Tensor:
        """The features the classifier reads: (N, n_leads, 1, 6144) -> (N, d)."""
        return self.pool(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encode(x))
