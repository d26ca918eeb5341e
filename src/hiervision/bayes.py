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

import numpy as np

from hiervision.marginals import end_distribution
from hiervision.tree.view import TreeView

__all__ = ["BAYES_METRICS", "DECODE_RULES", "answerable", "bayes_nodes", "check_metric", "decide_records",
           "decode_rule", "expected_scores", "rule_spec"]

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


def answerable(allowed, inner: bool) -> np.ndarray | None:
    """The nodes a rule may answer under a restriction (:class:`hiervision.restrict.Allowed`): the allowed end
    classes, and with inner answers every node above one of them; None when nothing is restricted."""
    if allowed is None:
        return None
    return allowed.reach if inner else allowed.ends


def decide_records(tree, ends: str, decoded: list[dict], spec: str, allowed=None) -> list[dict]:
    """The runtime's decision rule: each decoded record (``path_ids``, ``path_probability``,
    ``node_scores`` already calibrated) gets the answer of ``spec`` (CRM is the LCA-height rule over end
    classes) and that answer's probability — of being the truth for an end class, of covering it for
    an inner node. The ``top_k`` alternatives stay the model's own ranking. ``allowed``: the answer is one
    of these classes (or above one, for inner answers)."""
    rule, metric, inner = decode_rule(spec)
    if rule == "argmax" or not decoded:
        return decoded
    q = end_distribution(np.stack([np.asarray(d["node_scores"], dtype=np.float64) for d in decoded]), tree, ends)
    nodes = bayes_nodes(q, tree, metric or "severity", inner, answerable(allowed, inner))
    prob = _view(tree).subtree_sum(q) if inner else q
    return [{**d, "path_ids": list(tree.path(int(n))), "path_probability": float(prob[r, n])}
            for r, (d, n) in enumerate(zip(decoded, nodes))]


def _view(tree) -> TreeView:
    """The numpy view of ``tree`` (a :class:`~hiervision.taxonomy.Taxonomy` keeps one; a view is itself)."""
    return tree if isinstance(tree, TreeView) else tree.view


def expected_scores(q: np.ndarray, tree, metric: str) -> np.ndarray:
    """``(B, N+1)`` float64 expected score under ``q`` of answering each node (the root: −inf)."""
    check_metric(metric)
    t = _view(tree)
    q = _check_q(q, t.num_nodes)
    if metric == "path_accuracy":
        out = q.copy()
    elif metric == "severity":
        m = t.subtree_sum(q.T, nodes_first=True)  # (N+1, B) node marginals
        step = np.zeros_like(m)
        step[1:] = m[1:] * (t.heights[1:] - t.heights[t.parent[1:]])[:, None]
        out = -(t.path_sum(step, nodes_first=True) + t.heights[0] * m[0]).T  # E[height(lca)] per answer
    else:
        out = np.empty_like(q)
        n, d = t.num_nodes, t.max_depth
        nodes = np.arange(1, n)
        weight = 2.0 / (t.depths[:, None] + np.arange(1, d + 1)[None, :])  # (N+1, D): 2 / (d_a + e)
        rows = max(1, _CHUNK // (n * d))
        buffer = np.empty((n, min(rows, len(q)), d))  # one scratch block for every chunk
        for s in range(0, len(q), rows):
            qc = q[s : s + rows]
            mass = buffer[:, : len(qc)]
            mass.fill(0.0)
            mass[nodes, :, t.depths[nodes] - 1] = qc[:, nodes].T  # truth at node v sits at depth d_v
            t.subtree_sum(mass, nodes_first=True, inplace=True)  # the root is in no node set: path_sum leaves it out
            out[s : s + rows] = np.einsum("nbe,ne->bn", t.path_sum(mass, nodes_first=True, inplace=True), weight)
    out[:, 0] = -np.inf
    return out


def bayes_nodes(q: np.ndarray, tree, metric: str, allow_inner: bool = False, only: np.ndarray | None = None,
                scores: np.ndarray | None = None) -> np.ndarray:
    """``(B,)`` int64: per row of ``q`` ``(B, N+1)``, the node (never the root) of largest expected
    ``metric`` (module docstring); ``allow_inner=False`` keeps the answer to end classes; ``only``: ``(N+1,)``
    bool, the nodes an answer may be at all (answers restricted to some classes: :mod:`hiervision.restrict`);
    ``scores``: :func:`expected_scores` of ``q`` when the caller keeps them (several rules read one metric's)."""
    t = _view(tree)
    q = _check_q(q, t.num_nodes)
    score = expected_scores(q, t, metric) if scores is None else np.array(scores, dtype=np.float64)
    if allow_inner:  # one mask for every row
        allowed = np.ones(t.num_nodes, dtype=bool) if only is None else only.copy()
    else:
        allowed = t.leaf_mask[None, :] | (q > 0)
        if only is not None:
            allowed &= only[None, :]
    allowed[..., 0] = False
    np.putmask(score, ~np.broadcast_to(allowed, score.shape), -np.inf)
    best = score.max(1, keepdims=True)
    near = score >= best - 1e-9 * np.maximum(np.abs(best), 1.0)
    out = near.argmax(1)  # the first (lowest) id left
    tied = np.flatnonzero(near.sum(1) > 1)
    if len(tied):  # ties: the likelier truth, then the likelier cover
        near_t, q_t = near[tied], q[tied]
        for key in (q_t, t.subtree_sum(q_t)):
            k = np.where(near_t, key, -np.inf)
            near_t &= k >= k.max(1, keepdims=True) - 1e-12
        out[tied] = near_t.argmax(1)
    return out


def _check_q(q: np.ndarray, n: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != n:
        raise ValueError(f"end-class distribution must be (B, {n}) for this tree, got shape {q.shape}")
    return q
