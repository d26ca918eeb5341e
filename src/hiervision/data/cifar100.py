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
from typing import Any

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


class RefusedPickle(pickle.UnpicklingError):
    """The file asks the unpickler for something a CIFAR-100 file never holds (a function, a class)."""


def _reconstruct(subtype: type, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise RefusedPickle(f"array subclass {getattr(subtype, '__name__', subtype)!r}")
    return np.ndarray(shape, dtype)  # the empty array numpy's own _reconstruct makes; BUILD fills it


def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise RefusedPickle("an object array (its items would be unpickled as code)")
    return dt


def _scalar(dtype: Any, data: Any = None) -> np.generic:
    """A numpy scalar (e.g. a ``numpy.bytes_`` file name) from its dtype and raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise RefusedPickle("a numpy scalar that is not plain data")
    if len(data) != dtype.itemsize:
        raise ValueError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Protocol-2 pickles written by Python 3 spell a bytes object as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedPickle(f"_codecs.encode with {encoding!r}")
    return text.encode("latin-1")


#: every global a CIFAR-100 pickle (Python 2 original, or rewritten by Python 3) needs, mapped to a guarded stand-in
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes, numbers and numeric numpy arrays; any other global is refused.

    ``pickle.load`` would import and call whatever a file names, so a crafted ``cifar-100-python``
    folder could run code (the MD5 check only guards downloads). This reader never imports anything.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"it names {module}.{name}") from None


def _check_plain(obj: Any, depth: int = 0) -> None:
    """What came out is only dicts, lists, tuples, bytes, str, numbers and numeric arrays."""
    if depth > 20:
        raise RefusedPickle("nesting deeper than a CIFAR-100 file has")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject:
            raise RefusedPickle("an object array")
    elif not isinstance(obj, (bytes, str, int, float, bool, type(None))):
        raise RefusedPickle(f"a {type(obj).__name__} object")


def _unpickle(path: Path) -> dict:
    """Read one CIFAR-100 pickle through the restricted unpickler; refusals and damage are one-line ``ValueError``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-100 file missing ({HOW_TO_GET})")
    try:
        with open(path, "rb") as f:
            out = _CifarUnpickler(f, encoding="bytes").load()
        _check_plain(out)
    except RefusedPickle as e:
        raise ValueError(f"{path}: refused to unpickle: {e}, which a CIFAR-100 file never holds (it may be "
                         "crafted to run code; re-extract the official archive)") from None
    except Exception as e:  # noqa: BLE001 - any other failure of an untrusted file is a corrupt file
        raise ValueError(f"{path}: corrupt CIFAR-100 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: not a CIFAR-100 file (holds a {type(out).__name__}, not a dict)")
    return out


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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


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
