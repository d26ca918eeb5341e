"""Synthetic datasets: determinism, valid targets, tree-shaped content, speed."""

from __future__ import annotations

import time

import pytest
import torch

from hiervision.data import build_data
from hiervision.data.synthetic import SYNTHETIC_VARIANTS, make_synthetic, synthetic_taxonomy


def test_trees() -> None:
    fixed, var = synthetic_taxonomy(), synthetic_taxonomy(variable_depth=True)
    assert [len(level) for level in fixed.levels] == [2, 6, 12] and fixed.is_fixed_depth
    assert len(var.leaves) == 10 and not var.is_fixed_depth
    assert sorted(var.path_name(n) for n in var.leaves if var.depths[n] == 2) == ["horizontal/cross", "vertical/square"]


@pytest.mark.parametrize("variant", SYNTHETIC_VARIANTS)
def test_deterministic_and_valid(variant: str) -> None:
    a = make_synthetic(variant, 300, seed=3)
    b = make_synthetic(variant, 300, seed=3)
    c = make_synthetic(variant, 300, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (300, 3, 32, 32) and a.images.dtype == torch.uint8
    tax = a.taxonomy
    if variant == "synthetic_multilabel":
        assert a.targets.shape == (300, tax.num_nodes) and a.targets.dtype == torch.bool
        counts = a.targets.sum(1)
        assert counts.min() >= 1 and counts.max() <= 4 and not a.targets[:, 0].any()
        ends = a.targets.nonzero()[:, 1].unique().tolist()
        assert set(ends) <= set(tax.leaves) and len(ends) == len(tax.leaves)
        x, y = a[0]
        assert y.dtype == torch.bool and y.shape == (tax.num_nodes,)
    else:
        assert set(a.targets.tolist()) == set(tax.leaves)
        assert isinstance(a[0][1], int)
    gray = make_synthetic(variant, 10, size=16, channels=1, seed=3)
    assert gray.images.shape == (10, 1, 16, 16)


def test_content_follows_the_tree() -> None:
    """Each depth changes the image: stripe direction (depth 1) and shape side (depth 3) are measurable."""
    ds = make_synthetic("synthetic", 2000, seed=0, noise=0.0)
    tax = ds.taxonomy
    paths = tax.encode_paths(ds.targets)
    x = ds.images.float().mean(1)  # (n, H, W)
    row_var = x.mean(2).var(1)  # horizontal stripes → rows differ
    col_var = x.mean(1).var(1)
    horizontal = paths[:, 0] == tax.index("horizontal")
    assert ((row_var > col_var) == horizontal).float().mean() > 0.85
    shape = (ds.images.min(1).values > 0.675 * 255).float()  # shapes are ≥ 0.7, backgrounds ≤ 0.65
    centre = (shape.mean(1) * torch.arange(32)).sum(1) / shape.mean(1).sum(1).clamp(min=1e-6)
    right = torch.tensor([tax.names[int(p)] == "right" for p in paths[:, 2]])
    assert ((centre > 15.5) == right).float().mean() > 0.97


def test_bundle_and_speed() -> None:
    t = time.perf_counter()
    b = build_data({"name": "synthetic_var", "n_train": 3000, "n_test": 500, "seed": 1, "size": 24, "channels": 1})
    assert time.perf_counter() - t < 3.0  # < 1 s on an idle core; generous for loaded CI
    assert len(b.train) + len(b.val) == 3000 and 240 < len(b.val) < 360 and len(b.test) == 500  # val by id hash
    assert b.in_chans == 1 and b.image_size == 24 and not b.multi_label
    assert not torch.equal(b.train.images[:500], b.test.images)  # train and test are different draws
    ml = build_data({"name": "synthetic_multilabel", "n_train": 200, "n_test": 50})
    assert ml.multi_label and 5 < len(ml.val) < 40
