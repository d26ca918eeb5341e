"""VGG-16 (Simonyan & Zisserman 2015, configuration D): the plain 13-conv network of the DHNN tables.

Layout: 5 blocks of 3x3 convs (stride 1, padding 1) with 64/128/256/512/512 channels (2, 2, 3, 3, 3
convs), each conv followed by a ReLU (``batch_norm=True``: conv, BN, ReLU, i.e. ``vgg16_bn``) and each
block closed by a 2x2 max-pool. ``forward_features`` returns the 5 block outputs after their pool, at
reductions 2, 4, 8, 16, 32.

No classifier: the paper's VGG-16 ends in two 4096-d fully connected layers and a 1000-way one, but
every hiervision head sits on the global-average-pooled last map, so ``forward`` is GAP of block 5
(``num_features = 512``) and the backbone holds only the conv part (14,714,688 parameters for RGB).

Module names follow torchvision's ``vgg16`` / ``vgg16_bn`` (``features.N`` with the same indices),
so a torchvision state dict loads as is: its ``classifier.*`` keys are skipped through
:attr:`VGG.pretrained_ignore`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hiervision.models.backbones.base import Backbone, fixed_by_name
from hiervision.models.backbones.registry import register_backbone

__all__ = ["CFG_D", "VGG"]

#: configuration D of the paper: conv widths, "M" = 2x2 max-pool closing a block
CFG_D: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(Backbone):
    """A VGG conv trunk following the backbone contract of :mod:`hiervision.models.backbones`.

    Args:
        cfg: conv widths with ``"M"`` closing each block (default: configuration D, VGG-16).
        in_chans: input channels (1 or 3).
        batch_norm: BN after every conv (torchvision's ``vgg16_bn``), which trains from scratch
            without the paper's staged initialisation.
    """

    #: classifier keys of full-model checkpoints (torchvision's ``classifier.*``) that loading skips
    pretrained_ignore: ClassVar[tuple[str, ...]] = ("fc.", "classifier.")

    def __init__(self, cfg: Sequence[int | str] = CFG_D, in_chans: int = 3, batch_norm: bool = False) -> None:
        if not cfg or cfg[-1] != "M":
            raise ValueError("cfg must be non-empty and end with 'M' (every block closes with a max-pool)")
        super().__init__(in_chans)
        self.batch_norm = batch_norm
        layers: list[nn.Module] = []
        prev, reduction = in_chans, 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
                # the pool's index in `features` is both the stage's module name and where forward_features taps
                self.add_feature(prev, reduction, f"features.{len(layers) - 1}")
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"cfg entries must be positive ints or 'M', got {v!r}")
            layers.append(nn.Conv2d(prev, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            prev = v
        self.features = nn.Sequential(*layers)
        self._taps = {int(info["module"].split(".")[1]) for info in self.feature_info}
        # Kaiming init trains from scratch without the paper's shallow-net warm start
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of each block after its max-pool, at reductions 2, 4, 8, 16, 32 for VGG-16."""
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                feats.append(x)
        return feats


def _factory(batch_norm: bool) -> Callable[..., VGG]:
    """Factory for one name; ``batch_norm`` is fixed by the name (``batch_norm=`` must agree)."""

    def build(in_chans: int = 3, **kwargs: Any) -> VGG:
        fixed_by_name(kwargs, "batch_norm", batch_norm)
        return VGG(in_chans=in_chans, **kwargs)

    return build


register_backbone("vgg16")(_factory(False))
register_backbone("vgg16_bn")(_factory(True))
