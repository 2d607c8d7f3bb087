"""Augmentations: exact semantics, label mixing by area, generator-driven determinism."""

from __future__ import annotations

import torch

from ml.train.augment import (
    burst_dropout,
    cutmix,
    gaussian_noise,
    lead_shuffle,
    make_generator,
    sample_beta,
    strong_augment,
    time_flip,
    weak_augment,
)

T = 256


def _constant_records(n: int, leads: int = 12) -> torch.Tensor:
    """Record i is the constant i + 1 everywhere (so a mixed record shows its sources)."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, leads, 1, T).clone()


def _signal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, 1, T, generator=g) + 3.0  # no exact zeros


def test_cutmix_swaps_one_time_window_and_mixes_labels_by_area() -> None:
    n = 32
    x = _constant_records(n)
    y = torch.eye(n)
    x_before = x.clone()
    mixed, y_mixed = cutmix(x, y, make_generator(0))
    assert torch.equal(x, x_before), "cutmix must not modify its input"
    assert mixed.shape == x.shape and y_mixed.shape == y.shape
    for i in range(n):
        row = mixed[i, :, 0, :]  # (leads, T)
        assert torch.equal(row, row[:1].expand_as(row)), "the window spans all leads"
        sources = row[0].long() - 1
        partner = sources[sources != i]
        area = (sources != i).float().mean()
        if partner.numel():
            j = int(partner[0])
            assert (partner == j).all()
            positions = (sources == j).nonzero().squeeze(1)
            assert positions.max() - positions.min() + 1 == positions.numel(), "one contiguous window"
            assert y_mixed[i, j] == area
        assert torch.isclose(y_mixed[i, i], 1 - area) or sources.eq(i).all()
        assert torch.isclose(y_mixed[i].sum(), torch.tensor(1.0))


def test_cutmix_lambda_is_beta_075() -> None:
    lam = sample_beta(0.75, 20000, make_generator(1), torch.device("cpu"))
    assert abs(lam.mean().item() - 0.5) < 0.01
    # Var of Beta(a, a) = 1 / (4 (2a + 1)) = 0.1 for a = 0.75
    assert abs(lam.var().item() - 0.1) < 0.005
    assert ((lam >= 0) & (lam <= 1)).all()


def test_same_generator_seed_same_augmentation() -> None:
    x, y = _signal(16), (torch.rand(16, 5) < 0.3).float()
    for fn in (weak_augment, strong_augment):
        assert torch.equal(fn(x, make_generator(3)), fn(x, make_generator(3)))
        assert not torch.equal(fn(x, make_generator(3)), fn(x, make_generator(4)))
    a, b = cutmix(x, y, make_generator(5)), cutmix(x, y, make_generator(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_time_flip_and_noise() -> None:
    x = _signal(4)
    assert torch.equal(time_flip(x, make_generator(0)), x.flip(-1))
    noisy = gaussian_noise(_signal(64), make_generator(0))
    assert abs((noisy - _signal(64)).std().item() - 0.05) < 0.002


def test_burst_dropout_zeroes_one_contiguous_span_per_lead() -> None:
    x = _signal(8)
    out = burst_dropout(x, make_generator(2))
    spans = []
    for i in range(8):
        for lead in range(12):
            zero = (out[i, lead, 0] == 0).nonzero().squeeze(1)
            kept = out[i, lead, 0] != 0
            assert torch.equal(out[i, lead, 0][kept], x[i, lead, 0][kept])
            if zero.numel():
                assert zero.max() - zero.min() + 1 == zero.numel()
            spans.append(zero.numel())
    assert len(set(spans)) > 10, "span lengths are drawn per record and lead"
    assert max(spans) < T


def test_lead_shuffle_permutes_leads_per_record() -> None:
    x = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1).expand(16, 12, 1, T).clone()
    out = lead_shuffle(x, make_generator(0))
    perms = out[:, :, 0, 0].long()
    for i in range(16):
        assert sorted(perms[i].tolist()) == list(range(12))
    assert len({tuple(p.tolist()) for p in perms}) > 1, "each record gets its own permutation"


def _kind(original: torch.Tensor, augmented: torch.Tensor) -> str:
    """Which single weak augmentation turned ``original`` (leads, 1, T) into ``augmented``."""
    if torch.equal(augmented, original.flip(-1)):
        return "flip"
    zero = augmented == 0
    if zero.any() and torch.equal(augmented[~zero], original[~zero]):
        return "burst"
    if sorted(augmented[:, 0, 0].tolist()) == sorted(original[:, 0, 0].tolist()) and all(
        any(torch.equal(augmented[a], original[b]) for b in range(12)) for a in range(12)
    ):
        return "shuffle"
    if (augmented - original).abs().max() < 0.5:
        return "noise"
    return "other"


def test_weak_augment_applies_exactly_one_transform_per_record() -> None:
    x = _signal(64, seed=7)
    out = weak_augment(x, make_generator(11))
    kinds = [_kind(x[i], out[i]) for i in range(64)]
    assert "other" not in kinds
    assert set(kinds) == {"flip", "burst", "shuffle", "noise"}


def test_strong_augment_changes_records_and_stays_finite() -> None:
    x = _signal(16)
    out = strong_augment(x, make_generator(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert ((out - x).abs().flatten(1).max(dim=1).values > 0.1).all()
