"""Batch iteration whose order is a pure function of ``(seed, epoch)``, so a resumed run sees the same batches.

In-memory datasets are indexed a whole batch at a time (one gather instead of ``batch_size``
``__getitem__`` calls and a collate); lazy datasets go through a seeded torch ``DataLoader``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiervision.data.base import FeatureDataset, TensorImageDataset

__all__ = ["BatchLoader", "epoch_permutation", "iter_batches"]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch; depends only on its arguments."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g)


def _worker_init(worker_id: int) -> None:
    """Seed numpy/random in each worker from torch's per-worker seed (itself derived from the loader's generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class BatchLoader:
    """Reproducible batches: call :meth:`set_epoch` before iterating (like ``DistributedSampler``).

    Args:
        dataset: a :class:`TensorImageDataset` (fast path) or any map-style dataset.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (from ``seed`` and the epoch number).
        seed: base seed.
        num_workers: worker processes for lazy datasets (ignored by the fast path).
        drop_last: drop the last incomplete batch.
        device: fast path only — move uint8 batches there before the float conversion (saves bandwidth).
        rank, world_size: DDP — ``batch_size`` is the global batch; rank ``r`` yields the ``r``-th of
            ``world_size`` contiguous slices of each global batch, so the ranks together see exactly the
            batches one process would, and the order stays a function of ``(seed, epoch)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch: it must be ≥ the {world_size} processes")
        self.rank, self.world_size = rank, world_size
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.num_workers, self.drop_last, self.device = num_workers, drop_last, device
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> BatchLoader:
        """Select the epoch whose order to replay; ``start_batch`` skips batches already seen (mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        return self

    def __len__(self) -> int:
        n = len(self.dataset)
        # under DDP a last batch too small to give every rank a sample is dropped
        drop = self.drop_last or (self.world_size > 1 and n % self.batch_size < self.world_size)
        return n // self.batch_size if drop else -(-n // self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        perm = epoch_permutation(len(self.dataset), self.seed, self.epoch, self.shuffle)
        batches = list(perm.split(self.batch_size))[self.start_batch : len(self)]
        if self.world_size > 1:
            batches = [b.tensor_split(self.world_size)[self.rank] for b in batches]
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if isinstance(self.dataset, FeatureDataset):
            for idx in batches:
                yield self.dataset.features[idx], self.dataset.targets[idx]
            return
        if isinstance(self.dataset, TensorImageDataset):
            images, targets = self.dataset.images, self.dataset.targets
            for idx in batches:
                x = images[idx]
                if self.device is not None:
                    x = x.to(self.device, non_blocking=True)
                yield x.float().div_(255), targets[idx]
            return
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + self.epoch) % (2**63))
        loader = DataLoader(
            self.dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
            worker_init_fn=_worker_init,
            generator=g,
            persistent_workers=False,
        )
        for x, y in loader:
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            yield (x.to(self.device), y) if self.device is not None else (x, y)


def iter_batches(
    dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, start_batch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches without keeping a loader object around."""
    return iter(BatchLoader(dataset, batch_size, shuffle, seed).set_epoch(epoch, start_batch))
