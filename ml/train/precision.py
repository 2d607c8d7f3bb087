"""Numerical precision of training, rank allocation and inference: ``fp32``, ``bf16`` or ``auto``.

A run names a precision (``TrainConfig.precision``, the pipeline's ``--precision``) and
resolves it ONCE against its device with :func:`resolve_precision`; everything that runs the
model then asks the resolved :class:`Precision` for its context (:meth:`Precision.autocast`).

- ``fp32``: today's path, unchanged: no autocast, no TF32 (bit-reproducible run to run and
  identical to the results before this option existed).
- ``bf16``: mixed precision: the forward (and the backward of what it records) runs under
  ``torch.autocast(dtype=bfloat16)``: convolutions, matmuls and attention in bfloat16, the
  rest (norms, softmax, losses) in float32, as autocast decides; on CUDA, TF32 tensor cores
  for what stays float32 (matmuls and convolutions autocast leaves in float32). Master
  weights and the optimiser state stay float32 (autocast casts copies per op); losses and
  metrics are computed from float32 logits (the steps cast them before the loss). Reproducible
  run to run on the same device and seed, but not bit-equal to ``fp32``.
- ``auto``: ``bf16`` on a CUDA device that supports it (Ampere and later), else ``fp32``: the
  CPU keeps ``fp32`` (bfloat16 on a CPU is a test of the code path, not a speed-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, cast

import torch

from ml.errors import ParameterError

PrecisionName = Literal["fp32", "bf16"]
PRECISION_CHOICES: tuple[str, ...] = ("fp32", "bf16", "auto")
DEFAULT_PRECISION = "fp32"
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision_name(name: str) -> str:
    """``name`` when it is one of :data:`PRECISION_CHOICES`, else a one-line ParameterError."""
    if name not in PRECISION_CHOICES:
        raise ParameterError(f"precision {name!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    return name


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 autocast natively (CUDA: compute capability >= 8.0).

    The CPU can run bfloat16 autocast (it is how the tests exercise the path), but it is not
    a native fast path there, so ``auto`` does not choose it: this answers False for a CPU.
    """
    if device.type != "cuda":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one kind of device (``name`` is never ``auto``)."""

    name: PrecisionName
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of convolutions and matmuls (float32 or bfloat16)."""
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        """True for bf16: autocast is on (master weights stay float32)."""
        return self.name != "fp32"

    @property
    def tf32(self) -> bool:
        """Whether the float32 matmuls/convolutions left by autocast use TF32 (bf16 on CUDA only)."""
        return self.mixed and self.device_type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """``torch.autocast`` to bfloat16 for bf16 (and TF32 on CUDA), a no-op for fp32.

        Wrap the forward pass and the loss (the backward may run outside: autograd replays
        the recorded dtypes); keep ``optimizer.step()`` outside.
        """
        if not self.mixed:
            return contextlib.nullcontext()
        return _mixed(self.device_type, self.dtype, self.tf32)

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.name, "device_type": self.device_type}


@contextlib.contextmanager
def _mixed(device_type: str, dtype: torch.dtype, tf32: bool) -> Iterator[None]:
    with allow_tf32(tf32), torch.autocast(device_type=device_type, dtype=dtype):
        yield


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and cuDNN convolutions inside the block (restored after).

    A no-op when ``enabled`` is False: the fp32 path never touches the global flags.
    """
    if not enabled:
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """The precision ``name`` (``fp32 | bf16 | auto``) means on ``device``.

    ``auto``: bf16 where :func:`supports_bf16`, else fp32. ``bf16`` on a CUDA device without
    bfloat16 support is refused (a ParameterError naming the device), not silently emulated.
    """
    check_precision_name(name)
    device = torch.device(device)
    if name == "auto":
        return Precision("bf16" if supports_bf16(device) else "fp32", device.type)
    if name == "bf16" and device.type == "cuda" and not supports_bf16(device):
        raise ParameterError(f"precision 'bf16': the CUDA device {device} does not support bfloat16; use fp32 or auto")
    return Precision(cast(PrecisionName, name), device.type)


FP32 = Precision("fp32")

__all__ = [
    "DEFAULT_PRECISION",
    "FP32",
    "PRECISION_CHOICES",
    "Precision",
    "allow_tf32",
    "check_precision_name",
    "resolve_precision",
    "supports_bf16",
]
