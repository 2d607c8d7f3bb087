"""Infinite, resumable batch iteration with a seeded reshuffle every epoch.

Fine-tuning counts steps, not epochs: each step takes the next labelled (and unlabelled)
batch from an endless stream of indices, made of one seeded permutation of the dataset per
epoch. Batches are always full (a batch may run across an epoch boundary). The position in
the stream is two integers, ``(epoch, offset)``: the trainer checkpoints them and a resumed
run continues with exactly the batches the interrupted run would have drawn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and stream keys (independent streams per key)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``: torch's ``Dataset`` type does not declare ``__len__``; every dataset
    trained on here is map-style and has one (a TypeError names one that does not)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no len(): a map-style dataset with __len__ is needed")
    return len(dataset)


@dataclass
class StreamPosition:
    """Where an :class:`EpochStream` stands: epoch number and offset inside its permutation."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


class EpochStream:
    """Endless stream of dataset indices: epoch e is ``randperm(n)`` seeded by (seed, e)."""

    def __init__(self, size: int, batch_size: int, seed: int, position: StreamPosition | None = None):
        if size < 1:
            raise ValueError("cannot draw batches from an empty dataset")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.position = position or StreamPosition()
        self._cached: tuple[int, Tensor] | None = None

    def permutation(self, epoch: int) -> Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._cached = (epoch, torch.randperm(self.size, generator=generator))
        return self._cached[1]

    def next_indices(self) -> list[int]:
        """The next ``batch_size`` indices; advances the position."""
        out: list[int] = []
        while len(out) < self.batch_size:
            perm = self.permutation(self.position.epoch)
            take = min(self.batch_size - len(out), self.size - self.position.offset)
            out += perm[self.position.offset : self.position.offset + take].tolist()
            self.position.offset += take
            if self.position.offset == self.size:
                self.position = StreamPosition(self.position.epoch + 1, 0)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()


def fetch(dataset: Dataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Collate ``dataset[i] for i in indices`` into ``(x, y)`` batches.

    Fast paths: a ``TensorDataset`` is indexed with one tensor index, a dataset with
    ``__getitems__`` (e.g. a memory-mapped store) is asked for the whole batch at once.
    """
    if isinstance(dataset, TensorDataset):
        index = torch.as_tensor(indices, dtype=torch.long)
        x, y = (t[index] for t in dataset.tensors[:2])
        return x, y
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems else [dataset[i] for i in indices]
    x, y = default_collate(items)[:2]
    return x, y


class BatchIterator:
    """Endless ``(x, y)`` batches on ``device`` from an :class:`EpochStream`.

    ``num_workers == 0`` fetches in the calling process. With workers a DataLoader
    prefetches ahead of the consumer; :attr:`position` always counts the batches actually
    returned, so a checkpoint taken at any moment resumes exactly.

    On CUDA the batch is copied from pinned (page-locked) host memory with
    ``non_blocking=True`` (the DataLoader's workers pin it; in-process fetches are pinned
    here): the copy is queued behind the running step instead of stopping the host, and as
    the training loop never waits for the GPU, the next batch is read and queued while the
    current step still computes. :attr:`fetch_seconds` adds up the host time spent here (the
    loader's share of a step, for the benchmark).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        device: torch.device,
        position: StreamPosition | None = None,
        num_workers: int = 0,
    ) -> None:
        start = position or StreamPosition()
        self.dataset, self.device = dataset, device
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.fetch_seconds = 0.0
        self._consumed = EpochStream(dataset_size(dataset), batch_size, seed, StreamPosition(start.epoch, start.offset))
        self._loader: Iterator[tuple[Tensor, Tensor]] | None = None
        if num_workers > 0:
            sampler = EpochStream(dataset_size(dataset), batch_size, seed, StreamPosition(start.epoch, start.offset))
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=num_workers,
                pin_memory=self.pin,
                generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
                persistent_workers=False,
            )
            self._loader = iter(loader)

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self._consumed.position.epoch, self._consumed.position.offset)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        start = time.perf_counter()
        indices = self._consumed.next_indices()
        if self._loader is not None:
            x, y = next(self._loader)[:2]
        else:
            x, y = fetch(self.dataset, indices)
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
        batch = x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)
        self.fetch_seconds += time.perf_counter() - start
        return batch
