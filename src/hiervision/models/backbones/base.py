"""The base every backbone family derives from: the contract once, so a family file holds only its layout.

A family builds its modules in ``__init__`` (after ``super().__init__(in_chans)``), records one
:meth:`Backbone.add_feature` per returned map, and ends with :meth:`Backbone.init_weights`. What it gets:

* ``forward_features(x)``: ``stem`` then each module of ``stages`` in turn, every stage's output kept
  (families whose maps are tapped elsewhere, such as VGG's pools, override it);
* ``forward(x)``: the global-average-pooled last map, ``(B, num_features)``;
* ``num_features``: channels of the last map, read from ``feature_info`` so the two cannot disagree;
* ``init_weights()``: Kaiming-normal convs over fan-out with zero biases and BN at identity, the
  initialisation of He et al. that every family here uses (one that adds to it extends the method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Backbone", "fixed_by_name"]


class Backbone(nn.Module):
    """A feature extractor following the contract of :mod:`hiervision.models.backbones`.

    Subclasses provide ``stem`` (a module or method run before the first stage; ``nn.Identity()`` if
    none) and ``stages`` (an iterable of modules), or override :meth:`forward_features`.
    """

    #: key prefixes of full-model checkpoints (a classifier the backbone lacks) that loading skips
    pretrained_ignore: ClassVar[tuple[str, ...]] = ()
    stem: Callable[[torch.Tensor], torch.Tensor]
    stages: Iterable[nn.Module]

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.feature_info: list[dict[str, Any]] = []

    def add_feature(self, num_chs: int, reduction: int, module: str) -> None:
        """Record one map that :meth:`forward_features` returns (channels, stride from the input, its module)."""
        self.feature_info.append({"num_chs": num_chs, "reduction": reduction, "module": module})

    @property
    def num_features(self) -> int:
        """Channels of the last map, the width of what :meth:`forward` returns."""
        return int(self.feature_info[-1]["num_chs"])

    def init_weights(self) -> None:
        """Kaiming-normal convs (fan-out) with zero bias, BN at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of each stage, shallowest first (the stem's own output is not returned)."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last map, ``(B, num_features)``: what a classification head consumes."""
        return self.forward_features(x)[-1].mean(dim=(2, 3))


def fixed_by_name(kwargs: dict[str, Any], key: str, value: Any, hint: str = "") -> None:
    """A registered name that pins an argument (``vgg16_bn`` pins ``batch_norm``): a given kwarg must agree.

    Fills ``kwargs[key]`` with ``value`` when absent, so the factory passes it on unchanged; ``hint``
    (e.g. which name takes other values) ends the error.
    """
    if kwargs.setdefault(key, value) != value:
        raise ValueError(f"this backbone name fixes {key}={value!r}, got {key}={kwargs[key]!r}{hint}")
