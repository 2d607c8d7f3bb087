"""LoRA with random deactivation: reference goldens, merge rules, deactivation, trainable counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import (
    LoRAConfig,
    LoRAConv1D,
    LoRAConv2d,
    LoRALinear,
    count_parameters,
    lora_layers,
    mark_trainable,
    merge_lora,
    seed_deactivation,
    set_deactivation,
    unmerge_lora,
)

# (r=16 total, r=16 trainable) from the reference README table, 19 classes
PARAMETER_COUNTS = {
    "tinylight": (334_611, 80_659),
    "tiny": (1_851_923, 261_907),
    "base": (10_268_819, 795_283),
    "medium": (52_543_891, 2_135_443),
    "large": (116_563_603, 3_202_195),
}
R0_TOTALS = {"tinylight": 256_915, "tiny": 1_600_147, "base": 9_505_043, "medium": 50_493_971, "large": 113_489_683}


def golden_input(reference_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(reference_dir / "golden_input.npy"))


def golden_lora_model(reference_dir: Path, name: str) -> ECGTransformer:
    """r = 4 model with the r0 weights and the golden LoRA tensors, deactivation off."""
    model = ECGTransformer(backbone_config(name, 19), LoRAConfig(r=4, p=0.0))
    state = torch.load(reference_dir / f"golden_{name}_r0.pt", weights_only=True)
    state.update(torch.load(reference_dir / f"golden_{name}_lora_r4.pt", weights_only=True))
    model.load_state_dict(state, strict=True)
    return model.eval()


def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x.to(next(model.parameters()).device)).cpu().numpy()


def small_model(p: float = 0.2, r: int = 4) -> ECGTransformer:
    torch.manual_seed(0)
    model = ECGTransformer(backbone_config("tinylight", 3), LoRAConfig(r=r, p=p))
    with torch.no_grad():  # non-zero B so the update matters
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def short_input() -> torch.Tensor:
    return torch.randn(2, 12, 1, 6144, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["tinylight", "tiny"])
def test_unmerged_and_merged_goldens(reference_dir: Path, name: str, device: torch.device, golden_atol: float) -> None:
    x = golden_input(reference_dir)
    model = golden_lora_model(reference_dir, name).to(device)
    unmerged = np.load(reference_dir / f"golden_{name}_lora_r4_unmerged_logits.npy")
    merged = np.load(reference_dir / f"golden_{name}_lora_r4_merged_logits.npy")
    np.testing.assert_allclose(eval_logits(model, x), unmerged, atol=golden_atol, rtol=0)

    set_deactivation(model, 0.2)  # every adapted layer except classifier.0
    assert model.get_submodule("classifier.0").p == 0.0
    # our rule: the unmerged eval forward already uses the expected update (1 - p) B A
    np.testing.assert_allclose(eval_logits(model, x), merged, atol=golden_atol, rtol=0)
    merge_lora(model)
    np.testing.assert_allclose(eval_logits(model, x), merged, atol=golden_atol, rtol=0)


def test_merged_eval_equals_unmerged_eval_and_unmerge_is_exact(short_input: torch.Tensor, device: torch.device) -> None:
    model = small_model(p=0.2).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = eval_logits(model, short_input)
    np.testing.assert_array_equal(unmerged, eval_logits(model, short_input))  # eval is deterministic
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    np.testing.assert_allclose(eval_logits(model, short_input), unmerged, atol=1e-5, rtol=0)
    assert not torch.equal(model.state_dict()["classifier.0.weight"], before["classifier.0.weight"])
    unmerge_lora(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    np.testing.assert_array_equal(eval_logits(model, short_input), unmerged)


def test_merge_rule_per_layer() -> None:
    """W <- W + (1 - p) B A * scale; never-deactivated classifier.0 merges the full B A."""
    model = small_model(p=0.2)
    layers = lora_layers(model)
    conv, head = layers["encoder_layers.0.conv1"], layers["classifier.0"]
    w_conv, w_head = conv.weight.detach().clone(), head.weight.detach().clone()
    ba_conv = (conv.lora_B @ conv.lora_A).view(w_conv.shape).detach()
    ba_head = (head.lora_B @ head.lora_A).detach()
    merge_lora(model)
    torch.testing.assert_close(conv.weight.detach(), w_conv + 0.8 * ba_conv)
    torch.testing.assert_close(head.weight.detach(), w_head + ba_head)


def test_conv1d_update_is_block_diagonal_and_transposed() -> None:
    torch.manual_seed(0)
    layer = LoRAConv1D(8, 24, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.get_delta_weight().detach()
    assert delta.shape == layer.weight.shape == (8, 24)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    for i in range(3):  # block i of the (3d, d) update is B_i A_i
        torch.testing.assert_close(delta[:, i * 8 : (i + 1) * 8].t(), b[i * 8 : (i + 1) * 8] @ a[i * 2 : (i + 1) * 2])
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), x @ (layer.weight + delta) + layer.bias)


def test_layer_shapes_and_rank_zero() -> None:
    conv = LoRAConv2d(12, 64, (1, 9), stride=(1, 4), padding=(0, 4), r=16)
    assert conv.lora_A.shape == (16, 108) and conv.lora_B.shape == (64, 16)
    assert not conv.conv.weight.requires_grad
    assert not conv.lora_B.detach().any()
    assert conv.lora_A.std().item() == pytest.approx(0.02, rel=0.1)
    linear = LoRALinear(64, 256, r=0)
    assert [k for k, _ in linear.named_parameters()] == ["weight", "bias"]
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    with pytest.raises(ValueError):
        LoRAConfig(p=1.5)


def test_lora_a_init_c_attn_kaiming_uniform_others_normal_002() -> None:
    """c_attn's A is nn.Linear-like U(-1/sqrt(d), 1/sqrt(d)); every other A is N(0, 0.02^2)."""
    torch.manual_seed(0)
    d, r = 256, 16
    c_attn = LoRAConv1D(d, 3 * d, r=r)
    a = c_attn.lora_A.detach()
    bound = 1 / d**0.5  # kaiming_uniform_(a=sqrt(5)) with fan_in = d
    assert a.shape == (3 * r, d)
    assert a.abs().max().item() <= bound
    assert a.abs().max().item() > 0.98 * bound, "fills the whole interval"
    assert a.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # std of U(-b, b)
    assert a.mean().item() == pytest.approx(0.0, abs=0.1 * bound)
    assert not c_attn.lora_B.detach().any()
    conv = LoRAConv2d(d, d, (1, 3), stride=(1, 1), padding=(0, 1), r=r)
    assert conv.lora_A.std().item() == pytest.approx(0.02, rel=0.05)
    assert conv.lora_A.abs().max().item() > bound, "Gaussian tails, not a uniform bound"
    fc = LoRALinear(d, d, r=r)
    assert fc.lora_A.std().item() == pytest.approx(0.02, rel=0.05)
    c_attn.lora_A.data.zero_()
    c_attn.reset_lora_parameters()
    assert c_attn.lora_A.abs().max().item() <= bound and c_attn.lora_A.std().item() > 0.03


