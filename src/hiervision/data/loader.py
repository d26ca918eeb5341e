"""Batch iteration whose order is a pure function of ``(seed, epoch)``, so a resumed run sees the same batches.

In-memory datasets are indexed a whole batch at a time (one gather instead of ``batch_size``
``__getitem__`` calls and a collate); lazy datasets go through a torch ``DataLoader`` whose workers
decode (and, for the ImageNet-style pipeline, augment) each image. Images stay uint8 until they
reach the target device (a quarter of the bytes of float32 on the copy), from pinned memory on CUDA.

Distributed runs: every rank computes the same global order; each global batch of ``batch_size``
is cut into ``world_size`` contiguous slices and rank ``r`` takes slice ``r``, so the union of the
ranks' batches is exactly the single-process batch (``batch_size`` is the global batch).
Evaluation shards are :func:`hiervision.distributed.shard_indices`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiervision.data.base import FeatureDataset, FileImageDataset, TensorImageDataset

__all__ = ["BatchLoader", "epoch_permutation", "iter_batches", "sample_seed"]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of one epoch; depends only on its arguments."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's per-image augmentation: the same whichever worker or rank decodes it."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 0x9E3779B1 + int(index)) % (2**63)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1 (world_size ≥ 1), got rank {rank}, world_size {world_size}")


def _worker_init(worker_id: int) -> None:
    """Seed numpy/random in each worker from torch's per-worker seed (itself derived from the loader's generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class _Items(Dataset):
    """What the DataLoader workers index: ``(i, sample seed)`` pairs → ``(uint8 or float image, target)``.

    Lazy file datasets hand over their uint8 decode (converted to float on the device); datasets with a
    per-image pipeline get the sample's seed, so augmentation does not depend on the worker count.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor]:
        i, s = key
        ds = self.dataset
        if hasattr(ds, "load"):
            return ds.load(i, s)
        if isinstance(ds, FileImageDataset):
            return ds.read(ds.sources[i]), ds._target(i)
        return ds[i]


class _Batches:
    """A re-iterable batch sampler whose content the loader replaces each epoch (persistent workers keep it)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Reproducible batches: call :meth:`set_epoch` before iterating (like ``DistributedSampler``).

    Args:
        dataset: a :class:`TensorImageDataset` (fast path) or any map-style dataset.
        batch_size: samples per global batch (all ranks together).
        shuffle: reshuffle every epoch (from ``seed`` and the epoch number).
        seed: base seed.
        num_workers: worker processes for lazy datasets (ignored by the in-memory paths).
        drop_last: drop the last incomplete batch.
        min_last: drop a last incomplete batch smaller than this, unless it is the epoch's only batch
            (training: :data:`~hiervision.training.engine.MIN_LAST_BATCH_FRACTION` of the batch).
        device: move uint8 batches there before the float conversion (saves bandwidth); pinned on CUDA.
        rank, world_size: this process's slice of every global batch.
        persistent_workers: keep lazy datasets' workers alive between epochs (no re-fork per epoch).
        prefetch_factor: batches each worker decodes ahead.
        pin_memory: page-locked batches so the device copy overlaps compute (default: when ``device`` is CUDA).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        min_last: int = 1,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        _check_rank(rank, world_size)
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) is smaller than the world size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be ≥ 0, got {num_workers}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.num_workers, self.drop_last, self.min_last = num_workers, drop_last, int(min_last)
        self.device = None if device is None else torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.pin_memory = (self.device is not None and self.device.type == "cuda") if pin_memory is None else pin_memory
        self.epoch, self.start_batch = 0, 0
        self._sampler = _Batches()
        self._loader: DataLoader | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> BatchLoader:
        """Select the epoch whose order to replay; ``start_batch`` skips batches already seen (mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        return self

    def _shard_order(self) -> Dataset | None:
        """The data set (or the one a pipeline view reads) when it asks for its own shard-local order."""
        src = getattr(self.dataset, "base", self.dataset)
        return src if self.shuffle and getattr(src, "shard_order", False) else None

    def _order(self) -> torch.Tensor:
        src = self._shard_order()
        if src is not None:
            return src.epoch_order(self.seed, self.epoch, self.batch_size, self.world_size)
        return epoch_permutation(len(self.dataset), self.seed, self.epoch, self.shuffle)  # type: ignore[arg-type]

    def _count(self, n: int) -> int:
        full, rest = divmod(n, self.batch_size)
        # a last batch too small to give every rank a sample is dropped, so no rank ever gets an empty batch;
        # one under min_last too, unless it is all there is
        return full + (rest > 0 and not self.drop_last and rest >= self.world_size and (rest >= self.min_last
                                                                                         or full == 0))

    def __len__(self) -> int:
        """Global batches per epoch (the same count on every rank)."""
        n = len(self._order()) if self._shard_order() is not None else len(self.dataset)  # type: ignore[arg-type]
        return self._count(n)

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches (sample indices), after ``start_batch``; the same on every rank."""
        perm = self._order()
        return list(perm.split(self.batch_size))[self.start_batch : self._count(len(perm))]

    def _batches(self) -> list[torch.Tensor]:
        batches = self.global_batches()
        if self.world_size == 1:
            return batches
        return [b.tensor_split(self.world_size)[self.rank] for b in batches]

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device is None:
            return x
        if self.pin_memory and self.device.type == "cuda" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if isinstance(self.dataset, FeatureDataset):
            for idx in batches:
                yield self.dataset.features[idx], self.dataset.targets[idx]
            return
        if isinstance(self.dataset, TensorImageDataset):
            images, targets = self.dataset.images, self.dataset.targets
            for idx in batches:
                yield self._to_device(images[idx]).float().div_(255), targets[idx]
            return
        self._sampler.batches = [[(i, sample_seed(self.seed, self.epoch, i)) for i in b.tolist()] for b in batches]
        for x, y in self._dataloader():
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            x = self._to_device(x)
            yield (x.float().div_(255) if x.dtype == torch.uint8 else x), y

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers
            g = torch.Generator().manual_seed(int(self.seed) % (2**63))
            self._loader = DataLoader(
                _Items(self.dataset),
                batch_sampler=self._sampler,
                num_workers=workers,
                worker_init_fn=_worker_init,
                generator=g,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                persistent_workers=self.persistent_workers and workers > 0,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
            )
        return self._loader


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches without keeping a loader object around (evaluation: workers decode lazy sets)."""
    loader = BatchLoader(dataset, batch_size, shuffle, seed, num_workers=num_workers, device=device,
                         persistent_workers=False)
    return iter(loader.set_epoch(epoch, start_batch))
