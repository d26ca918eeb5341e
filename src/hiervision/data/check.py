"""Verify every image of a file-backed data set once, before training (``data.check``).

One corrupt file should stop a run before its first step with a list of *all* bad files, not
crash it mid-epoch (or, in the test split, after the last epoch). Each image is opened, its header's
pixel count checked against ``data.max_pixels`` and fully decoded with the training conversion,
in a thread pool (Pillow decodes without the GIL). Good files are remembered in a small JSON cache
keyed by path and file size + mtime (for zip members: size + CRC), so the next run checks only
new or changed files.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hiervision.data.base import FileImageDataset
from hiervision.data.imageio import ImageReader
from hiervision.imagefile import check_pixels, guarded, to_array

__all__ = ["check_images", "default_check_cache"]

_VERSION = 1


def default_check_cache(where: str) -> Path:
    """``$HIERVISION_CACHE/image-check/<hash of the data set's location>.json`` (default ``~/.cache/hiervision``)."""
    base = Path(os.environ.get("HIERVISION_CACHE", Path.home() / ".cache" / "hiervision"))
    key = hashlib.sha256(str(Path(where).expanduser().resolve()).encode()).hexdigest()[:20]
    return base / "image-check" / f"{key}.json"


def _stamps(sources: list[str], archive: str | None) -> list[list[int] | None]:
    """``[size, mtime_ns]`` per file (``[size, crc]`` per zip member); ``None`` when it cannot be stat'ed."""
    if archive is not None:
        try:
            with zipfile.ZipFile(archive) as zf:
                info = {i.filename: [i.file_size, i.CRC] for i in zf.infolist()}
        except (OSError, zipfile.BadZipFile):
            return [None] * len(sources)
        return [info.get(s) for s in sources]
    out: list[list[int] | None] = []
    for s in sources:
        try:
            st = os.stat(s)
            out.append([st.st_size, st.st_mtime_ns])
        except OSError:
            out.append(None)
    return out


def _load_cache(path: Path | None) -> dict[str, list[int]]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["ok"] if data.get("version") == _VERSION and isinstance(data.get("ok"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}  # a damaged cache only costs a full re-check


def _save_cache(path: Path | None, ok: dict[str, list[int]]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": _VERSION, "ok": ok}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop training


def _verify(reader: ImageReader, source: str) -> int:
    """Decode one image as training will; returns its pixel count, raises one-line ``ValueError`` when bad."""
    name = reader.name(source)

    def run() -> int:
        with reader._open(source) as im:
            check_pixels(im, reader.max_pixels, name)
            to_array(im, reader.channels, reader.size)
            return im.size[0] * im.size[1]

    return guarded(run, name)


def check_images(
    ds: FileImageDataset, cache: str | os.PathLike | None = None, workers: int | None = None
) -> list[tuple[int, str]]:
    """``[(index, message), ...]`` for every image of ``ds`` that cannot be read; ``[]`` when all are fine.

    Args:
        ds: a data set whose ``read`` is an :class:`~hiervision.data.imageio.ImageReader`.
        cache: JSON file remembering good files (``None``: no cache).
        workers: threads (default: up to 8).
    """
    reader = ds.read
    if not isinstance(reader, ImageReader):
        return []
    cache_path = Path(cache) if cache is not None else None
    ok = _load_cache(cache_path)
    stamps = _stamps(ds.sources, reader.archive)
    key = [reader.name(s) for s in ds.sources]
    limit = reader.max_pixels
    todo = []
    for i, (k, st) in enumerate(zip(key, stamps)):
        hit = ok.get(k)
        if st is None or hit is None or hit[:2] != st or (limit is not None and hit[2] > limit):
            todo.append(i)
    bad: list[tuple[int, str]] = []

    def one(i: int) -> tuple[int, int | str]:
        try:
            return i, _verify(reader, ds.sources[i])
        except ValueError as e:
            return i, str(e)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, res in pool.map(one, todo):
            if isinstance(res, str):
                bad.append((i, res))
            elif stamps[i] is not None:
                ok[key[i]] = [*stamps[i], res]
    if todo:
        _save_cache(cache_path, {k: ok[k] for k in key if k in ok})  # forget files no longer in the set
    return sorted(bad)
