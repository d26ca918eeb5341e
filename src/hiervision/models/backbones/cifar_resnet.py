"""CIFAR ResNets (He et al. 2016, Sec. 4.2): the small 6n+2-layer networks used on 32x32 data.

Layout: a 3x3 conv stem (16 channels) then 3 stages of ``n`` basic blocks with 16/32/64 channels
(times ``width``) at strides 1/2/4; the first block of stages 2 and 3 downsamples. Shortcuts are
option A (identity, subsampled and zero-padded in channels; no parameters, as in the paper's CIFAR
experiments) or option B (1x1 conv + BN projection where the shape changes).

``act="elu"`` is the ELU variant of Shah et al. 2016 used by HierNet, implemented as a plain swap:
every ReLU (after the stem, inside each block and after each residual addition) becomes an ELU; the
block layout is unchanged. It is registered as ``resnetXX_elu`` too.

Stages and blocks are individually addressable (``stem``, ``stages[i][j]``, :attr:`CifarResNet.blocks`)
so that HierNet can cut the network after a given block into a shared trunk and per-branch tails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.models.backbones.base import Backbone, fixed_by_name
from hiervision.models.backbones.registry import register_backbone

__all__ = ["BasicBlock", "CifarResNet", "DEPTHS"]

#: blocks per stage for each registered depth (depth = 6n + 2)
DEPTHS: dict[int, int] = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}

_ACTS = {"relu": nn.ReLU, "elu": nn.ELU}


def _make_act(act: str) -> nn.Module:
    if act not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    return _ACTS[act](inplace=True)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially, append zero channels (keeps the paper's 0.27M count)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.extra = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, added to the shortcut, then the activation (post-activation, as in the paper)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, shortcut: str = "A", act: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = _make_act(act)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = _make_act(act)
        self.shortcut: nn.Module
        if stride == 1 and in_chs == out_chs:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_chs, out_chs, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(Backbone):
    """A 6n+2-layer CIFAR ResNet following the backbone contract of :mod:`hiervision.models.backbones`.

    ``forward_features`` returns the three stage outputs (stem excluded) at reductions 1, 2, 4.

    Args:
        blocks_per_stage: ``n``; depth is ``6n + 2``.
        in_chans: input channels (1 or 3).
        width: channel multiplier on the 16/32/64 base widths (wide variants for bigger label sets).
        shortcut: ``"A"`` (zero-pad identity, paper default) or ``"B"`` (1x1 conv projection).
        act: ``"relu"`` or ``"elu"`` (Shah et al. 2016 variant).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        in_chans: int = 3,
        width: float = 1,
        shortcut: str = "A",
        act: str = "relu",
    ) -> None:
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        super().__init__(in_chans)
        chs = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.blocks_per_stage = blocks_per_stage
        self.shortcut_type = shortcut
        self.act_name = act
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, chs[0], 3, padding=1, bias=False), nn.BatchNorm2d(chs[0]), _make_act(act)
        )
        self.stages = nn.ModuleList()
        prev, reduction = chs[0], 1
        for i, c in enumerate(chs):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(prev, c, stride, shortcut, act)]
            blocks += [BasicBlock(c, c, 1, shortcut, act) for _ in range(blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.add_feature(c, reduction, f"stages.{i}")
            prev = c
        self.init_weights()  # Kaiming-normal convs (He et al. 2015), BN at identity: the paper's initialisation

    @property
    def blocks(self) -> list[nn.Module]:
        """All residual blocks in forward order (index ``k`` = stage ``k // n``, block ``k % n``), for cutting."""
        return [b for stage in self.stages for b in stage]


def _factory(n: int, fixed_act: str | None) -> Callable[..., CifarResNet]:
    """Factory for one depth; ``fixed_act`` pins the activation of the ``_elu`` names (``act=`` must agree)."""

    def build(in_chans: int = 3, **kwargs: Any) -> CifarResNet:
        if fixed_act is not None:
            fixed_by_name(kwargs, "act", fixed_act)
        return CifarResNet(n, in_chans=in_chans, **kwargs)

    return build


for _depth, _n in DEPTHS.items():
    register_backbone(f"resnet{_depth}")(_factory(_n, None))
    register_backbone(f"resnet{_depth}_elu")(_factory(_n, "elu"))
