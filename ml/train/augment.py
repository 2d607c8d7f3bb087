"""ECG augmentations of CE-SSL, vectorised over a batch and driven by a ``torch.Generator``.

Every function takes a batch ``x`` of shape (N, leads, 1, T) (time on the last axis, leads
on axis 1) and a generator on ``x.device``; all randomness is drawn from that generator
with tensor operations, never with a Python loop over samples, so one generator state
fully determines the result (the trainer checkpoints it for exact resume).

- :func:`cutmix` - labelled batches, as the CE-SSL reference does it: ONE
  lambda ~ Beta(0.75, 0.75) and ONE box for the whole batch. The (N, 12, 1, T) batch is
  viewed as (N, 1, 12, T) images, so the box spans a contiguous range of LEADS x a time
  window (side fractions sqrt(1 - lambda), centre uniform, clipped at the edges); it is
  pasted from a permutation of the batch and the labels are mixed by the box's real
  (clipped) area. :func:`sample_cutmix` draws (lambda, box, permutation) and
  :func:`apply_cutmix` is the pure function of them.
- :func:`weak_augment` - unlabelled batches of the semi-supervised step: ONE transform
  drawn for the WHOLE batch from {time flip, burst dropout, Gaussian noise (std 0.05),
  lead shuffle}; burst spans and the lead permutation are shared by every record. This is
  the view whose statistics semi-supervised BatchNorm learns from.
- :func:`strong_augment` - the strong view of the FixMatch baseline: amplitude scaling,
  then each transform with probability 0.75 and a much stronger noise (std 0.5). It is
  deliberately drawn PER RECORD (FixMatch's RandAugment-style strong view is a per-sample
  perturbation, and the consistency loss is per record); only CE-SSL's weak view follows
  the reference's batch-level draw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CutmixBox:
    """Half-open box ``[lead_start, lead_stop) x [time_start, time_stop)`` of a (leads, T) record."""

    lead_start: int
    lead_stop: int
    time_start: int
    time_stop: int

    @property
    def area(self) -> int:
        """Number of (lead, time) samples inside the box."""
        return (self.lead_stop - self.lead_start) * (self.time_stop - self.time_start)


def _clipped_span(side: int, fraction: float, centre: int) -> tuple[int, int]:
    """The span of ``int(side * fraction)`` samples around ``centre``, clipped to ``[0, side]``.

    As CutMix's ``rand_bbox``: half = ``int(side * fraction) // 2`` on each side of the centre.
    """
    half = int(side * fraction) // 2
    return min(max(centre - half, 0), side), min(max(centre + half, 0), side)


def cutmix_box(lam: float, leads: int, t: int, centre_lead: int, centre_time: int) -> CutmixBox:
    """The Cutmix box of ``lam``: side fractions sqrt(1 - lam) of ``leads`` and ``t`` around the centre."""
    fraction = float(np.sqrt(1.0 - lam))
    lead_start, lead_stop = _clipped_span(leads, fraction, centre_lead)
    time_start, time_stop = _clipped_span(t, fraction, centre_time)
    return CutmixBox(lead_start, lead_stop, time_start, time_stop)


def apply_cutmix(x: Tensor, y: Tensor, box: CutmixBox, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Paste ``box`` of record ``perm[i]`` into record i; mix labels by the box's area.

    ``x`` is (N, leads, 1, T); the box indexes leads (axis 1) and time (last axis). Labels:
    ``y <- lam_adj y + (1 - lam_adj) y[perm]`` with ``lam_adj = 1 - area / (leads T)``.
    Returns new tensors; the inputs are not modified.
    """
    leads, t = x.shape[1], x.shape[-1]
    mixed = x.clone()
    leads_in_box = slice(box.lead_start, box.lead_stop)
    time_in_box = slice(box.time_start, box.time_stop)
    mixed[:, leads_in_box, ..., time_in_box] = x[perm][:, leads_in_box, ..., time_in_box]
    lam_adj = 1.0 - box.area / (leads * t)
    return mixed, lam_adj * y + (1.0 - lam_adj) * y[perm]


def sample_cutmix(
    x: Tensor, generator: torch.Generator, alpha: float = CUTMIX_ALPHA
) -> tuple[float, CutmixBox, Tensor]:
    """Draw Cutmix's (lambda, box, permutation) for the batch ``x`` from ``generator``.

    Order of draws: lambda ~ Beta(alpha, alpha), the box centre (lead, then time, each
    uniform over its axis), then the permutation of the batch.
    """
    n, leads, t = x.shape[0], x.shape[1], x.shape[-1]
    lam = float(sample_beta(alpha, 1, generator, x.device)[0])
    centre_lead = int(torch.randint(leads, (1,), generator=generator, device=x.device).item())
    centre_time = int(torch.randint(t, (1,), generator=generator, device=x.device).item())
    box = cutmix_box(lam, leads, t, centre_lead, centre_time)
    perm = torch.randperm(n, generator=generator, device=x.device)
    return lam, box, perm


