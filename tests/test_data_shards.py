"""Tar shards: ``hiervision data pack``, ``data.name: shards``, shard-local epoch orders."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision.cli import main
from hiervision.data import BatchLoader, build_data
from hiervision.data.pipeline import PipelineDataset
from hiervision.data.shards import ShardDataset, load_shards, pack


def _folder(root: Path, n_per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for leaf in ("animal/cat", "animal/dog", "plant/tree", "plant"):  # "plant": an inner-node label
        (root / leaf).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            arr = rng.integers(0, 256, (int(rng.integers(20, 40)), 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / leaf / f"{j}.{'jpg' if j % 2 else 'png'}")
    return root


def test_pack_cli_writes_shards_that_read_back_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _folder(tmp_path / "imgs")
    out = tmp_path / "packed"
    assert main(["data", "pack", str(src), "--out", str(out), "--shard-size", "4"]) == 0
    assert "packed train" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    ref = build_data({"name": "folder", "root": str(src)})
    assert {k: v["count"] for k, v in index["splits"].items()} == {"train": len(ref.train), "val": len(ref.val),
                                                                   "test": len(ref.test)}
    assert sum(sum(c["counts"].values()) for c in index["classes"]) == 20
    assert {c["name"] for c in index["classes"]} == {"animal/cat", "animal/dog", "plant/tree", "plant"}
    # WebDataset-style members: every image next to its .cls label
    with tarfile.open(out / "train-000000.tar") as tf:
        names = tf.getnames()
        labels = {tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".cls")}
    assert len(names) == 8 and names[0].endswith((".png", ".jpg")) and names[1].endswith(".cls")
    assert len(labels) > 1  # placed shuffled: a shard mixes the folder's classes
    splits, tax = load_shards(out)
    assert tax.fingerprint == ref.taxonomy.fingerprint
    tr = splits["train"]
    assert isinstance(tr, ShardDataset) and torch.equal(tr.targets, ref.train.targets)
    assert tr.ids == list(getattr(ref.train, "ids", ref.train.sources))  # stable sample names survive packing
    assert tr.subset([2, 0]).ids == [tr.ids[2], tr.ids[0]]
    # the stored bytes are the original files: the same pixels as the folder data set
    for i in (0, 3, len(tr) - 1):
        assert tr.raw(i) == Path(ref.train.sources[i]).read_bytes()
    assert main(["data", "pack", str(src), "--out", str(out)]) == 1  # never overwrites
    assert "already holds shards" in capsys.readouterr().err


def test_shards_data_set_trains_like_its_source(tmp_path: Path) -> None:
    src = _folder(tmp_path / "imgs")
    out = tmp_path / "packed"
    ref = build_data({"name": "folder", "root": str(src), "image_size": 16})
    pack({"train": ref.train, "val": ref.val, "test": ref.test}, ref.taxonomy, out, shard_size=3)
    b = build_data({"name": "shards", "root": str(out), "image_size": 16})
    assert (len(b.train), len(b.val), len(b.test)) == (len(ref.train), len(ref.val), len(ref.test))
    assert b.in_chans == 3 and b.image_size == 16
    xs, ys = zip(*BatchLoader(b.train, 4, shuffle=True, seed=1, num_workers=2))
    xr, yr = zip(*BatchLoader(ref.train, 4, shuffle=True, seed=1))
    assert torch.equal(torch.cat(xs), torch.cat(xr)) and torch.equal(torch.cat(ys), torch.cat(yr))
    p = build_data({"name": "shards", "root": str(out), "pipeline": "imagenet", "crop": 16})
    assert isinstance(p.train, PipelineDataset) and p.augmented
    x, _ = next(iter(BatchLoader(p.train, 4, shuffle=True, num_workers=1)))
    assert x.shape == (4, 3, 16, 16)
    lim = build_data({"name": "shards", "root": str(out), "limit_train": 6, "val_fraction": 0.0})
    assert len(lim.train) == 6


def test_shards_from_in_memory_data_and_errors(tmp_path: Path) -> None:
    ref = build_data({"name": "synthetic", "n_train": 30, "n_test": 10, "size": 8, "val_fraction": 0.0})
    pack({"train": ref.train, "test": ref.test}, ref.taxonomy, tmp_path / "p", shard_size=7)
    b = build_data({"name": "shards", "root": str(tmp_path / "p"), "val_fraction": 0.2})
    assert len(b.train) + len(b.val) == 30 and 0 < len(b.val) < 15  # no packed val: carved from train (by id hash)
    assert torch.equal(torch.stack([b.test[i][0] for i in range(10)]), ref.test.images.float() / 255)
    with pytest.raises(FileNotFoundError, match="hiervision data pack"):
        build_data({"name": "shards", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="shard-size"):
        pack({"train": ref.train}, ref.taxonomy, tmp_path / "q", shard_size=0)
    with pytest.raises(ValueError, match="data.shard_order"):
        build_data({"name": "shards", "root": str(tmp_path / "p"), "shard_order": "yes"})
    (tmp_path / "p" / "train-000001.tar").write_bytes(b"")  # a damaged shard names itself
    ds = load_shards(tmp_path / "p")[0]["train"]
    with pytest.raises(ValueError, match="train-000001.tar"):
        ds[int(np.nonzero(ds.shard == 1)[0][0])]


@pytest.mark.parametrize("world", [1, 2])
def test_shard_order_gives_each_rank_its_own_shards(tmp_path: Path, world: int) -> None:
    ref = build_data({"name": "synthetic", "n_train": 50, "n_test": 4, "size": 8, "val_fraction": 0.0})
    pack({"train": ref.train, "test": ref.test}, ref.taxonomy, tmp_path / "p", shard_size=5)  # 10 shards
    b = build_data({"name": "shards", "root": str(tmp_path / "p"), "shard_order": True, "val_fraction": 0.0})
    ds = b.train
    loaders = [BatchLoader(ds, 4, shuffle=True, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        seen = [torch.cat([y for _, y in ld.set_epoch(epoch)]) for ld in loaders]
        order = ds.epoch_order(3, epoch, 4, world)
        assert len(set(order.tolist())) == len(order) == 50  # 10 shards deal evenly: nothing left out
        shards_of = [set(ds.shard[loader_idx].tolist()) for loader_idx in
                     (torch.cat(ld.set_epoch(epoch)._batches()).numpy() for ld in loaders)]
        assert all(len(s) == 10 // world for s in shards_of)
        assert world == 1 or not shards_of[0] & shards_of[1]
        assert sum(len(s) for s in seen) == 50
    # the single-rank order is reproducible and differs between epochs
    assert torch.equal(ds.epoch_order(3, 0, 4, 1), ds.epoch_order(3, 0, 4, 1))
    assert not torch.equal(ds.epoch_order(3, 0, 4, 1), ds.epoch_order(3, 1, 4, 1))


def test_pack_cli_from_a_config_keeps_its_splits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _folder(tmp_path / "imgs", 4)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"seed: 3\ndata: {{name: folder, root: {src}, pipeline: imagenet, crop: 16}}\n", encoding="utf-8")
    out = tmp_path / "packed"
    assert main(["data", "pack", str(cfg), "--out", str(out), "--set", "data.test_fraction=0.25"]) == 0
    ref = build_data({"name": "folder", "root": str(src), "test_fraction": 0.25, "split_seed": 3})
    splits, _ = load_shards(out)
    for k in ("train", "val", "test"):
        assert splits[k].ids == list(getattr(getattr(ref, k), "ids", getattr(ref, k).sources))
    assert main(["data", "pack", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "no such config file or image folder" in capsys.readouterr().err
