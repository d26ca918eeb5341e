"""BiLT (Lu et al., AAAI 2025, "Bidirectional Logits Tree: Pursuing Granularity Reconcilement in
Fine-Grained Classification"): a flat classifier whose logits grow a tree of coarser logits bottom-up,
and whose answer at every level is re-scored by the expected cost of each class under its own softmax,
trained towards soft labels that follow the tree's distances.

The parts (the authors' code, ``ZhiguangLuu/BiLT``: ``util/arch/custom_resnet.py`` ``ResNet50_ours_l*_norm``,
``util/loss_function/smooth_ce.py``, ``cost_matrix.py``; settings from its README):

* levels: the fine level is the leaves; each coarser level (shallower leaves carried down, as
  :func:`~hiervision.tree.tables.carried_levels`) reads the *logits* of the level below through
  batch norm → linear → batch norm → ELU → linear — the tree of logits, fine to coarse;
* cost matrix of a level: for two of its classes, half the length of the tree path between them,
  rounded up (``len(bfs_path) // 2`` in nodes: 1 for siblings), 0 on the diagonal;
* at each level, base logits ``z`` (the linear head, or the level's map) and the re-scored logits
  ``z' = β·p·N(W)ᵀ − p·Dᵀ`` with ``p = softmax(z)``, ``D`` a trained matrix started at the cost matrix (so
  ``−p·Dᵀ`` starts as minus each class's expected cost, CRM's score) and ``N(W)`` the row-normalised,
  off-diagonal part of a trained matrix started uniform;
* loss per level: cross-entropy of ``z`` plus the smoothed cross-entropy of ``z'``,
  ``ε·Σ_c t_c·(−log softmax(z')_c) + (1 − ε)·CE(z')``, with soft targets
  ``t = softmax(−γ·(cost[y] − β·N(W)[y]))``; the levels weighted ``exp(−α·k)`` at k levels above the fine one.
  In the authors' code ``W`` enters the targets through a detached copy except for a diagonal entry whose
  value is 0 and never reaches any output; here the targets read ``W`` detached outright (equal values);
* the answer: the fine level's re-scored logits ``z'``. Exports and predicts as the flat head it subclasses
  (the re-scoring is two small matrix products on the logits).

Defaults from the authors' README: α = 1, β = 0.5, ε = 0.5, γ = 1 (γ = 1.5 on iNaturalist-19). Their heads sit
on an extra BN → linear → BN → ELU feature layer of an ImageNet-pretrained ResNet-50; here the fine head is
flat's linear layer on the backbone's features (the comparison's shared recipe). Each level holds two
C_l × C_l matrices, so the model takes up to :data:`MAX_LEVEL_CLASSES` classes per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy
from hiervision.tree.tables import carried_levels, column_index, level_labels

__all__ = ["BiLTClassifier", "path_cost"]

#: the most classes one level may have (two trained C x C matrices per level)
MAX_LEVEL_CLASSES = 5_000


def path_cost(depth: torch.Tensor, lca: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half the tree-path length between nodes ``a`` and ``b`` (broadcast), rounded up: the authors' cost."""
    edges = depth[a] + depth[b] - 2 * depth[lca]
    return torch.div(edges + 1, 2, rounding_mode="floor")


class _Level(nn.Module):
    """One level of the logits tree: its map from the finer level's logits (none at the fine level), the
    re-scoring matrices and the fixed cost matrix. Everything here runs in fp32 outside autocast: the
    matrices are small, and under bf16 autocast each of the dozens of per-level products paid for casts."""

    def __init__(self, cost: torch.Tensor, finer: int | None) -> None:
        super().__init__()
        c = len(cost)
        self.up = None if finer is None else nn.Sequential(
            nn.BatchNorm1d(finer), nn.Linear(finer, c), nn.BatchNorm1d(c), nn.ELU(), nn.Linear(c, c))
        self.mix = nn.Parameter(torch.full((c, c), 1.0 / c))
        self.cost = nn.Parameter(cost.float().clone())
        # the tree gives both again: not in checkpoints
        self.register_buffer("tree_cost", cost.float(), persistent=False)
        self.register_buffer("off_diagonal", 1 - torch.eye(c), persistent=False)

    def neighbours(self) -> torch.Tensor:
        """``N(W)``: the off-diagonal part of ``mix``, rows of unit length."""
        return F.normalize(self.mix * self.off_diagonal, dim=1)

    def rescore(self, logits: torch.Tensor, beta: float, neighbours: torch.Tensor) -> torch.Tensor:
        """``z' = β·p·N(W)ᵀ − p·Dᵀ`` as one product."""
        return logits.float().softmax(1) @ (beta * neighbours - self.cost).T

    def smoothed_ce(self, rescored: torch.Tensor, y: torch.Tensor, known: torch.Tensor, beta: float,
                    epsilon: float, gamma: float, neighbours: torch.Tensor) -> torch.Tensor:
        """``ε·Σ_c t_c·(−log q_c) + (1 − ε)·(−log q_y)``, averaged over the rows whose label is known (a
        target too coarse for the level has none): one cross-entropy against ``ε·t + (1 − ε)·onehot(y)``."""
        targets = F.softmax(-gamma * (self.tree_cost - beta * neighbours.detach()), dim=1)  # (C, C), row y: t
        y = y.clamp(min=0)
        mixed = (epsilon * targets[y]).scatter_add_(1, y.unsqueeze(1), rescored.new_full((len(y), 1), 1 - epsilon))
        per_row = -(mixed * F.log_softmax(rescored, dim=1)).sum(1)
        return (per_row * known).sum() / known.sum()


