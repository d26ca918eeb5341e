"""Bayes-optimal answers for a named hierarchical metric, in numpy (Plaud et al., ICML 2025).

Given an image's end-class distribution ``q`` (what :func:`hiervision.marginals.end_distribution`
returns), the answer that maximises the *expected* score of a metric is not in general the most
probable class. :func:`bayes_nodes` finds it exactly for three metrics, per image:

* ``"hf1"`` — Kiritchenko's per-image hierarchical F1 between the answer's path and the true path
  (node sets without the root): ``2|A∩T| / (|A| + |T|)``;
* ``"severity"`` — minus the height of the lowest common ancestor of answer and truth (Karthik et al.'s
  CRM is this rule over end classes);
* ``"path_accuracy"`` — 1 when the answer is the truth: the most probable end class.

``allow_inner=True`` lets the answer be an inner node (a coarser, safer answer where the metric rewards
it: hF1 does, LCA height and path accuracy never strictly do); otherwise the answer is an end class
(the leaves, and inner nodes to which the row's ``q`` gives mass). Ties (within float noise) go to the
end class more likely to be the truth, then to the node more likely to cover it, then to the lower id.

Everything works on ancestor sums along the tree, level by level (no candidate × class loop and no
``(N+1)²`` table). With ``A = path(a)`` and ``lca(a, t) = a_k``, ``|A∩T| = k``; summing ``k`` over the
truths whose LCA with ``a`` is ``a_k`` telescopes into a sum over ``a``'s ancestors of the mass under
each. Because F1 also divides by the true depth ``|T|``, the mass is kept per true depth:

    E_hF1(a) = Σ_e 2·S(a, e) / (d_a + e),   S(a, e) = Σ_{u on path(a)} M(u, e),

``M(u, e)`` the probability that the truth lies under ``u`` at depth ``e`` (bottom-up sums) and ``S`` its
running sum down the path (top-down): O(N·D) time and memory per image, D the tree's depth. The LCA
height telescopes the same way without the depth axis, ``E_h(a) = h(root) + Σ_{u on path(a)} m(u)·(h(u) −
h(parent u))`` with ``m`` the node marginals: O(N) per image.

Needs numpy only: the PyTorch-free runtime (``predict``, the server, an exported ``.onnx``) answers with
the same code that :func:`hiervision.decisions.bayes_nodes` and ``evaluate --decode bayes`` use. ``tree``
is a :class:`~hiervision.taxonomy.Taxonomy` or a :class:`~hiervision.records.TreeView` (read through
their ``parents``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hiervision.marginals import end_distribution

__all__ = ["BAYES_METRICS", "DECODE_RULES", "bayes_nodes", "check_metric", "decide_records", "decode_rule",
           "expected_scores", "rule_spec"]

#: the metrics :func:`bayes_nodes` optimises (``--metric``)
BAYES_METRICS = ("hf1", "severity", "path_accuracy")
#: decision rules: the model's own decoding, Karthik et al.'s CRM, or the Bayes-optimal answer for a metric
DECODE_RULES = ("argmax", "crm", "bayes")
_CHUNK = 1 << 22  # elements of the (N+1, b, D) per-depth masses held at once (hF1)


def check_metric(metric: str) -> str:
    """One clear error for a metric :func:`bayes_nodes` does not know."""
    if metric not in BAYES_METRICS:
        raise ValueError(f"decode metric must be one of {list(BAYES_METRICS)}, got {metric!r}")
    return metric


def rule_spec(rule: str = "argmax", metric: str | None = None, allow_inner: bool = False) -> str:
    """The one string that names a decision rule (``eval.decode``, the export sidecar's ``decode``):
    ``argmax``, ``crm``, ``bayes:METRIC`` or ``bayes:METRIC:inner`` — from ``--decode/--metric/--allow-inner``."""
    if rule not in DECODE_RULES:
        raise ValueError(f"--decode must be one of {list(DECODE_RULES)}, got {rule!r}")
    if rule != "bayes":
        if metric is not None or allow_inner:
            raise ValueError(f"--metric and --allow-inner go with --decode bayes, not --decode {rule}")
        return rule
    return f"bayes:{check_metric(metric or 'hf1')}" + (":inner" if allow_inner else "")


def decode_rule(spec: str, source: str = "eval.decode") -> tuple[str, str | None, bool]:
    """``(rule, metric, allow_inner)`` of a :func:`rule_spec` string; one clear error naming ``source``
    (where the string came from) when it is not one."""
    parts = str(spec).split(":")
    ok = (parts[0] in DECODE_RULES and (len(parts) == 1 or parts[0] == "bayes") and len(parts) <= 3
          and (len(parts) < 2 or parts[1] in BAYES_METRICS) and (len(parts) < 3 or parts[2] == "inner"))
    if not ok:
        raise ValueError(f"{source} must be argmax, crm, bayes:METRIC or bayes:METRIC:inner (METRIC one of "
                         f"{', '.join(BAYES_METRICS)}), got {spec!r}")
    if parts[0] != "bayes":
        return parts[0], None, False
    return "bayes", parts[1] if len(parts) > 1 else "hf1", len(parts) == 3


def decide_records(tree, ends: str, decoded: list[dict], spec: str) -> list[dict]:
    """The runtime's decision rule: each decoded record (``path_ids``, ``path_probability``,
    ``node_scores`` already calibrated) gets the answer of ``spec`` (CRM is the LCA-height rule over end
    classes) and that answer's probability — of being the truth for an end class, of covering it for
    an inner node. The ``top_k`` alternatives stay the model's own ranking."""
    rule, metric, inner = decode_rule(spec)
    if rule == "argmax" or not decoded:
        return decoded
    q = end_distribution(np.stack([np.asarray(d["node_scores"], dtype=np.float64) for d in decoded]), tree, ends)
    nodes = bayes_nodes(q, tree, metric or "severity", inner)
    prob = _tree(tuple(tree.parents)).up_sums(q.T).T if inner else q
    return [{**d, "path_ids": list(tree.path(int(n))), "path_probability": float(prob[r, n])}
            for r, (d, n) in enumerate(zip(decoded, nodes))]


