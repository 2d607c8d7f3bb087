"""The training steps: what reaches the transformer, BatchNorm statistics, losses, FixMatch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ml.model.backbone import backbone_config
from ml.model.lora import LoRAConfig, seed_deactivation
from ml.train.augment import cutmix, make_generator, weak_augment
from ml.train.build import build_model
from ml.train.steps import fixmatch_step, pseudo_labels, semi_supervised_step, supervised_step

N_CLASSES = 3
BATCH = 4


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def cessl_model() -> torch.nn.Module:
    return build_model(None, backbone_config("tinylight", N_CLASSES), "cessl", LoRAConfig(p=0.2), seed=0)


@pytest.fixture(scope="module")
def batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 12, 1, 6144, generator=g)
    y = (torch.rand(BATCH, N_CLASSES, generator=g) < 0.5).float()
    u = torch.randn(BATCH, 12, 1, 6144, generator=g)
    return x, y, u


def _batch_sizes_seen(model: torch.nn.Module, run) -> dict[str, int]:
    """Batch sizes entering the encoder, the transformer and the classifier during ``run()``."""
    seen: dict[str, int] = {}

    def recorder(key: str):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(key, args[0].shape[0])

        return hook

    hooks = [
        module.register_forward_pre_hook(recorder(key))
        for key, module in (
            ("encoder", model.encoder_layers[0]),
            ("transformer", model.transformer_layers[0]),
            ("classifier", model.classifier[0]),
        )
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_unlabelled_half_goes_through_encoder_but_not_transformer(cessl_model, batches) -> None:
    model = copy.deepcopy(cessl_model).train()
    x, y, u = batches
    out: dict[str, object] = {}
    seen = _batch_sizes_seen(model, lambda: out.update(r=semi_supervised_step(model, x, y, u, make_generator(0))))
    assert seen == {"encoder": 2 * BATCH, "transformer": BATCH, "classifier": BATCH}
    assert out["r"].loss.ndim == 0


def test_loss_is_bce_on_the_labelled_half_only(cessl_model, batches) -> None:
    x, y, u = batches
    model_a, model_b = copy.deepcopy(cessl_model).train(), copy.deepcopy(cessl_model).train()
    seed_deactivation(model_a, 5)
    seed_deactivation(model_b, 5)
    result = semi_supervised_step(model_a, x, y, u, make_generator(9))
    g = make_generator(9)  # replay the same random draws by hand
    xm, ym = cutmix(x, y, g)
    uw = weak_augment(u, g)
    logits = model_b.head(model_b.encode(torch.cat([xm, uw]))[:BATCH])
    expected = F.binary_cross_entropy_with_logits(logits, ym)
    assert torch.equal(result.loss, expected)


def test_batchnorm_running_stats_see_the_unlabelled_data(cessl_model, batches) -> None:
    x, y, u = batches
    stats = []
    for unlabelled in (u, 4.0 * u + 3.0):
        model = copy.deepcopy(cessl_model).train()
        seed_deactivation(model, 1)
        semi_supervised_step(model, x, y, unlabelled, make_generator(0))
        bn = model.encoder_layers[0].bn1
        stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    assert not torch.allclose(stats[0][0], stats[1][0])
    assert not torch.allclose(stats[0][1], stats[1][1])
    before = cessl_model.encoder_layers[0].bn1.running_mean
    assert not torch.allclose(stats[0][0], before), "the step updated the running statistics"


def test_gradients_reach_only_the_trainable_parameters(cessl_model, batches) -> None:
    model = copy.deepcopy(cessl_model).train()
    seed_deactivation(model, 0)
    x, y, u = batches
    semi_supervised_step(model, x, y, u, make_generator(0)).loss.backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    assert model.classifier[1].weight.grad is not None
    assert model.classifier[0].lora_B.grad.abs().sum() > 0  # classifier.0 is never deactivated


def test_supervised_step(cessl_model, batches) -> None:
    model = copy.deepcopy(cessl_model).train()
    x, y, _ = batches
    seen = _batch_sizes_seen(model, lambda: supervised_step(model, x, y, make_generator(0)).loss.backward())
    assert seen == {"encoder": BATCH, "transformer": BATCH, "classifier": BATCH}


def test_pseudo_labels_are_per_class_confidence_thresholded() -> None:
    probs = torch.tensor([[0.99, 0.5, 0.01, 0.95, 0.96]])
    targets, mask = pseudo_labels(probs, tau=0.95)
    assert targets.tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0]]


def test_fixmatch_step_one_pass_over_labelled_weak_and_strong(batches) -> None:
    model = build_model(None, backbone_config("tinylight", N_CLASSES), "fixmatch", LoRAConfig(), seed=0).train()
    x, y, u = batches
    out: dict[str, object] = {}
    seen = _batch_sizes_seen(model, lambda: out.update(r=fixmatch_step(model, x, y, u, make_generator(0))))
    assert seen == {"encoder": 3 * BATCH, "transformer": 3 * BATCH, "classifier": 3 * BATCH}
    result = out["r"]
    assert set(result.logs) == {"loss", "loss_x", "loss_u", "mask_rate"}
    # A freshly initialised head is nowhere near 95% confident: nothing is pseudo-labelled.
    assert result.logs["mask_rate"] == 0.0
    assert torch.equal(result.loss, result.logs["loss_x"] + result.logs["loss_u"])
    # With tau = 0.5 every (record, class) pair is confident and L_u is a plain BCE.
    loose = fixmatch_step(model, x, y, u, make_generator(0), tau=0.5)
    assert loose.logs["mask_rate"] == 1.0 and loose.logs["loss_u"] > 0
