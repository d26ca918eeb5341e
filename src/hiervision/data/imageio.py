"""Image files for data sets: the PyTorch side of :mod:`hiervision.imagefile` (whose conversion rules apply).

The reader is a small picklable object so DataLoader workers can each reopen the zip archive
instead of sharing one file handle across processes.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections import Counter

import torch
from PIL import Image

from hiervision.imagefile import (
    DEFAULT_MAX_PIXELS,
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    check_pixels,
    decode,
    find_images,
    guarded,
    is_hidden,
    is_image_name,
    read_array,
    to_array,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "probe_sample",
    "IMAGE_EXTENSIONS",
    "ImageReader",
    "find_images",
    "is_hidden",
    "is_image_name",
    "probe_image",
    "read_image",
    "to_array",
]


#: the most bytes one image in a zip archive may unpack to (a 64-megapixel RGBA image is 256 MB raw; real PNGs
#: and JPEGs are far smaller): a member declaring more is refused before it is inflated
MAX_MEMBER_BYTES = 256_000_000
#: images read to find a data set's channels and size (spread over all of it)
PROBE_SAMPLE = 64


def read_image(
    path: str | os.PathLike,
    in_chans: int,
    size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """One image file as float32 ``(C, H, W)`` in [0, 1] (:func:`hiervision.imagefile.read_array` / 255)."""
    return torch.from_numpy(read_array(path, in_chans, size, max_pixels)).float().div_(255)


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
        info = self._zip.getinfo(source)
        if info.file_size > MAX_MEMBER_BYTES:  # checked before a byte is inflated (a zip bomb declares its size)
            raise ValueError(f"unpacks to {info.file_size:,} bytes, over the {MAX_MEMBER_BYTES:,} an image member "
                             "may hold")
        with self._zip.open(info) as member:  # reads at most the declared size (zipfile stops there)
            return Image.open(io.BytesIO(member.read(MAX_MEMBER_BYTES + 1)))

    def name(self, source: str) -> str:
        return f"{self.archive}:{source}" if self.archive else source

    def __call__(self, source: str) -> torch.Tensor:
        arr = decode(lambda: self._open(source), self.name(source), self.channels, self.size, self.max_pixels)
        return torch.from_numpy(arr)


def probe_image(reader: ImageReader, source: str) -> tuple[int, tuple[int, int]]:
    """``(channels, (H, W))`` of one image (after EXIF rotation): the defaults when the config does not fix them."""

    def probe() -> tuple[int, tuple[int, int]]:
        with reader._open(source) as im:
            check_pixels(im, reader.max_pixels, name)
            w, h = im.size
            if _orientation(im) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                w, h = h, w
            gray = im.mode in GRAY_MODES or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")
            return (1 if gray else 3), (h, w)

    name = reader.name(source)
    return guarded(probe, name)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - damaged EXIF is ignored, as in to_array
        return 1


def probe_sample(reader: ImageReader, sources: list[str], k: int = PROBE_SAMPLE) -> tuple[int, tuple[int, int], str]:
    """``(channels, (H, W), summary)`` of the data set from up to ``k`` images spread evenly over ``sources``
    (never from the first alone: a grey image sorting first must not make a colour data set grey): colour when
    any sampled image is, the most common size; ``summary`` says what was found and how mixed it was. Bad
    files (which ``data.check`` names or skips) are passed over; the first error when none can be read."""
    n = min(k, len(sources))
    idx = sorted({round(i * (len(sources) - 1) / max(n - 1, 1)) for i in range(n)})
    found, first = [], None
    for i in idx:
        try:
            found.append(probe_image(reader, sources[i]))
        except ValueError as e:
            first = first or e
    if not found:
        raise first if first is not None else ValueError("no images to probe")
    grey = sum(c == 1 for c, _ in found)
    sizes = Counter(hw for _, hw in found)
    (h, w), _ = sizes.most_common(1)[0]
    colour = "grey" if grey == len(found) else "colour" if not grey else f"{len(found) - grey} colour, {grey} grey"
    kinds = f"{len(sizes)} sizes, most common {w}x{h}" if len(sizes) > 1 else f"all {w}x{h}"
    summary = f"{len(found)} of {len(sources):,} images sampled: {colour}; {kinds}"
    return (3 if grey < len(found) else 1), (h, w), summary
