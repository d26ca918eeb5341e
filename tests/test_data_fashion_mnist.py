"""Real Fashion-MNIST: idx parsing, the Seo & Shin tree, label → leaf mapping, corrupt-file errors."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hiervision.data import build_data
from hiervision.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    fashion_mnist_taxonomy,
    load_fashion_mnist,
    read_idx,
)

ROOT = Path(FASHION_MNIST_DIR)
needs_data = pytest.mark.skipif(
    not (ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {ROOT} (apt-get install dataset-fashion-mnist)",
)


def test_tree_levels_and_depths() -> None:
    tax = fashion_mnist_taxonomy()
    assert [len(level) for level in tax.levels] == [2, 6, 10]
    assert tax.is_fixed_depth and tax.max_depth == 3
    assert [tax.names[n] for n in tax.levels[0]] == ["Clothes", "Goods"]
    assert tax.path_name(tax.index("Trouser"), " > ") == "Clothes > Bottoms > Trouser"
    assert tax.path_name(tax.index("Bag"), " > ") == "Goods > Accessories > Bag"
    shoes = {tax.names[c] for c in tax.children[tax.index("Shoes")]}
    assert shoes == {"Sandal", "Sneaker", "Ankle boot"}
    tops = {tax.names[c] for c in tax.children[tax.index("Tops")]}
    assert tops == {"T-shirt/top", "Pullover", "Shirt"}


def test_variable_depth_tree() -> None:
    var = fashion_mnist_taxonomy(variable_depth=True)
    assert len(var) == 14 and len(var.leaves) == 10 and not var.is_fixed_depth
    depth = {var.names[n]: var.depths[n] for n in var.leaves}
    assert depth == {"T-shirt/top": 3, "Pullover": 3, "Shirt": 3, "Sandal": 3, "Sneaker": 3, "Ankle boot": 3,
                     "Trouser": 2, "Dress": 2, "Coat": 2, "Bag": 2}
    assert var.names[var.parents[var.index("Trouser")]] == "Clothes"
    assert var.names[var.parents[var.index("Bag")]] == "Goods"
    for gone in ("Bottoms", "Dresses", "Outers", "Accessories"):
        assert gone not in var.names


@needs_data
def test_real_counts_shapes_and_labels() -> None:
    train, test = load_fashion_mnist(ROOT, "train"), load_fashion_mnist(ROOT, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int)
    raw = read_idx(ROOT / "train-labels-idx1-ubyte.gz")
    tax = train.taxonomy
    names = [tax.names[int(t)] for t in train.targets[:100]]
    assert names == [FASHION_MNIST_CLASSES[i] for i in raw[:100]]
    # the famous first training image is an ankle boot; balanced classes: 6000 / 1000 each
    assert tax.names[train[0][1]] == "Ankle boot"
    assert torch.bincount(train.targets).max() == 6000 and torch.bincount(test.targets).max() == 1000
    assert set(train.targets.tolist()) == set(tax.leaves)


@needs_data
def test_build_data_var_splits() -> None:
    b = build_data({"name": "fashion_mnist_var"})
    assert len(b.train) + len(b.val) == 60000 and 5800 < len(b.val) < 6200 and len(b.test) == 10000  # official test
    assert b.in_chans == 1 and b.image_size == 28 and not b.multi_label
    assert abs(b.mean[0] - 0.286) < 0.01 and abs(b.std[0] - 0.353) < 0.01
    depths = b.taxonomy.depth_tensor[b.train.targets]
    assert set(depths.tolist()) == {2, 3}
    # val by hash of the official index: about 600 images per class
    per_class = torch.bincount(b.val.targets)[list(b.taxonomy.leaves)]
    assert ((per_class > 520) & (per_class < 680)).all() and b.val.ids[0].startswith("train/")


def _write_gz(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


def test_idx_errors(tmp_path: Path) -> None:
    good = np.arange(12, dtype=np.uint8)
    header = bytes([0, 0, 0x08, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    _write_gz(tmp_path / "ok.gz", header + good.tobytes())
    assert read_idx(tmp_path / "ok.gz").tolist() == good.reshape(3, 4).tolist()
    _write_gz(tmp_path / "short.gz", header + good.tobytes()[:-1])
    with pytest.raises(ValueError, match=r"short\.gz: corrupt idx file \(shape \(3, 4\) needs 24 bytes, file has 23"):
        read_idx(tmp_path / "short.gz")
    _write_gz(tmp_path / "magic.gz", b"\x12\x34\x08\x02" + header[4:] + good.tobytes())
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "notgz.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(ValueError, match="cannot decompress"):
        read_idx(tmp_path / "notgz.gz")
    with pytest.raises(FileNotFoundError, match="missing.gz.*dataset-fashion-mnist"):
        read_idx(tmp_path / "missing.gz")


@needs_data
def test_truncated_real_file(tmp_path: Path) -> None:
    for f in ROOT.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    with gzip.open(ROOT / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    _write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: corrupt idx file"):
        load_fashion_mnist(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="nowhere.*dataset-fashion-mnist"):
        build_data({"name": "fashion_mnist", "root": str(tmp_path / "nowhere")})
