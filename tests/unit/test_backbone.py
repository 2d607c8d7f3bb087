"""Backbone compatibility with the reference implementation: key lists and r0 logits goldens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.model.backbone import (
    BACKBONE_CONFIGS,
    CausalSelfAttention,
    ECGTransformer,
    adapted_layer_names,
    backbone_config,
)
from ml.model.lora import LoRAConfig

CONFIGS = ["tinylight", "tiny", "base", "medium", "large"]


def reference_keys(reference_dir: Path, name: str) -> list[tuple[str, str]]:
    lines = (reference_dir / name).read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


def model_keys(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]


def build_on_meta(name: str, r: int) -> ECGTransformer:
    with torch.device("meta"):
        return ECGTransformer(backbone_config(name, 19), LoRAConfig(r=r))


def load_golden_r0(reference_dir: Path, name: str, model: ECGTransformer) -> None:
    model.load_state_dict(torch.load(reference_dir / f"golden_{name}_r0.pt", weights_only=True))


@pytest.mark.parametrize(
    "name,layers,d,n_tf",
    [
        ("tinylight", 14, 64, 1),
        ("tiny", 23, 128, 4),
        ("base", 35, 256, 8),
        ("medium", 47, 512, 12),
        ("large", 47, 768, 12),
    ],
)
def test_config_table(name: str, layers: int, d: int, n_tf: int) -> None:
    cfg = backbone_config(name, 19)
    assert (cfg.num_layers, cfg.d_model, cfg.n_transformer_layers, cfg.num_classes) == (layers, d, n_tf, 19)
    assert cfg.n_heads == 16 and cfg.n_tokens == 96
    assert len(adapted_layer_names(cfg)) == layers - 1
    assert BACKBONE_CONFIGS[name].d_model == d


def test_unknown_config_and_rank_map_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_config("huge", 19)
    with pytest.raises(ValueError, match="rank_map names unknown layers"):
        ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(rank_map={"encoder_layers.0.conv9": 4}))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("r,suffix", [(16, ""), (0, "_r0")])
def test_state_dict_keys_shapes_and_order(reference_dir: Path, name: str, r: int, suffix: str) -> None:
    expected = reference_keys(reference_dir, f"state_dict_keys_{name}{suffix}.txt")
    assert model_keys(build_on_meta(name, r)) == expected


@pytest.mark.parametrize("name", ["tinylight", "tiny"])
def test_r0_logits_match_golden(reference_dir: Path, name: str, device: torch.device, golden_atol: float) -> None:
    model = ECGTransformer(backbone_config(name, 19)).eval()
    load_golden_r0(reference_dir, name, model)
    x = torch.from_numpy(np.load(reference_dir / "golden_input.npy"))
    with torch.no_grad():
        logits = model.to(device)(x.to(device)).cpu().numpy()
    np.testing.assert_allclose(
        logits, np.load(reference_dir / f"golden_{name}_r0_logits.npy"), atol=golden_atol, rtol=0
    )


def test_encode_and_head_split_the_forward(reference_dir: Path, device: torch.device) -> None:
    model = ECGTransformer(backbone_config("tinylight", 19)).eval()
    load_golden_r0(reference_dir, "tinylight", model)
    model.to(device)
    x = torch.from_numpy(np.load(reference_dir / "golden_input.npy")).to(device)
    with torch.no_grad():
        features = model.encode(x)
        assert features.shape == (2, 64, 1, 96)
        # the encoder runs channels-last (no oneDNN reorders on CPU, cuDNN's NHWC kernels on
        # CUDA); the head's (N, 96, d) tokens are then a free view
        assert features.is_contiguous(memory_format=torch.channels_last)
        assert features.squeeze(2).transpose(1, 2).is_contiguous()
        plain = torch.nn.Sequential(*model.encoder_layers)(x)  # the same blocks, NCHW
        assert plain.is_contiguous()
        torch.testing.assert_close(features, plain, atol=1e-5, rtol=1e-5)
        # the semi-supervised step drops the second half of the batch before the head
        # (cuDNN may pick another algorithm for another batch size: float32 rounding apart)
        atol = 1e-6 if device.type == "cpu" else 1e-5
        torch.testing.assert_close(model.head(features[:1]), model(x[:1]), atol=atol, rtol=0)
        assert model.head(features).shape == (2, 19)


def test_buffers_are_the_reference_ones() -> None:
    model = ECGTransformer(backbone_config("tinylight", 19))
    mask = model.transformer_layers[0].self_attention.bias
    assert torch.equal(mask, torch.tril(torch.ones(96, 96)).view(1, 1, 96, 96))
    pe = model.position_encoding.positional_encoding
    assert pe.shape == (200, 64)
    assert pe[3, 0].item() == pytest.approx(math.sin(3.0))
    assert pe[3, 1].item() == pytest.approx(math.cos(3.0))
    assert pe[5, 2].item() == pytest.approx(math.sin(5.0 / 10000 ** (2 / 64)), rel=1e-5)


def test_attention_matches_reference_masking() -> None:
    """SDPA with is_causal equals softmax((q k^T / sqrt(hd)) * b - 1e10 (1 - b)) v."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 16, 96, rank=0).eval()
    x = torch.randn(2, 96, 64)
    with torch.no_grad():
        q, k, v = (z.view(2, 96, 16, 4).transpose(1, 2) for z in attn.c_attn(x).split(64, dim=2))
        w = q @ k.transpose(-1, -2) / math.sqrt(4)
        b = attn.bias
        w = torch.softmax(w * b - 1e10 * (1 - b), dim=-1)
        expected = attn.c_proj((w @ v).transpose(1, 2).reshape(2, 96, 64))
        np.testing.assert_allclose(attn(x).numpy(), expected.numpy(), atol=1e-6)
        # causal: a change in the last token leaves all earlier outputs unchanged
        x2 = x.clone()
        x2[:, -1] += 1.0
        torch.testing.assert_close(attn(x2)[:, :-1], attn(x)[:, :-1])
