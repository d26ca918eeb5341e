"""CIFAR-100 from the standard python-format folder, as the 20-superclass → 100-class two-level tree.

The coarse/fine pairs come from the label arrays themselves (``meta`` only holds names), so the
tree is exactly the one the data was annotated with.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from hiervision.data.base import TensorImageDataset
from hiervision.taxonomy import Taxonomy

__all__ = [
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "cifar100_taxonomy",
    "download_cifar100",
    "load_cifar100",
    "read_cifar100_meta",
    "read_cifar100_split",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = {
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
HOW_TO_GET = f"download and extract {CIFAR100_URL} (or call hiervision.data.cifar100.download_cifar100(root))"


def _folder(root: str | os.PathLike) -> Path:
    """Accept either the ``cifar-100-python`` folder itself or its parent."""
    root = Path(root)
    return root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-100 file missing ({HOW_TO_GET})")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: corrupt CIFAR-100 pickle ({e})") from None


def read_cifar100_meta(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(fine_label_names, coarse_label_names)`` from ``meta``."""
    path = _folder(root) / "meta"
    meta = _unpickle(path)
    try:
        return [n.decode() for n in meta[b"fine_label_names"]], [n.decode() for n in meta[b"coarse_label_names"]]
    except (KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a CIFAR-100 meta file (missing {e})") from None


def read_cifar100_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (n, 3, 32, 32), fine labels, coarse labels)`` of ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = _folder(root) / split
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
        coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"{path}: not a CIFAR-100 batch (missing key {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or not len(data) == len(fine) == len(coarse):
        raise ValueError(f"{path}: expected (n, 3072) data and n labels, got {data.shape}, {len(fine)}, {len(coarse)}")
    # each row is the R plane, then G, then B, each row-major 32×32: exactly C×H×W
    return data.reshape(-1, 3, 32, 32), fine, coarse


def cifar100_taxonomy(
    fine: np.ndarray, coarse: np.ndarray, fine_names: list[str], coarse_names: list[str]
) -> tuple[Taxonomy, torch.Tensor]:
    """Two-level tree from the label pairs, plus ``(100,)`` fine label → node id.

    Pairs are listed in (coarse, fine) label order, so coarse label ``c`` is node ``c + 1``.
    """
    pairs = sorted({(int(c), int(f)) for c, f in zip(coarse, fine)})
    tax = Taxonomy.from_coarse_fine([(coarse_names[c], fine_names[f]) for c, f in pairs])
    lookup = torch.full((len(fine_names),), -1, dtype=torch.long)
    for _, f in pairs:
        lookup[f] = tax.index(fine_names[f])
    return tax, lookup


def load_cifar100(root: str | os.PathLike) -> tuple[TensorImageDataset, TensorImageDataset]:
    """``(train, test)`` datasets; targets are fine-class (leaf) node ids."""
    folder = _folder(root)
    for name in ("train", "test"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: CIFAR-100 {name} pickle missing ({HOW_TO_GET})")
    fine_names, coarse_names = read_cifar100_meta(folder)
    x_tr, f_tr, c_tr = read_cifar100_split(folder, "train")
    x_te, f_te, c_te = read_cifar100_split(folder, "test")
    tax, lookup = cifar100_taxonomy(np.concatenate([f_tr, f_te]), np.concatenate([c_tr, c_te]),
                                    fine_names, coarse_names)
    return (
        TensorImageDataset(torch.from_numpy(x_tr.copy()), lookup[torch.from_numpy(f_tr)], tax),
        TensorImageDataset(torch.from_numpy(x_te.copy()), lookup[torch.from_numpy(f_te)], tax),
    )


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar100(root: str | os.PathLike) -> Path:
    """Download and extract the official archive into ``root`` (checking MD5s); returns the extracted folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-100-python.tar.gz"
    if not archive.is_file() or _md5(archive) != CIFAR100_MD5[archive.name]:
        tmp = archive.with_name(archive.name + ".part")
        urllib.request.urlretrieve(CIFAR100_URL, tmp)
        if _md5(tmp) != CIFAR100_MD5[archive.name]:
            tmp.unlink()
            raise ValueError(f"{CIFAR100_URL}: download has the wrong MD5 (expected {CIFAR100_MD5[archive.name]})")
        os.replace(tmp, archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    folder = root / "cifar-100-python"
    for name in ("train", "test"):
        if _md5(folder / name) != CIFAR100_MD5[name]:
            raise ValueError(f"{folder / name}: wrong MD5 after extraction (expected {CIFAR100_MD5[name]})")
    return folder