def cutmix(x: Tensor, y: Tensor, generator: torch.Generator, alpha: float = CUTMIX_ALPHA) -> tuple[Tensor, Tensor]:
    """Cutmix of a labelled batch: :func:`sample_cutmix`, then :func:`apply_cutmix`."""
    _, box, perm = sample_cutmix(x, generator, alpha)
    return apply_cutmix(x, y, box, perm)


def time_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Reverse every lead in time (the generator is unused; kept for a uniform signature)."""
    del generator
    return x.flip(-1)


def _draw_rows(x: Tensor, per_record: bool) -> int:
    """How many independent draws a transform makes: one per record, or one for the batch."""
    return x.shape[0] if per_record else 1


def burst_dropout(x: Tensor, generator: torch.Generator, per_record: bool = False) -> Tensor:
    """Zero one random span per lead: half-length L ~ U{0..T/2-1}, span [c-L, c+L) inside T.

    The spans are drawn once per lead and shared by every record of the batch (as the
    reference does); ``per_record=True`` draws them per record and lead instead.
    """
    rows, leads, t = _draw_rows(x, per_record), x.shape[1], x.shape[-1]
    half = (_uniform((rows, leads), generator, x.device) * (t // 2)).long()  # (rows, leads)
    centre = half + (_uniform((rows, leads), generator, x.device) * (t - 2 * half)).long()
    mask = _time_window_mask(centre - half, 2 * half, t)  # (rows, leads, T)
    return x.masked_fill(mask.view(rows, leads, *([1] * (x.dim() - 3)), t), 0.0)


def gaussian_noise(x: Tensor, generator: torch.Generator, std: float = WEAK_NOISE_STD) -> Tensor:
    """Add i.i.d. N(0, std^2) noise."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + std * noise


def lead_shuffle(x: Tensor, generator: torch.Generator, per_record: bool = False) -> Tensor:
    """Permute the leads with ONE random permutation shared by the batch (as the reference
    does); ``per_record=True`` gives every record its own permutation."""
    rows, leads = _draw_rows(x, per_record), x.shape[1]
    perm = _uniform((rows, leads), generator, x.device).argsort(dim=1)  # (rows, leads)
    index = perm.view(rows, leads, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def amplitude_scale(x: Tensor, generator: torch.Generator, low: float = 0.5, high: float = 1.5) -> Tensor:
    """Multiply every lead of every record by its own factor drawn from U(low, high)."""
    n, leads = x.shape[0], x.shape[1]
    scale = low + (high - low) * _uniform((n, leads), generator, x.device)
    return x * scale.view(n, leads, *([1] * (x.dim() - 2))).to(x.dtype)


Augmentation = Callable[[Tensor, torch.Generator], Tensor]
WEAK_AUGMENTATIONS: tuple[Augmentation, ...] = (time_flip, burst_dropout, gaussian_noise, lead_shuffle)


def weak_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """ONE weak augmentation for the WHOLE batch, drawn uniformly from :data:`WEAK_AUGMENTATIONS`.

    Draws: the transform's index, then that transform's own randomness (batch-shared).
    """
    choice = int(torch.randint(len(WEAK_AUGMENTATIONS), (1,), generator=generator, device=x.device).item())
    return WEAK_AUGMENTATIONS[choice](x, generator)


def _maybe(x: Tensor, augmented: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    keep = _uniform((x.shape[0],), generator, x.device) >= prob  # (N,)
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, augmented)


def strong_augment(
    x: Tensor, generator: torch.Generator, prob: float = 0.75, noise_std: float = STRONG_NOISE_STD
) -> Tensor:
    """FixMatch's strong view, drawn per record: amplitude scaling, then time flip, lead
    shuffle, strong noise and burst dropout, each applied to a record with probability ``prob``."""
    out = amplitude_scale(x, generator)
    out = _maybe(out, time_flip(out, generator), prob, generator)
    out = _maybe(out, lead_shuffle(out, generator, per_record=True), prob, generator)
    out = _maybe(out, gaussian_noise(out, generator, noise_std), prob, generator)
    return _maybe(out, burst_dropout(out, generator, per_record=True), prob, generator)
