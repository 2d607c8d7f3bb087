"""Pre-training: 2-process DDP (gloo, CPU) == 1 process with the same global batch.

The 2-process run is launched with torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node 2``) on this very file, whose ``__main__`` is the worker.

Why the two runs can agree: both use the DistributedSampler permutation of the same seed,
so the union of the two per-process batches of a step is the one-process batch; BCE is a
mean and DDP averages gradients, so the gradient is the global-batch gradient; BatchNorm
normalises with global-batch statistics (GlobalBatchNorm2d over gloo). Cutmix mixes
records within each process's batch, which no split of the batch can reproduce, so it is
off here.

The runs are in float64. In float32 the two runs differ by summation order (~1e-7), and
that is amplified past any useful tolerance within one step: a leaky-ReLU kink or the
max-pool's argmax flips, and Adam's first update is ~lr x sign(g), so an element whose
gradient is within rounding of zero (e.g. the conv biases right before BatchNorm, whose
true gradient is 0) moves by +-lr either way. In float64 the same comparison agrees to
~1e-12, so a real mistake (wrong shard, wrong lr scaling, per-process BatchNorm
statistics, unaveraged gradients) cannot hide under the tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

N_RECORDS, N_CLASSES, STEPS = 24, 4, 3
GLOBAL_BATCH = 8
# base_lr x global_batch / 1024 = 1e-3 for both runs: the scaling rule itself is exercised,
# and the weights move ~STEPS x 1e-3, far above the tolerance.
BASE_LR = 0.128


def _config(batch_size: int, **overrides):
    from ml.train.pretrain import PretrainConfig

    return PretrainConfig(
        backbone="tinylight",
        max_steps=STEPS,
        batch_size=batch_size,
        base_lr=BASE_LR,
        cutmix_alpha=0.0,
        seed=7,
        progress=False,
        device="cpu",
        dtype="float64",
        **overrides,
    )


def _dataset(path: Path):
    from ml.train.pretrain import TensorPairDataset

    data = np.load(path)
    return TensorPairDataset(data["x"], data["y"])


def _write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_RECORDS, 12, 6144)).astype(np.float32)
    y = (rng.random((N_RECORDS, N_CLASSES)) < 0.4).astype(np.float32)
    np.savez(path, x=x, y=y)


@pytest.mark.slow  # ~27 s: two torchrun processes, then the single-process reference
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    from ml.train.pretrain import pretrain

    data = tmp_path / "data.npz"
    _write_data(data)
    out = tmp_path / "ddp.pt"
    env = _clean_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(data),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ddp = torch.load(out, weights_only=True)
    assert ddp["world_size"] == 2 and ddp["lr"] == 1e-3

    single = pretrain(_dataset(data), _config(GLOBAL_BATCH))
    assert single.world_size == 1 and single.lr == 1e-3 and single.steps == STEPS

    init = _initial_weights()
    assert single.state_dict.keys() == ddp["state_dict"].keys()
    worst, moved = 0.0, 0.0
    for name, ref in single.state_dict.items():
        got = ddp["state_dict"][name]
        if not ref.is_floating_point():
            assert torch.equal(ref, got), name  # num_batches_tracked
            continue
        worst = max(worst, (ref - got).abs().max().item())
        if "running_" not in name:
            moved = max(moved, (ref - init[name].double()).abs().max().item())
    assert moved > 2e-3, f"weights barely moved ({moved:.2e}); the comparison would be vacuous"
    print(f"DDP vs single process: max |delta| = {worst:.2e}, max movement {moved:.2e}")
    assert worst < 1e-9, f"DDP vs single process: max |delta| = {worst:.2e}"


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def _initial_weights() -> dict[str, torch.Tensor]:
    from ml.model.backbone import ECGTransformer, backbone_config

    torch.manual_seed(7)
    return ECGTransformer(backbone_config("tinylight", N_CLASSES)).state_dict()


def _worker(data: Path, out: Path, sync_batchnorm: bool = True) -> None:
    from ml.train.pretrain import pretrain

    config = _config(GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]), sync_batchnorm=sync_batchnorm)
    result = pretrain(_dataset(data), config)
    if result.is_main:
        torch.save({"state_dict": result.state_dict, "world_size": result.world_size, "lr": result.lr}, out)


if __name__ == "__main__":  # torchrun worker
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sync_batchnorm="--no-sync-bn" not in sys.argv)
