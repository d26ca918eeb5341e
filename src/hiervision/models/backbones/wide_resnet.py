"""Pre-activation wide ResNets on 32x32 data: WRN-d-k (Zagoruyko & Komodakis 2016) and Guo et al.'s wider-ResNet.

Both are the CNN part of the CNN-RNN experiments of Guo et al. ("CNN-RNN: a large-scale hierarchical
image classification framework", Sec. 4.1.1, Tables 3-4): wrn-28-10 "with dropout" and their own
29-layer wider-ResNet. Both use pre-activation residual units (He et al. 2016, "Identity mappings"):
BN-ReLU comes *before* each conv, the residual sum is left unactivated, and one final BN-ReLU closes
the last stage so that what gets pooled is activated.

:class:`WideResNet` (``wrn-d-k``) follows the authors' Torch code (``models/wide-resnet.lua``):

* a 3x3 conv stem with 16 channels (not widened), then 3 stages of ``N = (d - 4) / 6`` basic blocks
  (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) with ``16k, 32k, 64k`` channels at strides 1, 2, 2;
* dropout sits after the second ReLU, right before the second conv: the paper puts it "between
  convolutions ... after ReLU" and the Torch code does exactly that (some PyTorch ports put it
  before the second BN instead, which changes what that BN normalises);
* where the shape changes the shortcut is a 1x1 conv (no BN) applied to the block's *pre-activated*
  input, BN-ReLU(x), as in the Torch code; elsewhere it is the identity on ``x``;
* no conv biases (the Torch code strips them), so WRN-28-10 has 36,472,784 parameters without a
  classifier and 36,536,884 with a 100-way fc, the paper's "36.5M". Ports that keep conv biases
  count 10,096 more (36,546,980 for CIFAR-100).

:class:`WiderResNet` is Table 3 of Guo et al. taken literally:

=======  ==========  ==============================================
conv1    32x32       3x3, 64
conv2    32x32       [1x1, 256; 3x3, 256; 1x1, 256] x 3
conv3    16x16       [1x1, 512; 3x3, 512; 1x1, 512] x 3
conv4    8x8         [1x1, 1024; 3x3, 1024; 1x1, 1024] x 3
pool5    1x1         global average pooling
=======  ==========  ==============================================

* the bottleneck keeps the *same* width in all three convs: no 1x1 reduction to a quarter and no 4x
  expansion as in He et al.'s bottleneck, because that is what the table says (a 256-wide 3x3 is what
  makes this network "wider"); 1 + 9*3 = 28 convs on the main path plus the fc are the paper's
  "29 layers" (the 3 projection shortcuts are not counted, as in He et al.);
* our choice where the table is silent: the first block of conv3 and conv4 downsamples with stride 2
  on its 3x3 conv (the 1x1 convs keep stride 1, as in fb.resnet.torch and torchvision); the shortcut
  is a 1x1 conv projection (stride 2 where the block downsamples) wherever the channel count or the
  resolution changes, i.e. in the first block of each stage (64 -> 256 too), applied to the
  pre-activated input exactly as in :class:`WideResNet`; no dropout (the paper mentions none);
* 45,417,792 parameters without a classifier at ``width=1``.

``widen`` (WRN) and ``width`` (wider-ResNet) scale the channel counts (``round(c * w)``, at least 1),
so that tests and CPU-scale twins can build small versions of the same layouts. Stages and blocks are
addressable (``stem``, ``stages[i][j]``, :attr:`blocks`) for trunk/branch cuts, as in
:mod:`.cifar_resnet`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hiervision.models.backbones.base import Backbone, fixed_by_name
from hiervision.models.backbones.registry import register_backbone

__all__ = ["PreActBasicBlock", "PreActBottleneck", "WideResNet", "WiderResNet", "wide_resnet"]

#: (channels, first-block stride) of the three stages of Table 3 (conv2, conv3, conv4), before ``width``
WIDER_STAGES: tuple[tuple[int, int], ...] = ((256, 1), (512, 2), (1024, 2))
#: stem width of Table 3 (conv1)
WIDER_STEM = 64
#: blocks per stage in Table 3
WIDER_BLOCKS = 3


def _scale(c: int, w: float) -> int:
    return max(1, round(c * w))


class PreActBasicBlock(nn.Module):
    """WRN block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus the (projected) shortcut; no activation after."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + skip


