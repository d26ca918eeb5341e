"""Valmadre's soft max-margin loss (NeurIPS 2022, "Hierarchical classification at multiple operating
points", the section that proposes its two losses: "soft-max-margin"): one softmax over *every* node
of the tree, trained so that the true node's score beats each other node's by a margin that is larger
for worse answers.

The paper's point is that a classifier should be judged along its whole operating curve (specific but
risky answers ↔ coarse but safe ones; :func:`hiervision.metrics.operating_curve`), and that a flat
softmax is hard to beat there; of the losses it tries, the soft max-margin over all nodes is the one
that improves on it. The scores of inner nodes let the model put mass on "somewhere under this node"
when it cannot tell the leaves apart, so its node marginals (the sum of a node's subtree) carry the
hierarchy into every post-hoc rule (hedging, CRM, Bayes decisions).
"""

from __future__ import annotations

import torch

from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.registry import register_model
from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["SoftMaxMarginClassifier"]

MARGINS = ("incorrect", "depth_dist")


class SoftMaxMarginClassifier(FlatClassifier):
    """Backbone + one linear layer scoring every node (the root excepted), trained with the soft
    max-margin loss ``−s_y + log Σ_v exp(s_v + τ·Δ(y, v))`` (Valmadre's soft variant of the structured
    hinge loss, as the authors' ``hier_torch.MarginLoss(hardness="soft")`` computes it).

    ``margin``: ``Δ(y, v)`` — ``"incorrect"`` (1 when answering ``v`` would be wrong, i.e. ``v`` is not
    ``y`` or one of its ancestors; 0 otherwise: the authors' ImageNet and iNaturalist configs) or
    ``"depth_dist"`` (edges between ``y`` and ``v`` through their LCA). ``margin_tau``: τ, 5 in those
    configs. A coarse target ``y`` (an inner node) is a class like any other here.

    Predictions: the node marginals are the softmax summed over each subtree (the paper's inference),
    and the answer is the leaf with the largest own probability — so the exported graph decodes as a
    flat softmax's (``end_nodes="leaves"``) and every post-hoc rule reads the marginals.
    """

    def __init__(self, taxonomy: Taxonomy, margin: str = "incorrect", margin_tau: float = 5.0, **kwargs) -> None:
        single_label_leaves("soft_max_margin", "a softmax over the nodes", kwargs)
        if margin not in MARGINS:
            raise ValueError(f"model.margin must be one of {list(MARGINS)}, got {margin!r}")
        if margin_tau < 0:
            raise ValueError(f"model.margin_tau must be ≥ 0, got {margin_tau}")
        super().__init__(taxonomy, end_nodes="all", **kwargs)  # one output per node 1..N
        self.end_nodes = "leaves"  # ... but the answer is a leaf
        self.margin, self.margin_tau = margin, float(margin_tau)
        self.register_buffer("answers", self.tables.leaf_mask[self.classes].clone(), persistent=False)
        self.register_buffer("class_depth", self.tables.depth[self.classes].clone(), persistent=False)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"].float()  # (B, N): column c is node c + 1
        path = self.tables.encode_paths(targets)  # (B, D)
        on_path = torch.zeros(len(targets), self.taxonomy.num_nodes, device=logits.device)
        on_path.scatter_(1, path.clamp(min=0), (path != PAD).float())
        on_path = on_path[:, 1:]  # (B, N): the target and its ancestors
        if self.margin == "incorrect":
            delta = 1.0 - on_path
        else:  # depth(y) + depth(v) − 2·depth(lca(y, v)), one row per target (B×N, never N×N)
            shared = self.tables.depth[self.tables.lca(targets.unsqueeze(1), self.classes.unsqueeze(0))]
            delta = self.tables.depth[targets].unsqueeze(1) + self.class_depth - 2 * shared
        label = logits.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
        return (torch.logsumexp(logits + self.margin_tau * delta, dim=1) - label).mean()

    def _best_class(self, probs: torch.Tensor, allowed: torch.Tensor | None = None):
        leaves = self.answers.expand_as(probs)
        return super()._best_class(probs, leaves if allowed is None else allowed & leaves)


@register_model("soft_max_margin", multi_label=False)
def soft_max_margin(taxonomy: Taxonomy, **kwargs) -> SoftMaxMarginClassifier:
    """Valmadre's soft max-margin loss over every node (NeurIPS 2022)."""
    return SoftMaxMarginClassifier(taxonomy, **kwargs)
