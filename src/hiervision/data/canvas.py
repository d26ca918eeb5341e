"""Multi-label canvases of real Fashion-MNIST items: each image holds a *set* of tree paths.

Koo et al. evaluate the multi-label setting on Open Images, where one photo carries several
labels that may sit anywhere in the class tree. Open Images cannot be downloaded here, so this
module builds the closest real stand-in we can check exactly: a ``grid × grid`` canvas (default
2 × 2 → 56 × 56, grey) whose cells hold between ``min_items`` and ``max_items`` real Fashion-MNIST
images in distinct random cells, empty cells black. The target marks the path end (leaf) of every
pasted item in a bool ``(N+1,)`` vector, so two items of one class give one mark.

No leakage: the official train images are split into train/val *items* first (the same seeded,
stratified split ``fashion_mnist`` uses for its val set), and train, val and test canvases are
composed only from the train items, val items and the 10k official test images respectively.
Items are drawn by walking through seeded permutations of their pool, so every item is used
equally often (± 1) and a canvas repeats an item only where two permutations meet.
Generation is vectorised and deterministic given ``seed``: 70k canvases take about a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from hiervision.data.base import TensorImageDataset, stratified_split
from hiervision.data.fashion_mnist import load_fashion_mnist

__all__ = ["CanvasSet", "CanvasSplits", "compose_canvases", "load_fashion_mnist_canvas"]

#: random streams of the three splits, so the test canvases do not depend on the train/val sizes
_STREAMS = {"train": 0, "val": 1, "test": 2}


@dataclass
class CanvasSet:
    """Composed canvases plus where every cell came from (kept for provenance checks)."""

    images: torch.Tensor  # uint8 (n, C, grid*h, grid*w)
    targets: torch.Tensor  # bool (n, num_nodes): path ends of the pasted items
    sources: torch.Tensor  # long (n, grid*grid): pool index of the item in each cell (row-major), -1 = empty


def compose_canvases(
    items: torch.Tensor,
    labels: torch.Tensor,
    num_nodes: int,
    n: int,
    rng: np.random.Generator,
    grid: int = 2,
    min_items: int = 1,
    max_items: int | None = None,
) -> CanvasSet:
    """Paste ``min_items..max_items`` (uniform count) items into distinct random cells of ``n`` canvases.

    Args:
        items: uint8 ``(m, C, h, w)`` pool of item images.
        labels: long ``(m,)`` node id of each item (its path end).
        num_nodes: length of the target vectors (``taxonomy.num_nodes``).
        n: number of canvases.
        rng: the only source of randomness, so the result is a function of its state.
        grid: cells per side.
        min_items, max_items: item count range per canvas (``max_items`` defaults to ``grid²``).
    """
    cells = grid * grid
    max_items = cells if max_items is None else max_items
    if grid < 1 or not 1 <= min_items <= max_items <= cells:
        raise ValueError(f"need grid ≥ 1 and 1 ≤ min_items ≤ max_items ≤ grid² = {cells}, "
                         f"got grid={grid}, min_items={min_items}, max_items={max_items}")  # fmt: skip
    if items.dtype != torch.uint8 or items.dim() != 4 or len(items) != len(labels):
        raise ValueError(f"items must be uint8 (m, C, h, w) with one label each, got {items.dtype} "
                         f"{tuple(items.shape)} and {len(labels)} labels")  # fmt: skip
    m, c, h, w = items.shape
    if n and not m:
        raise ValueError("no items to compose canvases from")
    count = rng.integers(min_items, max_items + 1, n)
    order = np.argsort(rng.random((n, cells)), axis=1)  # a random cell order per canvas
    occupied = np.arange(cells) < count[:, None]  # the first `count` cells of that order get items
    total = int(count.sum())
    perms = [rng.permutation(m) for _ in range(-(-total // m) if m else 0)]
    pick = np.concatenate(perms)[:total] if perms else np.zeros(0, dtype=np.int64)
    rows, slots = np.repeat(np.arange(n), count), order[occupied]  # both in row-major slot order
    sources = np.full((n, cells), -1, dtype=np.int64)
    sources[rows, slots] = pick
    r, s, p = (torch.from_numpy(a.astype(np.int64)) for a in (rows, slots, pick))
    images = torch.zeros(n, c, grid * h, grid * w, dtype=torch.uint8)
    # (n, C, grid, h, grid, w) view: indexing canvas, cell row and cell column writes whole items
    images.view(n, c, grid, h, grid, w)[r, :, s // grid, :, s % grid, :] = items[p]
    targets = torch.zeros(n, num_nodes, dtype=torch.bool)
    targets[r, labels[p]] = True
    return CanvasSet(images, targets, torch.from_numpy(sources))


@dataclass
class CanvasSplits:
    """The three canvas datasets and, per split, each cell's item index in its official file (-1 = empty).

    ``sources['train']`` and ``sources['val']`` index the official train file, ``sources['test']`` the test file.
    """

    train: TensorImageDataset
    val: TensorImageDataset
    test: TensorImageDataset
    sources: dict[str, torch.Tensor] = field(default_factory=dict)


def load_fashion_mnist_canvas(
    root: str | os.PathLike | None = None,
    *,
    variable_depth: bool = True,
    grid: int = 2,
    min_items: int = 1,
    max_items: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    seed: int = 0,
) -> CanvasSplits:
    """Train/val/test canvases from disjoint real item pools (see the module docstring).

    Sizes default to the item counts of each pool (54000 / 6000 / 10000 with ``val_fraction`` 0.1),
    so an epoch has as many images as on plain Fashion-MNIST and each item shows up about
    ``(min_items + max_items) / 2`` times. ``limit_train`` caps train + val canvases together,
    keeping their ratio (as ``fashion_mnist`` limits its pool before the val split);
    ``limit_test`` caps the test canvases.
    """
    train_file = load_fashion_mnist(root, "train", variable_depth)
    test_file = load_fashion_mnist(root, "test", variable_depth)
    tax = train_file.taxonomy
    if val_fraction > 0:
        train_idx, val_idx = stratified_split(train_file.targets, val_fraction, split_seed)
    else:
        train_idx, val_idx = torch.arange(len(train_file)), torch.zeros(0, dtype=torch.long)
    n_tr = len(train_idx) if n_train is None else n_train
    n_va = len(val_idx) if n_val is None else n_val
    n_te = len(test_file) if n_test is None else n_test
    if n_va and not len(val_idx):
        raise ValueError(f"n_val: {n_va} val canvases need val items, but val_fraction is 0")
    if limit_train is not None and limit_train < n_tr + n_va:
        n_va = n_va * limit_train // (n_tr + n_va)
        n_tr = limit_train - n_va
    if limit_test is not None:
        n_te = min(n_te, limit_test)
    pools = {"train": (train_file, train_idx, n_tr), "val": (train_file, val_idx, n_va),
             "test": (test_file, torch.arange(len(test_file)), n_te)}  # fmt: skip
    out: dict[str, TensorImageDataset] = {}
    sources: dict[str, torch.Tensor] = {}
    for split, (file, idx, n) in pools.items():
        rng = np.random.default_rng([seed, _STREAMS[split]])
        made = compose_canvases(file.images[idx], file.targets[idx], tax.num_nodes, n, rng, grid, min_items,
                                max_items)  # fmt: skip
        out[split] = TensorImageDataset(made.images, made.targets, tax)
        sources[split] = torch.where(made.sources >= 0, idx[made.sources.clamp(min=0)], -1)
    return CanvasSplits(out["train"], out["val"], out["test"], sources)