class PreActBottleneck(nn.Module):
    """Table 3 block: BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1, all ``out_chs`` wide (no expansion)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(out_chs, out_chs, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.act2(self.bn2(out)))
        out = self.conv3(self.act3(self.bn3(out)))
        return out + skip


class _PreActNet(Backbone):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU: the part both families share.

    ``forward_features`` returns the stage outputs (stem excluded): the first ones as raw residual
    sums, the way the next stage receives them, the last one after the final BN-ReLU, which is the
    map the networks pool.
    """

    def __init__(self, in_chans: int, stem_chs: int, stages: Sequence[Sequence[nn.Module]], chs: Sequence[int]) -> None:
        super().__init__(in_chans)
        self.stem = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False)
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.norm = nn.BatchNorm2d(chs[-1])
        self.act = nn.ReLU(inplace=True)
        for i, c in enumerate(chs):
            self.add_feature(c, 2**i, "act" if i == len(chs) - 1 else f"stages.{i}")
        self.init_weights()  # Kaiming-normal convs over fan-out (the Torch code's ``MSRinit``), BN at identity

    @property
    def blocks(self) -> list[nn.Module]:
        """All residual blocks in forward order, for cutting the network into a trunk and branches."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of each stage at reductions 1, 2, 4; the last one after the final BN-ReLU."""
        feats = super().forward_features(x)
        feats[-1] = self.act(self.norm(feats[-1]))
        return feats


class WideResNet(_PreActNet):
    """WRN-``depth``-``widen`` of Zagoruyko & Komodakis, following the backbone contract.

    Args:
        depth: ``6N + 4`` as in the paper (10, 16, 22, 28, 40, ...), ``N`` two-conv blocks per stage.
        widen: ``k``; stage widths are ``16k, 32k, 64k`` (rounded, at least 1; the 16-channel stem is not widened).
        dropout: dropout probability between the two convs of every block (0.3 in the paper's dropout runs).
        in_chans: input channels (1 or 3).
    """

    def __init__(self, depth: int = 28, widen: float = 10, dropout: float = 0.0, in_chans: int = 3) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6N+4 with N >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen <= 0:
            raise ValueError(f"widen must be > 0, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        chs = [_scale(c, widen) for c in (16, 32, 64)]
        stages: list[list[nn.Module]] = []
        prev = 16
        for i, c in enumerate(chs):
            stride = 1 if i == 0 else 2
            stages.append(
                [PreActBasicBlock(prev if j == 0 else c, c, stride if j == 0 else 1, dropout) for j in range(n)]
            )
            prev = c
        super().__init__(in_chans, 16, stages, chs)
        self.depth = depth
        self.widen = widen
        self.dropout = dropout


class WiderResNet(_PreActNet):
    """Guo et al.'s 29-layer wider-ResNet (their Table 3), following the backbone contract.

    Args:
        in_chans: input channels (1 or 3).
        width: multiplier on every channel count of Table 3 (64 stem; 256/512/1024 stages), rounded, at least 1.
    """

    def __init__(self, in_chans: int = 3, width: float = 1.0) -> None:
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        stem = _scale(WIDER_STEM, width)
        chs = [_scale(c, width) for c, _ in WIDER_STAGES]
        stages: list[list[nn.Module]] = []
        prev = stem
        for c, (_, stride) in zip(chs, WIDER_STAGES, strict=True):
            stages.append(
                [PreActBottleneck(prev if j == 0 else c, c, stride if j == 0 else 1) for j in range(WIDER_BLOCKS)]
            )
            prev = c
        super().__init__(in_chans, stem, stages, chs)
        self.width = width


@register_backbone("wide_resnet")
def wide_resnet(depth: int, widen: float, dropout: float = 0.0, in_chans: int = 3) -> WideResNet:
    """Any WRN-``depth``-``widen`` (e.g. ``create_backbone("wide_resnet", depth=16, widen=1)`` for a tiny one)."""
    return WideResNet(depth=depth, widen=widen, dropout=dropout, in_chans=in_chans)


def _wrn_factory(depth: int, widen: int, default_dropout: float) -> Callable[..., WideResNet]:
    """Factory for one named WRN; the name fixes depth and width (``depth=``/``widen=`` kwargs must agree)."""

    def build(in_chans: int = 3, dropout: float = default_dropout, **kwargs: Any) -> WideResNet:
        for key, fixed in (("depth", depth), ("widen", widen)):
            fixed_by_name(kwargs, key, fixed, hint="; use 'wide_resnet' for other values")
        return WideResNet(dropout=dropout, in_chans=in_chans, **kwargs)

    return build


# wrn-28-10 defaults to the "version with dropout" (0.3) that Guo et al. use; the smaller ones to no dropout,
# the setting of most of Zagoruyko & Komodakis's tables
register_backbone("wrn28_10")(_wrn_factory(28, 10, 0.3))
register_backbone("wrn16_4")(_wrn_factory(16, 4, 0.0))
register_backbone("wrn28_2")(_wrn_factory(28, 2, 0.0))


@register_backbone("wider_resnet")
def _wider_resnet(in_chans: int = 3, **kwargs: Any) -> WiderResNet:
    return WiderResNet(in_chans=in_chans, **kwargs)