def test_rank_map_sets_per_layer_ranks() -> None:
    model = ECGTransformer(
        backbone_config("tinylight", 19),
        LoRAConfig(r=16, rank_map={"encoder_layers.0.conv3": 8, "transformer_layers.0.fc1": 0}),
    )
    ranks = model.rank_map()
    assert ranks["encoder_layers.0.conv3"] == 8 and ranks["transformer_layers.0.fc1"] == 0
    assert ranks["classifier.0"] == 16
    assert "transformer_layers.0.fc1" not in lora_layers(model)
    assert "transformer_layers.0.fc1.lora_A" not in model.state_dict()


def test_lora_layers_reference_order(reference_dir: Path) -> None:
    order = (reference_dir / "golden_tinylight_taylor_order.txt").read_text().split()
    model = ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(r=16))
    assert list(lora_layers(model)) == order


def count_branch_calls(model: ECGTransformer, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Wrap every adapted layer's low-rank branch with a call counter."""
    calls = dict.fromkeys(lora_layers(model), 0)
    for name, layer in lora_layers(model).items():
        original = layer.forward_with_update

        def counted(x: torch.Tensor, factor: float, name: str = name, original=original) -> torch.Tensor:
            calls[name] += 1
            return original(x, factor)

        monkeypatch.setattr(layer, "forward_with_update", counted)
    return calls


def test_full_deactivation_skips_the_branch(
    short_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    model = small_model(p=1.0).to(device)
    mark_trainable(model, "lora")
    plain = ECGTransformer(backbone_config("tinylight", 3)).to(device)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    plain.classifier[0] = model.classifier[0]  # classifier.0 is never deactivated
    plain.train()
    x = short_input.to(device)
    expected = plain(x)
    calls = count_branch_calls(model, monkeypatch)
    model.train()
    out = model(x)
    out.sum().backward()
    assert calls.pop("classifier.0") == 1
    assert set(calls.values()) == {0}  # branch never computed
    for name, layer in lora_layers(model).items():
        if name != "classifier.0":
            assert layer.lora_A.grad is None and layer.lora_B.grad is None
    torch.testing.assert_close(out, expected)


class ConvBackwards(TorchDispatchMode):
    """Records every conv backward: (output_mask (grad input, grad kernel, grad bias), C_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[bool, bool, bool], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls.append((tuple(args[-1]), args[2].shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p, trained", [(1.0, "AB"), (0.0, "AB"), (0.0, "B")])
def test_lora_conv_backward_never_computes_the_full_kernel_gradient(
    p: float, trained: str, device: torch.device
) -> None:
    """Switched off (p = 1): only the input gradient (the bias is added apart, since oneDNN
    computes the kernel gradient whenever it is asked for the bias one). Switched on (p = 0):
    the input gradient plus, when A trains, the kernel gradient of the r-channel conv(x, A) -
    never the (C_out, C_in*9) one (B alone, as in the allocation pass, needs no second conv).
    Values and gradients equal plain autograd through W + B A."""
    torch.manual_seed(0)
    r, c_out = 4, 16
    layer = LoRAConv2d(8, c_out, (1, 9), stride=(1, 2), padding=(0, 4), r=r).double().to(device)  # exact compare
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.p = p
    mark_trainable(layer, "lora")
    layer.lora_A.requires_grad_("A" in trained)
    layer.train()
    x = torch.randn(3, 8, 1, 64, dtype=torch.float64, device=device, requires_grad=True)
    with ConvBackwards() as recorded:
        out = layer(x)
        out.square().sum().backward()
    r_channel_kernel_grad = [((False, True, False), r)] if p == 0.0 and "A" in trained else []
    assert recorded.calls == [((True, False, False), c_out), *r_channel_kernel_grad]
    ours = {"x": x.grad, "bias": layer.conv.bias.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}

    # reference: autograd through the merged kernel
    xr = x.detach().clone().requires_grad_()
    a, b, bias = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.conv.bias))
    kernel = layer.weight + (b @ a).view(layer.weight.shape) * (1.0 - p)
    ref = layer.conv._conv_forward(xr, kernel, bias)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ours["x"], xr.grad)
    torch.testing.assert_close(ours["bias"], bias.grad)
    if p == 1.0:
        assert ours["A"] is None and ours["B"] is None
    else:
        torch.testing.assert_close(ours["B"], b.grad)
        if "A" in trained:
            torch.testing.assert_close(ours["A"], a.grad)
        else:
            assert ours["A"] is None


def test_deactivation_rate_and_seeded_reproducibility(
    short_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = small_model(p=0.5).train()
    x = short_input[:, :, :, :512]
    calls = count_branch_calls(model, monkeypatch)

    def run(seed: int) -> list[torch.Tensor]:
        seed_deactivation(model, seed)
        with torch.no_grad():
            return [model(x) for _ in range(4)]

    first, second = run(7), run(7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = run(8)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    n_calls = sum(v for k, v in calls.items() if k != "classifier.0")
    n_draws = 12 * 12  # 12 deactivatable layers x 12 forward passes
    assert 0.3 * n_draws < n_calls < 0.7 * n_draws
    assert calls["classifier.0"] == 12
    # eval is deterministic regardless of the RNG
    model.eval()
    with torch.no_grad():
        seed_deactivation(model, 1)
        a = model(x)
        seed_deactivation(model, 2)
        assert torch.equal(a, model(x))


def test_set_deactivation_respects_never_deactivate() -> None:
    model = small_model(p=0.0)
    set_deactivation(model, 0.3)
    ps = {n: layer.p for n, layer in lora_layers(model).items()}
    assert ps.pop("classifier.0") == 0.0 and set(ps.values()) == {0.3}
    with pytest.raises(ValueError):
        set_deactivation(model, -0.1)


@pytest.mark.parametrize("name", list(PARAMETER_COUNTS))
def test_trainable_counts_match_reference(name: str) -> None:
    with torch.device("meta"):
        model = ECGTransformer(backbone_config(name, 19), LoRAConfig(r=16))
        plain = ECGTransformer(backbone_config(name, 19))
    mark_trainable(model, "lora")
    total, trainable = PARAMETER_COUNTS[name]
    assert count_parameters(model) == (trainable, total)
    mark_trainable(plain, "full")
    assert count_parameters(plain) == (R0_TOTALS[name], R0_TOTALS[name])


def test_lora_mode_freezes_norm_weights_but_bn_stats_update(short_input: torch.Tensor) -> None:
    model = small_model()
    mark_trainable(model, "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder_layers.0.bn1.bias" in trainable and "transformer_layers.0.norm1.bias" in trainable
    assert "encoder_layers.0.bn1.weight" not in trainable and "transformer_layers.0.norm1.weight" not in trainable
    assert "classifier.1.weight" in trainable and "classifier.0.weight" not in trainable
    assert "transformer_layers.0.self_attention.c_proj.weight" not in trainable
    before = model.encoder_layers[0].bn1.running_mean.clone()
    model.train()
    with torch.no_grad():
        model(short_input)
    assert not torch.equal(before, model.encoder_layers[0].bn1.running_mean)
    with pytest.raises(ValueError):
        mark_trainable(model, "partial")  # type: ignore[arg-type]  # an invalid mode on purpose


def test_trainable_count_after_allocation(reference_dir: Path) -> None:
    lines = (reference_dir / "golden_tinylight_ranks_c0.6.txt").read_text().splitlines()
    rank_map = {k: int(v) for k, v in (line.split("\t") for line in lines if not line.startswith("#"))}
    with torch.device("meta"):
        model = ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(r=16, rank_map=rank_map))
    mark_trainable(model, "lora")
    assert count_parameters(model)[0] == 59_571
