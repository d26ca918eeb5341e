"""Reading single image files (from disk or from inside a zip) for the lazy datasets.

The reader is a small picklable object so DataLoader workers can each reopen the zip archive
instead of sharing one file handle across processes.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReader", "is_image_name", "probe_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P;L")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageReader:
    """``reader(source) -> uint8 (C, H, W)``; ``source`` is a file path, or a member name when ``archive`` is a zip.

    Args:
        channels: 1 (grayscale) or 3 (RGB); every image is converted.
        size: ``(H, W)`` to resize to (bilinear, antialiased when shrinking), or ``None`` to keep.
        archive: optional zip file holding the images.
    """

    def __init__(self, channels: int, size: tuple[int, int] | None = None, archive: str | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels: must be 1 or 3, got {channels}")
        self.channels, self.size, self.archive = channels, size, archive
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
        try:
            with self._open(source) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if self.size is not None and im.size != (self.size[1], self.size[0]):
                    im = im.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                arr = np.array(im)
        except (OSError, UnidentifiedImageError, zipfile.BadZipFile, KeyError, SyntaxError) as e:
            raise ValueError(f"{self.name(source)}: cannot read image ({e})") from None
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))


def probe_image(reader: ImageReader, source: str) -> tuple[int, tuple[int, int]]:
    """``(channels, (H, W))`` of one image: the defaults when the config does not fix them."""
    try:
        with reader._open(source) as im:
            return (1 if im.mode in _GRAY_MODES else 3), (im.size[1], im.size[0])
    except (OSError, UnidentifiedImageError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{reader.name(source)}: cannot read image ({e})") from None
