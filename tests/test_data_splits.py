"""Splits, limits, coarse-only labels and config validation of build_data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiervision.data import build_data
from hiervision.data.base import coarsen_labels, stratified_split, stratified_subset
from hiervision.data.splits import (
    compare_split_records,
    hash_split,
    hash_subset,
    read_split_record,
    write_split_record,
)
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


# ------------------------------------------------------------------ identity-keyed splits and split records
def _folder_set(root: Path, per_class: int = 30) -> None:
    from PIL import Image

    for c in ("animal/cat", "animal/dog", "plant"):
        for i in range(per_class):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (6, 6), i).save(root / c / f"{i:03d}.png")


def _split_of(b) -> dict[str, str]:
    return {i: s for s in ("train", "val", "test") for i in getattr(b, s).ids}


def test_adding_or_removing_an_image_moves_only_that_image(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "data"
    _folder_set(root)
    cfg = {"name": "folder", "root": str(root), "val_fraction": 0.2, "test_fraction": 0.25, "check_cache": None}
    before = build_data(cfg)
    old = _split_of(before)
    assert len(old) == 90 and {"train", "val", "test"} == set(old.values())
    Image.new("L", (6, 6), 200).save(root / "animal" / "cat" / "000a.png")  # sorts second: shifts every position
    (root / "plant" / "017.png").unlink()
    after = build_data(cfg)
    new = _split_of(after)
    assert set(new) ^ set(old) == {"animal/cat/000a.png", "plant/017.png"}
    assert all(new[i] == s for i, s in old.items() if i in new)  # nothing else moved
    assert compare_split_records(before.split_record(), before.split_record()) is None
    msg = compare_split_records(before.split_record(), after.split_record())
    s_new, s_old = new["animal/cat/000a.png"], old["plant/017.png"]
    assert msg is not None and "\n" not in msg and msg.startswith("data changed since the run was recorded: ")
    for split in ("train", "val", "test"):
        plus, minus = int(s_new == split), int(s_old == split)
        assert (f"{split} +{plus}/-{minus}" in msg) == (plus or minus)
    assert msg.endswith(f"0 of the {len(after.test)} test samples were in the old train split")
    # the same images under another seed form another split; the record names the leak
    other = build_data({**cfg, "split_seed": 1})
    leak = len(set(other.test.ids) & set(before.train.ids))
    assert leak > 0 and f"; {leak} of the {len(other.test)} test samples were in the old train split" in \
        compare_split_records(before.split_record(), other.split_record())


def test_split_record_digest_roundtrip_and_damage(tmp_path: Path) -> None:
    b = build_data({"name": "synthetic", "n_train": 200, "n_test": 50, "size": 8})
    rec = b.split_record()
    assert rec["splits"]["test"]["count"] == 50 and rec["splits"]["test"]["ids"][0] == "test/0"
    assert rec["splits"]["train"]["count"] + rec["splits"]["val"]["count"] == 200 and rec["skipped"] == 0
    assert len(rec["splits"]["train"]["sha256"]) == 64
    write_split_record(tmp_path / "splits.json", rec)
    assert read_split_record(tmp_path / "splits.json") == rec
    assert compare_split_records(rec, build_data({"name": "synthetic", "n_train": 200, "n_test": 50}).split_record()) \
        is None  # the same config gives the same record
    smaller = build_data({"name": "synthetic", "n_train": 200, "n_test": 40, "size": 8}).split_record()
    assert compare_split_records(rec, smaller).startswith("data changed since the run was recorded: test +0/-10")
    no_ids = {"splits": {k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in smaller["splits"].items()}}
    assert "test 50 -> 40 samples, different digest" in compare_split_records(rec, no_ids)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"bad\.json: unreadable split record"):
        read_split_record(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json: not a split record"):
        read_split_record(tmp_path / "bad.json")


def test_hash_split_and_subset_are_functions_of_ids() -> None:
    ids = [f"c{i % 5}/{i}.png" for i in range(2000)]
    targets = torch.tensor([1 + i % 5 for i in range(2000)])
    rest, held = hash_split(ids, 0.2, seed=3, salt="test")
    assert 340 < len(held) < 460 and torch.cat([rest, held]).sort().values.tolist() == list(range(2000))
    per_class = torch.bincount(targets[held], minlength=6)[1:]
    assert (per_class > 50).all()  # every class held out at about the same rate
    # the held-out set of a shuffled, shortened list is the same samples
    keep = ids[::-1][:1500]
    _, held2 = hash_split(keep, 0.2, seed=3, salt="test")
    assert {keep[i] for i in held2.tolist()} == {ids[i] for i in held.tolist()} & set(keep)
    assert not torch.equal(hash_split(ids, 0.2, seed=4, salt="test")[1], held)
    sub = hash_subset(ids, targets, 100, seed=0)
    assert len(sub) == 100 and torch.bincount(targets[sub], minlength=6)[1:].tolist() == [20] * 5
    assert torch.equal(hash_subset(ids, targets, 100, seed=0), sub)


def test_builtin_sets_keep_official_splits_and_tag_ids() -> None:
    b = build_data({"name": "synthetic", "n_train": 300, "n_test": 60, "size": 8, "limit_train": 250})
    assert all(i.startswith("train/") for i in b.train.ids + b.val.ids)
    assert b.test.ids == [f"test/{i}" for i in range(60)]
    # S_fine/S_coarse and coarse labels are drawn by id too: the same ids give the same draw
    cfg = {"name": "synthetic", "n_train": 400, "n_test": 20, "size": 8, "coarse_fraction": 0.3, "coarse_level": 1,
           "fine_fraction": 0.3}
    x, y = build_data(cfg), build_data(cfg)
    assert x.train.ids == y.train.ids and torch.equal(x.train.coarse_mask, y.train.coarse_mask)


def test_a_test_split_that_holds_nothing_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    from PIL import Image

    ids = [f"{c}/{i}.png" for c in "ab" for i in range(2)]  # two classes: one would be refused first
    for name in ids:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), int(name[2])).save(root / name)
    outcomes = set()
    for seed in range(12):
        cfg = {"name": "folder", "root": str(root), "split_seed": seed, "test_fraction": 0.2, "check_cache": None}
        if (hash_split(ids, 0.2, seed, "test")[1]).numel() == 0:
            with pytest.raises(ValueError, match="data.test_fraction: a 0.2 split of 4 images by path hash holds none"):
                build_data(cfg)
            outcomes.add("error")
        else:
            assert len(build_data(cfg).test) >= 1
            outcomes.add("ok")
    assert outcomes == {"error", "ok"}


def test_verify_split_record_refuses_or_reports(tmp_path: Path) -> None:
    from hiervision.data.splits import verify_split_record

    rec = build_data({"name": "synthetic", "n_train": 100, "n_test": 30, "size": 8}).split_record()
    changed = build_data({"name": "synthetic", "n_train": 100, "n_test": 31, "size": 8}).split_record()
    path = tmp_path / "splits.json"
    assert verify_split_record(path, rec) is None  # no record yet (an older run): nothing to compare
    write_split_record(path, rec)
    assert verify_split_record(path, rec) is None
    with pytest.raises(ValueError, match=r"splits\.json: data changed .* test \+1/-0 .*--allow-changed-data"):
        verify_split_record(path, changed)
    assert verify_split_record(path, changed, allow_changed=True).endswith("0 of the 31 test samples were in the old "
                                                                           "train split")
