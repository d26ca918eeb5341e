"""Real Tiny-ImageNet (small subsets): labels from folders and val_annotations, grayscale images, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hiervision.data.tiny_imagenet as tin
from hiervision.data import build_data

ROOT = tin.default_root()
pytestmark = pytest.mark.skipif(
    not (ROOT / "wnids.txt").is_file() or not (tin.default_hierarchy_root() / "class_hierarchy.txt").is_file(),
    reason=f"Tiny-ImageNet or the BREEDS WordNet files not found at {ROOT} (set HIERVISION_TINY_IMAGENET)",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    b = build_data({"name": "tiny_imagenet", "limit_train": 400, "limit_test": 200, "cache_dir": str(cache),
                    "val_fraction": 0.25})
    return b, cache


def test_taxonomy_leaves_are_the_wnids(bundle) -> None:
    b, _ = bundle
    wnids = (ROOT / "wnids.txt").read_text().split()
    assert len(wnids) == 200
    assert {b.taxonomy.external_ids[n] for n in b.taxonomy.leaves} == set(wnids)
    assert b.taxonomy.names[0] == "entity" and b.taxonomy.max_depth > 3


def test_labels_match_folders_and_annotations(bundle) -> None:
    b, _ = bundle
    assert len(b.train) + len(b.val) == 400 and 70 < len(b.val) < 130 and len(b.test) == 200  # val by file hash
    assert b.test.ids[0].startswith("val/images/") and b.train.ids[0].startswith("train/n")
    assert b.in_chans == 3 and b.image_size == 64 and b.test.images.shape[1:] == (3, 64, 64)
    ann = dict(line.split("\t")[:2] for line in (ROOT / "val/val_annotations.txt").read_text().splitlines())
    test_files = tin.load_tiny_imagenet(ROOT, "val", b.taxonomy, limit=200, cache_dir=None).files
    ext = b.taxonomy.external_ids
    assert [ext[int(t)] for t in b.test.targets] == [ann[Path(f).name] for f in test_files]
    train_pool = tin.load_tiny_imagenet(ROOT, "train", b.taxonomy, limit=400, cache_dir=None)
    assert all(ext[int(t)] == f.split("/")[1] for t, f in zip(train_pool.targets, train_pool.files))
    assert len(set(train_pool.targets.tolist())) == 200  # class-balanced subset: 2 per class
    # pixels are the decoded file
    first = torch.from_numpy(np.array(Image.open(ROOT / train_pool.files[0]).convert("RGB")))
    assert torch.equal(train_pool.images[0], first.permute(2, 0, 1))


def test_grayscale_images_become_rgb() -> None:
    gray = None
    for f in sorted((ROOT / "val/images").iterdir(), key=lambda p: int(p.stem.split("_")[1])):
        with Image.open(f) as im:
            if im.mode == "L":
                gray = f
                break
    assert gray is not None
    arr = tin._decode(str(gray))
    assert arr.shape == (3, 64, 64) and (arr[0] == arr[1]).all() and (arr[1] == arr[2]).all()


def test_cache_reused_and_resize(bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    b, cache = bundle
    assert len(list(cache.glob("tiny_imagenet_*.npy"))) == 2
    assert not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(tin, "_decode_all", no_decoding)
    again = tin.load_tiny_imagenet(ROOT, "val", b.taxonomy, limit=200, cache_dir=cache)
    assert torch.equal(again.images, b.test.images)
    # another size is resized from the cached originals (area averaging), still without decoding
    small = tin.load_tiny_imagenet(ROOT, "val", b.taxonomy, image_size=32, limit=200, cache_dir=cache)
    assert small.images.shape == (200, 3, 32, 32) and small.images.dtype == torch.uint8
    expect = b.test.images[:4].float().unflatten(-1, (32, 2)).unflatten(-3, (32, 2)).mean(dim=(-3, -1))
    assert (small.images[:4].float() - expect).abs().max() <= 0.5 + 1e-4


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wnids.txt: Tiny-ImageNet not found"):
        build_data({"name": "tiny_imagenet", "root": str(tmp_path)})
