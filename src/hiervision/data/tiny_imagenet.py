"""Tiny-ImageNet-200 (64×64 JPEGs, 200 WordNet classes) with its WordNet tree, decoded once and cached.

Decoding 60k JPEGs with Pillow takes about a minute, so the uint8 arrays (after the optional
resize) are cached as ``.npy`` files keyed by the exact file list and size; later loads take a second.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from hiervision.data.base import TensorImageDataset, shared_data_dir
from hiervision.data.imageio import ImageReader
from hiervision.data.splits import hash_subset
from hiervision.data.transforms import resize
from hiervision.taxonomy import Taxonomy

__all__ = ["default_cache_dir", "load_tiny_imagenet", "tiny_imagenet_files", "tiny_imagenet_taxonomy"]

ENV_VAR = "HIERVISION_TINY_IMAGENET"
HIER_ENV_VAR = "HIERVISION_BREEDS_WORDNET"
HOW_TO_GET = "set HIERVISION_TINY_IMAGENET or cfg root to the tiny-imagenet-200 folder (see shared/data/README.md)"
CACHE_VERSION = 1


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR, shared_data_dir() / "tiny-imagenet-200"))


def default_hierarchy_root() -> Path:
    return Path(os.environ.get(HIER_ENV_VAR, shared_data_dir() / "imagenet" / "breeds" / "wordnet"))


def default_cache_dir() -> Path:
    """Where decoded Tiny-ImageNet arrays are cached: ``$HIERVISION_CACHE``, else ``~/.cache/hiervision``."""
    return Path(os.environ.get("HIERVISION_CACHE", Path.home() / ".cache" / "hiervision"))


def _wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Tiny-ImageNet not found ({HOW_TO_GET})")
    return path.read_text().split()


def tiny_imagenet_taxonomy(
    root: str | os.PathLike | None = None,
    hierarchy_root: str | os.PathLike | None = None,
    max_depth: int | None = None,
) -> Taxonomy:
    """WordNet tree over the 200 wnids (BREEDS ``class_hierarchy.txt`` + ``node_names.txt``)."""
    hroot = Path(hierarchy_root) if hierarchy_root is not None else default_hierarchy_root()
    hier, names = hroot / "class_hierarchy.txt", hroot / "node_names.txt"
    for f in (hier, names):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: WordNet hierarchy file not found (set cfg hierarchy_root to the BREEDS "
                                    "wordnet folder, e.g. shared/data/imagenet/breeds/wordnet)")
    wnids = _wnids(Path(root) if root is not None else default_root())
    return Taxonomy.from_wordnet(hier, names, classes=wnids, max_depth=max_depth)


def tiny_imagenet_files(root: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
    """``(relative image paths, wnids)`` of the train folders or of ``val/val_annotations.txt``, sorted."""
    root = Path(root)
    wnids = _wnids(root)
    files: list[str] = []
    labels: list[str] = []
    if split == "train":
        for wnid in sorted(wnids):
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: missing train folder of class {wnid} ({HOW_TO_GET})")
            names = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith((".jpeg", ".jpg", ".png")) and not f.startswith("."))
            files += [f"train/{wnid}/images/{f}" for f in names]
            labels += [wnid] * len(names)
    elif split == "val":
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise FileNotFoundError(f"{ann}: missing ({HOW_TO_GET})")
        known = set(wnids)
        for i, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in known:
                raise ValueError(f"{ann}:{i}: expected 'file<TAB>wnid' with a wnid from wnids.txt, got {line!r}")
            files.append(f"val/images/{parts[0]}")
            labels.append(parts[1])
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return files, labels


def _decode(path: str) -> np.ndarray:
    """One JPEG → uint8 (3, H, W) under the shared conversion rules (grey expanded to RGB, EXIF, pixel limit)."""
    return ImageReader(3)(path).numpy()


def _decode_all(paths: Sequence[str], workers: int, desc: str) -> np.ndarray:
    if workers > 1 and len(paths) > 256:
        with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
            arrays = list(_progress(pool.imap(_decode, paths, chunksize=256), len(paths), desc))
    else:
        arrays = [_decode(p) for p in _progress(paths, len(paths), desc)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{desc}: images have different sizes {sorted(shapes)[:2]}; set cfg image_size")
    return np.stack(arrays)


def _progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, total=total, desc=desc, disable=total < 2000, leave=False)


def _cache_path(cache_dir: Path, root: Path, files: Sequence[str], size: int | None) -> Path:
    h = hashlib.sha256(f"{CACHE_VERSION}|{root.resolve()}|{size}|".encode())
    h.update("\n".join(files).encode())
    return cache_dir / f"tiny_imagenet_{len(files)}x{size or 'orig'}_{h.hexdigest()[:16]}.npy"


def load_images_cached(
    root: Path, files: Sequence[str], size: int | None, cache_dir: Path | None, workers: int, desc: str
) -> torch.Tensor:
    """Decode (and resize) ``files`` once; later calls read the ``.npy`` cache (written atomically)."""
    path = _cache_path(cache_dir, root, files, size) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if len(arr) == len(files):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    orig = _cache_path(cache_dir, root, files, None) if cache_dir is not None and size is not None else None
    if orig is not None and orig.is_file():  # another size was asked for before: resize that instead of decoding
        x = load_images_cached(root, files, None, cache_dir, workers, desc)
    else:
        x = torch.from_numpy(_decode_all([str(root / f) for f in files], workers, desc))
    if size is not None:
        x = torch.cat([resize(c, size) for c in x.split(4096)])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, x.numpy())
        os.replace(tmp, path)
    return x


def load_tiny_imagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    taxonomy: Taxonomy | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> TensorImageDataset:
    """The train folders or the labelled val set as a :class:`TensorImageDataset` (3×64×64 unless resized).

    Args:
        root: the ``tiny-imagenet-200`` folder.
        split: ``"train"`` or ``"val"``.
        taxonomy: tree whose external ids include the wnids (default: :func:`tiny_imagenet_taxonomy`).
        image_size: resize (area averaging) before caching, e.g. 32.
        cache_dir: where decoded arrays are cached (``None`` disables the cache).
        limit: decode only a seeded class-balanced subset of this many images.
        seed: seed of that subset.
        workers: decoding processes (default: up to 4).
    """
    root = Path(root) if root is not None else default_root()
    tax = taxonomy if taxonomy is not None else tiny_imagenet_taxonomy(root)
    files, wnids = tiny_imagenet_files(root, split)
    missing = sorted(set(wnids) - set(tax.external_index))
    if missing:
        raise ValueError(f"class {missing[0]} of {root} is not in the taxonomy")
    targets = torch.tensor([tax.external_index[w] for w in wnids], dtype=torch.long)
    if limit is not None:
        keep = hash_subset(files, targets, limit, seed)  # by file name: stable when files come or go
        files, targets = [files[i] for i in keep.tolist()], targets[keep]
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    images = load_images_cached(root, files, image_size, Path(cache_dir) if cache_dir else None, workers,
                                f"tiny-imagenet {split}")
    ds = TensorImageDataset(images, targets, tax, ids=[str(f) for f in files])
    ds.files = files  # type: ignore[attr-defined]  # kept so tests and users can trace an image to its file
    return ds
