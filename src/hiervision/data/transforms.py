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
    off = torch.randint(0, 2 * pad + 1, (2, x.shape[0]), generator=generator)
    return _crop_at(x, pad, _to_device(off, x.device), mode)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One small host->device copy that does not stall the host (pinned source, non-blocking)."""
    if t.device == device or device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else t.to(device)


def _crop_at(x: torch.Tensor, pad: int, off: torch.Tensor, mode: str) -> torch.Tensor:
    """The windows at the given ``(2, B)`` offsets (already on ``x``'s device) of ``x`` padded by ``pad``."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode) if mode == "reflect" else F.pad(x, (pad,) * 4)
    rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


def hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p`` (independently per sample)."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return _flip_where(x, _to_device(flip, x.device))


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a float ``(B, C, H, W)`` batch."""
    m, s = _stats_tensors(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.dtype, x.device)
    return (x - m) / s


_STATS_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats_tensors(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as ``(1, C, 1, 1)`` tensors, built once per (values, dtype, device): on a GPU building them
    every batch is two host->device copies per step."""
    key = (mean, std, dtype, device)
    hit = _STATS_CACHE.get(key)
    if hit is None:
        if len(_STATS_CACHE) > 64:  # a long-lived process that saw many data sets
            _STATS_CACHE.clear()
        hit = (torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1),
               torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))
        _STATS_CACHE[key] = hit
    return hit


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
        # the same draws, in the same order, as pad_crop then hflip; on a GPU they travel in one copy
        b = x.shape[0]
        off = torch.randint(0, 2 * self.pad + 1, (2, b), generator=generator) if self.pad > 0 else None
        flip = torch.rand(b, generator=generator) < 0.5 if self.flip else None
        if x.device.type != "cpu" and off is not None and flip is not None:
            both = _to_device(torch.cat([off, flip[None].long()]), x.device)
            off, flip = both[:2], both[2].bool()
        if off is not None:
            x = _crop_at(x, self.pad, _to_device(off, x.device), self.pad_mode)
        return _flip_where(x, _to_device(flip, x.device)) if flip is not None else x

    def __repr__(self) -> str:
        return f"BatchAugment(pad={self.pad}, flip={self.flip}, pad_mode={self.pad_mode!r})"
