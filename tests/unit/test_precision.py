"""Mixed precision: resolution, bf16 training on the CPU, the LoRA-conv gradients, the option's
way through the pipeline and the adapter, and (CUDA) bf16-vs-fp32 accuracy parity."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import N_CLASSES, tiny_config, tiny_model, tiny_splits

from ml.errors import ParameterError
from ml.eval.evaluate import predict_with_labels
from ml.eval.metrics import binarize, macro_auroc, thresholded_metrics
from ml.model.adapter import ADAPTER_CONFIG, AdapterMeta, load_adapter, save_adapter, state_dict_identity
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, LoRAConv1D, LoRAConv2d, LoRALinear, _LoRAConvFunction, mark_trainable, merge_lora
from ml.train.augment import AugmentRNG, cutmix, make_augment_rng, make_generator, weak_augment
from ml.train.build import build_model
from ml.train.callbacks import StepProfiler
from ml.train.config import TrainConfig
from ml.train.precision import FP32, Precision, resolve_precision
from ml.train.recipe import finetune
from ml.train.steps import semi_supervised_step
from ml.train.synthetic import SyntheticTaskConfig, make_splits
from ml.train.trainer import CUDA_LOG_EVERY, BaseCallback, LossWindow, build_optimizer, fit, log_interval

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data():
    return tiny_splits({"train": 16, "valid": 8, "unlabelled": 8})


def _config(**overrides) -> TrainConfig:
    return tiny_config({"max_steps": 4}, **overrides)


_model = tiny_model


# --- resolution ------------------------------------------------------------------------------
def test_auto_is_fp32_on_the_cpu_and_bf16_is_honoured() -> None:
    assert resolve_precision("auto", "cpu") == Precision("fp32", "cpu")
    assert resolve_precision("fp32", "cpu") == FP32 and not FP32.mixed and FP32.dtype == torch.float32
    bf16 = resolve_precision("bf16", "cpu")
    assert bf16.mixed and bf16.dtype == torch.bfloat16 and not bf16.tf32  # TF32 is a CUDA switch
    with pytest.raises(ParameterError, match="precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_train_config_resolves_its_precision_once() -> None:
    config = _config(precision="auto")
    resolved = config.resolve_precision()
    assert resolved.precision == "fp32" and resolved.resolve_precision() is resolved
    with pytest.raises(ValueError, match="precision 'half'"):
        _config(precision="half")
    with pytest.raises(ValueError, match="log_every"):
        _config(log_every=-1)
    # fp32 keys and resumes checkpoints as before the option existed; bf16 is part of the key
    assert "precision" not in _config().schedule_fingerprint()
    assert _config(precision="bf16").schedule_fingerprint()["precision"] == "bf16"


# --- bf16 training on the CPU ------------------------------------------------------------------
def test_bf16_steps_keep_fp32_master_weights_and_optimizer_state(data) -> None:
    config = _config(precision="bf16")
    model = _model()
    optimizer, _ = build_optimizer(model, config)
    precision = config.resolved_precision()
    generator = make_generator(0)
    x, y = data["train"].tensors[0][:4], data["train"].tensors[1][:4]  # (4, 12, 1, T)
    x_u = data["unlabelled"].tensors[0][:4]
    losses = []
    for _ in range(3):
        with precision.autocast():
            out = semi_supervised_step(model, x, y, x_u, generator)
        assert out.loss.dtype == torch.float32  # computed from float32 logits
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in trained if p.grad is not None]  # a switched-off layer has none this step
    assert grads and all(g.dtype == torch.float32 for g in grads)
    states = [optimizer.state[p] for p in trained]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


@pytest.mark.parametrize("method", ["cessl", "fixmatch"])
def test_bf16_fit_end_to_end_is_finite_and_reproducible(data, method: str, device: torch.device) -> None:
    """On the CPU and (marked cuda) on a GPU: bf16 is reproducible run to run on one device."""
    config = _config(
        method=method, precision="bf16", device=str(device), max_steps=1, val_every=1
    )  # bf16: emulated on a CPU
    runs = []
    for _ in range(2):
        model = _model(method)
        result = fit(model, data["train"], data["unlabelled"], data["valid"], config)
        runs.append((model, result))
    (a, ra), (b, rb) = runs
    assert ra.precision == "bf16" and ra.steps == 1
    assert all(math.isfinite(r["train_loss"]) for r in ra.history if "train_loss" in r)
    assert {p.dtype for p in a.parameters()} == {torch.float32}
    for key, value in a.state_dict().items():  # same seed, same device: the same model
        assert torch.equal(value, b.state_dict()[key]), key
    assert ra.history == rb.history


def test_fp32_fit_reports_fp32_and_logging_interval_does_not_change_training(data) -> None:
    class Steps(BaseCallback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, float]] = []

        def on_step(self, step, metrics) -> None:
            self.seen.append((step, metrics["loss"]))

    every, windowed = Steps(), Steps()
    a, b = _model(), _model()
    config = _config(max_steps=6, precision="auto")
    ra = fit(a, data["train"], data["unlabelled"], data["valid"], config, [every])
    rb = fit(b, data["train"], data["unlabelled"], data["valid"], dataclasses.replace(config, log_every=4), [windowed])
    assert ra.precision == rb.precision == "fp32"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert ra.history == rb.history
    # every step on the CPU (log_every 0); with 4: at the validations (2, 4, 6) and at step 4
    assert [s for s, _ in every.seen] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in windowed.seen] == [2, 4, 6]
    per_step = dict(every.seen)
    assert windowed.seen[0][1] == pytest.approx((per_step[1] + per_step[2]) / 2, rel=1e-12)
    assert windowed.seen[2][1] == pytest.approx((per_step[5] + per_step[6]) / 2, rel=1e-12)


def test_losses_are_read_back_every_step_on_the_cpu_and_in_windows_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (log_interval(_config(), cpu), log_interval(_config(), cuda)) == (1, CUDA_LOG_EVERY)
    assert log_interval(_config(log_every=3), cpu) == log_interval(_config(log_every=3), cuda) == 3


def test_loss_window_means_and_resets() -> None:
    window = LossWindow()
    assert window.read() == {}
    for v in (1.0, 2.0, 4.5):
        window.add({"loss": torch.tensor(v), "aux": torch.tensor(2 * v)})
    assert window.read() == {"loss": 2.5, "aux": 5.0}
    window.add({"loss": torch.tensor(0.25)})
    assert window.read() == {"loss": 0.25}


def test_step_profiler_divides_a_window_among_its_steps() -> None:
    import time

    profiler = StepProfiler("cpu", warmup=1)
    profiler.on_validation(0, {})
    profiler.on_step(1, {})  # warm-up
    time.sleep(0.04)
    profiler.on_step(5, {})  # one read-back for steps 2..5
    assert profiler.steps == 4
    assert 5 <= profiler.ms_per_step < 60


# --- the augmentation's host stream --------------------------------------------------------------
def test_a_cpu_run_draws_from_one_plain_generator_and_a_pair_keeps_scalars_on_the_host() -> None:
    assert isinstance(make_augment_rng(1, 2, "cpu"), torch.Generator)
    x = torch.randn(6, 12, 1, 64, generator=torch.Generator().manual_seed(0))
    y = torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    pair = AugmentRNG(make_generator(7), make_generator(8))
    a = cutmix(x, y, pair), weak_augment(x, pair)
    state = pair.get_state()
    b = cutmix(x, y, pair)
    pair.set_state(state)
    assert all(torch.equal(u, v) for u, v in zip(cutmix(x, y, pair), b, strict=True))  # resumable
    pair2 = AugmentRNG(make_generator(7), make_generator(8))
    again = (*cutmix(x, y, pair2), weak_augment(x, pair2))
    assert all(torch.equal(u, v) for u, v in zip(again, (*a[0], a[1]), strict=True))


# --- the LoRA convolution ---------------------------------------------------------------------------
def _conv_layer(dtype: torch.dtype = torch.float32, r: int = 3) -> LoRAConv2d:
    torch.manual_seed(0)
    layer = LoRAConv2d(4, 6, (1, 5), stride=(1, 2), padding=(0, 2), r=r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    mark_trainable(layer, "lora")
    return layer.to(dtype).train()


@pytest.mark.parametrize("s", [1.0, 0.8])  # the fused (exact) and the separate kernel
def test_lora_conv_gradcheck_in_float64(s: float) -> None:
    layer = _conv_layer(torch.float64)
    x = torch.randn(2, 4, 1, 16, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    bias = layer.conv.bias.detach().clone().requires_grad_(True)

    def f(x, bias, a, b):
        return _LoRAConvFunction.apply(x, layer.weight, bias, a, b, s, layer)

    assert torch.autograd.gradcheck(f, (x, bias, a, b), eps=1e-6, atol=1e-5)


def test_lora_conv_bf16_autocast_is_close_to_fp32_and_returns_fp32_gradients() -> None:
    x = torch.randn(4, 4, 1, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("fp32", "bf16"):
        layer = _conv_layer()
        with resolve_precision(name, "cpu").autocast():
            out = layer(x.requires_grad_(True))
        loss = (out.float() ** 2).mean()
        x.grad = None
        loss.backward()
        results[name] = (out, x.grad.clone(), layer.lora_A.grad, layer.lora_B.grad, layer.conv.bias.grad)
    assert results["bf16"][0].dtype == torch.bfloat16 and results["fp32"][0].dtype == torch.float32
    for ref, got in zip(results["fp32"], results["bf16"], strict=True):
        assert got.dtype == torch.float32 or got is results["bf16"][0]
        scale = ref.abs().max().item()
        assert (got.float() - ref).abs().max().item() <= 0.03 * scale


@pytest.mark.parametrize("factor", [1.0, 0.8])
def test_fused_update_is_bit_identical_in_fp32_where_used(factor: float) -> None:
    torch.manual_seed(0)
    layers = [LoRALinear(16, 12, r=4), LoRAConv1D(16, 48, r=4), _conv_layer()]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
        separate = layer.weight + layer.low_rank_delta() * factor
        assert torch.equal(layer.updated_weight(factor), separate), type(layer).__name__


# --- predictor and adapter ------------------------------------------------------------------------
def test_adapter_json_carries_the_precision_and_old_adapters_load_as_fp32(tmp_path: Path) -> None:
    config = backbone_config("tinylight", N_CLASSES)
    backbone = ECGTransformer(config).state_dict()
    model = build_model(backbone, config, "cessl", LoRAConfig(), seed=0)
    meta = AdapterMeta(backbone_id=state_dict_identity(backbone), classes=["a", "b", "c"], precision="bf16")
    save_adapter(model, tmp_path, meta)
    stored = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert stored["precision"] == "bf16"
    assert load_adapter(tmp_path, backbone)[1].precision == "bf16"
    del stored["precision"]  # an adapter written before the option existed
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(stored))
    assert load_adapter(tmp_path, backbone)[1].precision == "fp32"


def test_predictor_bf16_is_close_to_fp32() -> None:
    from ml.eval.predictor import Predictor

    model = build_model(None, backbone_config("tinylight", N_CLASSES), "cessl", LoRAConfig(), seed=0)
    signals = np.random.default_rng(0).standard_normal((2, 12, 6144)).astype(np.float32)
    args = dict(model=model, classes=["a", "b", "c"], thresholds=np.full(3, 0.5), backbone_id="x")
    fp32 = Predictor(**args).predict_proba(signals)
    bf16 = Predictor(**args, precision="bf16").predict_proba(signals)
    assert fp32.dtype == bf16.dtype == np.float64
    assert np.abs(fp32 - bf16).max() < 0.02


def test_rank_allocation_scores_in_bf16(data) -> None:
    from ml.model.rank_allocation import RankAllocationConfig
    from ml.train.recipe import allocate_ranks_for

    args = ("cessl", None, backbone_config("tinylight", N_CLASSES), LoRAConfig(), RankAllocationConfig())
    fp32 = allocate_ranks_for(*args, data["train"], 8, 1)
    bf16 = allocate_ranks_for(*args, data["train"], 8, 1, precision="bf16")
    assert fp32.rank_map.keys() == bf16.rank_map.keys()
    assert all(math.isfinite(v) and v >= 0 for v in bf16.importance.values())


# --- the pipeline parameter ----------------------------------------------------------------------
def test_precision_parameter_validates_and_reaches_the_train_config() -> None:
    from pipeline.core.params import DEFAULTS, PipelineParams

    assert DEFAULTS.precision == "fp32" and "precision" in DEFAULTS.logged()
    assert DEFAULTS.replace(precision="bf16").train_config().precision == "bf16"
    assert PipelineParams.from_mapping({"precision": "auto"}).train_config().precision == "auto"
    with pytest.raises(ParameterError, match="--precision"):
        DEFAULTS.replace(precision="fp16")


def test_precision_is_a_compiled_pipeline_parameter_passed_to_finetune(tmp_path: Path) -> None:
    import yaml

    from pipeline.dags.spec import compile_spec, finetune_spec

    spec = next(yaml.safe_load_all(compile_spec(finetune_spec(), tmp_path / "pipeline.yaml").read_text()))
    root = spec["root"]
    assert root["inputDefinitions"]["parameters"]["precision"]["defaultValue"] == "fp32"
    task = root["dag"]["tasks"]["finetune"]
    assert task["inputs"]["parameters"]["precision"]["componentInputParameter"] == "precision"


# --- CUDA: accuracy parity of bf16 and fp32 fine-tunes ------------------------------------------------
PARITY_SEEDS = (0, 1, 2)


def _parity_run(
    splits, seed: int, precision: str, device: str = "cuda", steps: int = 150, batch: int = 32
) -> tuple[float, float, np.ndarray]:
    """(macro AUROC, macro F-beta2, merged-model test predictions) of one fine-tune."""
    train = TrainConfig(
        method="cessl",
        max_steps=steps,
        batch_size=batch,
        val_every=max(1, steps // 3),
        seed=seed,
        device=device,
        progress=False,
        precision=precision,
    )
    config = backbone_config("tinylight", N_CLASSES)
    outcome = finetune(None, config, LoRAConfig(), {}, train, splits["train"], splits["unlabelled"], splits["valid"])
    assert outcome.result.precision == precision
    probs, labels = predict_with_labels(outcome.model, splits["test"], 64, torch.device(device))
    f_beta = thresholded_metrics(labels, binarize(probs, outcome.thresholds))["macro_f_beta"]
    merge_lora(outcome.model)
    merged, _ = predict_with_labels(outcome.model, splits["test"], 64, torch.device(device))
    return macro_auroc(labels, probs), f_beta, binarize(merged, outcome.thresholds)


def test_the_parity_harness_runs_on_the_cpu(data) -> None:
    """The CUDA parity test's fine-tune-and-score path, a few steps on the CPU in bf16."""
    _, splits = make_splits(
        {"train": 12, "valid": 8, "unlabelled": 8, "test": 16},
        SyntheticTaskConfig(num_classes=N_CLASSES, positive_rate=0.5),
        seed=5,
    )
    auroc, f_beta, predictions = _parity_run(splits, 0, "bf16", device="cpu", steps=2, batch=4)
    assert 0.0 <= auroc <= 1.0 and 0.0 <= f_beta <= 1.0
    assert predictions.shape == (16, N_CLASSES) and set(np.unique(predictions)) <= {0, 1}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="the GPU has no bfloat16"
)
def test_bf16_and_fp32_fine_tunes_reach_the_same_accuracy() -> None:
    """The issue's parity: within 0.01 macro AUROC and 0.02 macro F-beta2 (per seed, 3 seeds),
    merged adapters giving the same predictions on >= 99% of the test labels."""
    _, splits = make_splits(
        {"train": 256, "valid": 128, "unlabelled": 256, "test": 256},
        SyntheticTaskConfig(num_classes=N_CLASSES, positive_rate=0.3),
        seed=11,
    )
    rows = []
    for seed in PARITY_SEEDS:
        auroc32, f32, pred32 = _parity_run(splits, seed, "fp32")
        auroc16, f16, pred16 = _parity_run(splits, seed, "bf16")
        rows.append((auroc16 - auroc32, f16 - f32, float((pred16 == pred32).mean()), auroc32, f32))
    d_auroc, d_f, agree = (np.array([r[i] for r in rows]) for i in range(3))
    print(
        f"bf16 - fp32 over seeds {PARITY_SEEDS}: macro AUROC {d_auroc.mean():+.4f} (spread {d_auroc.std():.4f}), "
        f"macro F-beta2 {d_f.mean():+.4f} (spread {d_f.std():.4f}), merged agreement {agree.min():.4f}; "
        f"fp32 AUROC {[round(r[3], 4) for r in rows]}, F-beta2 {[round(r[4], 4) for r in rows]}"
    )
    assert np.abs(d_auroc).max() <= 0.01
    assert np.abs(d_f).max() <= 0.02
    assert agree.min() >= 0.99
