"""`cessl backbone pretrain` under torchrun (real launcher processes). The loop, the lr rule
and resume in process: tests/unit/test_pretrain.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from store_support import write_random_store

CODES = ["164889003", "426177001", "59118001"]  # AF, SB, RBBB


def _write_store(path: Path, n: int = 12) -> None:
    write_random_store(path, n, CODES, unlabelled_last=True)  # one unlabelled record: not used


@pytest.mark.slow
def test_cli_pretrain_under_torchrun(tmp_path: Path) -> None:
    """`torchrun ... -m pipeline.cli backbone pretrain`: rank 0 writes the backbone folder."""
    from ml.model.pretrained import read_backbone

    store, out = tmp_path / "store", tmp_path / "bb"
    _write_store(store, n=16)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline.cli",
        "backbone",
        "pretrain",
        "--store",
        str(store),
        "--config",
        "tinylight",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    meta = read_backbone(out).meta
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 2
    assert meta["training"]["lr"] == pytest.approx(1e-3 * 2 * 2 / 1024)
    assert proc.stdout.strip().splitlines() == [str(out)]  # printed once, by rank 0
