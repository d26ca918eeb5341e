"""Multi-label Fashion-MNIST canvases: exact composition, labels = pasted items, no split leakage, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FMNIST
from hiervision.data import build_data
from hiervision.data.base import stratified_split
from hiervision.data.canvas import CanvasSplits, compose_canvases, load_fashion_mnist_canvas
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy, load_fashion_mnist

needs_data = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FMNIST} (apt-get install dataset-fashion-mnist)",
)
SMALL = {"n_train": 400, "n_val": 100, "n_test": 200}


def _cells(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``(n, C, grid*h, grid*w)`` canvases → ``(n, grid*grid, C, h, w)`` cells in row-major order."""
    n, c, hh, ww = images.shape
    h, w = hh // grid, ww // grid
    return images.view(n, c, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, h, w)


def _check_composition(images: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor,
                       items: torch.Tensor, labels: torch.Tensor, grid: int) -> None:  # fmt: skip
    """Every used cell is exactly its source item, every other cell black, targets = the items' path ends."""
    cells, used = _cells(images, grid), sources >= 0
    assert torch.equal(cells[used], items[sources[used]])
    assert not cells[~used].any()
    expected = torch.zeros_like(targets)
    rows = torch.arange(len(sources))[:, None].expand_as(sources)
    expected[rows[used], labels[sources[used]]] = True
    assert torch.equal(targets, expected)


def test_compose_exact_on_fake_items() -> None:
    # item k is a 1×3×2 patch of constant value k + 1, so every cell is identifiable by its pixels
    m, grid = 7, 3
    items = (torch.arange(m, dtype=torch.uint8) + 1).view(m, 1, 1, 1).expand(m, 1, 3, 2).contiguous()
    labels = torch.tensor([1, 2, 3, 4, 1, 2, 3])
    made = compose_canvases(items, labels, 6, 300, np.random.default_rng(5), grid=grid, min_items=2, max_items=5)
    assert made.images.shape == (300, 1, 9, 6) and made.images.dtype == torch.uint8
    assert made.targets.shape == (300, 6) and made.targets.dtype == torch.bool
    assert made.sources.shape == (300, 9)
    _check_composition(made.images, made.targets, made.sources, items, labels, grid)
    count = (made.sources >= 0).sum(1)
    assert set(count.tolist()) == {2, 3, 4, 5}  # uniform over the range: all four counts occur
    use = torch.bincount(made.sources[made.sources >= 0], minlength=m)
    assert use.max() - use.min() <= 1  # permutation walk: every item used equally often
    assert not made.targets[:, [0, 5]].any()  # only the items' own nodes are marked


def test_compose_seed_and_errors() -> None:
    items, labels = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8), torch.arange(20) % 3 + 1
    a, b, c = (compose_canvases(items, labels, 4, 50, np.random.default_rng(s)) for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    with pytest.raises(ValueError, match="max_items"):
        compose_canvases(items, labels, 4, 5, np.random.default_rng(0), grid=2, max_items=5)
    with pytest.raises(ValueError, match="min_items"):
        compose_canvases(items, labels, 4, 5, np.random.default_rng(0), min_items=3, max_items=2)
    with pytest.raises(ValueError, match="uint8"):
        compose_canvases(items.float(), labels, 4, 5, np.random.default_rng(0))


@pytest.fixture(scope="module")
def small() -> CanvasSplits:
    return load_fashion_mnist_canvas(FMNIST, **SMALL)


@needs_data
def test_real_canvases_hold_real_items(small: CanvasSplits) -> None:
    train_file, test_file = load_fashion_mnist(FMNIST, "train", True), load_fashion_mnist(FMNIST, "test", True)
    tax = fashion_mnist_taxonomy(variable_depth=True)
    for split, file in (("train", train_file), ("val", train_file), ("test", test_file)):
        ds, src = getattr(small, split), small.sources[split]
        assert len(ds) == SMALL[f"n_{split}"] and ds.multi_label
        assert ds.images.shape == (len(ds), 1, 56, 56) and ds.images.dtype == torch.uint8
        assert ds.targets.shape == (len(ds), tax.num_nodes) and ds.targets.dtype == torch.bool
        x, y = ds[0]
        assert x.dtype == torch.float32 and x.shape == (1, 56, 56) and y.dtype == torch.bool
        _check_composition(ds.images, ds.targets, src, file.images, file.targets, 2)
        count = (src >= 0).sum(1)
        assert count.min() >= 1 and count.max() <= 4
        assert set(torch.nonzero(ds.targets)[:, 1].tolist()) <= set(tax.leaves)


@needs_data
def test_no_item_leaks_between_splits(small: CanvasSplits) -> None:
    train_items, val_items = (set(small.sources[s][small.sources[s] >= 0].tolist()) for s in ("train", "val"))
    assert train_items and val_items and not train_items & val_items
    # the val items are exactly fashion_mnist's stratified val split of the official train file
    _, held = stratified_split(load_fashion_mnist(FMNIST, "train", True).targets, 0.1, 0)
    assert val_items <= set(held.tolist())
    test_src = small.sources["test"]
    assert test_src.max() < 10000  # indices into the 10k official test file (pixels checked above)


@needs_data
def test_determinism_by_seed(small: CanvasSplits) -> None:
    again = load_fashion_mnist_canvas(FMNIST, **SMALL)
    for split in ("train", "val", "test"):
        a, b = getattr(small, split), getattr(again, split)
        assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
        assert torch.equal(a.targets, b.targets)
    other = load_fashion_mnist_canvas(FMNIST, **SMALL, seed=1)
    assert not torch.equal(small.train.images, other.train.images)
    assert not torch.equal(small.test.images, other.test.images)
    # another split_seed moves items between train and val but leaves the test canvases alone
    resplit = load_fashion_mnist_canvas(FMNIST, **SMALL, split_seed=3)
    assert torch.equal(small.test.images, resplit.test.images)
    assert not torch.equal(small.val.images, resplit.val.images)


@pytest.mark.slow
@needs_data
def test_build_data_end_to_end() -> None:
    b = build_data({"name": "fashion_mnist_canvas"})
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert b.multi_label and b.in_chans == 1 and b.image_size == 56
    assert not b.taxonomy.is_fixed_depth and b.taxonomy.num_nodes == 15
    n_labels = b.train.targets.sum(1).float()
    assert n_labels.min() >= 1 and n_labels.max() <= 4 and 2.0 < n_labels.mean() < 2.5  # 1–4 items, some repeat
    # limit_train caps train + val like fashion_mnist's pool; limit_test caps test; a fixed-depth tree on request
    b = build_data({"name": "fashion_mnist_canvas", "limit_train": 500, "limit_test": 80, "grid": 3,
                    "min_items": 2, "variable_depth": False, "image_size": 42})  # fmt: skip
    assert (len(b.train), len(b.val), len(b.test)) == (450, 50, 80)
    assert b.image_size == 42 and b.taxonomy.is_fixed_depth and b.train.targets.shape[1] == 19


@pytest.mark.parametrize(
    ("extra", "key"),
    [({"size": 32}, "size"), ({"max_items": 5}, "max_items"), ({"min_items": 3, "max_items": 2}, "min_items"),
     ({"grid": 0}, "grid"), ({"variable_depth": "yes"}, "variable_depth"), ({"n_test": -1}, "n_test"),
     ({"n_val": 10, "val_fraction": 0}, "n_val")],
)  # fmt: skip
def test_bad_keys_name_the_key(extra: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^data\.{key}: [^\n]*$"):
        build_data({"name": "fashion_mnist_canvas", **extra})
