"""End-class distributions, temperature and node marginals from node scores, in numpy.

The one implementation of the probability side of :mod:`hiervision.decisions`: the torch functions
there call these, and the PyTorch-free runtime (``predict``, the server, an exported ``.onnx``) uses
them to apply a run's calibration temperature, so a probability means the same thing in ``evaluate``
and in a prediction record. Needs numpy only; ``tree`` is a :class:`~hiervision.taxonomy.Taxonomy`
or a :class:`~hiervision.records.TreeView`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from hiervision.records import TreeView

__all__ = ["apply_temperature", "end_distribution", "node_marginals"]


@lru_cache(maxsize=16)
def _tables(tree: TreeView) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """``(parents, ancestors, levels)``: ``ancestors[n, m]`` is true when m is n or an ancestor of n
    (the root excluded); ``levels[d]`` the node ids at depth ``d + 1``."""
    anc = np.zeros((tree.num_nodes, tree.num_nodes), dtype=bool)
    for v in range(1, tree.num_nodes):
        anc[v, list(tree.path(v))] = True
    depth = tree.depths
    levels = tuple(np.flatnonzero(depth == d) for d in range(1, tree.max_depth + 1))
    return np.asarray(tree.parents, dtype=np.int64), anc, levels


def _view(tree) -> TreeView:
    """The torch-free view of a :class:`~hiervision.taxonomy.Taxonomy` (a TreeView stays as it is)."""
    return tree if isinstance(tree, TreeView) else TreeView(tuple(tree.names), tuple(tree.parents))


def end_distribution(scores: np.ndarray, tree, ends: str = "leaves", temperature: float = 1.0) -> np.ndarray:
    """``(B, N+1)`` float64 probability that each end class is the truth, from ``(B, N+1)`` node scores.

    Node scores are read as "probability the truth lies under this node" and pushed down the tree:
    a node's probability goes to its children in proportion to their scores, and mass its children do
    not account for goes to the children the model did not score (a decoder that scores only its own
    path; their subtrees then share it by their number of leaves), or — when every child has a score,
    as with independent per-level softmaxes whose invalid paths lose mass — to the scored children in
    proportion. Complete scores (flat softmax, HierNet) come back unchanged, and so does every score
    on a decoder's path. With ``ends="all"`` (labels may stop at inner nodes) an inner node's score
    minus its children's is its own "stops here" class. Then the temperature is applied
    (:func:`apply_temperature`).
    """
    tree = _view(tree)
    par, anc, levels = _tables(tree)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, 1).copy()
    s[:, 0] = 1.0  # the truth always lies under the root
    mask = tree.end_mask(ends)
    child_sum = np.zeros_like(s)
    np.add.at(child_sum.T, par[1:], s[:, 1:].T)
    if ends == "all":
        leaf = tree.end_mask("leaves")
        q = np.where(leaf, s, np.clip(s - child_sum, 0, None)) * mask
        return apply_temperature(q / np.clip(q.sum(1, keepdims=True), 1e-12, None), temperature)
    n_leaves = (anc & mask[:, None]).sum(0).astype(np.float64)  # (N+1,) leaves under each node
    n_leaves[0] = mask.sum()
    rest = np.clip(s - child_sum, 0, None)
    unscored = s <= 0
    n_unscored = np.zeros_like(s)
    np.add.at(n_unscored.T, par[1:], (unscored[:, 1:] * n_leaves[1:]).T)
    m = np.zeros_like(s)
    m[:, 0] = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for idx in levels:  # top-down: a parent's final probability is known before its children's
            p = par[idx]
            u, nu, cs = rest[:, p], n_unscored[:, p], child_sum[:, p]
            w = s[:, idx] + np.where(unscored[:, idx], u * n_leaves[idx] / np.maximum(nu, 1), 0.0)
            w = w + np.where(nu > 0, 0.0, u * s[:, idx] / np.maximum(cs, 1e-12))
            total = np.zeros_like(s)
            np.add.at(total.T, p, w.T)
            total = total[:, p]
            share = np.where(total > 0, w / np.maximum(total, 1e-12), n_leaves[idx] / np.maximum(n_leaves[p], 1))
            m[:, idx] = m[:, p] * share
    q = m * mask
    q = q / np.clip(q.sum(1, keepdims=True), 1e-12, None)
    return apply_temperature(q, temperature)


def apply_temperature(q: np.ndarray, temperature: float) -> np.ndarray:
    """``q ∝ q^(1/T)`` row-wise (``T > 1`` softens, ``T < 1`` sharpens); zeros stay zero. For a flat
    softmax this is exactly dividing the logits by ``T``; it never changes a row's argmax."""
    t = float(temperature)
    if t <= 0 or not math.isfinite(t):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    q = np.asarray(q, dtype=np.float64)
    if t == 1.0:
        return q
    with np.errstate(divide="ignore"):
        logq = np.where(q > 0, np.log(np.clip(q, 1e-300, None)) / t, -np.inf)
    logq = logq - logq.max(1, keepdims=True)
    e = np.exp(logq)
    return e / e.sum(1, keepdims=True)


def node_marginals(q: np.ndarray, tree) -> np.ndarray:
    """``(B, N+1)`` probability that the truth lies under (or at) each node; the root's column is the
    row's total (1). Coherent by construction: a parent is never below its child."""
    _, anc, _ = _tables(_view(tree))
    q = np.asarray(q, dtype=np.float64)
    m = q @ anc
    m[:, 0] = q.sum(1)
    return m
