"""Argument checks shared by layers that cannot import each other: the torch-free runtime and the heads
both take a beam width, so its check lives on the floor below both (numpy core, no PyTorch)."""

from __future__ import annotations

__all__ = ["check_beam_width"]


def check_beam_width(width: int) -> int:
    """``width`` as an int ≥ 1, else a one-line error."""
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"beam width must be an integer >= 1, got {width!r}")
    return int(width)
