"""Batch transforms and reproducible loaders."""

from __future__ import annotations

import pytest
import torch

from hiervision.data import BatchAugment, BatchLoader, hflip, iter_batches, normalize, pad_crop, resize
from hiervision.data.base import TensorImageDataset
from hiervision.data.synthetic import make_synthetic


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pad_crop_shapes_determinism_and_content() -> None:
    x = torch.rand(16, 3, 8, 8)
    a, b = pad_crop(x, 2, _gen(0)), pad_crop(x, 2, _gen(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, pad_crop(x, 2, _gen(1)))
    # every crop is a shifted window: zero border or original pixels only
    ones = pad_crop(torch.ones(64, 1, 6, 6), 3, _gen(0))
    assert set(ones.unique().tolist()) <= {0.0, 1.0} and (ones.flatten(1).sum(1) >= 9).all()
    assert (ones.flatten(1).sum(1) < 36).any()
    refl = pad_crop(x, 2, _gen(0), mode="reflect")
    assert refl.shape == x.shape and (refl != 0).all()
    assert torch.equal(pad_crop(x, 0, _gen(0)), x)
    u8 = pad_crop((x * 255).to(torch.uint8), 2, _gen(0))
    assert u8.dtype == torch.uint8


def test_hflip_really_flips_per_sample() -> None:
    x = torch.arange(32 * 5, dtype=torch.float32).view(32, 1, 1, 5)
    y = hflip(x, _gen(0))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any() and kept.any()
    assert torch.equal(y, hflip(x, _gen(0)))
    assert torch.equal(hflip(x, _gen(0), p=1.0), x.flip(-1))


def test_normalize_and_resize() -> None:
    x = torch.rand(4, 3, 8, 8)
    n = normalize(x, (0.5, 0.4, 0.3), (0.1, 0.2, 0.3))
    assert torch.allclose(n[:, 1], (x[:, 1] - 0.4) / 0.2)
    u8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    small = resize(u8, 32)
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 32, 32)
    area = u8.float().unflatten(-1, (32, 2)).unflatten(-3, (32, 2)).mean(dim=(-3, -1))
    assert (small.float() - area).abs().max() <= 0.5 + 1e-4
    assert resize(x, (12, 10)).shape == (4, 3, 12, 10) and resize(x, 8) is x


def test_batch_augment() -> None:
    aug = BatchAugment(pad=4, flip=True)
    x = torch.rand(8, 3, 16, 16)
    assert torch.equal(aug(x, _gen(3)), aug(x, _gen(3))) and aug(x, _gen(3)).shape == x.shape
    assert torch.equal(BatchAugment(pad=0, flip=False)(x, _gen(0)), x)
    with pytest.raises(ValueError, match="pad_mode"):
        BatchAugment(pad_mode="wrap")


def test_fast_loader_reproducible_by_epoch() -> None:
    ds = make_synthetic("synthetic", 100, seed=0)
    loader = BatchLoader(ds, 32, shuffle=True, seed=5)
    assert len(loader) == 4
    e0 = [y for _, y in loader.set_epoch(0)]
    e0_again = [y for _, y in BatchLoader(ds, 32, shuffle=True, seed=5).set_epoch(0)]
    e1 = [y for _, y in loader.set_epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(e0, e0_again))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert torch.cat(e0).sort().values.tolist() == ds.targets.sort().values.tolist()
    # a resumed run skips the batches it has seen and continues identically
    resumed = [y for _, y in iter_batches(ds, 32, shuffle=True, seed=5, epoch=0, start_batch=2)]
    assert len(resumed) == 2 and torch.equal(resumed[0], e0[2])
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and x.max() <= 1 and x.shape == (32, 3, 32, 32)
    assert len(BatchLoader(ds, 32, drop_last=True)) == 3


def test_loader_drops_a_last_batch_under_min_last_unless_it_is_the_only_one() -> None:
    ds = make_synthetic("synthetic", 66, seed=0)  # 2 full batches of 32 and 2 images left
    sizes = [len(y) for _, y in BatchLoader(ds, 32, shuffle=True, min_last=4).set_epoch(0)]
    assert sizes == [32, 32]
    assert [len(y) for _, y in BatchLoader(ds, 32, min_last=2)] == [32, 32, 2]
    # which images sit out rotates with the epoch's shuffle
    left_out = [set(range(66)) - set(torch.cat(list(BatchLoader(ds, 32, shuffle=True, min_last=4)
                                                    .set_epoch(e).global_batches())).tolist()) for e in range(3)]
    assert all(len(s) == 2 for s in left_out) and len({frozenset(s) for s in left_out}) > 1
    assert [len(y) for _, y in BatchLoader(make_synthetic("synthetic", 3, seed=0), 32, min_last=4)] == [3]


def test_lazy_loader_matches_fast_path_order() -> None:
    ds = make_synthetic("synthetic", 50, seed=0)

    class Lazy(torch.utils.data.Dataset):  # a non-tensor dataset goes through DataLoader
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            return ds[i]

    fast = list(iter_batches(ds, 16, shuffle=True, seed=2, epoch=3))
    lazy = list(iter_batches(Lazy(), 16, shuffle=True, seed=2, epoch=3))
    assert len(fast) == len(lazy) == 4
    for (xf, yf), (xl, yl) in zip(fast, lazy):
        assert torch.equal(yf, yl) and torch.allclose(xf, xl)
    assert isinstance(ds, TensorImageDataset)