class BiLTClassifier(FlatClassifier):
    """Flat linear head over the leaves, its logits re-scored and grown into coarser levels (module
    docstring). ``level_decay``: α, the weight ``exp(−α·k)`` of the level k above the fine one;
    ``rescore_weight``: β; ``smoothing``: ε; ``cost_temperature``: γ of the soft targets."""

    extendable = False  # its output is not one fc row per class: no class can join it

    def __init__(self, taxonomy: Taxonomy, level_decay: float = 1.0, rescore_weight: float = 0.5,
                 smoothing: float = 0.5, cost_temperature: float = 1.0, **kwargs) -> None:
        single_label_leaves("bilt", "a softmax per level", kwargs)
        if not 0 <= smoothing <= 1:
            raise ValueError(f"model.smoothing must lie in [0, 1], got {smoothing}")
        super().__init__(taxonomy, **kwargs)
        self.beta, self.epsilon, self.gamma = float(rescore_weight), float(smoothing), float(cost_temperature)
        members = [torch.tensor(nodes) for nodes in carried_levels(taxonomy)] + [self.classes]
        widest = max(len(m) for m in members)
        if widest > MAX_LEVEL_CLASSES:
            raise ValueError(f"model bilt: a level of {widest:,} classes; each level trains two dense C x C "
                             f"matrices, so it takes up to {MAX_LEVEL_CLASSES:,} classes per level — on a bigger "
                             "tree use soft_max_margin, haf or flat with a decision rule")
        depth = self.tables.depth
        levels = []
        for i, nodes in enumerate(reversed(members)):  # fine first, then each coarser level
            lca = self.tables.lca(nodes.unsqueeze(1), nodes.unsqueeze(0))
            cost = path_cost(depth, lca, nodes.unsqueeze(1), nodes.unsqueeze(0))
            levels.append(_Level(cost, None if i == 0 else len(levels[-1].mix)))
        self.levels = nn.ModuleList(levels)
        self.register_buffer("level_weights", torch.exp(-float(level_decay) * torch.arange(len(levels))),
                             persistent=False)
        # each coarse level's label of every node (fine first): its ancestor there, −1 above it
        for k, lv in enumerate(range(len(members) - 1, 0, -1), start=1):
            self.register_buffer(f"label{k}", level_labels(self.tables, members[lv - 1].tolist(), lv),
                                 persistent=False)
        self.register_buffer("label0", column_index(self.classes, taxonomy.num_nodes), persistent=False)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and len(features) < 2:
            raise ValueError("model bilt: its coarse levels batch-normalise logits, which a training batch of one "
                             "image cannot be (train.batch_size must be at least 2)")
        base = self.fc(self.dropout(features))
        fine = self.levels[0]
        with torch.autocast(base.device.type, enabled=False):
            rescored = fine.rescore(base, self.beta, fine.neighbours())
        return {"logits": rescored, "base_logits": base}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        z = outputs["base_logits"].float()
        # the fine level: an inner target trains the base softmax by its marginal, as flat does
        loss = self.class_loss(F.log_softmax(z, dim=1), targets)
        rescored = outputs["logits"].float()
        with torch.autocast(z.device.type, enabled=False):
            for k, level in enumerate(self.levels):
                neighbours = level.neighbours()
                if k:
                    z = level.up(z)
                    rescored = level.rescore(z, self.beta, neighbours)
                y = getattr(self, f"label{k}")[targets]
                known = (y >= 0).float()
                if not known.any():
                    continue
                term = level.smoothed_ce(rescored, y, known, self.beta, self.epsilon, self.gamma, neighbours)
                if k:
                    term = term + F.cross_entropy(z, y, ignore_index=-1)
                loss = loss + self.level_weights[k] * term
        return loss


@register_model("bilt", multi_label=False)
def bilt(taxonomy: Taxonomy, **kwargs) -> BiLTClassifier:
    """BiLT: a bidirectional tree of logits re-scored by expected cost (Lu et al., AAAI 2025)."""
    return BiLTClassifier(taxonomy, **kwargs)
