"""Evaluation metrics for path predictions in a class tree.

Everything is vectorised torch so that the same code scores 100k images over ~1000 nodes on CPU or
GPU. Conventions follow :mod:`hiervision.taxonomy`: paths are ``(B, D)`` node ids padded with
:data:`~hiervision.taxonomy.PAD`; multi-label sets are ``(B, N+1)`` bool masks over nodes whose
column 0 (the root) never counts.

Single-label metrics take PAD-padded predicted and true paths of any widths (they are padded to a
common width here), so targets may end at inner nodes (coarse labels, variable-depth trees).
Multi-label metrics follow Koo et al. (2018), Sec. 4.2: a path is identified by its end node.

Ratios with an empty denominator are reported as ``0.0`` rather than NaN so that reports stay valid
JSON; :func:`mistake_severity` returns ``None`` when it is undefined (no mistakes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from hiervision.decoding import Prediction, last_node, tree_tables
from hiervision.distributions import end_distribution, node_marginals, rewards
from hiervision.taxonomy import PAD, Taxonomy

__all__ = [
    "calibration_points",
    "calibration_report",
    "depth_severity",
    "evaluate",
    "expected_calibration_error",
    "hierarchical_distance_at_k",
    "hierarchical_prf",
    "leaf_accuracy",
    "length_diagnostics",
    "level_accuracy",
    "path_accuracy_by_length",
    "mistake_severity",
    "node_accuracy",
    "node_accuracy_final_only",
    "node_f1",
    "node_prf",
    "operating_curve",
    "pareto_area",
    "path_accuracy",
    "path_f1",
    "path_prf",
    "select_threshold",
    "target_paths",
    "valid_path_rate",
    "valid_paths",
]

# rows per chunk for the dense (B, N+1) fallbacks: bounds memory at ~16M elements per tensor
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------- helpers
def _div(num: float | torch.Tensor, den: float | torch.Tensor) -> float:
    """Ratio as a Python float; 0.0 when the denominator is 0 (keeps reports JSON-serialisable)."""
    num, den = float(num), float(den)
    return num / den if den else 0.0


def _pad_to(paths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(paths, (0, width - paths.shape[1]), value=PAD)


def _as_paths(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).long()
    if x.dim() != 2:
        raise ValueError(f"expected (B, D) PAD-padded paths, got shape {tuple(x.shape)}")
    return x


def _align(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as long ``(B, D)`` on pred's device, padded to one width."""
    pred = _as_paths(pred)
    true = _as_paths(true).to(pred.device)
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions but {len(true)} targets")
    width = max(pred.shape[1], true.shape[1])
    return _pad_to(pred, width), _pad_to(true, width)


