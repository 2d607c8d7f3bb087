"""Pre-training loop: lr rule, checkpoint/resume equivalence, and `cessl backbone pretrain`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from store_support import write_random_store

from ml.train.checkpoint import load_checkpoint
from ml.train.pretrain import (
    CHECKPOINT_NAME,
    GlobalBatchNorm2d,
    TensorPairDataset,
    convert_global_batchnorm,
    pretrain,
)
from ml.train.pretrain_config import PretrainConfig, scaled_lr
from pipeline.cli import main as cessl

CODES = ["164889003", "426177001", "59118001"]  # AF, SB, RBBB


def _data(n: int = 12, classes: int = 3, seed: int = 0) -> TensorPairDataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12, 6144)).astype(np.float32)
    y = (rng.random((n, classes)) < 0.4).astype(np.float32)
    return TensorPairDataset(x, y)


def _config(**overrides) -> PretrainConfig:
    base = dict(backbone="tinylight", batch_size=4, lr=1e-3, seed=3, device="cpu", progress=False, checkpoint_every=1)
    return PretrainConfig(**(base | overrides))


def test_lr_rule() -> None:
    assert scaled_lr(1e-3, world_size=1, batch_size=1024) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, world_size=8, batch_size=64) == pytest.approx(5e-4)
    assert PretrainConfig(batch_size=64).learning_rate(world_size=2) == pytest.approx(1.25e-4)
    assert PretrainConfig(lr=3e-4).learning_rate(world_size=4) == 3e-4
    with pytest.raises(ValueError, match="cutmix_alpha"):
        PretrainConfig(cutmix_alpha=-1)


def test_resume_is_exact_across_an_epoch_boundary(tmp_path: Path) -> None:
    """4 steps straight == 2 steps, stop, resume to 4 (3 steps per epoch, Cutmix on)."""
    data = _data(n=6)
    straight = pretrain(data, _config(max_steps=4, batch_size=2, checkpoint_dir=str(tmp_path / "a")))
    first = pretrain(data, _config(max_steps=2, batch_size=2, checkpoint_dir=str(tmp_path / "b")))
    ckpt = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0, 2)
    resumed = pretrain(data, _config(max_steps=4, batch_size=2, checkpoint_dir=str(tmp_path / "b")))
    assert resumed.steps == 4 and resumed.samples == 2 * 2  # only the 2 remaining steps ran
    assert not all(torch.equal(first.state_dict[k], resumed.state_dict[k]) for k in first.state_dict)
    for name, value in straight.state_dict.items():
        assert torch.equal(value, resumed.state_dict[name]), name
    # a finished run resumed again does nothing and returns the same weights
    again = pretrain(data, _config(max_steps=4, batch_size=2, checkpoint_dir=str(tmp_path / "b")))
    assert again.samples == 0 and torch.equal(
        again.state_dict["classifier.1.weight"], straight.state_dict["classifier.1.weight"]
    )


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    data = _data()
    pretrain(data, _config(max_steps=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="global_batch"):
        pretrain(data, _config(max_steps=2, batch_size=2, checkpoint_dir=str(tmp_path)))
    fresh = pretrain(data, _config(max_steps=1, batch_size=2, checkpoint_dir=str(tmp_path), resume=False))
    assert fresh.steps == 1


def test_global_batchnorm_is_plain_batchnorm_without_a_process_group() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, (1, 3)), torch.nn.BatchNorm2d(4))
    converted = convert_global_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, (1, 3)), torch.nn.BatchNorm2d(4)))
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], GlobalBatchNorm2d)
    assert list(converted.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 3, 1, 20)
    torch.testing.assert_close(converted(x), plain(x))
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)


def _write_store(path: Path, n: int = 12) -> None:
    write_random_store(path, n, CODES, unlabelled_last=True)  # one unlabelled record: not used


def test_cli_pretrain_from_a_store_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ml.model.pretrained import read_backbone

    store, out = tmp_path / "store", tmp_path / "bb"
    _write_store(store)
    args = [
        "backbone",
        "pretrain",
        "--store",
        str(store),
        "--config",
        "tinylight",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "1",
        "--no-progress",
    ]
    assert cessl([*args, "--max-steps", "2"]) == 0
    backbone = read_backbone(out)
    config, meta = backbone.config, backbone.meta
    assert (config.name, config.num_classes, meta["classes"]) == ("tinylight", 3, CODES)
    assert meta["source"] == "pretrain" and meta["records"] == 11
    assert meta["data_version"].startswith("store:") and meta["training"]["steps"] == 2
    assert capsys.readouterr().out.strip().endswith(str(out))

    assert cessl([*args, "--max-steps", "3"]) == 0  # resumes from <out>/checkpoints
    assert load_checkpoint(out / "checkpoints" / CHECKPOINT_NAME)["step"] == 3
    meta3 = read_backbone(out).meta
    assert meta3["training"]["steps"] == 3 and meta3["identity"] != meta["identity"]
    assert meta3["data_version"] == meta["data_version"]


def test_a_process_group_that_cannot_be_joined_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 with nobody at MASTER_ADDR:MASTER_PORT: a DistributedTrainingError (a
    CesslError, exit code 5) after the timeout, naming the rank and the address; no hang."""
    import socket
    import time

    from ml.errors import EXIT_STEP_FAILED
    from ml.train.pretrain import DistributedTrainingError, setup_distributed

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    start = time.perf_counter()
    with pytest.raises(DistributedTrainingError, match=rf"rank 1 of 2: could not join .* 127\.0\.0\.1:{port}") as err:
        setup_distributed("cpu", timeout_s=1)
    assert time.perf_counter() - start < 60
    assert err.value.exit_code == EXIT_STEP_FAILED and "\n" not in str(err.value)
    assert not torch.distributed.is_initialized()
