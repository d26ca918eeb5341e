"""Pre-computed features (``train.precompute_features``): the backbone runs once, the epochs train the head.

Guo et al. trained their RNN on features extracted by a CNN; with a frozen backbone this saves every
epoch's backbone pass. :func:`precompute_features` turns each split into its pooled features and
:class:`FeatureHead` lets the engine train and evaluate the model on them as if it were the whole network.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hiervision.config import ConfigError
from hiervision.data import DataBundle, FeatureDataset, HierDataset, iter_batches
from hiervision.decoding import Prediction
from hiervision.distributed import DistEnv, gather_rows, shard_indices
from hiervision.models import HierarchicalClassifier

__all__ = ["FeatureHead", "precompute_features"]


class FeatureHead(nn.Module):
    """A model that reads only pooled backbone features, driven by pre-computed ones: its head alone."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    @property
    def threshold(self) -> torch.Tensor:  # multi-label: the threshold tuned on validation lives in the model
        return self.model.threshold

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_head(features)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(outputs, targets)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> Prediction:
        return self.model.decode(self(features))

    @torch.no_grad()
    def predict_given(self, features: torch.Tensor, given: torch.Tensor) -> Prediction:
        return self.model.decode_given(self(features), given)


@torch.no_grad()
def precompute_features(
    model: HierarchicalClassifier,
    data: DataBundle,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    env: DistEnv | None = None,
) -> DataBundle:
    """Every split's pooled backbone features, computed once (eval mode, no augmentation), so that
    epochs cost only the head — Guo et al.'s RNN trained on extracted CNN features. Under DDP each
    rank computes a shard and every rank gets all of them."""
    if type(model).forward_head is HierarchicalClassifier.forward_head:
        raise ConfigError(f"train.precompute_features: model {type(model).__name__} does not run on one "
                          "backbone's pooled features (it reads stage maps, or runs more than one backbone)")
    model.eval()

    env = env or DistEnv(0, 1, 0, device)

    def run(ds: HierDataset) -> FeatureDataset:
        feats = [torch.zeros(0, model.backbone.num_features)]
        shard = ds.subset(shard_indices(len(ds), env)) if env.enabled else ds
        for images, _ in iter_batches(shard, batch_size):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats.append(model.backbone(data.normalize(images.to(device))).float().cpu())
        return FeatureDataset(gather_rows(torch.cat(feats), len(ds), env).to(device), ds)

    return dataclasses.replace(data, train=run(data.train), val=run(data.val), test=run(data.test), features=True)
