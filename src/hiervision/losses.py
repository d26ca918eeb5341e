"""Hierarchy-aware training losses, selected by ``model.loss_type``.

* ``soft_labels`` (Bertinetto et al., CVPR 2020): cross-entropy against a target spread over the
  classes by ``exp(−β·d)``, ``d`` the height of their lowest common ancestor with the truth divided by
  the tree's height — a mistake into a near class costs less.
* ``hxe`` (the same paper's hierarchical cross-entropy): ``−Σ_v exp(−α·h(v))·log p(v | parent(v))``
  over the nodes of the target's path, from the class softmax's marginals; ``α = 0`` is plain
  cross-entropy for a leaf target.
* ``chmcnn`` (Giunchiglia & Lukasiewicz, NeurIPS 2020), multi-label: the max-constraint module
  (a node's output is the largest sigmoid in its subtree, so a child never passes a threshold its
  parent fails: thresholded outputs are coherent by construction) and its loss, which scores a
  positive node only through positive descendants.

Classes are given as node ids (``classes`` ``(C,)``), so any head whose output is a softmax over a set
of end classes can use the first two. Both cost O(B·C·log D) or O(B·N) per batch: LCAs come per target
and class (binary lifting), node probabilities are summed up the tree level by level; no C×C or
(N+1)×C table. ``taxonomy`` may be a model's :class:`~hiervision.taxonomy.TreeTables` (already on its
device) or a :class:`~hiervision.taxonomy.Taxonomy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiervision.decoding import tree_tables
from hiervision.taxonomy import PAD, Taxonomy, TreeTables

__all__ = ["LOSS_TYPES", "check_loss_type", "chmcnn_loss", "hxe_loss", "max_constraint", "soft_label_loss",
           "soft_label_targets"]

#: accepted ``model.loss_type`` values (heads say which they support)
LOSS_TYPES = ("ce", "soft_labels", "hxe", "chmcnn")


def check_loss_type(loss_type: str, supported: tuple[str, ...], model: str) -> str:
    """One clear error for a ``model.loss_type`` the head does not have."""
    if loss_type not in supported:
        raise ValueError(f"model.loss_type {loss_type!r} is not available for {model} (choose from {list(supported)})")
    return loss_type


def soft_label_targets(taxonomy: Taxonomy | TreeTables, targets: torch.Tensor, classes: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """``(B, C)`` soft labels ``∝ exp(−β·d)``, ``d = (h(lca(class, target)) − h(target)) / (h(root) − h(target))``.

    For a leaf target this is Bertinetto et al.'s LCA height over the tree's height; measuring from the
    target's own height keeps the target (and, for a coarse target, every class under it) at distance 0,
    so the same rule serves a head over one level of inner nodes."""
    tables = tree_tables(taxonomy, targets.device)
    heights = tables.height.float()
    h_t = heights[targets].unsqueeze(1)
    span = (heights[0] - h_t).clamp(min=1)
    lca = tables.lca(classes.unsqueeze(0), targets.unsqueeze(1))  # (B, C): one row per target, never C×C
    d = (heights[lca] - h_t).clamp(min=0) / span
    return torch.softmax(-beta * d, dim=1)


def soft_label_loss(logp: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor,
                    taxonomy: Taxonomy | TreeTables, beta: float) -> torch.Tensor:
    """Cross-entropy of ``(B, C)`` class log-probabilities against :func:`soft_label_targets`."""
    y = soft_label_targets(taxonomy, targets, classes.to(logp.device), beta)
    return -(y * logp.clamp(min=-1e4)).sum(1).mean()


def hxe_loss(logp: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor, taxonomy: Taxonomy | TreeTables,
             alpha: float) -> torch.Tensor:
    """Hierarchical cross-entropy from ``(B, C)`` class log-probabilities; inner (coarse) targets sum
    over their own path only."""
    tables = tree_tables(taxonomy, logp.device)
    on_nodes = logp.new_full((len(logp), tables.taxonomy.num_nodes), float("-inf"))
    on_nodes = on_nodes.index_copy(1, classes.to(logp.device), logp)
    node_lp = tables.subtree_logsumexp(on_nodes)  # (B, N+1): log-probability that the truth lies under n
    node_lp = torch.cat([torch.zeros_like(node_lp[:, :1]), node_lp[:, 1:]], 1)  # the root holds all the mass
    path = tables.paths[targets]  # (B, D): the target's path, PAD after its end
    on_path = path != PAD
    path = path.clamp(min=0)
    cond = (node_lp.gather(1, path) - node_lp.gather(1, tables.parent[path])).clamp(min=-1e4)  # log p(v | parent v)
    weight = torch.exp(-alpha * tables.height[path].to(logp.dtype))
    return -(cond * weight * on_path).sum(1).mean()


def max_constraint(probs: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """C-HMCNN's max-constraint module: ``(B, N+1)`` per-node probabilities → each node's largest
    probability in its subtree (itself included). Column 0 is left as given."""
    out = probs.clone()
    parents = taxonomy.parent_tensor.to(probs.device)
    for level in reversed(taxonomy.levels[1:]):  # bottom-up: children are final before their parents
        idx = torch.tensor(level, dtype=torch.long, device=probs.device)
        index = parents[idx].expand(len(out), -1)
        out = out.scatter_reduce(1, index, out[:, idx], "amax", include_self=True)
    return out


def chmcnn_loss(logits: torch.Tensor, closed_targets: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """C-HMCNN's max-constraint loss from ``(B, N+1)`` node logits (column 0 ignored) and ``(B, N+1)``
    ancestor-closed 0/1 targets: a positive node is scored by ``MCM(y·h)`` (only its positive
    descendants may vouch for it), a negative one by ``MCM(h)``; then binary cross-entropy."""
    h = torch.sigmoid(logits.float())
    y = closed_targets.float()
    pos = max_constraint(y * h, taxonomy)
    neg = max_constraint(h, taxonomy)
    pred = (y * pos + (1 - y) * neg)[:, 1:].clamp(1e-7, 1 - 1e-7)
    return F.binary_cross_entropy(pred, y[:, 1:])
