"""ECG augmentations of CE-SSL, vectorised over a batch and driven by a ``torch.Generator``.

Every function takes a batch ``x`` of shape (N, leads, 1, T) (time on the last axis, leads
on axis 1) and a generator on ``x.device``; the randomness is drawn per sample (or per
sample and lead) with tensor operations, never with a Python loop over samples, so one
generator state fully determines the result (the trainer checkpoints it for exact resume).

- :func:`cutmix` - labelled batches: a random time window of every record is replaced by
  the same window of a partner record; labels are mixed by the area swapped.
- :func:`weak_augment` - unlabelled batches of the semi-supervised step: ONE of
  {time flip, burst dropout, Gaussian noise (std 0.05), lead shuffle} per record.
- :func:`strong_augment` - the strong view of FixMatch: amplitude scaling, then each weak
  transform with probability 0.75 and a much stronger noise (std 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.special import betaincinv
from torch import Tensor

CUTMIX_ALPHA = 0.75
WEAK_NOISE_STD = 0.05
STRONG_NOISE_STD = 0.5


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) by inverse CDF of generator-driven uniforms."""
    u = _uniform((n,), generator, device).double().cpu().numpy()
    lam = betaincinv(alpha, alpha, u).astype(np.float32)
    return torch.from_numpy(lam).to(device)


def _time_window_mask(start: Tensor, length: Tensor, t: int) -> Tensor:
    """Boolean mask (*start.shape, T): True on ``[start, start + length)``."""
    steps = torch.arange(t, device=start.device)
    return (steps >= start.unsqueeze(-1)) & (steps < (start + length).unsqueeze(-1))


def cutmix(
    x: Tensor, y: Tensor, generator: torch.Generator, alpha: float = CUTMIX_ALPHA
) -> tuple[Tensor, Tensor]:
    """Cutmix on the time axis.

    Per record i: lambda_i ~ Beta(alpha, alpha); a window of ``round((1 - lambda_i) T)``
    samples at a uniform position is copied from partner ``perm[i]`` (one random
    permutation of the batch). Labels are mixed by area:
    ``y_i <- (1 - a_i) y_i + a_i y_perm[i]`` with ``a_i`` = fraction of time swapped.
    Returns new tensors; the inputs are not modified.
    """
    n, t = x.shape[0], x.shape[-1]
    lam = sample_beta(alpha, n, generator, x.device)  # (N,)
    perm = torch.randperm(n, generator=generator, device=x.device)  # (N,)
    cut = torch.round((1.0 - lam) * t).long()  # (N,) samples taken from the partner
    start = (_uniform((n,), generator, x.device) * (t - cut + 1)).long().clamp(max=t)
    mask = _time_window_mask(start, cut, t)  # (N, T)
    mixed = torch.where(mask.view(n, *([1] * (x.dim() - 2)), t), x[perm], x)
    area = (cut.float() / t).to(y.dtype).unsqueeze(1)  # (N, 1)
    return mixed, (1.0 - area) * y + area * y[perm]


def time_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Reverse every lead in time (the generator is unused; kept for a uniform signature)."""
    del generator
    return x.flip(-1)


def burst_dropout(x: Tensor, generator: torch.Generator) -> Tensor:
    """Zero one random span per lead: half-length L ~ U{0..T/2-1}, span [c-L, c+L) inside T."""
    n, leads, t = x.shape[0], x.shape[1], x.shape[-1]
    half = (_uniform((n, leads), generator, x.device) * (t // 2)).long()  # (N, leads)
    centre = half + (_uniform((n, leads), generator, x.device) * (t - 2 * half)).long()
    mask = _time_window_mask(centre - half, 2 * half, t)  # (N, leads, T)
    return x.masked_fill(mask.view(n, leads, *([1] * (x.dim() - 3)), t), 0.0)


def gaussian_noise(x: Tensor, generator: torch.Generator, std: float = WEAK_NOISE_STD) -> Tensor:
    """Add i.i.d. N(0, std^2) noise."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std * noise


def lead_shuffle(x: Tensor, generator: torch.Generator) -> Tensor:
    """Permute the leads of every record with its own random permutation."""
    n, leads = x.shape[0], x.shape[1]
    perm = _uniform((n, leads), generator, x.device).argsort(dim=1)  # (N, leads)
    index = perm.view(n, leads, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def amplitude_scale(
    x: Tensor, generator: torch.Generator, low: float = 0.5, high: float = 1.5
) -> Tensor:
    """Multiply every lead by its own factor drawn from U(low, high)."""
    n, leads = x.shape[0], x.shape[1]
    scale = low + (high - low) * _uniform((n, leads), generator, x.device)
    return x * scale.view(n, leads, *([1] * (x.dim() - 2))).to(x.dtype)


Augmentation = Callable[[Tensor, torch.Generator], Tensor]
WEAK_AUGMENTATIONS: tuple[Augmentation, ...] = (time_flip, burst_dropout, gaussian_noise, lead_shuffle)


def weak_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """ONE weak augmentation per record, drawn uniformly from :data:`WEAK_AUGMENTATIONS`."""
    choice = torch.randint(len(WEAK_AUGMENTATIONS), (x.shape[0],), generator=generator, device=x.device)
    out = x.clone()
    for k, augmentation in enumerate(WEAK_AUGMENTATIONS):
        index = (choice == k).nonzero().squeeze(1)
        if index.numel():
            out[index] = augmentation(x[index], generator)
    return out


def _maybe(x: Tensor, augmented: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    keep = _uniform((x.shape[0],), generator, x.device) >= prob  # (N,)
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, augmented)


def strong_augment(
    x: Tensor, generator: torch.Generator, prob: float = 0.75, noise_std: float = STRONG_NOISE_STD
) -> Tensor:
    """FixMatch's strong view: amplitude scaling, then time flip, lead shuffle, strong noise
    and burst dropout, each applied to a record with probability ``prob``."""
    out = amplitude_scale(x, generator)
    out = _maybe(out, time_flip(out, generator), prob, generator)
    out = _maybe(out, lead_shuffle(out, generator), prob, generator)
    out = _maybe(out, gaussian_noise(out, generator, noise_std), prob, generator)
    return _maybe(out, burst_dropout(out, generator), prob, generator)
