"""HAF (Garg et al., ECCV 2022, "Learning Hierarchy Aware Features for Reducing Mistake Severity"):
a flat classifier over the leaves with one extra head per coarser level, on the same features, whose
losses shape the features and the fine classifier's geometry after the tree. Only the fine head
predicts, so it exports and predicts as the flat head it subclasses.

The loss (the paper's method section; the authors' ``hafeat_l5_cejsd_wtconst_dissim`` heads, as
vendored in ``ltong1130ztr/HAFrame``'s ``util/arch``), each head's weights L2-normalised where used:

* cross-entropy of the fine head;
* soft labels: for each pair of adjacent levels, the Jensen-Shannon divergence between the finer
  head's softmax summed into the coarser level's classes and the coarser head's softmax;
* geometric consistency: minus the mean cosine between each coarse class's weight and the
  normalised sum of its children's weights;
* margin loss: at each coarse level, pairs of images with different labels there push their
  predictions apart, ``½·Σ max(0, m − KL(p‖mix))`` over both sides, m = 3 (the authors' margin).

Variable-depth trees: a leaf shallower than a level stands for itself at that level (it is carried
down), so every level partitions the leaves and a tree of depth D gets D − 1 coarse heads.

Deep trees: the authors add the three terms of every level, unweighted (``level_reduction: sum``; their
trees have 2–11 coarse levels and start from ImageNet weights). Trained from scratch on Tiny-ImageNet's
WordNet tree (11 coarse levels), the summed terms kept the fine cross-entropy near chance: 6.4 % test top-1
after the comparison's 10 epochs (seed 0) where flat reaches 28.6 %; averaged over the levels
(``level_reduction: mean``, which on one coarse level is the sum) 26.5 % over 3 seeds (benchmarks/RESULTS.md
§ comparison, ``configs/comparison/tinyimagenet-haf.yaml``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy
from hiervision.tree.tables import carried_levels, column_index, level_labels

__all__ = ["HAFClassifier"]


def _kl_to_mix(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``(KL(p‖m), KL(q‖m))``, ``m = (p + q)/2``. Written out rather than with ``F.kl_div``, whose
    gradient with respect to a target probability of exactly 0 is −inf (a saturated softmax makes one)."""
    log_mix = (0.5 * (p + q)).clamp(1e-7, 1).log()

    def kl(a: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp(min=1e-12).log() - log_mix)).sum(1)

    return kl(p), kl(q)


def _jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence between the rows of two distributions."""
    kl_p, kl_q = _kl_to_mix(p, q)
    return 0.5 * (kl_p + kl_q).mean()


def _apart(p: torch.Tensor, q: torch.Tensor, margin: float) -> torch.Tensor:
    """The dissimilar-pair hinge: mean over rows of ½·(max(0, m − KL(p‖mix)) + max(0, m − KL(q‖mix)))."""
    kl_p, kl_q = _kl_to_mix(p, q)
    return 0.5 * ((margin - kl_p).clamp(min=0).mean() + (margin - kl_q).clamp(min=0).mean())


class _UnitRows(torch.autograd.Function):
    """Rows scaled to unit length: :func:`F.normalize`'s forward, with its backward written out,
    ``(g − y·⟨g, y⟩) / ‖x‖``: autograd's graph of ``F.normalize`` makes several passes over the (C, d) weight,
    which on a 10^5-class head cost as much as the rest of HAF's losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n = x.norm(2, 1, keepdim=True).clamp_min(1e-12)
        y = x / n
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        y, n = ctx.saved_tensors
        return (g - y * (g * y).sum(1, keepdim=True)) / n


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    """``F.normalize(w, dim=1)``, by :class:`_UnitRows` where a gradient is wanted (export traces the plain one)."""
    return _UnitRows.apply(w) if torch.is_grad_enabled() and w.requires_grad else F.normalize(w, dim=1)


#: ``coarse_levels="auto"`` keeps every level on trees up to this many nodes (the papers' and the comparison's)
AUTO_ALL_LEVELS = 1_000


