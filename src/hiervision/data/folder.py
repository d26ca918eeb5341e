"""Hierarchical image folders (``root/A/B/C/*.png``, or the same layout inside a ``.zip``): each folder is a node.

Images lying directly in an inner folder are labelled with that inner node (a coarse-only
label), so partially annotated collections need no special format.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path, PurePosixPath

import torch

from hiervision.data.base import FileImageDataset
from hiervision.data.imageio import DEFAULT_MAX_PIXELS, ImageReader, is_hidden, is_image_name, probe_sample
from hiervision.runfolder import MARKER
from hiervision.taxonomy import Taxonomy

__all__ = ["folder_index", "load_folder"]


def _walk(root: Path) -> tuple[list[str], list[str], list[str]]:
    """``(class folders, image paths, their folder)`` relative to ``root``, symlinks followed once.

    A linked folder is read like a real one; a link back to a folder above it (a loop) or a second
    way into a folder already read is an error naming the link, since its images would otherwise be
    counted twice or under two classes.
    """
    dirs: list[str] = []
    sources: list[str] = []
    folders: list[str] = []
    odd: list[str] = []  # image names that are not regular files, run folders: named and skipped
    seen: dict[str, str] = {os.path.realpath(root): "."}

    stack: list[tuple[str, str, str]] = [(str(root), ".", os.path.realpath(root))]
    while stack:  # depth-first, in name order, without recursion (trees may be very deep)
        path, rel, here = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f"{path}: cannot list folder ({e.strerror or e})") from None
        below: list[tuple[str, str, str]] = []
        for e in entries:
            if is_hidden(e.name):
                continue
            if e.is_dir() or is_image_name(e.name):
                _check_name(e.path, e.name)
            sub = e.name if rel == "." else f"{rel}/{e.name}"
            if e.is_dir() and os.path.isfile(os.path.join(e.path, MARKER)):  # a run's own folder (--out inside
                odd.append(e.path)  # the data): its plots and checkpoints are no class
                continue
            if e.is_dir():  # follows symlinks
                real = os.path.realpath(e.path)
                if here == real or here.startswith(real.rstrip(os.sep) + os.sep):  # real is this folder or above
                    raise ValueError(f"{e.path}: symlink loop (points back to {real}, a folder above it)")
                if real in seen:
                    first, second = str(root / seen[real]), e.path
                    if os.path.islink(first) and not e.is_symlink():
                        first, second = second, first  # name the link as the culprit
                    raise ValueError(f"{second}: the same folder as {first} (symlink); a folder can be one class only")
                seen[real] = sub
                dirs.append(sub)
                below.append((e.path, sub, real))
            elif is_image_name(e.name) and not e.is_file():  # a pipe, device or socket: reading it could hang
                odd.append(e.path)
            elif is_image_name(e.name):
                if rel == ".":
                    raise ValueError(f"{e.path}: image at the top of the folder has no class folder")
                sources.append(e.path)
                folders.append(rel)
        stack.extend(reversed(below))
    if odd:
        shown = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        print(f"hiervision: warning: {root}: skipped {len(odd)} entries that are no images of a class (a pipe, a "
              f"device or a socket named like an image, or a hiervision run folder): {shown}", file=sys.stderr)
    return dirs, sources, folders


def _check_name(path: str, name: str) -> None:
    """A class folder or image name must be printable UTF-8: its name becomes a class name (or a sample id)
    written to taxonomy.json, splits.json and one-line messages."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogates (os.fsdecode)
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ValueError(f"{shown}: file name is not valid UTF-8; rename it") from None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"{repr(path)[1:-1]}: name holds a control character (newline, tab, ...); rename it")


def _no_empty(dirs: list[str] | set[str], folders: list[str], where: str) -> None:
    """Every class folder must hold an image somewhere below it: an empty class is a silent data error."""
    full = {f for f in folders}
    full |= {"/".join(f.split("/")[: i + 1]) for f in full for i in range(f.count("/"))}
    empty = sorted(d for d in dirs if d not in full)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{where}/{empty[0]}: class folder holds no images{more}; add images or remove it")


def folder_index(root: str | os.PathLike) -> tuple[Taxonomy, list[str], list[str], str | None]:
    """Scan a folder or zip: ``(taxonomy, sources, relative folder of each image, archive or None)``.

    A zip whose entries all sit under one top folder (as Omniglot's do) is read from inside it.
    Hidden files and folders are skipped; empty class folders and symlink loops are errors.
    """
    root = Path(root)
    if root.is_file() and not zipfile.is_zipfile(root):
        raise ValueError(f"{root}: data.root is a file but not a zip archive (give a folder of class folders, "
                         "or a .zip of one)")
    if root.is_file():
        with zipfile.ZipFile(root) as zf:
            names = [n for n in zf.namelist() if not any(is_hidden(p) for p in PurePosixPath(n).parts)]
        for n in names:
            if n.endswith("/") or is_image_name(n):
                _check_name(f"{root}:{n}", n)
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
        if not sources:
            raise ValueError(f"{root}: the zip archive holds no images (expected <class>/.../*.png inside)")
        _no_empty(dirs, folders, f"{root}:{prefix.rstrip('/')}" if prefix else f"{root}:")
        return Taxonomy.from_paths(dirs), sources, folders, str(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder or zip file (give cfg root: a folder of class folders)")
    dirs, sources, folders = _walk(root)
    if not dirs:
        raise ValueError(f"{root}: no class folders (expected root/<class>/.../*.png)")
    _no_empty(dirs, folders, str(root))
    return Taxonomy.from_paths(dirs), sources, folders, None


def load_folder(
    root: str | os.PathLike,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> FileImageDataset:
    """All images under ``root`` as one lazy dataset (the caller splits it).

    ``channels``/``image_size`` default to those of the first image; other sizes are resized to it.
    Sample ids are the images' paths relative to ``root`` (inside the zip's top folder for archives),
    so a split keyed on them survives moving the data set.
    """
    tax, sources, folders, archive = folder_index(root)
    if not sources:
        raise FileNotFoundError(f"{root}: no image files found (expected root/<class>/.../*.png)")
    probe_c, probe_hw, found = probe_sample(ImageReader(3, None, archive, max_pixels), sources)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    reader = ImageReader(channels or probe_c, tuple(size) if size else probe_hw, archive, max_pixels)
    targets = torch.tensor([tax.external_index[f] for f in folders], dtype=torch.long)
    ids = [f"{f}/{PurePosixPath(s).name}" for s, f in zip(sources, folders)]
    ds = FileImageDataset(sources, targets, tax, reader, ids=ids)
    ds.found = found  # what the probe saw, for the run's note
    return ds
