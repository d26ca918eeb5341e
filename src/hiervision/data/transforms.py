"""Augmentation on whole batches of tensors (no torchvision): one kernel call per batch instead of per image.

Every random choice draws from an explicit :class:`torch.Generator` on the CPU, so a batch's
augmentation is reproducible from the generator state whatever device the images live on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment", "hflip", "normalize", "pad_crop", "resize"]


def pad_crop(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None, mode: str = "constant"
) -> torch.Tensor:
    """Random crop of the original size from the image padded by ``pad`` on every side, per sample.

    Args:
        x: ``(B, C, H, W)`` batch (any dtype for ``constant``; float for ``reflect``).
        pad: padding in pixels (0 returns ``x``).
        generator: CPU generator for the crop offsets.
        mode: ``"constant"`` (zeros) or ``"reflect"``.
    """
    if pad <= 0:
        return x
    if mode not in ("constant", "reflect"):
        raise ValueError(f"pad mode must be 'constant' or 'reflect', got {mode!r}")
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode) if mode == "reflect" else F.pad(x, (pad,) * 4)
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p`` (independently per sample)."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a float ``(B, C, H, W)`` batch."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a ``(B, C, H, W)`` batch; area averaging when shrinking (no aliasing), bilinear when growing.

    uint8 input gives uint8 output (rounded), so cached datasets stay compact.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    y = x.float()
    if hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]:
        y = F.interpolate(y, size=hw, mode="area")
    else:
        y = F.interpolate(y, size=hw, mode="bilinear", align_corners=False, antialias=True)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


class BatchAugment:
    """The training-time augmentation the trainer applies to each float batch: random pad-crop, then flip.

    Args:
        pad: crop padding in pixels (0 disables cropping).
        flip: random horizontal flips.
        pad_mode: ``"constant"`` or ``"reflect"``.
    """

    def __init__(self, pad: int = 4, flip: bool = True, pad_mode: str = "constant") -> None:
        if pad < 0:
            raise ValueError(f"pad must be ≥ 0, got {pad}")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        self.pad, self.flip, self.pad_mode = pad, flip, pad_mode

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = pad_crop(x, self.pad, generator, self.pad_mode)
        return hflip(x, generator) if self.flip else x

    def __repr__(self) -> str:
        return f"BatchAugment(pad={self.pad}, flip={self.flip}, pad_mode={self.pad_mode!r})"
