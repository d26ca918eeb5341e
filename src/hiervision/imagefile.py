"""Reading single image files: one set of conversion rules for training, ``predict``, the server and
the PyTorch-free runtime, so a picture means the same thing wherever it is read (numpy + Pillow only).

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

"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "center_box",
    "crop_resize",
    "decode",
    "find_images",
    "is_hidden",
    "is_image_name",
    "read_array",
    "to_array",
    "upright",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: default pixel limit per image (``data.max_pixels``): 64 megapixels, e.g. 8000 × 8000
DEFAULT_MAX_PIXELS = 64_000_000
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "P;L")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
T = TypeVar("T")


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image suffixes training and predict read (case-insensitive)."""
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


def check_pixels(im: Image.Image, max_pixels: int | None, name: str) -> None:
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


def guarded(fn: Callable[[], T], name: str) -> T:
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


def decode(opener: Callable[[], Image.Image], name: str, channels: int, size: tuple[int, int] | None,
            max_pixels: int | None) -> np.ndarray:
    """Open, check the header's pixel count (before decoding), decode and convert."""

    def run() -> np.ndarray:
        with opener() as im:
            check_pixels(im, max_pixels, name)
            return to_array(im, channels, size)

    return guarded(run, name)


def hw(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def read_array(
    path: str | os.PathLike,
    in_chans: int,
    size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    resize: int | None = None,
) -> np.ndarray:
    """One image file as uint8 ``(C, H, W)``, converted exactly as training converts it.

    ``size`` is ``(H, W)`` or one int (square); ``None`` keeps the file's size. ``resize``: the run's
    evaluation transform was the pipeline's centre crop (:func:`center_box`) of a ``size`` square. Raises ``ValueError``
    (one line naming the file) for anything that is not a readable image within ``max_pixels``.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans: must be 1 or 3, got {in_chans}")
    if resize is None or size is None:
        return decode(lambda: Image.open(path), str(path), in_chans, hw(size), max_pixels)

    def centre_crop() -> np.ndarray:  # a run trained with data.pipeline: imagenet evaluates on centre crops
        with Image.open(path) as im:
            check_pixels(im, max_pixels, str(path))
            im = upright(im)
            if im.mode.startswith("I") or im.mode == "F":
                im = _to_8bit(im)
            side = hw(size)[0]
            arr = np.asarray(crop_resize(im, center_box(*im.size, side, resize), side, in_chans), dtype=np.uint8)
        return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))

    return guarded(centre_crop, str(path))


def center_box(w: int, h: int, size: int, resize: int) -> tuple[float, float, float, float]:
    """Evaluation crop of the ImageNet-style pipeline: the shorter side scaled to ``resize``, then the
    centre ``size`` square — as a box in source pixels (so one resize pass does both)."""
    side = min(min(w, h) * size / resize, w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def crop_resize(im: Image.Image, box: tuple[float, float, float, float], out: int, channels: int) -> Image.Image:
    """Crop ``box`` out of ``im`` and resize it to ``out``×``out`` in one pass, JPEG-drafted when it can shrink."""
    w, h = im.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    mode = "L" if channels == 1 else "RGB"
    if im.format == "JPEG":
        # draft keeps each side ≥ the requested size, so the box still has ≥ `out` pixels per side
        req = (max(1, math.ceil(w * out / bw)), max(1, math.ceil(h * out / bh)))
        im.draft(mode, req)
        sx, sy = im.size[0] / w, im.size[1] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # transparency on a white page, as a viewer shows it
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode != mode:
        im = im.convert(mode)
    return im.resize((out, out), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation first (a phone photo stored sideways), so the crop box is drawn upright.
    Only rotated images pay for it: they are decoded in full, without a JPEG draft."""
    if im.getexif().get(0x0112, 1) in (None, 1):
        return im
    return ImageOps.exif_transpose(im)
