"""Hierarchical image folders (``root/A/B/C/*.png``, or the same layout inside a ``.zip``): each folder is a node.

Images lying directly in an inner folder are labelled with that inner node (a coarse-only
label), so partially annotated collections need no special format.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

import torch

from hiervision.data.base import FileImageDataset
from hiervision.data.imageio import ImageReader, is_image_name, probe_image
from hiervision.taxonomy import Taxonomy

__all__ = ["folder_index", "load_folder"]


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def folder_index(root: str | os.PathLike) -> tuple[Taxonomy, list[str], list[str], str | None]:
    """Scan a folder or zip: ``(taxonomy, sources, relative folder of each image, archive or None)``.

    A zip whose entries all sit under one top folder (as Omniglot's do) is read from inside it.
    """
    root = Path(root)
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            names = [n for n in zf.namelist() if not any(_hidden(p) for p in PurePosixPath(n).parts)]
        parts = {PurePosixPath(n).parts[0] for n in names}
        prefix = ""
        if len(parts) == 1 and all("/" in n for n in names):
            prefix = parts.pop() + "/"
        sources, folders, dirs = [], [], set()
        for n in sorted(names):
            rel = n[len(prefix) :]
            if not rel:
                continue
            if n.endswith("/"):
                dirs.add(rel.rstrip("/"))
            elif is_image_name(n):
                folder = str(PurePosixPath(rel).parent)
                if folder == ".":
                    raise ValueError(f"{root}:{n}: image at the top of the archive has no class folder")
                sources.append(n)
                folders.append(folder)
                dirs.add(folder)
        return Taxonomy.from_paths(dirs), sources, folders, str(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder or zip file (give cfg root: a folder of class folders)")
    tax = Taxonomy.from_folders(root)
    sources, folders = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(filenames):
            if not is_image_name(f) or _hidden(f):
                continue
            if rel == ".":
                raise ValueError(f"{Path(dirpath) / f}: image at the top of the folder has no class folder")
            sources.append(str(Path(dirpath) / f))
            folders.append(rel)
    return tax, sources, folders, None


def load_folder(
    root: str | os.PathLike,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> FileImageDataset:
    """All images under ``root`` as one lazy dataset (the caller splits it).

    ``channels``/``image_size`` default to those of the first image; other sizes are resized to it.
    """
    tax, sources, folders, archive = folder_index(root)
    if not sources:
        raise FileNotFoundError(f"{root}: no image files found (expected root/<class>/.../*.png)")
    probe_c, probe_hw = probe_image(ImageReader(3, None, archive), sources[0])
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    reader = ImageReader(channels or probe_c, tuple(size) if size else probe_hw, archive)
    targets = torch.tensor([tax.external_index[f] for f in folders], dtype=torch.long)
    return FileImageDataset(sources, targets, tax, reader)
