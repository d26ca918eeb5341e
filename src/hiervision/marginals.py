"""End-class distributions, temperature and node marginals from node scores, in numpy.

The one implementation of the probability side of :mod:`hiervision.decisions` and
:mod:`hiervision.metrics`: the torch wrappers in :mod:`hiervision.distributions` call these, and the
PyTorch-free runtime (``predict``, the server, an exported ``.onnx``) uses them to apply a run's
calibration temperature, so a probability means the same thing in ``evaluate`` and in a prediction
record. Needs numpy only; ``tree`` is a :class:`~hiervision.taxonomy.Taxonomy`
or a :class:`~hiervision.records.TreeView`. Everything is O(B·N): sums over subtrees and into parents
go level by level (:meth:`~hiervision.tree.view.TreeView.subtree_sum`), never through a (N+1)² table.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hiervision.records import TreeView

__all__ = ["apply_temperature", "as_temperature", "conditionals", "end_distribution", "is_identity",
           "node_marginals", "temper_level"]

#: a calibration temperature: one for the model (a float) or one per tree level (depth 1 first)
Temperature = float | tuple[float, ...]


def as_temperature(value) -> Temperature:
    """A temperature as stored (a model's buffer, a sidecar's or ``decisions.json``'s value) in its one
    Python form: a float for one temperature, a tuple of floats for one per level."""
    a = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
    if a.ndim == 0:
        return float(a)
    return tuple(float(x) for x in a.reshape(-1))


def is_identity(temperature) -> bool:
    """True when the temperature leaves probabilities as they are (every value 1)."""
    return bool(np.all(np.asarray(as_temperature(temperature)) == 1.0))


@lru_cache(maxsize=16)
def _tables(tree: TreeView) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """``(parents, levels)``: parent ids (the root's -1) and ``levels[d]``, the node ids at depth ``d + 1``."""
    return np.asarray(tree.parents, dtype=np.int64), tree.levels


def _view(tree) -> TreeView:
    """The torch-free view of a :class:`~hiervision.taxonomy.Taxonomy` (a TreeView stays as it is)."""
    return tree if isinstance(tree, TreeView) else tree.view


def end_distribution(scores: np.ndarray, tree, ends: str = "leaves", temperature: Temperature = 1.0) -> np.ndarray:
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
    par, levels = _tables(tree)
    s = np.array(scores, dtype=np.float64)  # our own copy, changed in place below (rows may be 10⁵ wide)
    np.clip(s, 0, 1, out=s)
    s[:, 0] = 1.0  # the truth always lies under the root
    mask = tree.end_mask(ends)
    child_sum = tree.children_sum(s)
    if ends == "all":
        leaf = tree.end_mask("leaves")
        q = np.where(leaf, s, np.clip(s - child_sum, 0, None)) * mask
        return apply_temperature(q / np.clip(q.sum(1, keepdims=True), 1e-12, None), temperature, tree, ends)
    inner = ~mask
    inner[0] = False
    total = (s @ mask.astype(np.float64))[:, None]
    if np.abs(total - 1.0).max(initial=0.0) <= 1e-4 and _close(child_sum[:, inner], s[:, inner]):
        # coherent scores (a flat softmax's marginals, a restricted distribution's): every inner node holds its
        # leaves' sum, so pushing down would give the leaves back — one pass instead of one per level
        s *= mask
        s /= total
        return apply_temperature(s, temperature, tree, ends)
    n_leaves = tree.subtree_sum(mask[None].astype(np.float64))[0]  # (N+1,) leaves under each node
    rest = np.clip(s - child_sum, 0, None)
    unscored = s <= 0
    n_unscored = tree.children_sum(unscored * n_leaves)
    m = np.zeros_like(s)
    m[:, 0] = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for d, idx in enumerate(levels):  # top-down: a parent's final probability is known before its children's
            p = par[idx]
            u, nu, cs = rest[:, p], n_unscored[:, p], child_sum[:, p]
            w = s[:, idx] + np.where(unscored[:, idx], u * n_leaves[idx] / np.maximum(nu, 1), 0.0)
            w = w + np.where(nu > 0, 0.0, u * s[:, idx] / np.maximum(cs, 1e-12))
            total = tree.children_sum(w, level=d)[:, p]
            share = np.where(total > 0, w / np.maximum(total, 1e-12), n_leaves[idx] / np.maximum(n_leaves[p], 1))
            m[:, idx] = m[:, p] * share
    q = m * mask
    q = q / np.clip(q.sum(1, keepdims=True), 1e-12, None)
    return apply_temperature(q, temperature, tree, ends)


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> bool:
    """``np.allclose(a, b, atol=tol, rtol=tol)`` for finite arrays, without its copies (10⁵-node rows)."""
    d = np.subtract(a, b)
    np.abs(d, out=d)
    return bool((d <= tol + tol * np.abs(b)).all())


def apply_temperature(q: np.ndarray, temperature: Temperature, tree=None, ends: str = "leaves") -> np.ndarray:
    """Calibrate an end-class distribution (rows of ``q``) with a temperature (``T > 1`` softens,
    ``T < 1`` sharpens; zeros stay zero; a row's argmax never changes under one temperature).

    One temperature: ``q ∝ q^(1/T)``, for a flat softmax exactly dividing the logits by ``T``. One per
    level (a sequence, depth 1 first; needs ``tree`` and ``ends``): ``q`` is read as a chain of
    conditionals down the tree (:func:`conditionals`), each level's are tempered within their sibling
    groups by that level's ``T`` (:func:`temper_level`), and the chain is multiplied back — the
    per-level softmaxes of a head with levels, tempered one by one.
    """
    t = as_temperature(temperature)
    if not np.all(np.isfinite(t)) or np.any(np.asarray(t) <= 0):
        raise ValueError(f"temperature must be positive numbers, got {temperature}")
    q = np.asarray(q, dtype=np.float64)
    if is_identity(t):
        return q
    if isinstance(t, tuple):
        if tree is None:
            raise ValueError("a per-level temperature needs the tree")
        return _apply_level_temperature(q, t, _view(tree), ends)
    with np.errstate(divide="ignore"):
        e = np.log(q)  # zeros: -inf, and exp gives them back as zeros; in place from here (a row may be 10⁵ wide)
    e /= t
    e -= e.max(1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(1, keepdims=True)
    return e


def conditionals(q: np.ndarray, tree, ends: str = "leaves") -> tuple[np.ndarray, np.ndarray]:
    """``(c, stop)`` of an end-class distribution: ``c[:, v]`` the probability of v given its parent,
    ``stop[:, u]`` (``ends="all"``, inner u) that the truth is u itself given that it lies under u. Along a
    path their product gives ``q`` back, and each sibling group (with its parent's stop) sums to 1."""
    tree = _view(tree)
    par, _ = _tables(tree)
    m = node_marginals(q, tree)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(m[:, par] > 0, m / m[:, par], 0.0)
        stop = np.where((m > 0) & _inner_ends(tree, ends), np.asarray(q, dtype=np.float64) / m, 0.0)
    c[:, 0] = 1.0
    return c, stop


def _inner_ends(tree: TreeView, ends: str) -> np.ndarray:
    mask = tree.end_mask(ends) & ~tree.end_mask("leaves")
    mask[0] = False
    return mask


def _halts(tree: TreeView, ends: str, level: int) -> np.ndarray:
    """Ids of the inner ends at depth ``level - 1``: their "stop here" shares level ``level``'s softmax."""
    return np.flatnonzero(_inner_ends(tree, ends) & (tree.depths == level - 1))


def temper_level(c: np.ndarray, stop: np.ndarray, tree, ends: str, level: int,
                 t: float) -> tuple[np.ndarray, np.ndarray]:
    """Level ``level``'s (depth ≥ 1) conditionals and their parents' stops (:func:`conditionals`) raised
    to ``1/t`` and renormalised within each sibling group. Returns the two tempered blocks: columns
    ``tree``'s nodes at depth ``level``, and the inner ends at depth ``level - 1`` (``ends="all"``)."""
    tree = _view(tree)
    par, levels = _tables(tree)
    kids, halts = levels[level - 1], _halts(tree, ends, level)
    ck, sk = c[:, kids] ** (1 / t), stop[:, halts] ** (1 / t)
    z = tree.children_sum(ck, level=level - 1)  # (B, N+1): each parent's sum over its children
    z[:, halts] += sk
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(z[:, par[kids]] > 0, ck / z[:, par[kids]], 0.0),
                np.where(z[:, halts] > 0, sk / z[:, halts], 0.0))


def _apply_level_temperature(q: np.ndarray, temps: tuple[float, ...], tree: TreeView, ends: str) -> np.ndarray:
    par, levels = _tables(tree)
    if len(temps) != tree.max_depth:
        raise ValueError(f"a per-level temperature needs one value per level ({tree.max_depth}), got {len(temps)}")
    c, stop = conditionals(q, tree, ends)
    for d, t in enumerate(temps, start=1):
        c[:, levels[d - 1]], stop[:, _halts(tree, ends, d)] = temper_level(c, stop, tree, ends, d, t)
    m = np.ones_like(c)
    for idx in levels:  # multiply the chain back, top-down
        m[:, idx] = m[:, par[idx]] * c[:, idx]
    out = np.where(tree.end_mask("leaves"), m, m * stop) * tree.end_mask(ends)
    return out / np.clip(out.sum(1, keepdims=True), 1e-12, None)


def node_marginals(q: np.ndarray, tree) -> np.ndarray:
    """``(B, N+1)`` probability that the truth lies under (or at) each node; the root's column is the
    row's total (1). Coherent by construction: a parent is never below its child."""
    a = np.asarray(q, dtype=np.float64)
    return _view(tree).subtree_sum(a, inplace=a is not q)  # a float64 copy made here is ours to sum into
