"""Splits, limits, coarse-only labels and config validation of build_data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiervision.data import build_data
from hiervision.data.base import coarsen_labels, stratified_split, stratified_subset
from hiervision.data.synthetic import make_synthetic


def test_stratified_split_disjoint_seeded_balanced() -> None:
    targets = torch.arange(1, 6).repeat_interleave(torch.tensor([100, 50, 30, 10, 10]))
    rest, held = stratified_split(targets, 0.2, seed=7)
    assert len(held) == 40 and len(rest) == 160
    assert torch.cat([rest, held]).sort().values.tolist() == list(range(200))
    counts = torch.bincount(targets[held], minlength=6)[1:].tolist()
    assert counts == [20, 10, 6, 2, 2]
    again = stratified_split(targets, 0.2, seed=7)
    assert torch.equal(again[1], held) and not torch.equal(stratified_split(targets, 0.2, seed=8)[1], held)
    sub = stratified_subset(targets, 20, seed=0)
    assert len(sub) == 20 and torch.bincount(targets[sub], minlength=6)[1:].tolist() == [10, 5, 3, 1, 1]


def test_coarse_fraction_exact_train_only_ancestors() -> None:
    cfg = {"name": "synthetic", "n_train": 1000, "n_test": 200, "coarse_fraction": 0.3, "coarse_level": 2}
    b = build_data(cfg)
    plain = build_data({**cfg, "coarse_fraction": 0.0})
    tax = b.taxonomy
    mask = b.train.coarse_mask
    assert int(mask.sum()) == round(0.3 * len(b.train)) and 850 < len(b.train) < 950  # val: ~10 % by id hash
    changed = b.train.targets != plain.train.targets
    assert torch.equal(changed, mask)
    assert (tax.depth_tensor[b.train.targets[mask]] == 2).all()
    for new, old in zip(b.train.targets[mask].tolist(), plain.train.targets[mask].tolist()):
        assert new in tax.ancestors(old)
    assert torch.equal(b.val.targets, plain.val.targets) and torch.equal(b.test.targets, plain.test.targets)
    assert not b.val.coarse_mask.any() and not b.test.coarse_mask.any()
    assert torch.equal(b.train.images, plain.train.images)
    assert torch.equal(build_data(cfg).train.coarse_mask, mask)  # deterministic


def test_coarsen_var_tree_only_deep_labels() -> None:
    ds = make_synthetic("synthetic_var", 500, seed=0)
    tax = ds.taxonomy
    new, mask = coarsen_labels(ds.targets, tax, 0.5, level=2, seed=0)
    assert int(mask.sum()) == 250 and (tax.depth_tensor[ds.targets[mask]] == 3).all()
    with pytest.raises(ValueError, match="coarse_level"):
        coarsen_labels(ds.targets, tax, 0.5, level=3, seed=0)
    ml = make_synthetic("synthetic_multilabel", 10)
    with pytest.raises(ValueError, match="coarse_fraction"):
        coarsen_labels(ml.targets, ml.taxonomy, 0.5, 1, 0)


def test_limits_and_image_size() -> None:
    b = build_data({"name": "synthetic", "limit_train": 200, "limit_test": 50, "image_size": 16, "val_fraction": 0.25})
    assert len(b.train) + len(b.val) == 200 and 30 <= len(b.val) <= 70 and len(b.test) == 50
    assert b.image_size == 16 and b.train.images.shape[1:] == (3, 16, 16)
    b0 = build_data({"name": "synthetic", "n_train": 100, "val_fraction": 0})
    assert len(b0.train) == 100 and len(b0.val) == 0


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "mnist"}, "data.name: unknown dataset 'mnist'"),
        ({"name": "synthetic", "colour": 1}, "data.colour: not a setting of dataset 'synthetic'"),
        ({"name": "fashion_mnist", "n_train": 5}, "data.n_train: not a setting"),
        ({"name": "synthetic", "val_fraction": 1.5}, "data.val_fraction"),
        ({"name": "synthetic", "limit_train": 0}, "data.limit_train"),
        ({"name": "synthetic", "limit_train": True}, "data.limit_train"),
        ({"name": "synthetic", "image_size": "big"}, "data.image_size"),
        ({"name": "synthetic", "coarse_fraction": -0.1}, "data.coarse_fraction"),
        ({"name": "synthetic", "coarse_fraction": 0.5, "coarse_level": 3}, "coarse_level"),
        ({"name": "synthetic", "channels": 2}, "data.channels"),
        ({"name": "folder"}, "data.root: required"),
        ({"name": "synthetic", "fallback": "mnist"}, "data.fallback"),
    ],
)
def test_bad_config(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_data(cfg)


def test_missing_data_and_fallback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder or zip file"):
        build_data({"name": "folder", "root": str(tmp_path / "none")})
    b = build_data({"name": "cifar100", "root": str(tmp_path), "fallback": "synthetic", "limit_train": 100})
    assert b.name == "synthetic" and "cifar100 unavailable" in b.note and "synthetic" in b.note
    assert len(b.train) + len(b.val) == 100