def _lca(taxonomy: Taxonomy, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Vectorised :meth:`Taxonomy.lca`: the deepest shared entry of the two root paths (0 = root).

    Ids outside ``1..N`` (PAD, EOS, garbage) share only the root with anything.
    """
    pm = taxonomy.path_matrix.to(a.device)
    n = taxonomy.num_nodes
    pa = pm[torch.where((a > 0) & (a < n), a, 0)]
    pb = pm[torch.where((b > 0) & (b < n), b, 0)]
    shared = ((pa == pb) & (pa != PAD)).long().cumprod(1).sum(1)  # common prefix length
    return torch.where(shared > 0, pa.gather(1, (shared - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)


def _multihot(paths: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``(B, D)`` paths → ``(B, N+1)`` bool of the classes they contain (PAD, root and bad ids dropped)."""
    ids = torch.where((paths > 0) & (paths < num_nodes), paths, 0)
    out = torch.zeros(len(paths), num_nodes, dtype=torch.bool, device=paths.device)
    out.scatter_(1, ids, True)
    out[:, 0] = False
    return out


def _deepest(taxonomy: Taxonomy, marks: torch.Tensor) -> torch.Tensor:
    """Ancestor-close a node mask and keep the nodes with no marked child: the path ends it implies."""
    return taxonomy.path_ends(taxonomy.close_upwards(marks))


# ---------------------------------------------------------------------- single-label
def target_paths(targets: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """``(B,)`` target node ids → ``(B, D)`` PAD-padded true paths (inner nodes allowed)."""
    return taxonomy.encode_paths(torch.as_tensor(targets))


def valid_paths(pred: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """``(B,)`` bool: the path is non-empty, every node is a class whose parent is the previous node
    (the root for the first), and nothing but PAD follows the first PAD.

    Autoregressive decoders can emit anything, so this is checked rather than assumed.
    """
    p = _as_paths(pred)
    if p.shape[1] == 0:
        return torch.zeros(len(p), dtype=torch.bool, device=p.device)
    n = taxonomy.num_nodes
    is_pad = p == PAD
    is_class = (p > 0) & (p < n)
    parent = taxonomy.parent_tensor.to(p.device)[torch.where(is_class, p, 0)]
    prev = torch.cat([torch.zeros_like(p[:, :1]), p[:, :-1]], dim=1)
    links_ok = is_pad | (is_class & (parent == prev))
    after_pad = is_pad.long().cummax(1).values.bool()
    return links_ok.all(1) & ~(after_pad & ~is_pad).any(1) & ~is_pad[:, 0]


def valid_path_rate(pred: torch.Tensor, taxonomy: Taxonomy) -> float:
    """Share of predicted paths that exist in the tree (see :func:`valid_paths`)."""
    v = valid_paths(pred, taxonomy)
    return _div(v.sum(), v.numel())


def path_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Share of samples whose whole predicted path equals the true path (Koo et al.'s path accuracy).

    A prediction that goes deeper or stops earlier than the target is wrong.
    """
    p, t = _align(pred, true)
    return _div((p == t).all(1).sum(), len(p))


def path_accuracy_by_length(pred: torch.Tensor, true: torch.Tensor) -> dict[int, float]:
    """Path accuracy over the samples whose true path has each length (Guo et al.'s variable-length
    WordNet paths): ``{length: accuracy}``, lengths that occur only."""
    p, t = _align(pred, true)
    lengths = (t != PAD).sum(1)
    exact = (p == t).all(1)
    return {int(n): _div(exact[lengths == n].sum(), (lengths == n).sum()) for n in lengths.unique().tolist()}


def length_diagnostics(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """Where and how autoregressive heads go wrong on variable-length paths (JSON-ready).

    Path accuracy alone cannot say whether a head stops too early, runs on too far, or takes a wrong
    branch and compounds it; these breakdowns can:

    * ``length_confusion`` — ``{true length: {predicted length: count}}``;
    * ``too_short`` / ``too_long`` / ``right_length`` — shares of all samples by predicted length;
    * ``stopped_early`` — share of samples whose prediction is a strict prefix of the true path (every
      node right, only the stop wrong); ``ran_on`` — the true path is a strict prefix of the prediction;
    * ``first_wrong_level`` — ``{level: count}`` over wrong predictions: the first level (1-based) where
      they differ, a missing or an extra node counting as a difference at its level;
    * ``level_accuracy_given_prefix`` — at each level, accuracy over the samples whose true path reaches
      it and whose levels above are all right: a per-step error rate free of compounding (a greedy
      decoder's level accuracy falls faster than this when early mistakes derail later steps);
    * ``path_accuracy_by_length`` and ``num_samples_by_length`` — ``{true length: ...}``.
    """
    p, t = _align(pred, true)
    width = p.shape[1]
    p_len, t_len = (p != PAD).sum(1), (t != PAD).sum(1)
    same = p == t
    exact = same.all(1)
    prefix_ok = same.long().cumprod(1)  # 1 while every level so far agrees
    agree = prefix_ok.sum(1)  # length of the common prefix (PAD == PAD counts, so exact rows reach width)
    confusion: dict[int, dict[int, int]] = {}
    for tl, pl in torch.stack([t_len, p_len], 1).tolist():
        row = confusion.setdefault(int(tl), {})
        row[int(pl)] = row.get(int(pl), 0) + 1
    wrong = ~exact
    first = (agree[wrong] + 1).tolist()
    first_wrong = {lv: first.count(lv) for lv in sorted(set(first))}
    has = t != PAD
    above_ok = F.pad(prefix_ok, (1, 0), value=1)[:, :width].bool()
    reach = has & above_ok
    n = len(t)
    depth = int(t_len.max()) if n else 0
    given_prefix = [_div((same & reach)[:, i].sum(), reach[:, i].sum()) for i in range(depth)]
    return {
        "length_confusion": {k: dict(sorted(v.items())) for k, v in sorted(confusion.items())},
        "too_short": _div((p_len < t_len).sum(), n),
        "too_long": _div((p_len > t_len).sum(), n),
        "right_length": _div((p_len == t_len).sum(), n),
        "stopped_early": _div((wrong & (agree == p_len) & (p_len < t_len)).sum(), n),
        "ran_on": _div((wrong & (agree == t_len) & (p_len > t_len)).sum(), n),
        "first_wrong_level": first_wrong,
        "level_accuracy_given_prefix": given_prefix,
        "path_accuracy_by_length": path_accuracy_by_length(p, t),
        "num_samples_by_length": {int(k): int(c) for k, c in zip(*t_len.unique(return_counts=True))},
    }


def node_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Koo et al.'s node accuracy: share of all *target-path* nodes that the predicted path gets right.

    Positional and micro-averaged: target node at level t counts as correct when ``pred[t] == true[t]``;
    the sum over samples is divided by the total number of target nodes. Predicted nodes deeper than
    the target are ignored (they are penalised by :func:`path_accuracy` instead).

    For flat models pass the taxonomy path implied by the predicted class (``taxonomy.encode_paths``):
    that is Koo's **Remark 1** convention ("if the final node is correctly predicted, all its
    predecessors are correctly predicted as well"), and it also credits correct ancestors of a wrong
    class. See :func:`node_accuracy_final_only` for the strict reading.
    """
    p, t = _align(pred, true)
    has = t != PAD
    return _div(((p == t) & has).sum(), has.sum())


def node_accuracy_final_only(pred_nodes: torch.Tensor, true: torch.Tensor) -> float:
    """Strict node accuracy for models that predict only a final node (no implied ancestors).

    A correct final node earns all ``|target path|`` nodes (as in Koo's Remark 1); a wrong one earns
    only the target nodes equal to the predicted node itself — 1 when it is an ancestor of the target
    (it sits at its own level), else 0. Correct ancestors of a wrong class earn nothing, unlike
    :func:`node_accuracy` on the implied path.

    Args:
        pred_nodes: ``(B,)`` predicted node ids.
        true: ``(B, D)`` PAD-padded true paths.
    """
    t = _as_paths(true)
    nodes = torch.as_tensor(pred_nodes).long().to(t.device).reshape(-1)
    if len(nodes) != len(t):
        raise ValueError(f"{len(nodes)} predictions but {len(t)} targets")
    has = t != PAD
    length = has.sum(1)
    hits = ((t == nodes[:, None]) & has).sum(1)
    credit = torch.where(nodes == last_node(t), length, hits)
    return _div(credit.sum(), length.sum())


def level_accuracy(pred: torch.Tensor, true: torch.Tensor) -> list[float]:
    """Per-level top-1 accuracy (Guo et al.'s coarse/fine accuracies), one float per target level.

    Level t is scored over the samples whose target reaches level t, so variable-depth targets
    never count as wrong at levels they do not have. The list is as long as the deepest target.
    """
    p, t = _align(pred, true)
    has = t != PAD
    depth = int(has.sum(1).max()) if len(t) else 0
    correct = ((p == t) & has).sum(0)
    counts = has.sum(0)
    return [_div(correct[i], counts[i]) for i in range(depth)]


def leaf_accuracy(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Share of samples whose predicted final node equals the target node (flat top-1 accuracy)."""
    p, t = _align(pred, true)
    return _div((last_node(p) == last_node(t)).sum(), len(p))


def _set_counts(
    pred: torch.Tensor, true: torch.Tensor, taxonomy: Taxonomy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample ``|P ∩ T|, |P|, |T|`` of the ancestor-closed node sets (root excluded).

    Valid paths are already ancestor-closed and two root paths share exactly their positional prefix,
    so the common case is O(B·D). Rows with an invalid path fall back to dense closed masks, in chunks.
    """
    p, t = _align(pred, true)
    inter = ((p == t) & (t != PAD)).sum(1)
    n_pred = (p != PAD).sum(1)
    n_true = (t != PAD).sum(1)
    bad = (~(valid_paths(p, taxonomy) & valid_paths(t, taxonomy))).nonzero().squeeze(1)
    if bad.numel():
        n = taxonomy.num_nodes
        step = max(1, _CHUNK_ELEMENTS // n)
        for s in range(0, bad.numel(), step):
            rows = bad[s : s + step]
            cp = taxonomy.close_upwards(_multihot(p[rows], n))
            ct = taxonomy.close_upwards(_multihot(t[rows], n))
            inter[rows] = (cp & ct).sum(1)
            n_pred[rows] = cp.sum(1)
            n_true[rows] = ct.sum(1)
    return inter, n_pred, n_true


def hierarchical_prf(
    pred: torch.Tensor,
    true: torch.Tensor,
    taxonomy: Taxonomy,
    average: Literal["micro", "macro"] = "micro",
) -> tuple[float, float, float]:
    """Hierarchical precision, recall and F1 (Kiritchenko et al., 2005) of single-label paths.

    Each sample's sets are its predicted / true nodes plus all their ancestors, root excluded; for a
    valid path that is just the path's nodes. Every node of an *invalid* predicted path also brings its
    ancestors (it implies them), which is where this differs from ``hiclass.metrics`` (it takes a row's
    labels as they are). Empty sets count as 0 (hiclass raises ZeroDivisionError there).

    * ``micro``: ``hP = Σ|P∩T| / Σ|P|``, ``hR = Σ|P∩T| / Σ|T|``, ``hF = 2·hP·hR / (hP + hR)``.
    * ``macro``: per-sample ``hP_i, hR_i, hF_i`` then the mean of each. As in
      ``hiclass.metrics.f1(average="macro")``, macro hF is the **mean of per-sample F1**, not the F1
      of mean precision and recall.
    """
    inter, n_pred, n_true = _set_counts(pred, true, taxonomy)
    if average == "micro":
        hp, hr = _div(inter.sum(), n_pred.sum()), _div(inter.sum(), n_true.sum())
        return hp, hr, _div(2 * hp * hr, hp + hr)
    if average == "macro":
        if len(inter) == 0:
            return 0.0, 0.0, 0.0
        inter, n_pred, n_true = inter.double(), n_pred.double(), n_true.double()
        p_i = torch.where(n_pred > 0, inter / n_pred.clamp(min=1), 0.0)
        r_i = torch.where(n_true > 0, inter / n_true.clamp(min=1), 0.0)
        f_i = torch.where(p_i + r_i > 0, 2 * p_i * r_i / (p_i + r_i).clamp(min=1e-300), 0.0)
        return float(p_i.mean()), float(r_i.mean()), float(f_i.mean())
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def mistake_severity(pred_nodes: torch.Tensor, true_nodes: torch.Tensor, taxonomy: Taxonomy) -> float | None:
    """Mean height of the lowest common ancestor of predicted and true node, over mistakes only.

    Bertinetto et al. (2020), "Making Better Mistakes": accuracy says how often a model is wrong, this
    says how badly (0 is impossible for a mistake between leaves; the root's height is the worst).
    Heights are :attr:`Taxonomy.heights`. ``None`` when there are no mistakes. Predicted ids outside
    the tree (e.g. PAD from an empty path) share only the root.
    """
    mistakes = _mistakes(pred_nodes, true_nodes, taxonomy)
    if mistakes is None:
        return None
    _, lca = mistakes
    heights = torch.tensor(taxonomy.heights, dtype=torch.float64, device=lca.device)
    return float(heights[lca].mean())


def _mistakes(pred_nodes: torch.Tensor, true_nodes: torch.Tensor, taxonomy: Taxonomy
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(true node, LCA with the answer)`` of every wrong answer, ``None`` when there is none."""
    pred = torch.as_tensor(pred_nodes).long().reshape(-1)
    true = torch.as_tensor(true_nodes).long().reshape(-1).to(pred.device)
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions but {len(true)} targets")
    wrong = pred != true
    if not wrong.any():
        return None
    return true[wrong], _lca(taxonomy, pred[wrong], true[wrong])


def depth_severity(pred_nodes: torch.Tensor, true_nodes: torch.Tensor, taxonomy: Taxonomy) -> float | None:
    """Mean number of the true path's levels a mistake misses, ``depth(t) − depth(lca(a, t))``, over
    mistakes only (``None`` without any): mistake severity measured from the true class up.

    On a tree whose leaves all lie at one depth it equals :func:`mistake_severity` (an LCA's height is
    then the leaves' depth minus its own). On a variable-depth tree the LCA height is not: a node's
    height is its *deepest* descendant's distance, so one deep branch makes every ancestor it shares
    costly, and a mistake between two shallow leaves under such an ancestor counts as many levels
    lost as one between deep leaves. Counting from the truth scores the levels of its path the answer
    actually got wrong (benchmarks/DECISIONS.md, "CRM on deep variable-depth trees").
    """
    mistakes = _mistakes(pred_nodes, true_nodes, taxonomy)
    if mistakes is None:
        return None
    true, lca = mistakes
    depth = taxonomy.depth_tensor.to(lca.device).double()
    return float((depth[true] - depth[lca]).mean())


# ---------------------------------------------------------------------- multi-label
def _prf(tp: torch.Tensor, n_pred: torch.Tensor, n_true: torch.Tensor) -> tuple[float, float, float]:
    return _div(tp, n_pred), _div(tp, n_true), _div(2 * tp, n_pred + n_true)


def path_prf(pred_ends: torch.Tensor, true_ends: torch.Tensor) -> tuple[float, float, float]:
    """Micro precision, recall, F1 over (sample, path) pairs; a path is named by its end node.

    Koo et al.'s path F1 (Sec. 4.2). Inputs are ``(B, N+1)`` bool end marks; column 0 is ignored.
    """
    p, t = pred_ends.bool(), true_ends.bool().to(pred_ends.device)
    p, t = p[:, 1:], t[:, 1:]
    return _prf(torch.count_nonzero(p & t), torch.count_nonzero(p), torch.count_nonzero(t))


def path_f1(pred_ends: torch.Tensor, true_ends: torch.Tensor) -> float:
    """Koo et al.'s path F1: micro F1 over (sample, path end) pairs (see :func:`path_prf`)."""
    return path_prf(pred_ends, true_ends)[2]


def node_prf(pred_ends: torch.Tensor, true_ends: torch.Tensor, taxonomy: Taxonomy) -> tuple[float, float, float]:
    """Micro precision, recall, F1 over (sample, node) pairs of the ancestor-closed node sets.

    Koo et al.'s node F1 (Sec. 4.2): a wrong leaf on a right branch still earns its correct ancestors.
    """
    p = taxonomy.close_upwards(pred_ends.bool())[:, 1:]
    t = taxonomy.close_upwards(true_ends.bool().to(pred_ends.device))[:, 1:]
    return _prf(torch.count_nonzero(p & t), torch.count_nonzero(p), torch.count_nonzero(t))


def node_f1(pred_ends: torch.Tensor, true_ends: torch.Tensor, taxonomy: Taxonomy) -> float:
    """Koo et al.'s node F1 (see :func:`node_prf`)."""
    return node_prf(pred_ends, true_ends, taxonomy)[2]


def _path_min(taxonomy: Taxonomy, scores_t: torch.Tensor) -> torch.Tensor:
    """Node-major ``(N+1, b)`` scores → lowest score on each node's root path (the largest threshold
    that keeps the node). Node-major so that each level's update reads contiguous rows.
    """
    parents = taxonomy.parent_tensor.to(scores_t.device)
    out = scores_t.clone()
    out[0] = float("inf")
    for level in taxonomy.levels:  # top-down, so parents are final before their children
        idx = torch.tensor(level, dtype=torch.long, device=out.device)
        out[idx] = torch.minimum(out[idx], out[parents[idx]])
    return out


def select_threshold(
    scores: torch.Tensor,
    true_ends: torch.Tensor,
    taxonomy: Taxonomy,
    metric: Literal["path_f1", "node_f1"] = "path_f1",
    grid: Sequence[float] | torch.Tensor | None = None,
) -> tuple[float, float]:
    """Threshold for :func:`~hiervision.decoding.threshold_paths` that maximises F1 on validation data.

    Koo et al. pick the threshold on the validation set and reuse it on test. Every grid point is
    scored exactly (same result as calling ``threshold_paths`` per threshold) without decoding each:
    a node is kept for ``τ ≤ m`` where ``m`` is the lowest score on its path, and is a path end for
    ``max_child(m) < τ ≤ m``, so per-threshold counts come from two ``searchsorted`` calls.

    Args:
        scores: ``(B, N+1)`` sigmoid scores.
        true_ends: ``(B, N+1)`` bool true path ends.
        metric: ``"path_f1"`` or ``"node_f1"``.
        grid: candidate thresholds (default 0.05, 0.06, …, 0.95).

    Returns:
        ``(threshold, value)``; ties go to the smallest threshold.
    """
    if metric not in ("path_f1", "node_f1"):
        raise ValueError(f"metric must be 'path_f1' or 'node_f1', got {metric!r}")
    if grid is None:
        nominal = torch.arange(5, 96, dtype=torch.float64) / 100
    else:
        nominal = torch.as_tensor(grid, dtype=torch.float64)
    nominal = nominal.reshape(-1).sort().values
    if nominal.numel() == 0:
        raise ValueError("empty threshold grid")
    dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    # compare in the scores' dtype, exactly like `scores >= threshold` in threshold_paths
    g = nominal.to(scores.device, dtype).contiguous()
    size = len(g)
    true_ends = true_ends.bool().to(scores.device)
    truth = true_ends if metric == "path_f1" else taxonomy.close_upwards(true_ends)
    n_true = int(truth[:, 1:].sum())
    tp = torch.zeros(size + 1, dtype=torch.long, device=scores.device)
    n_pred = torch.zeros_like(tp)
    parents = taxonomy.parent_tensor.to(scores.device)[1:]
    step = max(1, _CHUNK_ELEMENTS // taxonomy.num_nodes)
    for s in range(0, len(scores), step):
        sc = scores[s : s + step].T.to(dtype).contiguous()  # node-major (N+1, b)
        sc = sc.masked_fill(sc.isnan(), float("-inf"))  # NaN never passes `>=`
        m = _path_min(taxonomy, sc)
        hi = torch.searchsorted(g, m[1:], right=True)  # thresholds g[k] <= m: k < hi
        if metric == "path_f1":
            index = parents.unsqueeze(1).expand(-1, m.shape[1])
            cmax = torch.full_like(m, float("-inf")).scatter_reduce_(0, index, m[1:], "amax")
            lo = torch.searchsorted(g, cmax[1:], right=True)
        else:
            lo = torch.zeros_like(hi)
        hit = truth[s : s + step, 1:].T
        for counts, sel in ((n_pred, slice(None)), (tp, hit)):
            counts += torch.bincount(lo[sel].reshape(-1), minlength=size + 1)
            counts -= torch.bincount(hi[sel].reshape(-1), minlength=size + 1)
    tp, n_pred = tp.cumsum(0)[:size], n_pred.cumsum(0)[:size]
    f1 = torch.where(n_pred + n_true > 0, 2 * tp.double() / (n_pred + n_true).clamp(min=1).double(), 0.0)
    best = int(f1.argmax())  # first maximum: the smallest threshold among ties
    return float(nominal[best]), float(f1[best])


# ---------------------------------------------------------------------- the report
def score_metrics(q: torch.Tensor, end: torch.Tensor, taxonomy: Taxonomy, m: torch.Tensor | None = None) -> dict:
    """The metrics of the scores alone (end-class distribution ``q`` against the true end nodes): calibration,
    hdist@k, HOPS and the operating-curve areas — the same for every decision rule answering from ``q``, so a
    report of several rules computes them once. ``m``: ``q``'s node marginals when the caller has them."""
    m = node_marginals(q, taxonomy) if m is None else m
    curve = operating_curve(m, end, taxonomy)
    return {**calibration_report(q, end, taxonomy, m=m), **hierarchical_distance_at_k(q, end, taxonomy),
            "hops": hops(q, end, taxonomy)["hops"],
            "operating_area_correct": curve["correct_area"], "operating_area_exact": curve["exact_area"]}


def evaluate(prediction: Prediction, targets: torch.Tensor, taxonomy: Taxonomy, q: torch.Tensor | None = None,
             scored: dict | None = None) -> dict:
    """The one metrics report used by the CLI and the trainer (plain Python values, JSON-ready).

    ``targets`` decides the task:

    * single-label — ``(B,)`` node ids (inner nodes allowed) or ``(B, D)`` PAD-padded long paths:
      ``path_accuracy``, ``node_accuracy``, ``level_accuracy`` (list), ``path_accuracy_by_length``
      (``{length: accuracy}``), ``length_diagnostics`` (:func:`length_diagnostics`), ``leaf_accuracy``,
      ``hierarchical_precision/recall/f1`` (micro), ``hierarchical_f1_macro``, ``mistake_severity`` and
      ``depth_severity`` (:func:`depth_severity`; ``None`` without mistakes), ``valid_path_rate``,
      ``num_samples``; from the scores' end-class distribution
      (:func:`~hiervision.distributions.end_distribution`; ``q``, when the caller already holds it, e.g. the
      post-hoc step's shared :class:`~hiervision.distributions.EndDistribution`; ``scored``, when it already
      holds their :func:`score_metrics`): ``ece``, ``ece_mass``,
      ``ece_per_level``, ``ece_per_level_mass`` (:func:`calibration_report`), ``hdist@1/5/20``
      (:func:`hierarchical_distance_at_k`; 1-D node-id targets only), ``hops`` (:func:`hops`) and the areas
      under Valmadre's operating curves, ``operating_area_correct`` and ``operating_area_exact``
      (:func:`operating_curve`);
    * multi-label — ``(B, N+1)`` bool or float marks: ``path_f1``, ``path_precision``,
      ``path_recall``, ``node_f1``, ``num_samples``. Marks may be path ends or ancestor-closed sets
      (:meth:`Taxonomy.encode_multihot`): both are reduced to the deepest marked nodes, the form
      :func:`~hiervision.decoding.threshold_paths` produces. Predicted ``labels`` get the same
      treatment; a prediction without ``labels`` counts as its single path.
    """
    targets = torch.as_tensor(targets)
    device = prediction.paths.device
    targets = targets.to(device)
    if len(targets) != len(prediction):
        raise ValueError(f"{len(prediction)} predictions but {len(targets)} targets")
    multi = targets.dim() == 2 and (targets.dtype == torch.bool or targets.is_floating_point())
    if multi:
        if targets.shape[1] != taxonomy.num_nodes:
            raise ValueError(f"multi-label targets need {taxonomy.num_nodes} columns, got {targets.shape[1]}")
        if prediction.labels is not None:
            pred_marks = prediction.labels.bool()
        else:
            pred_marks = _multihot(last_node(prediction.paths).unsqueeze(1), taxonomy.num_nodes)
        pred_ends, true_ends = _deepest(taxonomy, pred_marks), _deepest(taxonomy, targets > 0)
        pp, pr, pf = path_prf(pred_ends, true_ends)
        return {
            "path_f1": pf,
            "path_precision": pp,
            "path_recall": pr,
            "node_f1": node_f1(pred_ends, true_ends, taxonomy),
            "num_samples": len(targets),
        }
    true = target_paths(targets, taxonomy) if targets.dim() == 1 else _as_paths(targets)
    pred = prediction.paths.long()
    hp, hr, hf = hierarchical_prf(pred, true, taxonomy, "micro")
    decisions: dict = {}
    if len(true):
        decisions = scored if scored is not None else score_metrics(
            end_distribution(prediction, taxonomy) if q is None else q, last_node(true), taxonomy)
    return {
        "path_accuracy": path_accuracy(pred, true),
        "node_accuracy": node_accuracy(pred, true),
        "level_accuracy": level_accuracy(pred, true),
        "path_accuracy_by_length": path_accuracy_by_length(pred, true),
        "length_diagnostics": length_diagnostics(pred, true),
        "leaf_accuracy": leaf_accuracy(pred, true),
        "hierarchical_precision": hp,
        "hierarchical_recall": hr,
        "hierarchical_f1": hf,
        "hierarchical_f1_macro": hierarchical_prf(pred, true, taxonomy, "macro")[2],
        "mistake_severity": mistake_severity(last_node(pred), last_node(true), taxonomy),
        "depth_severity": depth_severity(last_node(pred), last_node(true), taxonomy),
        "valid_path_rate": valid_path_rate(pred, taxonomy),
        **decisions,
        "num_samples": len(true),
    }


# ---------------------------------------------------------------------- calibration and distance @k
def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15, scheme: Literal["width", "mass"] = "width"
) -> float:
    """ECE: ``Σ_b (n_b/n)·|accuracy_b − confidence_b|`` over confidence bins (Naeini et al., 2015).

    ``width``: ``bins`` equal intervals of [0, 1] (the usual ECE); ``mass``: bins holding equal numbers of
    samples (less sensitive to empty bins when confidences pile up near 1).
    """
    conf = torch.as_tensor(confidence).double().reshape(-1)
    ok = torch.as_tensor(correct).double().reshape(-1).to(conf.device)
    n = len(conf)
    if n == 0:
        return 0.0
    if scheme == "width":
        idx = (conf * bins).long().clamp(0, bins - 1)
    elif scheme == "mass":
        order = conf.argsort()
        idx = torch.empty_like(order)
        idx[order] = torch.arange(n, device=conf.device) * bins // n
    else:
        raise ValueError(f"ECE bins must be 'width' or 'mass', got {scheme!r}")
    count = torch.bincount(idx, minlength=bins).double()
    gap = torch.bincount(idx, ok, minlength=bins) - torch.bincount(idx, conf, minlength=bins)
    return float(gap.abs().sum() / n) if count.sum() else 0.0


def calibration_points(
    q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, m: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(confidence, correct)`` per level, then for the end class (the last entry): at level d the
    confidence is the largest marginal among the nodes at depth d and it is correct when that node is
    the target's ancestor there; samples whose target does not reach depth d are left out. ``m``: ``q``'s
    node marginals when the caller has them."""
    targets = torch.as_tensor(targets).long().to(q.device)
    m = node_marginals(q, taxonomy) if m is None else m
    true = taxonomy.encode_paths(targets)
    out = []
    for d, level in enumerate(taxonomy.levels):
        ids = torch.tensor(level, device=q.device)
        conf, arg = m[:, ids].max(1)
        has = true[:, d] != PAD
        out.append((conf[has], (ids[arg] == true[:, d])[has]))
    conf, arg = q.max(1)
    out.append((conf, arg == targets))
    return out


def calibration_report(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, bins: int = 15,
                       m: torch.Tensor | None = None) -> dict:
    """``ece`` (top-1 end class, equal-width bins), ``ece_mass`` (equal-mass bins) and the same per level
    (``ece_per_level``, ``ece_per_level_mass``) from an end-class distribution
    (:func:`hiervision.distributions.end_distribution`); ``m``: its node marginals when at hand."""
    pts = calibration_points(q, targets, taxonomy, m)
    return {
        "ece": expected_calibration_error(*pts[-1], bins, "width"),
        "ece_mass": expected_calibration_error(*pts[-1], bins, "mass"),
        "ece_per_level": [expected_calibration_error(c, k, bins, "width") for c, k in pts[:-1]],
        "ece_per_level_mass": [expected_calibration_error(c, k, bins, "mass") for c, k in pts[:-1]],
    }


def hierarchical_distance_at_k(
    q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, ks: Sequence[int] = (1, 5, 20),
    ranking: torch.Tensor | None = None,
) -> dict[str, float]:
    """Bertinetto et al.'s average hierarchical distance @k: the mean height of the lowest common
    ancestor of the target and each of the k top-ranked end classes, over **all** samples (right ones
    count 0 at rank 1). Ranking is by ``q`` (or lower ``ranking`` first, e.g. CRM's expected risk);
    k is capped at the number of end classes."""
    targets = torch.as_tensor(targets).long().to(q.device)
    classes = (q > 0).any(0) | _leaf_mask(taxonomy, q.device)
    key = (q if ranking is None else -ranking).masked_fill(~classes, float("-inf"))
    kmax = min(max(ks), int(classes.sum()))
    top = key.topk(kmax, dim=1).indices  # (B, k)
    tables = tree_tables(taxonomy, q.device)
    dist = tables.height[tables.lca(targets.unsqueeze(1), top)].float()  # (B, k): only the top k vs the truth
    return {f"hdist@{k}": float(dist[:, : min(k, kmax)].mean()) if len(q) else 0.0 for k in ks}


#: HOPS compares every image's whole ranking: at most this many (image, class) pairs are scored, on evenly spaced
#: images — every image of a 200-class test set up to 25,000 images, 76 images of a 65,000-class WordNet tree
HOPS_PAIRS = 5_000_000


def hops(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, ranking: torch.Tensor | None = None,
         k: int | None = None) -> dict[str, float | int]:
    """Sani & Anand's HOPS (CVPR 2026): how close each image's ranking of *all* end classes is to the ideal one,
    in which classes come in order of their distance (LCA height, as in :func:`hierarchical_distance_at_k`) to the
    truth.

    Per image: ``e`` is the ideal sequence of dense distance ranks (0 for the truth, 1 for the nearest distance
    present, …: classes at one distance share a rank, so any order among them is as good), ``o`` the ranks in
    the order the model ranks the classes (by ``q``, or lower ``ranking`` first). Position weights fall from
    ``2^-r`` at the start of rank group ``r`` linearly towards the next group's ``2^-(r+1)`` (the last group towards
    0); the error ``Σ w·|e − o|`` is divided by that of the reversed ideal order and ``1 −`` it is clipped to
    [0, 1]. ``k`` scores the top ``k`` positions only, against the ideal order with its top ``k`` reversed (the
    authors' HOPS@k). Returns ``{"hops": mean, "hops_images": images scored}`` (at most :data:`HOPS_PAIRS` pairs)."""
    targets = torch.as_tensor(targets).long().to(q.device)
    classes = ((q > 0).any(0) | _leaf_mask(taxonomy, q.device)).nonzero().squeeze(1)
    c = len(classes)
    take = torch.linspace(0, len(q) - 1, min(len(q), max(1, HOPS_PAIRS // max(c, 1)))).round().long().unique() \
        if len(q) else torch.zeros(0, dtype=torch.long)
    if not len(take) or c < 2:
        return {"hops": 1.0 if len(take) else 0.0, "hops_images": len(take)}
    tables = tree_tables(taxonomy, q.device)
    key = (q if ranking is None else -ranking)[take][:, classes]
    dist = tables.height[tables.lca(targets[take].unsqueeze(1), classes.unsqueeze(0))]  # (B, C)
    ideal, order = dist.sort(dim=1, stable=True)
    e = F.pad((ideal.diff(dim=1) != 0).long().cumsum(1), (1, 0))  # dense ranks, ascending by position
    rank = torch.empty_like(e).scatter_(1, order, e)  # each class's rank
    o = rank.gather(1, key.argsort(dim=1, descending=True, stable=True))
    left = torch.searchsorted(e, e, right=False)
    size = torch.searchsorted(e, e, right=True) - left
    pos = torch.arange(c, device=q.device).expand_as(e)
    top = 2.0 ** -e.double()
    floor = torch.where(e == e[:, -1:], 0.0, top / 2)  # the next group's start; the last group falls to 0
    w = top - (top - floor) * (pos - left) / size
    worst = e.flip(1) if k is None else torch.cat([e[:, :k].flip(1), e[:, k:]], 1)
    z = (w * (e - worst).abs()).sum(1)
    if k is not None:
        w = w.masked_fill(pos >= k, 0)
    err = (w * (e - o).abs()).sum(1)
    score = torch.where(z > 0, (1 - err / z.clamp(min=1e-12)).clamp(0, 1), 1.0)
    return {"hops": float(score.mean()), "hops_images": len(take)}


def _leaf_mask(taxonomy: Taxonomy, device: torch.device | str) -> torch.Tensor:
    mask = torch.zeros(taxonomy.num_nodes, dtype=torch.bool, device=device)
    mask[list(taxonomy.leaves)] = True
    return mask


# ---------------------------------------------------------------------- operating curves (Valmadre)
def operating_curve(marginals: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy) -> dict:
    """Valmadre's operating curve (NeurIPS 2022, "Hierarchical classification at multiple operating
    points"): at a threshold τ every image answers the most specific node whose probability (node
    marginal: the truth lies under it) is ≥ τ; sweeping τ from 1 down traces, over the data set, how
    often the answer is *correct* (the truth lies under it, or it lies under the truth) and *exact*
    (it is the truth) against its mean *specificity* (Deng et al.'s information, ``log|leaves| −
    log|leaves under v|``, over its largest value: 0 for the root, 1 for a leaf).

    The DARTS curve (:func:`hiervision.decisions.accuracy_specificity_curve`) fits one λ per accuracy
    target; this one needs no fitting: every threshold at once, exactly. Per image the answers form a
    short sequence (the nodes more specific than every more probable one, found by one sort), and the
    data set's curve merges them by threshold (the authors' ``infer.pareto_optimal_predictions`` and
    ``metrics.operating_curve``).

    Returns ``{"threshold", "specificity", "correct", "exact"}`` (lists, one point per distinct
    threshold, the first the most confident answers) and ``correct_area`` / ``exact_area``: the area
    under each curve's Pareto front over specificity (:func:`pareto_area`), 1 for a perfect classifier.
    """
    targets = torch.as_tensor(targets).long().to(marginals.device)
    n = len(targets)
    if n == 0:
        return {"threshold": [], "specificity": [], "correct": [], "exact": [], "correct_area": 0.0,
                "exact_area": 0.0}
    depth = taxonomy.depth_tensor.to(marginals.device)
    info = rewards(taxonomy).double().to(marginals.device)
    info = info / info.max().clamp(min=1e-12)
    paths = taxonomy.path_matrix.to(marginals.device)
    # ties in probability: the more specific first, then the deeper (a node with one child is as
    # specific as the child: answer the child)
    by_depth = depth.argsort(descending=True, stable=True)
    by_info = by_depth[info[by_depth].argsort(descending=True, stable=True)]
    rows, thresholds, nodes = [], [], []
    step = max(1, _CHUNK_ELEMENTS // taxonomy.num_nodes)
    for s in range(0, n, step):
        m = marginals[s : s + step].double().clone()
        m[:, 0] = 1.0  # the root always covers the truth
        order = by_info[m[:, by_info].argsort(dim=1, descending=True, stable=True)]  # (b, N+1) most probable first
        inf = info[order]
        best_before = F.pad(inf.cummax(1).values[:, :-1], (1, 0), value=-1.0)
        r, k = (inf > best_before).nonzero(as_tuple=True)  # more specific than every more probable node
        rows.append(r + s)
        nodes.append(order[r, k])
        thresholds.append(m[r, order[r, k]])
    row, node, tau = torch.cat(rows), torch.cat(nodes), torch.cat(thresholds)
    t = targets[row]
    under = (node == 0) | (paths[t, (depth[node] - 1).clamp(min=0)] == node)  # the answer covers the truth
    above = paths[node, (depth[t] - 1).clamp(min=0)] == t  # the answer lies under the truth
    values = torch.stack([info[node], (under | above).double(), (node == t).double()], 1)  # (R, 3)
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]  # records come grouped by image, most confident first
    delta = values - torch.where(first.unsqueeze(1), 0.0, values.roll(1, 0))
    start = delta[first].sum(0)
    later = ~first
    tau, delta = tau[later], delta[later]
    order = tau.argsort(descending=True, stable=True)
    tau, totals = tau[order], start + delta[order].cumsum(0)
    last = torch.ones_like(tau, dtype=torch.bool)
    last[:-1] = tau[1:] != tau[:-1]  # one point per distinct threshold, after all its changes
    points = torch.cat([start.unsqueeze(0), totals[last]]) / n
    spec, correct, exact = points.T
    # the first answers are each image's most specific node of probability 1 (at least the root)
    return {"threshold": [1.0, *tau[last].tolist()], "specificity": spec.tolist(), "correct": correct.tolist(),
            "exact": exact.tolist(), "correct_area": pareto_area(spec, correct), "exact_area": pareto_area(spec, exact)}


def pareto_area(x: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the Pareto front of points ``(x, y)`` in [0, 1]²: at each x the best y any point at
    that x or beyond reaches, integrated from 0 (Valmadre's ``metrics.pareto_integrate``)."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    order = x.argsort()
    x, y = x[order], y[order]
    best = y.flip(0).cummax(0).values.flip(0)
    return float(((x - F.pad(x[:-1], (1, 0))) * best).sum())
