"""End to end: CE-SSL (rank allocation + LoRA with deactivation + semi-supervised BN) learns.

tinylight, randomly initialised, on a small synthetic multi-label task whose classes are
sinusoid patterns on class-specific leads (:mod:`ml.train.synthetic`). Kept well under a
minute on two CPU cores: few records, batches of 8 + 8, 30 steps.
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from ml.eval.evaluate import evaluate
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, count_parameters
from ml.model.rank_allocation import RankAllocationConfig
from ml.train.build import build_model
from ml.train.config import TrainConfig
from ml.train.recipe import allocate_ranks_for, finetune
from ml.train.synthetic import SyntheticTaskConfig, make_splits
from pipeline.cli.method_demo import DemoOptions, render, run_demo

N_CLASSES = 3
BATCH = 8


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.slow
def test_cessl_learns_a_synthetic_multilabel_task(device: torch.device) -> None:
    task, data = make_splits(
        {"train": 64, "valid": 32, "test": 64, "unlabelled": 64},
        SyntheticTaskConfig(num_classes=N_CLASSES, amplitude=1.5),
        seed=0,
    )
    config = backbone_config("tinylight", N_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone_state = ECGTransformer(config).state_dict()  # stands in for a pre-trained backbone

    lora = LoRAConfig(r=16, p=0.2)
    allocated = allocate_ranks_for(
        "cessl", backbone_state, config, lora, RankAllocationConfig(compress=0.6), data["train"], BATCH, seed=0
    )
    rank_map = allocated.rank_map
    assert sorted(rank_map.values()).count(8) == 8  # tinylight, c = 0.6: 8 of 13 matrices at r_low

    train_config = TrainConfig(
        method="cessl",
        lr=3e-3,
        max_steps=30,
        batch_size=BATCH,
        val_every=15,
        warmup_frac=0.05,
        seed=0,
        device=device.type,
        progress=False,
    )
    outcome = finetune(
        backbone_state, config, lora, rank_map, train_config, data["train"], data["unlabelled"], data["valid"]
    )
    assert outcome.trainable < count_parameters(build_model(None, config, "full", lora))[0]
    report = evaluate(outcome.model, data["test"], thresholds=outcome.thresholds, classes=task.classes)

    assert outcome.result.steps == 30
    assert report.metrics["macro_auroc"] > 0.75, report.metrics
    assert report.metrics["macro_map"] > 0.6, report.metrics
    assert list(report.per_class["class"]) == task.classes


@pytest.mark.slow
def test_demo_runs_and_renders() -> None:
    options = DemoOptions(
        train=16, valid=8, test=8, unlabelled=16, steps=2, batch_size=4, val_every=2, device="cpu", progress=False
    )
    report = run_demo(options)
    assert report.train.steps == 2
    assert len(report.rank_map) == 13 and set(report.rank_map.values()) == {8, 16}
    out = io.StringIO()
    render(report, options, Console(file=out, width=120))
    text = out.getvalue()
    for expected in ("trainable (CE-SSL)", "Rank map", "macro_auroc", "Per class"):
        assert expected in text
