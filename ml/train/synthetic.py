"""A small synthetic multi-label ECG-shaped task, for demos, tests and benchmarks.

Records are (12, 1, 6144) float32 tensors: white Gaussian background noise plus, for every
class a record has, that class's pattern - a sinusoid at a class-specific frequency, on a
class-specific subset of leads, switched on over a random window of the record. Labels are
independent per class (multi-label). The patterns are fixed by ``task_seed``; the records
of each split by their own seed, so train / valid / test / unlabelled are draws from the
same distribution. Nothing here is physiological: it only checks that fine-tuning learns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ml.train.loaders import derive_seed

CHUNK = 64  # records generated at once (bounds peak memory)


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Shape and difficulty of the synthetic task."""

    num_classes: int = 4
    n_leads: int = 12
    length: int = 6144
    sample_rate: float = 500.0
    positive_rate: float = 0.3  # P(class present) per record and class
    amplitude: float = 1.0  # pattern amplitude (background noise has std noise_std)
    noise_std: float = 1.0
    min_window: float = 0.3  # pattern covers this fraction of the record at least ...
    max_window: float = 0.8  # ... and at most
    leads_per_class: int = 6


@dataclass(frozen=True)
class SyntheticTask:
    """The class patterns: frequency (Hz) and lead mask (C, leads) of every class."""

    config: SyntheticTaskConfig
    frequencies: Tensor  # (C,)
    lead_masks: Tensor  # (C, leads) of 0/1

    @property
    def classes(self) -> list[str]:
        return [f"class_{k}" for k in range(self.config.num_classes)]


def make_task(config: SyntheticTaskConfig = SyntheticTaskConfig(), task_seed: int = 0) -> SyntheticTask:
    """Draw the class patterns: distinct frequencies spread over 2-40 Hz, random lead subsets."""
    g = torch.Generator().manual_seed(derive_seed(task_seed, 0))
    c = config.num_classes
    base = torch.linspace(2.0, 40.0, c)
    frequencies = base[torch.randperm(c, generator=g)]
    lead_masks = torch.zeros(c, config.n_leads)
    for k in range(c):  # one tiny loop over classes, not over records
        leads = torch.randperm(config.n_leads, generator=g)[: config.leads_per_class]
        lead_masks[k, leads] = 1.0
    return SyntheticTask(config, frequencies, lead_masks)


def _records(task: SyntheticTask, y: Tensor, g: torch.Generator) -> Tensor:
    """Signals (n, leads, 1, T) for label matrix ``y`` (n, C)."""
    cfg = task.config
    n, length = y.shape[0], cfg.length
    t = torch.arange(length) / cfg.sample_rate  # (T,)
    x = cfg.noise_std * torch.randn(n, cfg.n_leads, length, generator=g)
    for k in range(cfg.num_classes):
        phase = 2 * math.pi * torch.rand(n, 1, generator=g)  # (n, 1)
        width = cfg.min_window + (cfg.max_window - cfg.min_window) * torch.rand(n, 1, generator=g)
        start = (1.0 - width) * torch.rand(n, 1, generator=g)
        frac = torch.arange(length) / length  # (T,)
        window = ((frac >= start) & (frac < start + width)).float()  # (n, T)
        wave = torch.sin(2 * math.pi * task.frequencies[k] * t + phase) * window  # (n, T)
        gain = cfg.amplitude * y[:, k, None, None] * task.lead_masks[k][None, :, None]  # (n, leads, 1)
        x += gain * wave[:, None, :]
    return x.unsqueeze(2)  # (n, leads, 1, T)


def sample_dataset(task: SyntheticTask, n: int, seed: int, labelled: bool = True) -> TensorDataset:
    """``n`` records as a TensorDataset of (x (n, 12, 1, T) float32, y (n, C) float32).

    With ``labelled=False`` the labels are zeros (the signals still carry the patterns).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, 1))
    y = (torch.rand(n, task.config.num_classes, generator=g) < task.config.positive_rate).float()
    x = torch.cat([_records(task, y[i : i + CHUNK], g) for i in range(0, n, CHUNK)]) if n else torch.empty(0)
    return TensorDataset(x.float(), y if labelled else torch.zeros_like(y))


def make_splits(
    sizes: Mapping[str, int], config: SyntheticTaskConfig = SyntheticTaskConfig(), seed: int = 0
) -> tuple[SyntheticTask, dict[str, TensorDataset]]:
    """One task and one dataset per split name (a split named "unlabelled" gets zero labels)."""
    task = make_task(config, seed)
    datasets = {
        name: sample_dataset(task, n, derive_seed(seed, 100 + i), labelled=name != "unlabelled")
        for i, (name, n) in enumerate(sizes.items())
    }
    return task, datasets
