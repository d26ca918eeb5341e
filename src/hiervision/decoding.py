"""Turning model scores into paths of the tree.

Every model ends in a :class:`Prediction`, so metrics, the CLI and serving never special-case a
method. Two decoders live here:

* :func:`exact_best_path` — for heads whose per-node scores do not depend on earlier predictions
  (flat softmax, per-level heads, Koo's FPL outputs): the best *valid* path is found exactly by
  summing log-probabilities along every root-to-node path, one matrix product.
* :func:`threshold_paths` — multi-label: a node is kept when it and all its ancestors pass the
  threshold (Koo et al., Sec. 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["Prediction", "exact_best_path", "last_node", "threshold_paths"]


def last_node(paths: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` padded paths → ``(B,)`` last non-PAD entry of each (PAD for an empty path)."""
    if paths.shape[1] == 0:
        return torch.full((len(paths),), PAD, dtype=torch.long, device=paths.device)
    pos = torch.arange(paths.shape[1], device=paths.device)
    last = torch.where(paths != PAD, pos, -1).max(1).values
    return torch.where(last >= 0, paths.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1), PAD)


@dataclass
class Prediction:
    """What every model's ``predict`` returns for a batch of B images.

    Attributes:
        paths: ``(B, D)`` node ids per level, :data:`~hiervision.taxonomy.PAD` after the end.
            Autoregressive heads may emit invalid paths; metrics report how often.
        scores: ``(B, N+1)`` per-node score in [0, 1] (marginal probability for softmax heads,
            sigmoid for multi-label heads); column 0 unused.
        path_prob: ``(B,)`` probability the model gives to the returned path.
        labels: multi-label only — ``(B, N+1)`` bool, the predicted path *ends* (a set of paths).
    """

    paths: torch.Tensor
    scores: torch.Tensor
    path_prob: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def nodes(self) -> torch.Tensor:
        """``(B,)`` the last node of each path (the predicted class)."""
        return last_node(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def cat(parts: list[Prediction]) -> Prediction:
        """Join per-batch predictions (paths are padded to the longest)."""
        d = max(p.paths.shape[1] for p in parts)
        paths = torch.cat([torch.nn.functional.pad(p.paths, (0, d - p.paths.shape[1]), value=PAD) for p in parts])
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        return Prediction(
            paths, torch.cat([p.scores for p in parts]), torch.cat([p.path_prob for p in parts]), labels
        )


def exact_best_path(
    taxonomy: Taxonomy,
    node_logprob: torch.Tensor,
    end_nodes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best valid path under independent per-node log-probabilities.

    Args:
        node_logprob: ``(B, N+1)`` log-probability of each node *given its level* (column 0 ignored).
        end_nodes: ``(N+1,)`` bool, where a path may end (default: leaves only; pass all nodes
            for variable-length trees where inner nodes are labels).

    Returns:
        ``(nodes, logprob)``: the best end node per sample and its path's summed log-probability.
    """
    anc = taxonomy.ancestor_matrix.to(node_logprob.device, torch.float32)
    # -inf (probability 0) would turn 0·(-inf) into NaN in the product: a large finite floor is exact enough
    lp = node_logprob.float().clamp(min=-1e4)
    lp[:, 0] = 0
    path_lp = lp @ anc.T  # (B, N+1): sum along each root-to-node path
    if end_nodes is None:
        end_nodes = torch.zeros(taxonomy.num_nodes, dtype=torch.bool)
        end_nodes[list(taxonomy.leaves)] = True
    end_nodes = end_nodes.to(path_lp.device).clone()
    end_nodes[0] = False  # the root is not a class
    path_lp = path_lp.masked_fill(~end_nodes, float("-inf"))
    best_lp, nodes = path_lp.max(1)
    return nodes, best_lp


def threshold_paths(taxonomy: Taxonomy, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Multi-label decoding: ``(B, N+1)`` sigmoid scores → ``(B, N+1)`` bool set of kept path ends.

    A node is kept when it and every ancestor pass ``threshold``; the kept paths are the kept
    nodes that have no kept child (the deepest points reached).
    """
    kept = (scores >= threshold).T.contiguous()
    kept[0] = True  # the root passes, so depth-1 nodes only need themselves
    parents = taxonomy.parent_tensor.to(scores.device)
    for level in taxonomy.levels:  # top-down: a node stays only if its parent stayed
        idx = torch.tensor(level, dtype=torch.long, device=scores.device)
        kept[idx] &= kept[parents[idx]]
    kept[0] = False
    return taxonomy.path_ends(kept.T)
