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

from hiervision.decoding import Prediction, full_precision
from hiervision.losses import check_loss_type
from hiervision.models.backbones import create_backbone
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.flat import (
    best_class,
    class_loss,
    class_marginals,
    class_rows,
    classes_below,
    single_label_leaves,
)
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy

__all__ = ["HiEClassifier"]


class HiEClassifier(HierarchicalClassifier):
    """A flat softmax over the leaves amended at prediction by a coarse classifier over the leaves' parents
    (module docstring). ``outputs["logits"]`` are the amended log-probabilities, so decoding, calibration,
    every post-hoc rule and the exported graph treat HiE as a flat head (through the flat head's functions);
    ``"fine"`` and ``"coarse"`` hold the two networks' own logits, which the loss trains. ``loss_type`` is the
    fine network's (as for :class:`~hiervision.models.flat.FlatClassifier`)."""

    def __init__(self, taxonomy: Taxonomy, *, dropout: float = 0.0, loss_type: str = "ce", loss_beta: float = 10.0,
                 loss_alpha: float = 0.1, **kwargs) -> None:
        single_label_leaves("hie", "a softmax over the leaves amended by one over their parents", kwargs)
        backbone = kwargs.get("backbone", "resnet20")
        super().__init__(taxonomy, **kwargs)
        self.loss_type = check_loss_type(loss_type, ("ce", "soft_labels", "hxe"), "hie")
        self.loss_beta, self.loss_alpha = float(loss_beta), float(loss_alpha)
        self.register_buffer("classes", torch.tensor(list(taxonomy.leaves)), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.num_features, len(self.classes))
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

    # two backbones read the images, so there is no forward_head: train.precompute_features is refused
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fine = self.fc(self.dropout(self.backbone(images)))
        coarse = self.coarse_fc(self.dropout(self.coarse_backbone(images)))
        amended = F.log_softmax(fine.float(), 1) + F.log_softmax(coarse.float(), 1)[:, self.leaf_group]
        return {"logits": amended, "fine": fine, "coarse": coarse}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        fine = class_loss(F.log_softmax(outputs["fine"].float(), 1), targets, self.classes, self.tables,
                          loss_type=self.loss_type, beta=self.loss_beta, alpha=self.loss_alpha)
        # the groups with a leaf at or below the target (one group for a leaf target), O(B·C)
        below = classes_below(self.tables, self.classes, targets).float()
        allowed = below.new_zeros(len(targets), self.num_groups).index_add_(1, self.leaf_group, below) > 0
        logp = F.log_softmax(outputs["coarse"].float(), 1).masked_fill(~allowed, float("-inf"))
        return fine - torch.logsumexp(logp, dim=1).mean()

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        return best_class(self.tables, self.classes, outputs["logits"].float().softmax(1))

    @full_precision
    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        """The most probable leaf below ``given`` (or ``given`` itself)."""
        allowed = classes_below(self.tables, self.classes, given)
        return best_class(self.tables, self.classes, outputs["logits"].float().softmax(1), allowed)

    def decoder_settings(self) -> dict:
        return {"kind": "exact", "end_nodes": "leaves"}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = self(images)["logits"].float().softmax(1)
        return {"scores": class_marginals(self.tables, self.classes, probs),
                "path_logprob": torch.log(class_rows(self.taxonomy.num_nodes, self.classes, probs)).T}

    def backbones(self) -> list[nn.Module]:
        """Both networks' backbones are ``backbone`` (a freeze schedule freezes both)."""
        return [self.backbone, self.coarse_backbone]


@register_model("hie", multi_label=False)
def hie(taxonomy: Taxonomy, **kwargs) -> HiEClassifier:
    """HiE: a fine classifier amended by a coarse one over the leaves' parents (Jain et al., NeurIPS 2023)."""
    return HiEClassifier(taxonomy, **kwargs)
