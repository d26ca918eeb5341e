"""Hier-COS (Sani & Anand, CVPR 2026, "Hierarchy-aware orthogonal subspaces"): every node of the tree owns one
direction of the feature space, and a class is the subspace spanned by the directions of its path, so classes
that share ancestors share dimensions and a near miss stays near in the geometry.

From the authors' code (``Depanshu-Sani/Hier-COS``: ``util/hiercos_construction.py``, ``HAF_resnet.py``):

* the feature space has one coordinate per node (the root excepted): D = N. The backbone's features go through
  a transformation head (a bias-free linear map to D — the paper's 1×1 convolution before pooling —, batch norm,
  two residual blocks of linear → batch norm → PReLU, as HAFrame's) and then a *fixed* random orthogonal D×D
  matrix (seeded: the same tree always gives the same frame);
* a class's score is the length of the feature's projection onto its subspace, ``s_c = ‖P_c x‖ =
  sqrt(Σ_{a on c's path} x_a²)``: top-1 and the ranking over classes sort it. Computed by summing ``x²`` down
  the tree (O(B·N)), not with the authors' C×D×D projector tensor;
* the loss: ``KL(t ‖ softmax(|x|)) + α·L_aux``. The target ``t`` spreads over the label's path, the node at
  level ``ℓ`` of a path of ``L`` nodes getting a share ∝ ``exp(2 / (L − ℓ))`` (the label itself the most);
  ``L_aux`` sums over the levels the L1 distance between the level's one-hot label and the level's ``|x|``
  normalised to unit length (averaged over the images that have a node there), and for images whose leaf ends
  above a level, that level's ``|x|`` (pushing it to 0). α = 0.05, the authors' setting for CIFAR-100 trained
  from scratch (their ImageNet-pretrained runs use 1e-3 to 1e-5).

A coarse target (an inner node) trains on its known prefix: the same target over its own path, and no
auxiliary term below it. The authors' optimiser puts the transformation head at the schedule's learning rate
and the backbone at a tenth of it, CIFAR-100 from scratch included (``train.backbone_lr_scale=0.1`` here);
hiervision's comparison gives every head the same recipe. Their ``> 0`` guard that skips a
level's term when every image of a batch sits under that level's first node is a quirk not copied here.

Measured (``benchmarks/RESULTS.md``, § comparison and § hiercos collapse): it keeps flat's top-1 on Fashion-MNIST's
18-node tree, but trained from scratch on Tiny-ImageNet's 298-node tree it stays near chance, its answers piled on
a few classes, with the authors' optimiser or without the per-level term alike; their deep-tree runs start from a
pretrained backbone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.haframe import MAX_FRAME_CLASSES, check_batch, transformation_head
from hiervision.models.registry import register_model
from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["HierCOSClassifier", "path_target"]


def path_target(depth: torch.Tensor, width: int) -> torch.Tensor:
    """``(B,)`` path lengths → ``(B, width)`` target shares along each path: position ``ℓ`` of a path of ``L``
    nodes gets ``exp(2 / (L − ℓ))``, normalised over the path; 0 past its end."""
    pos = torch.arange(width, device=depth.device)
    left = (depth.unsqueeze(1) - pos).float()  # L − ℓ: ≥ 1 on the path
    w = torch.where(left > 0, torch.exp(2.0 / left.clamp(min=1)), 0.0)
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)


class HierCOSClassifier(FlatClassifier):
    """A softmax over the leaves whose logits are the projection lengths onto the leaves' path subspaces (module
    docstring). ``aux_weight``: α, the share of the per-level term."""

    extendable = False  # a new class would need a new dimension in the fixed frame

    def __init__(self, taxonomy: Taxonomy, aux_weight: float = 0.05, **kwargs) -> None:
        single_label_leaves("hiercos", "scores over the leaves' subspaces", kwargs)
        if aux_weight < 0:
            raise ValueError(f"model.aux_weight must be ≥ 0, got {aux_weight}")
        super().__init__(taxonomy, **kwargs)
        self.aux_weight = float(aux_weight)
        d = taxonomy.num_nodes - 1
        if d > MAX_FRAME_CLASSES:
            raise ValueError(f"model hiercos: {d:,} nodes; its frame and head are dense D x D matrices, one row per "
                             f"node, so it takes trees of up to {MAX_FRAME_CLASSES:,} nodes — on a bigger tree use "
                             "soft_max_margin, haf or flat with a decision rule")
        self.fc = transformation_head(self.backbone.num_features, d)
        frame, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
        self.register_buffer("frame", torch.from_numpy(frame).float(), persistent=False)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        check_batch("hiercos", self.training, features)
        x = self.fc(self.dropout(features)) @ self.frame.T.to(features.dtype)  # (B, D): column n − 1 is node n
        squares = self.tables.path_sum(F.pad(x.float().square(), (1, 0)))  # (B, N+1): Σ x² along each path
        return {"logits": squares[:, self.classes].clamp(min=1e-12).sqrt(), "coords": x}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        a = outputs["coords"].float().abs()
        path = self.tables.paths[targets]  # (B, depth), PAD past the end
        on = path != PAD
        t = path_target(self.tables.depth[targets], path.shape[1])
        logq = F.log_softmax(a, dim=1).gather(1, (path - 1).clamp(min=0))
        kl = (t * (t.clamp(min=1e-12).log() - logq)).masked_fill(~on, 0).sum(1).mean()
        if self.aux_weight == 0:
            return kl
        leaf = self.tables.leaf_mask[targets]
        bounds, aux = self.tables.level_bounds, kl.new_zeros(())
        for level in range(path.shape[1]):
            ids = self.tables.by_depth[bounds[level]:bounds[level + 1]]  # the nodes at depth level + 1
            a_level = a[:, ids - 1]
            norm = a_level / a_level.norm(dim=1, keepdim=True).clamp(min=1e-12)
            here, ended = on[:, level], ~on[:, level] & leaf
            if here.any():  # L1 to the one-hot label: (1 − n_true) + Σ_{others} n = 1 + Σ n − 2·n_true
                true = norm[here].gather(1, self.tables.level_position[path[here, level]].unsqueeze(1)).squeeze(1)
                aux = aux + (1 + norm[here].sum(1) - 2 * true).mean()
            if ended.any():  # a leaf above this level: the level's coordinates should stay at 0
                aux = aux + a_level[ended].sum(1).mean()
        return kl + self.aux_weight * aux


@register_model("hiercos", multi_label=False)
def hiercos(taxonomy: Taxonomy, **kwargs) -> HierCOSClassifier:
    """Hier-COS: classes as path subspaces of a fixed orthogonal frame (Sani & Anand, CVPR 2026)."""
    return HierCOSClassifier(taxonomy, **kwargs)
