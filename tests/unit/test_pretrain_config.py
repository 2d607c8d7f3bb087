"""The one pre-training config: its defaults are every entry point's, "not set" is 0, and a
run travels as JSON to the one node entry point (``python -m components.pretrain``)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from components.pretrain import main as node_main
from ml.errors import EXIT_STEP_FAILED, EXIT_USAGE
from ml.train.pretrain_config import PAPER_CUTMIX_ALPHA, PretrainConfig, PretrainRun, scaled_lr
from pipeline.core.pretrain_params import DEFAULTS

SHARED_WITH_PARAMS = ("epochs", "max_steps", "batch_size", "base_lr", "lr", "weight_decay", "cutmix_alpha", "seed")


def test_not_set_is_zero_and_means_the_rule() -> None:
    config = PretrainConfig(batch_size=64)
    assert (config.max_steps, config.lr, config.num_classes, config.checkpoint_dir) == (0, 0.0, 0, "")
    assert config.learning_rate(world_size=2) == pytest.approx(scaled_lr(1e-3, 2, 64))
    assert PretrainConfig(lr=3e-4).learning_rate(world_size=2) == 3e-4
    for name in ("max_steps", "lr", "num_classes"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0"):
            PretrainConfig(**{name: -1})


def test_the_paper_cutmix_alpha_is_the_augmentations() -> None:
    from ml.train.augment import CUTMIX_ALPHA

    assert PretrainConfig().cutmix_alpha == PAPER_CUTMIX_ALPHA == CUTMIX_ALPHA


def test_pipeline_parameters_and_flags_default_to_the_config() -> None:
    from pipeline.cli import build_parser

    config = PretrainConfig()
    assert DEFAULTS.backbone_config == config.backbone
    for name in (*SHARED_WITH_PARAMS, "checkpoint_every", "device"):
        assert getattr(DEFAULTS, name) == getattr(config, name), name
    args = build_parser().parse_args(["backbone", "pretrain", "--store", ".", "--out", "bb"])
    assert args.config == config.backbone
    flags = {name: value for name, value in vars(args).items() if hasattr(config, name)}
    assert set(flags) >= {*SHARED_WITH_PARAMS, "checkpoint_every", "num_workers", "device"}
    for name, value in flags.items():
        if name != "checkpoint_dir":  # None: <out>/checkpoints
            assert value == getattr(config, name), name


def test_a_run_round_trips_through_json() -> None:
    run = PretrainRun("s", "o", PretrainConfig(backbone="tinylight", max_steps=3, lr=1e-3), ("a", "b"), "v1")
    assert PretrainRun.from_dict(json.loads(run.to_json())) == run
    with pytest.raises(ValueError, match="not a pre-training run"):
        PretrainRun.from_dict({"store": "s"})
    with pytest.raises(ValueError, match="max_stepz"):  # a typo is not silently the default
        PretrainRun.from_dict({"store": "s", "out": "o", "config": {"max_stepz": 3}})
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        PretrainRun.from_dict({"store": "s", "out": "o", "config": {"max_steps": -3}})


def test_the_node_entry_point_reads_the_run_from_stdin(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="components.pretrain")
    run = PretrainRun(str(tmp_path / "no-store"), str(tmp_path / "bb"))
    monkeypatch.setattr("sys.stdin", io.StringIO(run.to_json()))
    assert node_main(["-"]) == EXIT_STEP_FAILED
    assert any("no-store is not a complete dataset store" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr("sys.stdin", io.StringIO("--max-steps 3"))  # flags are not a spec
    assert node_main(["-"]) == EXIT_STEP_FAILED
    assert "pre-training spec stdin" in caplog.records[-1].getMessage()
    assert node_main([]) == EXIT_USAGE
    assert not (tmp_path / "bb").exists()
