"""HiE, hierarchical ensembles (Jain, Karthik & Gandhi, NeurIPS 2023, "Test-Time Amendment with a Coarse
Classifier for Fine-Grained Classification", the section on post-hoc correction): a fine classifier over
the leaves and a second, separately trained classifier over the leaves' *parents*; at test time each leaf's
probability is multiplied by its parent's coarse probability and renormalised,
``p(leaf) ∝ p_fine(leaf) · p_coarse(parent(leaf))``.

The paper's argument: coarse labels are easier to get right, and an independent coarse opinion pulls the
fine answer into the right family, so mistakes get milder and top-1 can rise. The cost is a second network:
HiE is an ensemble, **not** an equal-budget method — this head runs two backbones, so it has twice flat's
parameters and training and inference compute (``benchmarks/RESULTS.md`` § comparison states the cost).

The two networks are the fine flat classifier (``backbone`` + ``fc``) and the coarse one (``coarse_backbone``
+ ``coarse_fc``), each trained by its own cross-entropy as the authors train them apart: no parameter is
shared, so the summed loss gives each network exactly its own gradient. On a variable-depth tree the
"parents" may nest (a node can hold a leaf and a sub-tree); the coarse classes are then the *groups of
sibling leaves*, which partition the leaves whatever the depths. A coarse-only target trains each network
by its marginal over the classes below it, as the flat head does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.models.backbones import create_backbone
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy

__all__ = ["HiEClassifier"]


class HiEClassifier(FlatClassifier):
    """A flat softmax over the leaves amended at prediction by a coarse classifier over the leaves' parents
    (module docstring). ``outputs["logits"]`` are the amended log-probabilities, so decoding, calibration,
    every post-hoc rule and the exported graph treat HiE as a flat head; ``"fine"`` and ``"coarse"`` hold
    the two networks' own logits, which the loss trains."""

    def __init__(self, taxonomy: Taxonomy, **kwargs) -> None:
        single_label_leaves("hie", "a softmax over the leaves amended by one over their parents", kwargs)
        backbone = kwargs.get("backbone", "resnet20")
        super().__init__(taxonomy, **kwargs)
        parents = self.tables.parent[self.classes]  # (C,) the parent of each leaf
        groups, leaf_group = torch.unique(parents, return_inverse=True)
        if len(groups) < 2:
            raise ValueError("model hie: every leaf hangs from one parent, so its coarse classifier would have "
                             "one class; it needs a tree with at least two parents of leaves")
        self.register_buffer("leaf_group", leaf_group, persistent=False)
        self.num_groups = len(groups)
        # the second network: the same backbone, its own initialisation (a module given is copied and re-drawn)
        if isinstance(backbone, str):
            self.coarse_backbone = create_backbone(backbone, in_chans=kwargs.get("in_chans", 3),
                                                   **(kwargs.get("backbone_kwargs") or {}))
        else:
            self.coarse_backbone = copy.deepcopy(self.backbone)
            for m in self.coarse_backbone.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.coarse_fc = nn.Linear(self.coarse_backbone.num_features, self.num_groups)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fine = self.fc(self.dropout(self.backbone(images)))
        coarse = self.coarse_fc(self.dropout(self.coarse_backbone(images)))
        amended = F.log_softmax(fine.float(), 1) + F.log_softmax(coarse.float(), 1)[:, self.leaf_group]
        return {"logits": amended, "fine": fine, "coarse": coarse}

    # two backbones read the images: one backbone's pooled features are not its input (training refuses
    # train.precompute_features in one line for a model that keeps the base's forward_head)
    forward_head = HierarchicalClassifier.forward_head

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        fine = self.class_loss(F.log_softmax(outputs["fine"].float(), 1), targets)
        # the groups with a leaf at or below the target (one group for a leaf target), O(B·C)
        below = self._below(targets).float()
        allowed = below.new_zeros(len(targets), self.num_groups).index_add_(1, self.leaf_group, below) > 0
        logp = F.log_softmax(outputs["coarse"].float(), 1).masked_fill(~allowed, float("-inf"))
        return fine - torch.logsumexp(logp, dim=1).mean()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Both networks' backbones are ``backbone`` (a freeze schedule freezes both)."""
        backbone = [*self.backbone.parameters(), *self.coarse_backbone.parameters()]
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return {"backbone": backbone, "cnn": backbone, "head": head, "rnn": head}


@register_model("hie")
def hie(taxonomy: Taxonomy, **kwargs) -> HiEClassifier:
    """HiE: a fine classifier amended by a coarse one over the leaves' parents (Jain et al., NeurIPS 2023)."""
    return HiEClassifier(taxonomy, **kwargs)
