"""Decoding uploaded image bytes safely: the checks that keep one bad upload from hurting the server.

Every rejection is a :class:`ImageRejected` carrying the HTTP status the server answers with, so the
web layer maps errors without guessing from messages.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageRejected", "decode_image"]

#: refuse images above this many pixels *before* decoding them (a 40 kB PNG can inflate to gigabytes)
DEFAULT_MAX_PIXELS = 40_000_000


class ImageRejected(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(
    data: bytes,
    name: str,
    in_chans: int,
    size: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Image bytes → ``uint8`` array ``H×W`` (grey) or ``H×W×3`` at the model's ``size`` ``(H, W)``.

    The header is read first and the pixel count checked against ``max_pixels`` before any pixel is
    decoded; truncated or unknown files raise :class:`ImageRejected` (400), oversized ones 413.
    """
    if not data:
        raise ImageRejected(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageRejected(f"{name}: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}", 413)
                img.load()  # decodes now: a truncated file fails here, not later
                img = img.convert("L" if in_chans == 1 else "RGB")
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8).copy()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"{name}: too many pixels to decode safely (more than the limit of {max_pixels})",
                            413) from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{name}: not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(f"{name}: unreadable image ({e})") from None
