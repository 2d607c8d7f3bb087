"""One-shot rank allocation: Taylor importance golden, rank rule, fisher variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, lora_layers
from ml.model.rank_allocation import (
    allocate_ranks,
    default_r_low,
    parameter_importance,
    ranks_from_importance,
)


def golden_batch(reference_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.load(reference_dir / "golden_input.npy")),
        torch.from_numpy(np.load(reference_dir / "golden_labels.npy")),
    )


def taylor_model(reference_dir: Path, p: float = 0.2) -> ECGTransformer:
    """r = 16 tinylight with the r0 weights (classifier.1 included) and the golden LoRA init."""
    model = ECGTransformer(backbone_config("tinylight", 19), LoRAConfig(r=16, p=p))
    state = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    state.update(torch.load(reference_dir / "golden_tinylight_taylor_lora_init.pt", weights_only=True))
    model.load_state_dict(state, strict=True)
    return model


def golden_ranks(reference_dir: Path) -> dict[str, int]:
    lines = (reference_dir / "golden_tinylight_ranks_c0.6.txt").read_text().splitlines()
    return {k: int(v) for k, v in (line.split("\t") for line in lines if not line.startswith("#"))}


def test_taylor_importance_and_allocation_match_goldens(reference_dir: Path, device: torch.device) -> None:
    model = taylor_model(reference_dir).to(device)
    importance = parameter_importance(model, [golden_batch(reference_dir)], variant="taylor")
    order = (reference_dir / "golden_tinylight_taylor_order.txt").read_text().split()
    assert list(importance) == order
    np.testing.assert_allclose(
        np.array(list(importance.values())),
        np.load(reference_dir / "golden_tinylight_taylor_importance.npy"),
        rtol=1e-4,
        atol=0,
    )
    ranks = ranks_from_importance(importance, model.config.num_layers, r=16, compress=0.6)
    assert ranks == golden_ranks(reference_dir)
    assert sum(v == 8 for v in ranks.values()) == 8


def test_allocate_ranks_end_to_end_leaves_the_model_untouched(reference_dir: Path) -> None:
    model = taylor_model(reference_dir, p=0.2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ranks = allocate_ranks(model, [golden_batch(reference_dir)], r=16, r_low=None, compress=0.6)
    assert ranks == golden_ranks(reference_dir)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # BN running stats restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    ps = {n: layer.p for n, layer in lora_layers(model).items()}
    assert ps.pop("classifier.0") == 0.0 and set(ps.values()) == {0.2}


def test_fisher_variant_and_batch_averaging(reference_dir: Path) -> None:
    x, y = golden_batch(reference_dir)
    model = taylor_model(reference_dir)
    one = parameter_importance(model, [(x[:1], y[:1])], variant="fisher")
    other = parameter_importance(model, [(x[1:], y[1:])], variant="fisher")
    both = parameter_importance(model, [(x[:1], y[:1]), (x[1:], y[1:])], variant="fisher")
    values = np.array(list(both.values()))
    assert np.all(np.isfinite(values)) and np.all(values > 0)
    for name in both:  # averaged over batches
        assert both[name] == pytest.approx((one[name] + other[name]) / 2, rel=1e-6)

    # by hand for classifier.0: mean(((dL/dB) A)^2), with and without W (taylor)
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[:1]), y[:1])
    layer = model.get_submodule("classifier.0")
    (grad_b,) = torch.autograd.grad(loss, [layer.lora_B])
    g_w = grad_b @ layer.lora_A.detach()
    assert one["classifier.0"] == pytest.approx(float((g_w**2).mean()), rel=1e-4)
    taylor = parameter_importance(model, [(x[:1], y[:1])], variant="taylor")
    assert taylor["classifier.0"] == pytest.approx(float(((layer.weight.detach() * g_w) ** 2).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="variant"):
        parameter_importance(model, [(x, y)], variant="hessian")  # type: ignore[arg-type]  # an invalid variant on purpose


def test_rank_rule_hand_cases() -> None:
    assert [default_r_low(r) for r in (4, 6, 8, 16, 32)] == [2, 2, 4, 8, 16]
    # ties share the average rank: a, b -> 1.5 (<= 2: low), c -> 3, d -> 4
    assert ranks_from_importance({"a": 1.0, "b": 1.0, "c": 2.0, "d": 3.0}, 5, 16, 0.4) == {
        "a": 8,
        "b": 8,
        "c": 16,
        "d": 16,
    }
    # a tie straddling the threshold: b, c -> 2.5 > floor(5 * 0.4) = 2, so both keep r
    assert ranks_from_importance({"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0}, 5, 16, 0.4) == {
        "a": 8,
        "b": 16,
        "c": 16,
        "d": 16,
    }
    # c = 0 keeps everything, an explicit r_low is honoured, order follows the input
    assert ranks_from_importance({"x": 3.0, "y": 1.0}, 3, 4, 0.0) == {"x": 4, "y": 4}
    assert list(ranks_from_importance({"x": 3.0, "y": 1.0}, 3, 16, 0.5, r_low=4).items()) == [("x", 16), ("y", 4)]
    with pytest.raises(ValueError):
        ranks_from_importance({"x": 1.0}, 3, 16, 1.5)
