"""A step given a GPU stops at once, with one line, on an image whose torch cannot use it;
without the compiled pipeline's ``CESSL_REQUIRE_GPU`` nothing is checked (local CPU runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.finetune import finetune_step
from ml.errors import CesslError
from ml.model.lora import LoRAConfig
from ml.train.config import TrainConfig
from ml.train.gpu import IMAGE_ENV, REQUIRE_GPU_ENV, GpuUnavailableError, TorchGpu, check_required_gpu, gpu_required

IMAGE = "registry.example.org/cessl:0.1.0"
CPU_TORCH = torch.version.cuda is None


def test_nothing_is_checked_without_the_setting():
    assert not gpu_required({})
    assert not gpu_required({REQUIRE_GPU_ENV: "0"})
    assert gpu_required({REQUIRE_GPU_ENV: "1"}) and gpu_required({REQUIRE_GPU_ENV: "true"})
    # a CPU-only build passes when no GPU is required (every local run)
    assert check_required_gpu("finetune", {}, TorchGpu("2.13.0+cpu", None, 0)) is None


@pytest.mark.skipif(not CPU_TORCH, reason="this torch is a CUDA build")
def test_this_cpu_torch_is_refused_when_a_gpu_is_required():
    """The real probe of this environment's CPU-only torch."""
    with pytest.raises(GpuUnavailableError) as err:
        check_required_gpu("finetune", {REQUIRE_GPU_ENV: "1", IMAGE_ENV: IMAGE})
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, CesslError)
    assert message.startswith("finetune requested a GPU (CESSL_REQUIRE_GPU=1)")
    assert IMAGE in message and f"torch {torch.__version__}" in message and "CPU-only build" in message
    assert "scripts/build_image.sh --cuda" in message


def test_a_cuda_build_without_a_visible_gpu_is_refused():
    with pytest.raises(GpuUnavailableError, match=r"torch 2\.13\.0\+cu128 \(CUDA 12\.8\) in this image sees no GPU"):
        check_required_gpu("finetune", {REQUIRE_GPU_ENV: "1"}, TorchGpu("2.13.0+cu128", "12.8", 0))


def test_a_cuda_build_with_a_gpu_passes():
    gpu = TorchGpu("2.13.0+cu128", "12.8", 1)
    assert check_required_gpu("finetune", {REQUIRE_GPU_ENV: "1"}, gpu) == gpu


@pytest.mark.skipif(not CPU_TORCH, reason="this torch is a CUDA build")
def test_finetune_step_stops_before_reading_anything(monkeypatch, tmp_path: Path):
    """The component checks first: the inputs here do not even exist, the GPU error comes first."""
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    missing = tmp_path / "missing"

    def finetune_missing_inputs() -> None:
        finetune_step(
            missing,
            missing,
            missing,
            missing,
            tmp_path / "adapter",
            tmp_path / "curves.jsonl",
            lora=LoRAConfig(),
            train=TrainConfig(),
            store_fingerprint="x",
        )

    with pytest.raises(GpuUnavailableError, match=IMAGE):
        finetune_missing_inputs()
    monkeypatch.delenv(REQUIRE_GPU_ENV)
    with pytest.raises(ValueError, match="unreadable split file") as err:  # unset: the step goes on
        finetune_missing_inputs()
    assert not isinstance(err.value, GpuUnavailableError)  # (and fails on the missing input)
