"""Optional bridge to timm models under the same backbone contract (``create_backbone("timm/resnet50")``).

timm is an optional extra: it is imported only when a :class:`TimmBackbone` is built, so the core
package never depends on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from hiervision.models.backbones.base import Backbone

__all__ = ["TimmBackbone", "import_timm"]

INSTALL_HINT = "pip install hiervision[timm]"


def import_timm() -> Any:
    """Import timm on demand; a missing install becomes an ImportError that says how to get it."""
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(f"timm backbones need the optional timm package: {INSTALL_HINT}") from e


class TimmBackbone(Backbone):
    """A ``timm.create_model(..., features_only=True)`` network exposing the hiervision backbone contract.

    ``forward_features`` returns the maps selected by ``out_indices`` (timm's default: every stage,
    stem included for most CNNs); ``forward`` average-pools the last one.

    Args:
        name: a timm model name, e.g. ``"resnet50"``.
        pretrained: let timm fetch its own weights (this *does* download; prefer ``pretrained_path``).
        in_chans: input channels.
        out_indices: which feature levels to return (timm semantics).
        **kwargs: forwarded to ``timm.create_model``.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        in_chans: int = 3,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        timm = import_timm()
        super().__init__(in_chans)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        self.model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, features_only=True, **kwargs)
        info = self.model.feature_info
        for c, r, m in zip(info.channels(), info.reduction(), info.module_name(), strict=True):
            self.add_feature(c, r, m)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the selected levels, shallowest first."""
        return list(self.model(x))