class _Tree:
    """Parent pointers grouped for level-by-level sums: per depth, its nodes sorted by parent and the
    run starts of each parent (``np.add.reduceat``), plus depths and heights."""

    def __init__(self, parents: tuple[int, ...]) -> None:
        par = np.asarray(parents, dtype=np.int64)
        n = len(par)
        depth = np.zeros(n, dtype=np.int64)
        order = _top_down(par)
        for v in order[1:]:
            depth[v] = depth[par[v]] + 1
        height = np.zeros(n, dtype=np.int64)
        for v in order[:0:-1]:  # bottom-up: children before parents
            height[par[v]] = max(height[par[v]], height[v] + 1)
        has_child = np.zeros(n, dtype=bool)
        has_child[par[1:]] = True
        self.par, self.depth, self.height, self.leaf = par, depth, height, ~has_child
        self.leaf[0] = False
        self.max_depth = int(depth.max())
        self.levels = []  # depth 1 first: (nodes sorted by parent, their distinct parents, run starts)
        for d in range(1, self.max_depth + 1):
            idx = np.flatnonzero(depth == d)
            idx = idx[np.argsort(par[idx], kind="stable")]
            ups, starts = np.unique(par[idx], return_index=True)
            self.levels.append((idx, ups, starts))

    def up_sums(self, x: np.ndarray) -> np.ndarray:
        """Node-first ``x`` ``(N+1, ...)`` summed over each node's subtree (itself included)."""
        out = x.copy()
        for idx, ups, starts in reversed(self.levels):
            out[ups] += np.add.reduceat(out[idx], starts, axis=0)
        return out

    def down_sums(self, x: np.ndarray) -> np.ndarray:
        """Node-first ``x`` summed along each node's root path (itself included; the root's row kept)."""
        out = x.copy()
        for idx, _, _ in self.levels:
            out[idx] += out[self.par[idx]]
        return out


def _top_down(par: np.ndarray) -> list[int]:
    kids: list[list[int]] = [[] for _ in par]
    for v in range(1, len(par)):
        if not 0 <= par[v] < len(par):
            raise ValueError(f"tree: node {v} has unknown parent {par[v]}")
        kids[par[v]].append(v)
    order, stack = [], [0]
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(kids[v])
    if len(order) != len(par):
        raise ValueError("tree: some nodes do not reach the root")
    return order


@lru_cache(maxsize=8)
def _tree(parents: tuple[int, ...]) -> _Tree:
    return _Tree(parents)


def expected_scores(q: np.ndarray, tree, metric: str) -> np.ndarray:
    """``(B, N+1)`` float64 expected score under ``q`` of answering each node (the root: −inf)."""
    check_metric(metric)
    t = _tree(tuple(tree.parents))
    q = _check_q(q, len(t.par))
    if metric == "path_accuracy":
        out = q.copy()
    elif metric == "severity":
        m = t.up_sums(q.T)  # (N+1, B) node marginals
        step = np.zeros_like(m)
        step[1:] = m[1:] * (t.height[1:] - t.height[t.par[1:]])[:, None]
        step[0] = t.height[0] * m[0]
        out = -t.down_sums(step).T
    else:
        out = np.empty_like(q)
        n, d = len(t.par), t.max_depth
        nodes = np.arange(1, n)
        weight = 2.0 / (t.depth[:, None] + np.arange(1, d + 1)[None, :])  # (N+1, D): 2 / (d_a + e)
        rows = max(1, _CHUNK // (n * d))
        for s in range(0, len(q), rows):
            qc = q[s : s + rows]
            mass = np.zeros((n, len(qc), d))
            mass[nodes, :, t.depth[nodes] - 1] = qc[:, nodes].T  # truth at node v sits at depth d_v
            under = t.up_sums(mass)
            under[0] = 0.0  # the root is in no node set
            out[s : s + rows] = np.einsum("nbe,ne->bn", t.down_sums(under), weight)
    out[:, 0] = -np.inf
    return out


def bayes_nodes(q: np.ndarray, tree, metric: str, allow_inner: bool = False) -> np.ndarray:
    """``(B,)`` int64: per row of ``q`` ``(B, N+1)``, the node (never the root) of largest expected
    ``metric`` (module docstring); ``allow_inner=False`` keeps the answer to end classes."""
    t = _tree(tuple(tree.parents))
    q = _check_q(q, len(t.par))
    score = expected_scores(q, tree, metric)
    allowed = np.ones_like(q, dtype=bool) if allow_inner else (t.leaf[None, :] | (q > 0))
    allowed[:, 0] = False
    score = np.where(allowed, score, -np.inf)
    best = score.max(1, keepdims=True)
    near = score >= best - 1e-9 * np.maximum(np.abs(best), 1.0)
    for key in (q, t.up_sums(q.T).T):  # ties: the likelier truth, then the likelier cover
        k = np.where(near, key, -np.inf)
        near &= k >= k.max(1, keepdims=True) - 1e-12
    return near.argmax(1)  # the first (lowest) id left


def _check_q(q: np.ndarray, n: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != n:
        raise ValueError(f"end-class distribution must be (B, {n}) for this tree, got shape {q.shape}")
    return q
