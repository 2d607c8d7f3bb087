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

Host draws without a host stall: Cutmix's lambda and box centre and the weak view's choice
are scalars the host needs (they set slice bounds and pick a function). Drawn from a CUDA
generator they would be read back with ``.item()``/``.cpu()``, which waits for every queued
kernel, every step. An :class:`AugmentRNG` pairs the device generator (every tensor-sized
draw) with a CPU generator for those scalars, so they never leave the host; the trainer uses
one on CUDA. A plain generator still works: on the CPU it serves both roles and the draws -
and so the seeded results - are exactly the ones before ``AugmentRNG`` existed; a plain CUDA
generator falls back to reading the scalars back (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

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


@dataclass(frozen=True)
class AugmentRNG:
    """The two random streams of the augmentations: ``device`` for every tensor-sized draw,
    ``host`` (a CPU generator) for the scalars the host needs (see the module doc)."""

    device: torch.Generator
    host: torch.Generator

    def get_state(self) -> tuple[Tensor, Tensor]:
        return self.device.get_state(), self.host.get_state()

    def set_state(self, state: tuple[Tensor, Tensor]) -> None:
        self.device.set_state(state[0])
        self.host.set_state(state[1])


Generator: TypeAlias = torch.Generator | AugmentRNG


def make_augment_rng(seed: int, host_seed: int, device: torch.device | str) -> Generator:
    """The augmentation stream for ``device``: a plain CPU generator on the CPU (the draws
    are those of :func:`make_generator`), an :class:`AugmentRNG` on a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return make_generator(seed, device)
    return AugmentRNG(make_generator(seed, device), make_generator(host_seed, "cpu"))


def _on_device(generator: Generator) -> torch.Generator:
    """The generator of tensor-sized draws."""
    return generator.device if isinstance(generator, AugmentRNG) else generator


def _on_host(generator: Generator) -> torch.Generator | None:
    """The generator of host scalars: the pair's host one, a CPU generator itself, else None."""
    if isinstance(generator, AugmentRNG):
        return generator.host
    return generator if generator.device.type == "cpu" else None


def _uniform(shape: tuple[int, ...], generator: Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=_on_device(generator), device=device)


def _host_uniform(n: int, generator: Generator) -> np.ndarray:
    """``n`` uniforms as float64 on the host (read back from the device without a host stream)."""
    host = _on_host(generator)
    if host is not None:
        return torch.rand((n,), generator=host).double().numpy()
    device = _on_device(generator).device
    return _uniform((n,), generator, device).double().cpu().numpy()


def _host_randint(high: int, generator: Generator) -> int:
    """One integer uniform in ``[0, high)`` on the host."""
    host = _on_host(generator)
    if host is not None:
        return int(torch.randint(high, (1,), generator=host).item())  # a CPU tensor: no device sync
    device = _on_device(generator).device
    return int(torch.randint(high, (1,), generator=_on_device(generator), device=device).item())


def _beta(alpha: float, n: int, generator: Generator) -> np.ndarray:
    """``n`` draws of Beta(alpha, alpha) as float32 on the host (inverse CDF of host uniforms)."""
    return betaincinv(alpha, alpha, _host_uniform(n, generator)).astype(np.float32)


def sample_beta(alpha: float, n: int, generator: Generator, device: torch.device) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) by inverse CDF of generator-driven uniforms."""
    return torch.from_numpy(_beta(alpha, n, generator)).to(device)


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


def sample_cutmix(x: Tensor, generator: Generator, alpha: float = CUTMIX_ALPHA) -> tuple[float, CutmixBox, Tensor]:
    """Draw Cutmix's (lambda, box, permutation) for the batch ``x`` from ``generator``.

    Order of draws: lambda ~ Beta(alpha, alpha), the box centre (lead, then time, each
    uniform over its axis) - host scalars - then the permutation of the batch (on the device).
    """
    n, leads, t = x.shape[0], x.shape[1], x.shape[-1]
    lam = float(_beta(alpha, 1, generator)[0])
    centre_lead = _host_randint(leads, generator)
    centre_time = _host_randint(t, generator)
    box = cutmix_box(lam, leads, t, centre_lead, centre_time)
    perm = torch.randperm(n, generator=_on_device(generator), device=x.device)
    return lam, box, perm


def cutmix(x: Tensor, y: Tensor, generator: Generator, alpha: float = CUTMIX_ALPHA) -> tuple[Tensor, Tensor]:
    """Cutmix of a labelled batch: :func:`sample_cutmix`, then :func:`apply_cutmix`."""
    _, box, perm = sample_cutmix(x, generator, alpha)
    return apply_cutmix(x, y, box, perm)


def time_flip(x: Tensor, generator: Generator) -> Tensor:
    """Reverse every lead in time (the generator is unused; kept for a uniform signature)."""
    del generator
    return x.flip(-1)


def _draw_rows(x: Tensor, per_record: bool) -> int:
    """How many independent draws a transform makes: one per record, or one for the batch."""
    return x.shape[0] if per_record else 1


def burst_dropout(x: Tensor, generator: Generator, per_record: bool = False) -> Tensor:
    """Zero one random span per lead: half-length L ~ U{0..T/2-1}, span [c-L, c+L) inside T.

    The spans are drawn once per lead and shared by every record of the batch (as the
    reference does); ``per_record=True`` draws them per record and lead instead.
    """
    rows, leads, t = _draw_rows(x, per_record), x.shape[1], x.shape[-1]
    half = (_uniform((rows, leads), generator, x.device) * (t // 2)).long()  # (rows, leads)
    centre = half + (_uniform((rows, leads), generator, x.device) * (t - 2 * half)).long()
    mask = _time_window_mask(centre - half, 2 * half, t)  # (rows, leads, T)
    return x.masked_fill(mask.view(rows, leads, *([1] * (x.dim() - 3)), t), 0.0)


def gaussian_noise(x: Tensor, generator: Generator, std: float = WEAK_NOISE_STD) -> Tensor:
    """Add i.i.d. N(0, std^2) noise."""
    noise = torch.randn(x.shape, generator=_on_device(generator), device=x.device, dtype=x.dtype)
    return x + std * noise


def lead_shuffle(x: Tensor, generator: Generator, per_record: bool = False) -> Tensor:
    """Permute the leads with ONE random permutation shared by the batch (as the reference
    does); ``per_record=True`` gives every record its own permutation."""
    rows, leads = _draw_rows(x, per_record), x.shape[1]
    perm = _uniform((rows, leads), generator, x.device).argsort(dim=1)  # (rows, leads)
    index = perm.view(rows, leads, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def amplitude_scale(x: Tensor, generator: Generator, low: float = 0.5, high: float = 1.5) -> Tensor:
    """Multiply every lead of every record by its own factor drawn from U(low, high)."""
    n, leads = x.shape[0], x.shape[1]
    scale = low + (high - low) * _uniform((n, leads), generator, x.device)
    return x * scale.view(n, leads, *([1] * (x.dim() - 2))).to(x.dtype)


Augmentation = Callable[[Tensor, Generator], Tensor]
WEAK_AUGMENTATIONS: tuple[Augmentation, ...] = (time_flip, burst_dropout, gaussian_noise, lead_shuffle)


def weak_augment(x: Tensor, generator: Generator) -> Tensor:
    """ONE weak augmentation for the WHOLE batch, drawn uniformly from :data:`WEAK_AUGMENTATIONS`.

    Draws: the transform's index, then that transform's own randomness (batch-shared).
    """
    choice = _host_randint(len(WEAK_AUGMENTATIONS), generator)
    return WEAK_AUGMENTATIONS[choice](x, generator)


def _maybe(x: Tensor, augmented: Tensor, prob: float, generator: Generator) -> Tensor:
    keep = _uniform((x.shape[0],), generator, x.device) >= prob  # (N,)
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, augmented)


def strong_augment(x: Tensor, generator: Generator, prob: float = 0.75, noise_std: float = STRONG_NOISE_STD) -> Tensor:
    """FixMatch's strong view, drawn per record: amplitude scaling, then time flip, lead
    shuffle, strong noise and burst dropout, each applied to a record with probability ``prob``."""
    out = amplitude_scale(x, generator)
    out = _maybe(out, time_flip(out, generator), prob, generator)
    out = _maybe(out, lead_shuffle(out, generator, per_record=True), prob, generator)
    out = _maybe(out, gaussian_noise(out, generator, noise_std), prob, generator)
    return _maybe(out, burst_dropout(out, generator, per_record=True), prob, generator)
