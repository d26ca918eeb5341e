"""The ImageNet-style per-image pipeline, the GPU-minded loader paths and rank sharding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision.data import BatchAugment, BatchLoader, build_data, hflip, iter_batches, pad_crop
from hiervision.data.base import FileImageDataset
from hiervision.data.pipeline import CenterCrop, PipelineDataset, RandomResizedCrop
from hiervision.data.synthetic import make_synthetic


def _image_folder(root: Path, n_per_class: int = 6) -> Path:
    """Two coarse classes with two leaves each; JPEGs and PNGs of different sizes and aspects."""
    rng = np.random.default_rng(0)
    k = 0
    for leaf in ("animal/cat", "animal/dog", "plant/tree", "plant/herb"):
        (root / leaf).mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            h, w = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "jpg" if k % 2 else "png"
            Image.fromarray(arr).save(root / leaf / f"{j}.{ext}")
            k += 1
    return root


def _cfg(root: Path, **kw) -> dict:
    return {"name": "folder", "root": str(root), "pipeline": "imagenet", "crop": 32, "val_fraction": 0.25, **kw}


# ---------------------------------------------------------------------------------------------- transforms
def test_random_resized_crop_boxes_respect_scale_and_ratio() -> None:
    t = RandomResizedCrop(32, scale=(0.2, 0.5), ratio=(0.75, 4 / 3))
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = t.box(200, 100, rng)
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
        area = (x1 - x0) * (y1 - y0) / 20000
        assert 0.19 <= area <= 0.51
        assert 0.74 <= (x1 - x0) / (y1 - y0) <= 1.34
    # nothing fits the aspect range: the fallback is the centre box of the nearest allowed aspect
    x0, y0, x1, y1 = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(2.0, 3.0)).box(100, 100, random.Random(0))
    assert (x1 - x0, y1 - y0) == (100, 50) and y0 == 25


def test_center_crop_is_resize_then_centre() -> None:
    # a 40x80 image whose left/right halves differ: the centre crop at resize = crop sees both halves equally
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 40:] = 255
    with Image.fromarray(arr) as im:
        out = CenterCrop(16, 16)(im, 3)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[:, :, :7].max() == 0 and out[:, :, 9:].min() == 255
    assert CenterCrop(16, 32).box(80, 40) == (30.0, 10.0, 50.0, 30.0)


def test_jpeg_draft_decode_matches_a_full_decode(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (32, 48, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 1024x1536
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    t = CenterCrop(64, 73)
    with Image.open(tmp_path / "big.jpg") as im:
        drafted = t(im, 3)
        assert im.size[0] < 1536  # draft decoded at a reduced scale
    with Image.open(tmp_path / "big.jpg") as im:
        im.load()
        full = t(im.copy(), 3)  # a loaded image cannot be drafted
    assert drafted.shape == full.shape == (3, 64, 64)
    assert (drafted.float() - full.float()).abs().mean() < 6


def test_pipeline_dataset_is_seeded_per_sample(tmp_path: Path) -> None:
    b = build_data(_cfg(_image_folder(tmp_path / "imgs")))
    assert isinstance(b.train, PipelineDataset) and b.augmented and b.image_size == 32 and b.in_chans == 3
    x1, y1 = b.train.load(0, 7)
    x2, _ = b.train.load(0, 7)
    x3, _ = b.train.load(0, 8)
    assert x1.dtype == torch.uint8 and x1.shape == (3, 32, 32) and torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert y1 == int(b.train.targets[0])
    ev = b.test.load(0, 1)[0]
    assert torch.equal(ev, b.test.load(0, 2)[0])  # evaluation is not random
    sub = b.train.subset([2, 0])
    assert torch.equal(sub.load(1, 7)[0], x1) and sub.targets.tolist() == b.train.targets[[2, 0]].tolist()


def test_pipeline_config_errors(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", 2)
    for bad, msg in (({"pipeline": "timm"}, "data.pipeline"), ({"resize": 16}, "data.resize"),
                     ({"crop_scale": [0.5, 2]}, "data.crop_scale"), ({"image_size": 20}, "data.image_size"),
                     ({"flip": "yes"}, "data.flip")):
        with pytest.raises(ValueError, match=msg):
            build_data(_cfg(root, **bad))
    with pytest.raises(ValueError, match="data.crop: applies only with data.pipeline"):
        build_data({"name": "folder", "root": str(root), "crop": 32})
    with pytest.raises(ValueError, match="data.pipeline"):
        build_data({"name": "synthetic", "pipeline": "imagenet"})


def test_loader_workers_give_the_same_augmented_batches(tmp_path: Path) -> None:
    b = build_data(_cfg(_image_folder(tmp_path / "imgs")))
    runs = []
    for workers in (0, 2):
        loader = BatchLoader(b.train, 5, shuffle=True, seed=3, num_workers=workers)
        epochs = [[(x, y) for x, y in loader.set_epoch(e)] for e in (0, 1)]  # persistent workers across epochs
        runs.append(epochs)
    for e in (0, 1):
        for (xa, ya), (xb, yb) in zip(runs[0][e], runs[1][e]):
            assert xa.dtype == torch.float32 and xa.shape[1:] == (3, 32, 32) and 0 <= xa.min() and xa.max() <= 1
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # another epoch, other crops
    ev = [x for x, _ in iter_batches(b.test, 4, num_workers=2)]
    assert torch.equal(torch.cat(ev), torch.stack([b.test[i][0] for i in range(len(b.test))]))


def test_lazy_file_loader_stays_uint8_until_converted(tmp_path: Path) -> None:
    ds = build_data({"name": "folder", "root": str(_image_folder(tmp_path / "imgs", 2)), "image_size": 16}).train
    assert isinstance(ds, FileImageDataset)
    x, _ = next(iter(BatchLoader(ds, 4, device="cpu")))
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(4)]))


# ---------------------------------------------------------------------------------------------- GPU-minded paths
def test_batch_augment_draws_as_pad_crop_then_hflip() -> None:
    x = torch.rand(16, 3, 12, 12)
    for pad, flip in ((4, True), (0, True), (3, False)):
        g = torch.Generator().manual_seed(5)
        expect = pad_crop(x, pad, g)
        if flip:
            expect = hflip(expect, g)
        assert torch.equal(BatchAugment(pad, flip)(x, torch.Generator().manual_seed(5)), expect)


def test_in_memory_loader_unchanged_with_a_device() -> None:
    ds = make_synthetic("synthetic", 50, seed=0)
    a = [x for x, _ in BatchLoader(ds, 16, shuffle=True, seed=2).set_epoch(1)]
    b = [x for x, _ in BatchLoader(ds, 16, shuffle=True, seed=2, device="cpu").set_epoch(1)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(2 * 1_000_003 + 1))
    assert torch.equal(a[0], ds.images[perm[:16]].float() / 255)


# ---------------------------------------------------------------------------------------------- rank sharding
@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_union_is_the_single_process_batch(world: int) -> None:
    ds = make_synthetic("synthetic", 70, seed=0)
    single = BatchLoader(ds, 12, shuffle=True, seed=4)
    ranks = [BatchLoader(ds, 12, shuffle=True, seed=4, rank=r, world_size=world) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for epoch, start in ((0, 0), (1, 0), (1, 3)):  # start 3: a resumed epoch
        full = list(single.set_epoch(epoch, start))
        parts = [list(r.set_epoch(epoch, start)) for r in ranks]
        assert all(len(p) == len(full) for p in parts)
        for k, (x, y) in enumerate(full):
            xs = [p[k][0] for p in parts]
            assert all(len(s) > 0 for s in xs)
            assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat([p[k][1] for p in parts]), y)
    # a last global batch too small to give every rank a sample is dropped on every rank
    assert len(BatchLoader(ds, 69)) == 2 and len(BatchLoader(ds, 69, world_size=2, rank=1)) == 1  # 70 = 69 + 1
    assert len(BatchLoader(ds, 34, world_size=3)) == 2  # 70 = 2 * 34 + 2, 2 < 3 ranks
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 12, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch"):
        BatchLoader(ds, 2, world_size=3)


def test_bundle_meta_tells_inference_the_eval_transform(tmp_path: Path) -> None:
    from hiervision.imagefile import read_array

    root = _image_folder(tmp_path / "imgs", 2)
    b = build_data(_cfg(root, resize=40))
    assert b.meta()["resize"] == 40 and b.meta()["image_size"] == [32, 32]
    assert "resize" not in build_data({"name": "folder", "root": str(root)}).meta()
    i = 0
    x = torch.from_numpy(read_array(Path(b.test.base.sources[i]), 3, (32, 32), resize=40)).float() / 255
    assert torch.equal(x, b.test[i][0])  # predict sees what evaluation saw


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_augment_and_normalize_match_cpu(tmp_path: Path) -> None:
    from hiervision.data import normalize

    ds = make_synthetic("synthetic", 40, seed=0)
    cpu = list(BatchLoader(ds, 16, shuffle=True, seed=1))
    gpu = list(BatchLoader(ds, 16, shuffle=True, seed=1, device="cuda"))
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # u/255 on the GPU may differ from the CPU's in the last bit
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and same(xg.cpu(), xc) and torch.equal(yg, yc)
    x = cpu[0][0]
    aug = BatchAugment(4, True)
    assert torch.equal(aug(x.cuda(), torch.Generator().manual_seed(2)).cpu(), aug(x, torch.Generator().manual_seed(2)))
    n1 = normalize(x.cuda(), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert torch.allclose(n1.cpu(), normalize(x, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)))
    b = build_data(_cfg(_image_folder(tmp_path / "imgs")))
    lazy_c = [x for x, _ in BatchLoader(b.train, 5, shuffle=True, num_workers=2)]
    lazy_g = [x for x, _ in BatchLoader(b.train, 5, shuffle=True, num_workers=2, device="cuda")]
    assert all(g.is_cuda and same(g.cpu(), c) for c, g in zip(lazy_c, lazy_g))


def test_pipeline_reads_upright_and_transparent_images_as_viewers_show_them(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white, right half black
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: shown turned 90° clockwise, 20 wide and 40 tall
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rot.jpg") as f:
        x = CenterCrop(8, 8)(f, 3)
    # upright, the image is 20x40 (w x h): the centre square spans the white top / black bottom halves
    assert x[:, :3].float().mean() > 200 and x[:, -3:].float().mean() < 50
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    with Image.open(tmp_path / "clear.png") as f:
        assert CenterCrop(8, 8)(f, 3).min() == 255  # on white


def test_pipeline_honours_the_readers_pixel_limit(tmp_path: Path) -> None:
    b = build_data(_cfg(_image_folder(tmp_path / "imgs", 2)))
    b.train.base.read.max_pixels = 100  # the limit a reader carries (data.max_pixels)
    with pytest.raises(ValueError, match="over the limit 100"):
        b.train.load(0, 0)
