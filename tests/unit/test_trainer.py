"""The fine-tuning loop: schedule, loaders, determinism, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from train_support import N_CLASSES, tiny_config, tiny_model, tiny_splits

from ml.eval.evaluate import predict_with_labels
from ml.eval.metrics import macro_average_precision
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig
from ml.train import trainer
from ml.train.build import build_model
from ml.train.checkpoint import load_checkpoint
from ml.train.config import TrainConfig, batch_size_for_label_ratio, steps_for_epochs
from ml.train.loaders import BatchIterator, EpochStream, StreamPosition, fetch
from ml.train.trainer import (
    CHECKPOINT_NAME,
    BaseCallback,
    EarlyStopping,
    TrainResult,
    fit,
    linear_warmup_decay,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data():
    return tiny_splits({"train": 24, "valid": 12, "unlabelled": 16})


_model = tiny_model


def _config(tmp: Path | None, **overrides) -> TrainConfig:
    base = dict(
        max_steps=6,
        patience=10,
        checkpoint_dir=str(tmp) if tmp else None,
        log_every=1,  # every step's loss to the callbacks on CUDA too (the default reads back every 10 there)
    )
    return tiny_config(base, **overrides)


def _fit(data, config: TrainConfig, callbacks=()) -> tuple[torch.nn.Module, TrainResult]:
    model = _model(config.method)
    result = fit(model, data["train"], data["unlabelled"], data["valid"], config, callbacks)
    return model, result


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class _Recorder(BaseCallback):
    def __init__(self, fail_at: int | None = None) -> None:
        self.steps: list[int] = []
        self.validations: list[int] = []
        self.ended: list[TrainResult] = []
        self.fail_at = fail_at

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        assert {"loss", "lr"} <= set(metrics)
        self.steps.append(step)
        if step == self.fail_at:
            raise KeyboardInterrupt(f"simulated kill at step {step}")

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        assert {"macro_map", "macro_auroc", "loss"} <= set(metrics)
        assert ({"train_loss", "lr"} <= set(metrics)) == (step > 0), "no training numbers before any update"
        self.validations.append(step)

    def on_end(self, result: TrainResult) -> None:
        self.ended.append(result)


# --- pure pieces ----------------------------------------------------------------------------
def test_linear_warmup_then_linear_decay() -> None:
    factor = linear_warmup_decay(warmup_steps=10, total_steps=110)
    assert factor(0) == 0.0 and factor(5) == 0.5 and factor(10) == 1.0
    assert factor(60) == pytest.approx(0.5) and factor(110) == 0.0
    assert linear_warmup_decay(0, 10)(0) == 1.0


def test_config_helpers_and_validation() -> None:
    assert batch_size_for_label_ratio(0.01) == 16 and batch_size_for_label_ratio(0.05) == 64
    assert steps_for_epochs(130, 64) == 2 * 200, "the incomplete batch is skipped"
    assert steps_for_epochs(128, 64, epochs=3) == 6 and steps_for_epochs(10, 64, epochs=5) == 5  # at least 1 batch
    assert TrainConfig(max_steps=7).resolve_steps(130).max_steps == 7  # max_steps mode
    resolved = TrainConfig(epochs=200).resolve_steps(130)
    assert (resolved.max_steps, resolved.epochs) == (400, 200) and resolved.resolve_steps(130) == resolved
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    assert TrainConfig(max_steps=1000).warmup_steps == 10
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="mixmatch")  # type: ignore[arg-type]  # an unknown method on purpose


def test_epoch_stream_reshuffles_every_epoch_and_resumes() -> None:
    stream = EpochStream(10, 4, seed=0)
    drawn = [i for _ in range(5) for i in stream.next_indices()]  # 20 indices = 2 epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:], "a new permutation every epoch"
    assert stream.position == StreamPosition(2, 0)
    again = EpochStream(10, 4, seed=0, position=StreamPosition(0, 8))
    assert again.next_indices() == drawn[8:12]  # a batch across the epoch boundary


def test_batch_iterator_matches_fetch(data) -> None:
    it = BatchIterator(data["train"], 5, seed=0, device=torch.device("cpu"))
    x, y = next(it)
    indices = EpochStream(len(data["train"]), 5, seed=0).next_indices()
    fx, fy = fetch(data["train"], indices)
    assert torch.equal(x, fx) and torch.equal(y, fy)
    assert it.position == StreamPosition(0, 5)


def test_worker_processes_give_the_same_batches(data) -> None:
    inline = BatchIterator(data["train"], 5, seed=0, device=torch.device("cpu"))
    workers = BatchIterator(data["train"], 5, seed=0, device=torch.device("cpu"), num_workers=1)
    for _ in range(6):  # crosses an epoch boundary (24 records)
        (xa, ya), (xb, yb) = next(inline), next(workers)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert workers.position == inline.position == StreamPosition(1, 6)


def test_early_stopping_counts_validations_without_improvement() -> None:
    early = EarlyStopping(patience=2)
    assert early.update(0, 0.5, {})
    assert not early.update(1, 0.4, {}) and early.bad_validations == 1
    assert early.update(2, 0.5, {}) and early.best_step == 2, "a tie is an improvement (the reference's >=)"
    assert early.bad_validations == 0
    assert early.update(3, 0.6, {})
    assert not early.update(4, float("nan"), {})
    assert not early.update(5, 0.1, {}) and early.stopped
    assert early.best_step == 3
    first_nan = EarlyStopping(patience=2)
    assert first_nan.update(0, float("nan"), {}) and first_nan.update(1, 0.0, {})


# --- the loop ------------------------------------------------------------------------------
def test_same_seed_same_weights(data, device: torch.device) -> None:
    a, ra = _fit(data, _config(None, device=device.type))
    b, rb = _fit(data, _config(None, device=device.type))
    _assert_same_state(a, b)
    assert ra.history == rb.history
    c, _ = _fit(data, _config(None, seed=2, device=device.type))
    assert not torch.equal(a.classifier[1].weight, c.classifier[1].weight)


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(data, tmp_path: Path, device: torch.device) -> None:
    reference, ref_result = _fit(
        data, _config(tmp_path / "uninterrupted", max_steps=8, val_every=3, device=device.type)
    )

    config = _config(tmp_path / "killed", max_steps=8, val_every=3, device=device.type)
    killer = _Recorder(fail_at=5)  # checkpoint at step 3, killed during step 5
    with pytest.raises(KeyboardInterrupt):
        _fit(data, config, [killer])
    assert load_checkpoint(tmp_path / "killed" / CHECKPOINT_NAME)["step"] == 3

    recorder = _Recorder()
    resumed, result = _fit(data, config, [recorder])  # a fresh process would do exactly this
    assert result.resumed_from == 3
    assert recorder.steps == [4, 5, 6, 7, 8] and recorder.validations == [6, 8]
    assert [h["step"] for h in result.history] == [0.0, 3.0, 6.0, 8.0]
    _assert_same_state(resumed, reference)
    assert result.history == ref_result.history
    assert (result.best_step, result.best_score) == (ref_result.best_step, ref_result.best_score)


def test_checkpoint_contents_load_with_weights_only(data, tmp_path: Path) -> None:
    _fit(data, _config(tmp_path, max_steps=2))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "loaders", "early_stopping", "best_state", "history"} <= set(
        state
    )
    assert state["step"] == 2 and state["loaders"]["labelled"] == {"epoch": 0, "offset": 8}
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME], "no temporary files left"


def test_finished_run_is_not_trained_again_and_config_changes_are_refused(data, tmp_path: Path) -> None:
    model, _ = _fit(data, _config(tmp_path, max_steps=2))
    recorder = _Recorder()
    again, second = _fit(data, _config(tmp_path, max_steps=2), [recorder])
    assert recorder.steps == [] and second.resumed_from == 2
    _assert_same_state(model, again)
    with pytest.raises(ValueError, match="max_steps"):
        _fit(data, _config(tmp_path, max_steps=4))


def test_callbacks_best_state_and_global_rng(data) -> None:
    recorder = _Recorder()
    rng_before = torch.get_rng_state()
    model, result = _fit(data, _config(None, max_steps=5, val_every=2), [recorder])
    assert torch.equal(torch.get_rng_state(), rng_before), "fit leaves the caller's RNG alone"
    assert recorder.steps == [1, 2, 3, 4, 5]
    assert recorder.validations == [0, 2, 4, 5]  # at the start, every val_every steps and at the end
    assert recorder.ended == [result]
    assert [h["step"] for h in result.history] == [0.0, 2.0, 4.0, 5.0]
    # The returned model holds the best validation state.
    probs, labels = predict_with_labels(model, data["valid"])
    assert macro_average_precision(labels, probs) == pytest.approx(result.best_score, abs=1e-9)
    assert result.best_score == max(h["macro_map"] for h in result.history)


def _script_validation(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """Make every validation return the next of ``scores`` as its macro mAP."""
    remaining = iter(scores)

    def validate(self: trainer._Run) -> dict[str, float]:
        return {"macro_map": next(remaining), "macro_auroc": 0.5, "loss": 1.0}

    monkeypatch.setattr(trainer._Run, "validate", validate)


def test_validation_at_step_0_starts_the_history(data) -> None:
    recorder = _Recorder()
    _, result = _fit(data, _config(None, max_steps=2), [recorder])
    assert recorder.validations == [0, 2] and [h["step"] for h in result.history] == [0.0, 2.0]
    probs, labels = predict_with_labels(_model(), data["valid"])  # the untouched model
    assert result.history[0]["macro_map"] == pytest.approx(macro_average_precision(labels, probs), abs=1e-12)
    assert "train_loss" not in result.history[0] and "lr" not in result.history[0]

    recorder = _Recorder()
    _, result = _fit(data, _config(None, max_steps=2, validate_at_start=False), [recorder])
    assert recorder.validations == [2] and [h["step"] for h in result.history] == [2.0]


def test_a_run_that_only_gets_worse_keeps_its_initial_state(data, monkeypatch: pytest.MonkeyPatch) -> None:
    _script_validation(monkeypatch, [0.9, 0.5, 0.4])
    model, result = _fit(data, _config(None, max_steps=4))
    assert (result.best_step, result.best_score, result.steps) == (0, 0.9, 4)
    _assert_same_state(model, _model())


def test_a_tie_moves_the_best_step_to_the_later_validation(data, monkeypatch: pytest.MonkeyPatch) -> None:
    _script_validation(monkeypatch, [0.5, 0.5, 0.5])
    tied, result = _fit(data, _config(None, max_steps=4))
    assert (result.best_step, result.best_score) == (4, 0.5)
    _script_validation(monkeypatch, [0.1, 0.2, 0.3])
    improving, _ = _fit(data, _config(None, max_steps=4))
    _assert_same_state(tied, improving)  # both end with the last state


def test_early_stopping_counts_from_the_step_0_validation(data, monkeypatch: pytest.MonkeyPatch) -> None:
    _script_validation(monkeypatch, [0.9, 0.5, 0.4, 0.3])
    _, result = _fit(data, _config(None, max_steps=8, patience=2))
    assert result.stopped_early and result.steps == 4 and result.best_step == 0


def test_resume_after_the_step_0_checkpoint_neither_repeats_nor_loses_it(data, tmp_path: Path) -> None:
    reference, ref_result = _fit(data, _config(tmp_path / "uninterrupted", max_steps=4))
    config = _config(tmp_path / "killed", max_steps=4)
    killer = _Recorder(fail_at=1)
    with pytest.raises(KeyboardInterrupt):
        _fit(data, config, [killer])
    state = load_checkpoint(tmp_path / "killed" / CHECKPOINT_NAME)
    assert killer.validations == [0] and state["step"] == 0 and len(state["history"]) == 1

    recorder = _Recorder()
    resumed, result = _fit(data, config, [recorder])
    assert result.resumed_from == 0 and recorder.steps == [1, 2, 3, 4] and recorder.validations == [2, 4]
    assert result.history == ref_result.history and [h["step"] for h in result.history] == [0.0, 2.0, 4.0]
    _assert_same_state(resumed, reference)


def test_epochs_mode_counts_complete_labelled_batches(data) -> None:
    recorder = _Recorder()
    _, result = _fit(data, _config(None, epochs=2, batch_size=5, max_steps=1), [recorder])
    assert result.steps == 2 * (24 // 5) and recorder.steps == list(range(1, 9))
    assert recorder.validations == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("method", ["lora", "full", "fixmatch"])
def test_baseline_methods_run(data, method: str, device: torch.device) -> None:
    model, result = _fit(data, _config(None, method=method, max_steps=2, val_every=2, device=device.type))
    assert result.steps == 2 and [h["step"] for h in result.history] == [0.0, 2.0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "lora":
        assert all("lora_" in n or n.endswith("bias") or n == "classifier.1.weight" for n in trainable)
        assert all(layer.p == 0.0 for layer in model.modules() if hasattr(layer, "lora_A"))
    else:
        assert trainable == {n for n, _ in model.named_parameters()}


def test_semi_supervised_methods_need_unlabelled_data(data) -> None:
    with pytest.raises(ValueError, match="unlabelled"):
        fit(_model(), data["train"], None, data["valid"], _config(None))


def test_config_roundtrip() -> None:
    config = _config(None)
    assert TrainConfig(**config.to_dict()) == config
    assert dataclasses.replace(config, seed=5).schedule_fingerprint()["seed"] == 5
    fingerprint = dataclasses.replace(config, epochs=3, validate_at_start=False).schedule_fingerprint()
    assert (fingerprint["epochs"], fingerprint["validate_at_start"]) == (3, False)


def test_build_model_loads_the_backbone_but_not_its_head() -> None:
    pretrained = ECGTransformer(backbone_config("tinylight", 6)).state_dict()  # a 6-class pre-training head
    model = build_model(
        pretrained,
        backbone_config("tinylight", N_CLASSES),
        "cessl",
        LoRAConfig(p=0.2),
        rank_map={"encoder_layers.0.conv1": 8},
    )
    own = model.state_dict()
    for key, value in pretrained.items():
        if not key.startswith("classifier.1."):
            assert torch.equal(own[key], value), key
    assert own["classifier.1.weight"].shape == (N_CLASSES, 64)
    assert model.encoder_layers[0].conv1.r == 8 and model.encoder_layers[0].conv2.r == 16
    assert model.encoder_layers[0].conv1.p == 0.2 and model.classifier[0].p == 0.0
    assert not model.encoder_layers[0].conv1.conv.weight.requires_grad
    assert model.classifier[1].weight.requires_grad and model.encoder_layers[0].bn1.bias.requires_grad
    with pytest.raises(ValueError):
        build_model(pretrained, backbone_config("tiny", N_CLASSES), "cessl", LoRAConfig())
