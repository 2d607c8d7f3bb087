"""Fail fast when a step that was given a GPU cannot use one.

A Kubeflow step that requests an accelerator but starts on a CPU-only image (the default
image holds the CPU torch build; ``scripts/build_image.sh --cuda`` makes the GPU one), or
on a node whose GPU the container does not see, would otherwise train on the CPU for
hours (``device="auto"`` falls back silently) or fail much later. The compiled pipeline
sets ``CESSL_REQUIRE_GPU=1`` (and ``CESSL_IMAGE``) on every task that requests an
accelerator (``pipeline.dags.finetune``); such a step calls :func:`check_required_gpu` first and
stops with one line naming the image, the torch build and what was requested. Without
the variable (every local run) nothing is checked: CPU-only runs are unaffected.

Torch is imported only when the check runs (this module is imported at compile time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ml.errors import EXIT_USAGE, CesslError

REQUIRE_GPU_ENV = "CESSL_REQUIRE_GPU"
IMAGE_ENV = "CESSL_IMAGE"  # the image the task runs (set by the compiled pipeline), for the message
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


class GpuUnavailableError(CesslError):
    """A GPU was requested for this step, but torch here cannot use one."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class TorchGpu:
    """What this process's torch can do with GPUs."""

    torch_version: str
    cuda_build: str | None  # torch.version.cuda: None for a CPU-only build
    device_count: int  # GPUs torch sees (0 on a CPU build, or when none is visible)

    @classmethod
    def probe(cls) -> TorchGpu:
        """This process's torch build and visible GPUs."""
        import torch

        cuda = torch.version.cuda
        count = torch.cuda.device_count() if cuda and torch.cuda.is_available() else 0
        return cls(torch_version=str(torch.__version__), cuda_build=cuda, device_count=count)


def gpu_required(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``$CESSL_REQUIRE_GPU`` asks for a GPU (set by the compiled pipeline)."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_GPU_ENV, "").strip().lower() in TRUE_VALUES


def check_required_gpu(
    step: str, environ: Mapping[str, str] | None = None, gpu: TorchGpu | None = None
) -> TorchGpu | None:
    """Raise :class:`GpuUnavailableError` when a GPU is required here but cannot be used.

    Returns what was probed (None when no GPU is required: nothing is probed then).
    """
    env = os.environ if environ is None else environ
    if not gpu_required(env):
        return None
    gpu = gpu or TorchGpu.probe()
    image = env.get(IMAGE_ENV) or "this image"
    requested = f"{step} requested a GPU ({REQUIRE_GPU_ENV}=1)"
    if gpu.cuda_build is None:
        raise GpuUnavailableError(
            f"{requested}, but {image} has torch {gpu.torch_version}, a CPU-only build (torch.version.cuda is "
            "None): build the CUDA image (scripts/build_image.sh --cuda) or compile with --no-gpu"
        )
    if gpu.device_count == 0:
        raise GpuUnavailableError(
            f"{requested}, but torch {gpu.torch_version} (CUDA {gpu.cuda_build}) in {image} sees no GPU: "
            "check the node's NVIDIA driver / device plugin and the pod's accelerator limit"
        )
    return gpu