def coarse_level_count(levels: list[list[int]], num_classes: int, num_nodes: int, setting: int | str | None) -> int:
    """How many of the carried levels (top first) get a head. On a deep tree the carried levels near the
    bottom hold nearly every leaf, so heads for all of them cost O(N·depth) outputs (7× flat's train step at
    45,000 nodes); ``"auto"`` keeps every level up to :data:`AUTO_ALL_LEVELS` nodes and above that the top
    levels whose heads together have at most a quarter of the fine head's outputs (at least one). Why a
    quarter: each coarse output costs a dozen element-wise passes of the soft-label, margin and consistency
    losses, forward and back — several times what a fine output costs flat's cross-entropy. At 10^5 nodes,
    heads with half the fine outputs made a step 1.8× flat's, a quarter 1.4× (``benchmarks/scale.py``)."""
    if setting is None or (setting == "auto" and num_nodes <= AUTO_ALL_LEVELS):
        return len(levels)
    if setting == "auto":
        sizes = [len(level) for level in levels]
        k = next((i for i in range(len(sizes)) if 4 * sum(sizes[: i + 1]) > num_classes), len(sizes))
        return max(k, min(1, len(sizes)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"model.coarse_levels must be a whole number ≥ 1, null or 'auto', got {setting!r}")
    return min(setting, len(levels))


class HAFClassifier(FlatClassifier):
    """Flat softmax over the leaves (normalised weights) plus HAF's coarse heads and losses (module
    docstring). ``dissimilar_margin``: m of the margin loss (3 in the authors' code). ``coarse_levels``:
    how many levels, from the top, get a coarse head (:func:`coarse_level_count`; ``None``: all).
    ``level_reduction``: ``"sum"`` (the authors') or ``"mean"`` of the per-level terms (module docstring)."""

    extendable = False  # its output is not one fc row per class: no class can join it

    def __init__(self, taxonomy: Taxonomy, dissimilar_margin: float = 3.0,
                 coarse_levels: int | str | None = "auto", level_reduction: str = "sum", **kwargs) -> None:
        single_label_leaves("haf", "a softmax per level", kwargs)
        super().__init__(taxonomy, **kwargs)
        self.dissimilar_margin = float(dissimilar_margin)
        if level_reduction not in ("sum", "mean"):
            raise ValueError(f"model.level_reduction must be 'sum' or 'mean', got {level_reduction!r}")
        self.level_reduction = level_reduction
        levels = carried_levels(taxonomy)
        levels = levels[: coarse_level_count(levels, len(self.classes), taxonomy.num_nodes, coarse_levels)]
        self.coarse = nn.ModuleList(nn.Linear(self.backbone.num_features, len(nodes)) for nodes in levels)
        paths = self.tables.paths
        depth = self.tables.depth
        # for each head (coarse levels, then the fine one), each class's coarser-level class index
        members = [torch.tensor(nodes) for nodes in levels] + [self.classes]
        for lv, nodes in enumerate(members[:-1], start=1):
            finer = members[lv]
            up = torch.where(depth[finer] >= lv, paths[finer, lv - 1], finer)  # the finer class's node at level lv
            self.register_buffer(f"up{lv}", column_index(nodes, taxonomy.num_nodes)[up], persistent=False)
            self.register_buffer(f"label{lv}", level_labels(self.tables, nodes.tolist(), lv), persistent=False)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.dropout(features)
        # the normalised fine weight goes to the loss too: normalising a 10^5-row matrix (and its backward)
        # twice per step cost more than the rest of HAF's losses on a WordNet-sized tree
        w = unit_rows(self.fc.weight)
        return {"logits": F.linear(x, w, self.fc.bias), "features": x, "fine_weight": w}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(outputs["logits"].float(), dim=1)
        loss = self.class_loss(logp, targets)
        x = outputs["features"].float()
        heads = [*self.coarse, self.fc]
        weights = [*(unit_rows(h.weight.float()) for h in self.coarse), outputs["fine_weight"].float()]
        # fp32 softmaxes: autocast would run the coarse heads in half precision; the fine one is the loss's own
        probs = [F.softmax(F.linear(x, w, h.bias), dim=1, dtype=torch.float32)
                 for w, h in zip(weights[:-1], heads[:-1])]
        probs.append(logp.exp())
        shift = torch.roll(torch.arange(len(x), device=x.device), 1)  # image i pairs with image i − 1
        scale = 1 / len(self.coarse) if self.level_reduction == "mean" and self.coarse else 1.0
        for lv in range(1, len(heads)):
            coarse, finer = probs[lv - 1], probs[lv]
            up = getattr(self, f"up{lv}")
            # soft labels: the finer softmax summed into level lv's classes against level lv's own
            loss = loss + scale * _jsd(torch.zeros_like(coarse).index_add(1, up, finer), coarse)
            # geometric consistency: a class's weight points where its children's weights sum
            children = torch.zeros_like(weights[lv - 1]).index_add(0, up, weights[lv])
            loss = loss - scale * F.cosine_similarity(weights[lv - 1], F.normalize(children, dim=1), dim=1).mean()
            # margin loss on pairs whose labels at level lv differ
            lab = getattr(self, f"label{lv}")[targets]
            pair = (lab >= 0) & (lab[shift] >= 0) & (lab != lab[shift])
            if pair.any():
                loss = loss + scale * _apart(coarse[pair], coarse[shift][pair], self.dissimilar_margin)
        return loss


@register_model("haf", multi_label=False)
def haf(taxonomy: Taxonomy, **kwargs) -> HAFClassifier:
    """HAF: hierarchy-aware features from per-level heads and their losses (Garg et al., ECCV 2022)."""
    return HAFClassifier(taxonomy, **kwargs)
