"""ImageNet ResNet-50 (He et al. 2016) and its SE (Hu et al. 2018) and CBAM (Woo et al. 2018) variants.

Not to be confused with the CIFAR ResNets of :mod:`.cifar_resnet` (``resnet20`` ... ``resnet110``):
this is the 224x224 ImageNet network of the DHNN tables.

Layout: a 7x7 stride-2 conv stem (64 channels) and a 3x3 stride-2 max-pool, then 4 stages
(``layer1`` ... ``layer4``) of 3/4/6/3 bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4) with
256/512/1024/2048 output channels at reductions 4/8/16/32; ``forward_features`` returns the 4 stage
outputs. The stride of a downsampling block sits on its 3x3 conv ("v1.5", as in torchvision and
timm) and its shortcut is a 1x1 conv + BN projection.

``attention`` puts a gate on the residual branch, after the last BN and before the addition:

* ``"se"``: squeeze-and-excitation, GAP -> C/16 -> ReLU -> C -> sigmoid, a per-channel scale;
  adds ``2*C*C/16 + C/16 + C`` parameters per block (28.09M with a 1000-way fc, as in Hu et al.).
* ``"cbam"``: channel attention (the same MLP shared by the average- and max-pooled descriptors,
  summed before the sigmoid) followed by spatial attention (a 7x7 conv + BN over the channel-max
  and channel-mean maps, then a sigmoid); the SE count plus 100 per block (28.09M with the fc).

Module names follow torchvision's ``resnet50`` (``conv1``, ``bn1``, ``layerN.i.conv1 ... bn3``,
``layerN.i.downsample.0/1``), so its state dict loads as is, the ``fc.*`` keys being skipped through
:attr:`ResNet.pretrained_ignore`. The gates add ``layerN.i.se.*`` (1x1 convs ``fc1``/``fc2`` with
bias, the layout of timm's ``seresnet50``) or ``layerN.i.cbam.*`` keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hiervision.models.backbones.base import Backbone, fixed_by_name
from hiervision.models.backbones.registry import register_backbone

__all__ = ["ATTENTIONS", "CBAM", "Bottleneck", "ResNet", "SqueezeExcite"]

#: values of the ``attention`` argument
ATTENTIONS: tuple[str | None, ...] = (None, "se", "cbam")


class SqueezeExcite(nn.Module):
    """SE gate (Hu et al.): rescale channels by a sigmoid of an MLP over their global average."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class ChannelAttention(nn.Module):
    """CBAM channel gate: one MLP applied to both the average- and the max-pooled descriptor, outputs summed."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3)))))
        mx = self.fc2(self.act(self.fc1(x.amax(dim=(2, 3)))))
        return x * torch.sigmoid(avg + mx)[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial gate: a 7x7 conv + BN over the channel-max and channel-mean maps, then a sigmoid.

    Input order (max, mean) and the BN follow the authors' released code rather than the paper's
    formula (mean, max; conv only), so their trained kernels map onto ``conv`` / ``bn`` by renaming.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al.): channel gate, then spatial gate, in sequence."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, optional gate, plus the shortcut, then ReLU."""

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        attention: str | None = None,
        attn_reduction: int = 16,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        # at most one of the two is a module, so state-dict keys name the gate that is really there
        self.se: nn.Module | None = SqueezeExcite(out_chs, attn_reduction) if attention == "se" else None
        self.cbam: nn.Module | None = CBAM(out_chs, attn_reduction) if attention == "cbam" else None
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.cbam is not None:
            out = self.cbam(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(Backbone):
    """An ImageNet bottleneck ResNet following the backbone contract of :mod:`hiervision.models.backbones`.

    ``forward_features`` returns the outputs of ``layer1`` ... ``layer4`` (stem excluded) at reductions
    4, 8, 16, 32. :meth:`stem` and :attr:`blocks` allow cutting the network after a given block, as
    for :class:`~hiervision.models.backbones.cifar_resnet.CifarResNet`.

    Args:
        layers: bottleneck blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50.
        in_chans: input channels (1 or 3).
        attention: ``None``, ``"se"`` or ``"cbam"``: a gate on every block's residual branch.
        attn_reduction: hidden-layer reduction of the gates' channel MLP (16 in both papers).
        zero_init_residual: start every ``bn3`` at zero so each block begins as the identity
            (Goyal et al. 2017); off by default, as in the papers.
    """

    #: classifier keys of full-model checkpoints (torchvision's ``fc.*``) that loading skips
    pretrained_ignore: ClassVar[tuple[str, ...]] = ("fc.", "classifier.")

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        in_chans: int = 3,
        attention: str | None = None,
        attn_reduction: int = 16,
        zero_init_residual: bool = False,
    ) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if attn_reduction < 1:
            raise ValueError(f"attn_reduction must be >= 1, got {attn_reduction}")
        super().__init__(in_chans)
        self.layers = tuple(layers)
        self.attention = attention
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        prev, reduction = 64, 4
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            reduction *= stride
            blocks = [Bottleneck(prev, planes, stride, attention, attn_reduction)]
            prev = planes * Bottleneck.expansion
            blocks += [Bottleneck(prev, planes, 1, attention, attn_reduction) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            self.add_feature(prev, reduction, f"layer{i}")
        self.zero_init_residual = zero_init_residual
        self.init_weights()

    def init_weights(self) -> None:
        """The shared Kaiming / BN-identity init (fan-out, as torchvision), then two zero-scale BNs.

        CBAM's spatial BN starts at zero scale as in the authors' code: the spatial gate begins as a
        uniform 0.5 and learns to discriminate, instead of starting from a random 7x7 pattern.
        """
        super().init_weights()
        for m in self.modules():
            if isinstance(m, SpatialAttention):
                nn.init.zeros_(m.bn.weight)
            elif self.zero_init_residual and isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        """``[layer1, layer2, layer3, layer4]``."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def blocks(self) -> list[nn.Module]:
        """All bottleneck blocks in forward order, for cutting a trunk after block ``k``."""
        return [b for stage in self.stages for b in stage]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> ReLU -> max-pool: the input of ``layer1``, at reduction 4."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _factory(layers: tuple[int, ...], fixed_attention: str | None) -> Callable[..., ResNet]:
    """Factory for one name; the gate is fixed by the name (an ``attention=`` kwarg must agree)."""

    def build(in_chans: int = 3, **kwargs: Any) -> ResNet:
        fixed_by_name(kwargs, "attention", fixed_attention)
        return ResNet(layers, in_chans=in_chans, **kwargs)

    return build


register_backbone("resnet50")(_factory((3, 4, 6, 3), None))
register_backbone("se_resnet50")(_factory((3, 4, 6, 3), "se"))
register_backbone("cbam_resnet50")(_factory((3, 4, 6, 3), "cbam"))
