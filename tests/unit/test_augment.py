"""Augmentations: exact semantics, label mixing by area, generator-driven determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.train.augment import (
    WEAK_AUGMENTATIONS,
    CutmixBox,
    apply_cutmix,
    burst_dropout,
    cutmix,
    cutmix_box,
    gaussian_noise,
    lead_shuffle,
    make_generator,
    sample_beta,
    sample_cutmix,
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


def test_cutmix_box_is_rand_bbox_of_lambda_clipped_at_the_edges() -> None:
    # sqrt(1 - 0.75) = 0.5: 6 of 12 leads (half 3), 128 of 256 samples (half 64)
    assert cutmix_box(0.75, 12, T, centre_lead=5, centre_time=100) == CutmixBox(2, 8, 36, 164)
    # clipped at both edges: centre lead 0 -> [0, 3); centre time 250 -> [186, 256)
    box = cutmix_box(0.75, 12, T, centre_lead=0, centre_time=250)
    assert box == CutmixBox(0, 3, 186, 256)
    assert box.area == 3 * 70
    # lambda = 1: empty box; lambda = 0: the whole record around the centre
    assert cutmix_box(1.0, 12, T, 6, 128).area == 0
    assert cutmix_box(0.0, 12, T, 6, 128) == CutmixBox(0, 12, 0, 256)


def test_apply_cutmix_pastes_the_box_from_the_permutation_and_mixes_labels_by_area() -> None:
    n = 4
    x = torch.arange(n * 12 * T, dtype=torch.float32).view(n, 12, 1, T)
    y = torch.eye(n)
    x_before, y_before = x.clone(), y.clone()
    perm = torch.tensor([2, 0, 3, 1])
    box = CutmixBox(lead_start=3, lead_stop=7, time_start=10, time_stop=74)
    mixed, y_mixed = apply_cutmix(x, y, box, perm)
    assert torch.equal(x, x_before) and torch.equal(y, y_before), "inputs are not modified"
    expected = x.clone()
    expected[:, 3:7, :, 10:74] = x[perm][:, 3:7, :, 10:74]
    assert torch.equal(mixed, expected)
    lam_adj = 1 - (4 * 64) / (12 * T)  # 1/12 of the record swapped
    assert torch.allclose(y_mixed, lam_adj * y + (1 - lam_adj) * y[perm])
    assert y_mixed[0, 0] == pytest.approx(11 / 12) and y_mixed[0, 2] == pytest.approx(1 / 12)


def test_cutmix_uses_one_lambda_and_one_box_for_the_whole_batch() -> None:
    n = 32
    x = _constant_records(n)
    y = torch.eye(n)
    lam, box, perm = sample_cutmix(x, make_generator(0))
    mixed, y_mixed = cutmix(x, y, make_generator(0))
    assert 0.0 <= lam <= 1.0
    assert box == cutmix_box(lam, 12, T, *_centre_of(box, lam))
    ref_x, ref_y = apply_cutmix(x, y, box, perm)
    assert torch.equal(mixed, ref_x) and torch.equal(y_mixed, ref_y)
    swapped = mixed[:, :, 0, :] != x[:, :, 0, :]  # (N, leads, T)
    moved = perm != torch.arange(n)
    assert swapped[moved].any(dim=0).sum() == box.area, "the same box in every moved record"
    assert not swapped[~moved].any()


def _centre_of(box: CutmixBox, lam: float) -> tuple[int, int]:
    """A centre that reproduces ``box`` (the unclipped side of the box, else its midpoint)."""
    lead_half = int(12 * (1 - lam) ** 0.5) // 2
    time_half = int(T * (1 - lam) ** 0.5) // 2
    lead = box.lead_start + lead_half if box.lead_start > 0 else box.lead_stop - lead_half
    time = box.time_start + time_half if box.time_start > 0 else box.time_stop - time_half
    return lead, time


def test_cutmix_replaces_a_quarter_of_the_batch_on_average() -> None:
    # E[box area] ~ E[1 - lambda] = 0.5 before clipping and flooring; the old per-record,
    # all-leads Cutmix replaced ~44% of a record, the reference's box ~25%.
    x = _constant_records(8)
    areas = [sample_cutmix(x, make_generator(seed))[1].area / (12 * T) for seed in range(400)]
    assert 0.18 < float(np.mean(areas)) < 0.32


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


def test_burst_dropout_zeroes_one_contiguous_span_per_lead_shared_by_the_batch() -> None:
    x = _signal(8)
    out = burst_dropout(x, make_generator(2))
    zero = out == 0  # (N, leads, 1, T)
    assert torch.equal(out[~zero], x[~zero])
    assert (zero == zero[:1]).all(), "every record gets the same spans"
    spans = []
    for lead in range(12):
        positions = zero[0, lead, 0].nonzero().squeeze(1)
        if positions.numel():
            assert positions.max() - positions.min() + 1 == positions.numel()
        spans.append(positions.numel())
    assert len(set(spans)) > 6, "span lengths are drawn per lead"
    assert max(spans) < T
    per_record = burst_dropout(x, make_generator(2), per_record=True) == 0
    assert not (per_record == per_record[:1]).all(), "per_record=True draws spans per record"


def test_lead_shuffle_permutes_leads_with_one_permutation_for_the_batch() -> None:
    x = torch.arange(12, dtype=torch.float32).view(1, 12, 1, 1).expand(16, 12, 1, T).clone()
    perms = lead_shuffle(x, make_generator(0))[:, :, 0, 0].long()
    assert sorted(perms[0].tolist()) == list(range(12))
    assert perms[0].tolist() != list(range(12))
    assert (perms == perms[:1]).all(), "one permutation shared by the batch"
    own = lead_shuffle(x, make_generator(0), per_record=True)[:, :, 0, 0].long()
    assert len({tuple(p.tolist()) for p in own}) > 1, "per_record=True: each record its own"


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


def test_weak_augment_applies_one_transform_to_the_whole_batch() -> None:
    x = _signal(16, seed=7)
    seen = set()
    for seed in range(24):
        out = weak_augment(x, make_generator(seed))
        kinds = {_kind(x[i], out[i]) for i in range(16)}
        assert len(kinds) == 1 and "other" not in kinds, f"seed {seed}: {kinds}"
        seen |= kinds
        if kinds == {"shuffle"}:
            order = [[int(torch.argmin((x[i, :, 0, 0] - out[i, a, 0, 0]).abs())) for a in range(12)] for i in range(16)]
            assert all(o == order[0] for o in order), "one lead permutation for the batch"
        if kinds == {"burst"}:
            zero = out == 0
            assert (zero == zero[:1]).all(), "burst spans shared by the batch"
    assert seen == {"flip", "burst", "shuffle", "noise"}


def test_weak_augment_is_the_drawn_transform_with_the_remaining_draws() -> None:
    x = _signal(8)
    gen = make_generator(5)
    choice = int(torch.randint(4, (1,), generator=gen).item())
    expected = WEAK_AUGMENTATIONS[choice](x, gen)
    assert torch.equal(weak_augment(x, make_generator(5)), expected)


def test_strong_augment_changes_records_and_stays_finite() -> None:
    x = _signal(16)
    out = strong_augment(x, make_generator(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert ((out - x).abs().flatten(1).max(dim=1).values > 0.1).all()
