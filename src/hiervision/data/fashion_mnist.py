"""Fashion-MNIST from the original idx files, with the 3-level tree of Seo & Shin (2019).

The idx reader is our own (gzip + numpy) so the project needs no torchvision, and it checks
magic numbers and sizes so a truncated download fails with a message instead of garbage.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from hiervision.data.base import TensorImageDataset
from hiervision.taxonomy import Taxonomy

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "fashion_mnist_taxonomy",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "HIERVISION_FASHION_MNIST"
HOW_TO_GET = "install it with `apt-get install dataset-fashion-mnist` or set HIERVISION_FASHION_MNIST / cfg root"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: label id → name, in the dataset's own order
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Seo & Shin (2019), "Hierarchical convolutional neural networks for fashion image classification"
_TREE = {
    "Clothes": {"Tops": ["T-shirt/top", "Pullover", "Shirt"], "Bottoms": ["Trouser"], "Dresses": ["Dress"],
                "Outers": ["Coat"]},
    "Goods": {"Accessories": ["Bag"], "Shoes": ["Sandal", "Sneaker", "Ankle boot"]},
}  # fmt: skip
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array, checking header and size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({HOW_TO_GET})")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt idx file (cannot decompress: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise ValueError(f"{path}: corrupt idx file (truncated header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: corrupt idx file (shape {shape} needs {expected} bytes, file has {len(raw)})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_taxonomy(variable_depth: bool = False) -> Taxonomy:
    """The Seo & Shin tree (2 → 6 → 10); ``variable_depth`` collapses single-child chains (Bottoms→Trouser)."""
    parent_of: dict[str, str | None] = {}
    for top in _TREE:  # level by level, so ids grow with depth
        parent_of[top] = None
    for top, groups in _TREE.items():
        for group in groups:
            parent_of[group] = top
    for groups in _TREE.values():
        for group, leaves in groups.items():
            for leaf in leaves:
                parent_of[leaf] = group
    tax = Taxonomy.from_parent_map(parent_of)
    return tax.collapse_chains() if variable_depth else tax


def label_to_node(taxonomy: Taxonomy) -> torch.Tensor:
    """``(10,)`` long: Fashion-MNIST label id → node id of its leaf."""
    return torch.tensor([taxonomy.index(name) for name in FASHION_MNIST_CLASSES], dtype=torch.long)


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR, FASHION_MNIST_DIR))


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", variable_depth: bool = False
) -> TensorImageDataset:
    """The 60k train or 10k test split as a :class:`TensorImageDataset` (1×28×28, targets = leaf node ids)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Fashion-MNIST folder not found ({HOW_TO_GET})")
    img_file, lbl_file = (root / f for f in FILES[split])
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{img_file}: expected uint8 images (n, rows, cols), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{lbl_file}: {labels.shape} labels do not match {len(images)} images in {img_file.name}")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{lbl_file}: label {labels.max()} out of range 0..9")
    tax = fashion_mnist_taxonomy(variable_depth)
    targets = label_to_node(tax)[torch.from_numpy(labels.astype(np.int64))]
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), targets, tax)
