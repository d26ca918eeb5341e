"""Reading single image files (from disk or from inside a zip): one set of conversion rules for
training, ``predict`` and the server, so a picture means the same thing wherever it is read.

Conversion rules (:func:`to_array`):

* EXIF orientation is applied first (a phone photo stored sideways is read upright).
* 16-bit (and 32-bit integer, mode ``I``) grey is scaled to 8 bit (``v / 257``, rounded), never
  clipped — an ``I`` image holding 0..255 values therefore reads dark; save such images as 8 bit;
  ``F`` (float) images are taken as [0, 1] when their maximum is ≤ 1, else as [0, 255].
* Transparency (RGBA, LA, PA, palette with a transparent colour) is composited on **white**: what
  lies under a transparent pixel is arbitrary (often black), a white page is what a viewer shows.
* Palette, CMYK, YCbCr, LAB, HSV and 1-bit images are converted by Pillow to grey or RGB.
* An image with more than ``max_pixels`` pixels is refused before it is decoded (one-line error
  naming the file); Pillow's own decompression-bomb guard (2 × ``Image.MAX_IMAGE_PIXELS``) is turned
  into the same error, so ``max_pixels`` above ~179 million has no effect.

The reader is a small picklable object so DataLoader workers can each reopen the zip archive
instead of sharing one file handle across processes.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "first_readable",
    "IMAGE_EXTENSIONS",
    "ImageReader",
    "find_images",
    "is_hidden",
    "is_image_name",
    "probe_image",
    "read_image",
    "to_array",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: default pixel limit per image (``data.max_pixels``): 64 megapixels, e.g. 8000 × 8000
DEFAULT_MAX_PIXELS = 64_000_000
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "P;L")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
T = TypeVar("T")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(part: str) -> bool:
    """Dotfiles/dot-folders and macOS zip litter are never data (``.DS_Store``, ``._x.png``, ``__MACOSX``)."""
    return part.startswith(".") or part == "__MACOSX"


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files under ``folder`` (recursively), hidden files and folders skipped as in training."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(Path(dirpath) / f for f in filenames if is_image_name(f) and not is_hidden(f))
    return sorted(found)


def _check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"{name}: image is {w}x{h} = {w * h} pixels, over the limit data.max_pixels = {max_pixels}")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Grey images deeper than 8 bit, scaled (not clipped) to 0..255."""
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    a = np.asarray(im).astype(np.float32)  # I;16* and I (Pillow opens 16-bit PNGs as I;16 or I)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def to_array(im: Image.Image, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """An opened image as uint8 ``(C, H, W)`` under the module's conversion rules, resized to ``size = (H, W)``."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are still good, read them as stored
        pass
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(page, rgba).convert("RGB")
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy shares it
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _guarded(fn: Callable[[], T], name: str) -> T:
    """Run ``fn``; every failure on an untrusted file becomes one ``ValueError`` line naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked instead
            return fn()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: image too large, refused as a possible decompression bomb ({_line(e)})") from None
    except FileNotFoundError:
        raise ValueError(f"{name}: cannot read image (no such file)") from None
    except ValueError as e:
        if str(e).startswith(f"{name}: "):
            raise
        raise ValueError(f"{name}: cannot read image ({_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on an untrusted file is a bad image, not a crash
        raise ValueError(f"{name}: cannot read image ({type(e).__name__}: {_line(e)})") from None


def _line(e: BaseException) -> str:
    """A decoder's message on one line (some span several), so error lists stay one line per run."""
    return " ".join(str(e).split())[:300]


def _decode(opener: Callable[[], Image.Image], name: str, channels: int, size: tuple[int, int] | None,
            max_pixels: int | None) -> np.ndarray:
    """Open, check the header's pixel count (before decoding), decode and convert."""

    def run() -> np.ndarray:
        with opener() as im:
            _check_pixels(im, max_pixels, name)
            return to_array(im, channels, size)

    return _guarded(run, name)


def _hw(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def read_image(
    path: str | os.PathLike,
    in_chans: int,
    size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """One image file as float32 ``(C, H, W)`` in [0, 1], converted exactly as training converts it.

    For ``predict`` and the server. ``size`` is ``(H, W)`` or one int (square); ``None`` keeps the
    file's size. Raises ``ValueError`` (one line naming the file) for anything that is not a readable
    image within ``max_pixels``.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans: must be 1 or 3, got {in_chans}")
    arr = _decode(lambda: Image.open(path), str(path), in_chans, _hw(size), max_pixels)
    return torch.from_numpy(arr).float().div_(255)


class ImageReader:
    """``reader(source) -> uint8 (C, H, W)``; ``source`` is a file path, or a member name when ``archive`` is a zip.

    Args:
        channels: 1 (grayscale) or 3 (RGB); every image is converted (see the module's rules).
        size: ``(H, W)`` to resize to (bilinear, antialiased when shrinking), or ``None`` to keep.
        archive: optional zip file holding the images.
        max_pixels: images with more pixels are refused (``None``: no limit of our own).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int] | None = None,
        archive: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels: must be 1 or 3, got {channels}")
        self.channels, self.size, self.archive, self.max_pixels = channels, size, archive, max_pixels
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}

    def _open(self, source: str) -> Image.Image:
        if self.archive is None:
            return Image.open(source)
        if self._zip is None or self._pid != os.getpid():  # reopen in each worker process
            self._zip, self._pid = zipfile.ZipFile(self.archive), os.getpid()
        return Image.open(io.BytesIO(self._zip.read(source)))

    def name(self, source: str) -> str:
        return f"{self.archive}:{source}" if self.archive else source

    def __call__(self, source: str) -> torch.Tensor:
        arr = _decode(lambda: self._open(source), self.name(source), self.channels, self.size, self.max_pixels)
        return torch.from_numpy(arr)


def probe_image(reader: ImageReader, source: str) -> tuple[int, tuple[int, int]]:
    """``(channels, (H, W))`` of one image (after EXIF rotation): the defaults when the config does not fix them."""

    def probe() -> tuple[int, tuple[int, int]]:
        with reader._open(source) as im:
            _check_pixels(im, reader.max_pixels, name)
            w, h = im.size
            if _orientation(im) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                w, h = h, w
            gray = im.mode in _GRAY_MODES or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")
            return (1 if gray else 3), (h, w)

    name = reader.name(source)
    return _guarded(probe, name)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - damaged EXIF is ignored, as in to_array
        return 1


def first_readable(reader: ImageReader, sources: list[str]) -> tuple[int, tuple[int, int]]:
    """:func:`probe_image` of the first source that can be probed, so one bad file (which ``data.check``
    reports or skips) does not decide the data set's channels and size; the first error when none can."""
    first: ValueError | None = None
    for s in sources:
        try:
            return probe_image(reader, s)
        except ValueError as e:
            first = first or e
    raise first if first is not None else ValueError("no images to probe")
