"""Post-hoc decision rules on a model's node scores: calibration, hedged answers, mistake-aware decoding.

Every rule reads one thing every model family produces,
:attr:`Prediction.scores <hiervision.decoding.Prediction>`, turned into an *end-class distribution* ``q``
``(B, N+1)`` (column 0 = 0, rows sum to 1) by
:func:`~hiervision.distributions.end_distribution`. From ``q`` come coherent node marginals
(:func:`~hiervision.distributions.node_marginals`: the probability that the truth lies under each node), and
on those the rules work. The rules that take a whole prediction (:func:`calibrate`, :func:`fit_decisions`,
:func:`evaluate_hedging`, :func:`hedge_records`) also take its :class:`~hiervision.distributions.EndDistribution`,
so that a caller that runs several of them (the post-hoc step) builds each distribution once:

* temperature scaling (:func:`~hiervision.distributions.apply_temperature`, :func:`fit_temperature`) —
  ``q ∝ q^(1/T)``; for the flat softmax this is exactly dividing the logits by ``T``; for path-scoring heads
  (per-level softmaxes, HierNet's routers, decoders) it scales the whole path's log-probability. It never changes the
  argmax. ``eval.calibrate: per_level`` fits one ``T`` per tree level instead and tempers each
  level's conditionals (a head with levels has one softmax per level); the argmax may then move, but a
  model's decoded paths stay as they are either way: only probabilities change.
* hedging (Deng et al., CVPR 2012, DARTS): :func:`hedge` predicts ``argmax_v (r(v) + λ)·p(v)`` with
  ``r(v) = log|leaves| − log|leaves(v)|``; :func:`fit_lambda` picks the smallest ``λ`` meeting an
  accuracy target on validation data. :func:`conformal_threshold`/:func:`conformal_nodes` give a
  split-conformal variant with a finite-sample coverage guarantee; :func:`backoff_nodes` is the naive
  baseline ("back off to the parent while its probability is below t").
* CRM decoding (Karthik et al., ICLR 2021): :func:`crm_nodes`, the end class minimising the expected
  height of the lowest common ancestor with the truth.
* Bayes-optimal decoding for a named metric (Plaud et al., ICML 2025): :func:`bayes_nodes`, the node
  of largest expected hierarchical F1, minus LCA height (CRM's answer) or path accuracy, computed on
  ancestor sums in O(N·depth) per image (:mod:`hiervision.bayes`, shared with the runtime).

The temperature and λ of a run live in ``decisions.json`` in the run folder (:func:`save_decisions`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hiervision import bayes, marginals
from hiervision.decoding import Prediction, end_mask, tree_tables
from hiervision.distributions import (  # below decisions and metrics; re-exported here, where callers know them
    EndDistribution,
    apply_temperature,
    distribution_of,
    end_distribution,
    node_marginals,
    rewards,
)
from hiervision.marginals import Temperature
from hiervision.restrict import Allowed, restrict_q
from hiervision.taxonomy import PAD, Taxonomy

__all__ = [
    "DECISIONS_FILE",
    "DECODE_RULES",
    "accuracy_specificity_curve",
    "apply_temperature",
    "calibrate",
    "backoff_nodes",
    "bayes_nodes",
    "conformal_nodes",
    "conformal_scores",
    "conformal_threshold",
    "covers",
    "crm_nodes",
    "end_distribution",
    "fit_backoff",
    "fit_decisions",
    "fit_lambda",
    "fit_temperature",
    "hedge_nodes",
    "evaluate_hedging",
    "hedge_records",
    "hedger",
    "coverage_report",
    "expected_lca_height",
    "load_decisions",
    "node_marginals",
    "ranked_classes",
    "rewards",
    "rule_nodes",
    "save_decisions",
    "set_temperature",
]

DECISIONS_FILE = "decisions.json"
#: decision rules: the model's own decoding, Karthik et al.'s conditional risk minimisation, or the
#: Bayes-optimal answer for a metric (:func:`bayes_nodes`); ``eval.decode`` names one as
#: ``argmax | crm | bayes:METRIC[:inner]`` (:func:`hiervision.bayes.decode_rule`)
DECODE_RULES = bayes.DECODE_RULES


# ---------------------------------------------------------------------- temperature
def fit_temperature(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, per_level: bool = False,
                    ends: str = "leaves", bounds: tuple[float, float] = (0.05, 20.0), iters: int = 40) -> Temperature:
    """Temperature minimising the validation negative log-likelihood of the targets (Guo et al., 2017).

    One scalar per model, found by golden-section search on ``log T`` (the NLL is unimodal there for a
    softmax); coarse targets count by the mass of the end classes under them. ``per_level``: one per
    tree level (a tuple, depth 1 first). A target's probability is the product of its path's
    conditionals, so its log-likelihood is a sum of one term per level, each depending on that level's
    temperature only: each level is fitted alone, on the samples whose target reaches it (1 where
    none does, or where no node there has a sibling).
    """
    if len(q) == 0:
        raise ValueError("fit_temperature needs at least one validation sample")
    targets = torch.as_tensor(targets).long().to(q.device)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    if per_level:
        return _fit_level_temperatures(q, targets, taxonomy, ends, lo, hi, iters)

    # q^(1/T) renormalised, read at the target: log Σ_{c under target} q_c^(1/T) − log Σ_c q_c^(1/T), over the
    # classes that hold mass (zeros stay zero), with log q computed once
    ids = ((q > 0).any(0) | end_mask(taxonomy, "leaves").to(q.device)).nonzero().squeeze(1)
    logq = q[:, ids].double().log().float()  # logs of tiny masses kept: q^(1/T) lifts them at T > 1
    col = torch.full((taxonomy.num_nodes,), -1, dtype=torch.long, device=q.device)
    col[ids] = torch.arange(len(ids), device=q.device)
    at = col[targets]  # a target that is a class: its column; a coarse one (-1): the classes under it
    coarse = (at < 0).nonzero().squeeze(1)
    under = tree_tables(taxonomy, q.device).is_ancestor(targets[coarse].unsqueeze(1), ids.unsqueeze(0))
    logq_under = logq[coarse].masked_fill(~under, float("-inf"))
    own = logq.gather(1, at.clamp(min=0).unsqueeze(1)).squeeze(1)

    def nll(log_t: float) -> float:
        inv = math.exp(-log_t)
        hit = (own * inv).index_put((coarse,), torch.logsumexp(logq_under * inv, 1))
        return float((torch.logsumexp(logq * inv, 1) - hit).clamp(max=-math.log(1e-12)).mean())

    return math.exp(_golden_min(nll, lo, hi, iters))


def _fit_level_temperatures(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, ends: str,
                            lo: float, hi: float, iters: int) -> tuple[float, ...]:
    c, stop = marginals.conditionals(q.detach().cpu().double().numpy(), taxonomy, ends)
    path = taxonomy.path_matrix[targets.cpu()].numpy()  # (B, D): the target's node at each depth, PAD past it
    temps = []
    for d, nodes in enumerate(taxonomy.levels, start=1):
        col = np.full(taxonomy.num_nodes, -1)  # node id -> its column in level d's block
        col[list(nodes)] = np.arange(len(nodes))
        rows = np.flatnonzero(path[:, d - 1] != PAD)
        cr, sr, at = c[rows], stop[rows], col[path[rows, d - 1]]

        def nll(log_t: float, cr=cr, sr=sr, at=at, d=d) -> float:
            ck, _ = marginals.temper_level(cr, sr, taxonomy, ends, d, math.exp(log_t))
            return float(-np.log(np.clip(ck[np.arange(len(at)), at], 1e-12, None)).mean())

        # a level no target reaches, or whose conditionals a temperature cannot move (only children), keeps 1
        flat = not len(rows) or nll(0.0) == nll(1.0)
        temps.append(1.0 if flat else math.exp(_golden_min(nll, lo, hi, iters)))
    return tuple(temps)


def _golden_min(f, lo: float, hi: float, iters: int) -> float:
    """Golden-section search for the minimum of a unimodal ``f`` on ``[lo, hi]``."""
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


# ---------------------------------------------------------------------- hedging (DARTS)
def hedge_nodes(marginals: torch.Tensor, taxonomy: Taxonomy, lam: float, ends: str = "leaves") -> torch.Tensor:
    """DARTS: ``(B,)`` node ids ``argmax_v (r(v) + λ)·p(v)`` over every node, the root (id 0) included
    (ties go to the deepest node).

    ``marginals``: :func:`~hiervision.distributions.node_marginals` (probability the truth lies under each
    node). ``λ = 0`` answers the most probable end class (for leaf rewards); ``λ → ∞`` backs off to the
    root, which is always right. Many λ on the same marginals: :func:`hedger`.
    """
    if lam < 0:
        raise ValueError(f"hedging multiplier λ must be ≥ 0, got {lam}")
    r = rewards(taxonomy, ends).to(marginals.device, marginals.dtype)
    return _hedged(marginals, r, _depths(taxonomy, marginals.device), lam)


def hedger(marginals: torch.Tensor, taxonomy: Taxonomy, ends: str = "leaves") -> Callable[[float], torch.Tensor]:
    """``λ ↦ hedge_nodes(marginals, taxonomy, λ, ends)``, for the many λ of a bisection or a sweep on the same
    marginals: the nodes that cannot come within the tie band of the best score at any λ ≥ 0 are dropped
    once, which on a 10⁵-node tree leaves a few hundred columns.

    Why that is exact: scores only grow with λ and the root's is λ, so the best is at least ``max(S₀, λ)``,
    ``S₀`` the best at λ = 0; a node's margin ``(r + λ)·p − max(S₀, λ)`` is largest at ``λ = S₀`` unless
    ``p ≈ 1``. A node is kept when it reaches the band there (with room for float32 rounding) in some row; the
    returned function's ``kept`` holds their ids."""
    r = rewards(taxonomy, ends).to(marginals.device, marginals.dtype)
    s0 = (r * marginals).max(1, keepdim=True).values.clamp(min=0)
    slack = 2e-6 * s0.clamp(min=1)
    keep = (((r + s0) * marginals >= s0 - slack) | (marginals >= 1 - 2e-6)).any(0)
    keep[0] = True  # the root: its score is set, not read
    ids = keep.nonzero().squeeze(1)
    m, rk, depth = marginals[:, ids], r[ids], _depths(taxonomy, marginals.device)[ids]

    def nodes(lam: float) -> torch.Tensor:
        if lam < 0:
            raise ValueError(f"hedging multiplier λ must be ≥ 0, got {lam}")
        return ids[_hedged(m, rk, depth, lam)]

    nodes.kept = ids  # type: ignore[attr-defined]  # the node ids it reads
    return nodes


def _depths(taxonomy: Taxonomy, device: torch.device) -> torch.Tensor:
    """Node depths as small ints: the (B, N+1) tie pick below is most of a hedging call on a big tree."""
    return taxonomy.depth_tensor.to(device, torch.int8 if taxonomy.max_depth < 127 else torch.int32)


def _hedged(m: torch.Tensor, r: torch.Tensor, depth: torch.Tensor, lam: float) -> torch.Tensor:
    """The column of ``argmax (r + λ)·m`` per row, column 0 being the root (probability 1), ties to the deepest."""
    score = (r + lam) * m
    score[:, 0] = r[0] + lam  # the root's probability is 1
    # a node with one child ties with it exactly (same leaves, same reward): answer the deeper, more
    # specific one — a tolerance absorbs float noise between genuinely equal answers
    best = score.max(1, keepdim=True).values
    near = score >= best - 1e-6 * best.abs().clamp(min=1)
    return torch.where(near, depth, -1).argmax(1)


def covers(nodes: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """``(B,)`` bool: the answered node is the target or one of its ancestors (the root always is)."""
    nodes = torch.as_tensor(nodes).long()
    targets = torch.as_tensor(targets).long().to(nodes.device)
    return (nodes == 0) | tree_tables(taxonomy, nodes.device).is_ancestor(nodes, targets)


def coverage_report(nodes: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, ends: str = "leaves") -> dict:
    """Accuracy and specificity of node answers: ``accuracy`` (answer covers the truth),
    ``information_gain`` (Deng et al.: mean ``r(v)`` of right answers, 0 for wrong ones, in nats),
    ``specificity`` (the same divided by ``log|ends|``: 1 = always the right end class) and ``depths``
    (share of answers at each depth, 0 = the root)."""
    nodes = torch.as_tensor(nodes).long()
    ok = covers(nodes, targets, taxonomy)
    r = rewards(taxonomy, ends).to(nodes.device)[nodes] * ok
    max_r = float(rewards(taxonomy, ends).max())
    depth = taxonomy.depth_tensor.to(nodes.device)[nodes]
    n = max(len(nodes), 1)
    return {
        "accuracy": float(ok.float().mean()) if len(nodes) else 0.0,
        "information_gain": float(r.sum()) / n,
        "specificity": float(r.sum()) / n / max_r if max_r > 0 else 0.0,
        "depths": {int(d): int(c) / n for d, c in zip(*torch.unique(depth, return_counts=True), strict=True)},
    }


def fit_lambda(marginals: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, target_accuracy: float,
               ends: str = "leaves", iters: int = 40) -> float:
    """Smallest λ ≥ 0 (to bisection precision) whose hedged answers reach ``target_accuracy`` on these
    (validation) samples — Deng et al.'s Algorithm 1. The upper end of the search is their bound
    ``λ̄ = (r_max·(1−ε) − r_root)/ε``, beyond which answers only get less specific."""
    if not 0 < target_accuracy <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    targets = torch.as_tensor(targets).long().to(marginals.device)
    hedge = hedger(marginals, taxonomy, ends)

    def acc(lam: float) -> float:
        return float(covers(hedge(lam), targets, taxonomy).float().mean())

    if acc(0.0) >= target_accuracy:
        return 0.0
    eps = max(1 - target_accuracy, 1e-6)
    r_max = float(rewards(taxonomy, ends).max())
    hi = max(r_max * (1 - eps) / eps, 1.0)
    while acc(hi) < target_accuracy and hi < 1e12:  # ties at the root: push on until it answers the root
        hi *= 10
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if acc(mid) >= target_accuracy:
            hi = mid
        else:
            lo = mid
    return hi


def backoff_nodes(marginals: torch.Tensor, taxonomy: Taxonomy, threshold: float,
                  start: torch.Tensor | None = None) -> torch.Tensor:
    """Naive baseline: from ``start`` (default the leaf with the largest marginal), go up to the parent
    while the node's probability is below ``threshold``; the root stops it."""
    m = marginals
    if start is None:
        start = m.masked_fill(~end_mask(taxonomy, "leaves").to(m.device), -1.0).argmax(1)
    node = torch.as_tensor(start).long().to(m.device).clone()
    parents = taxonomy.parent_tensor.to(m.device)
    for _ in range(taxonomy.max_depth):  # the root (probability 1) always stops it
        low = (m.gather(1, node.unsqueeze(1)).squeeze(1) < threshold) & (node != 0)
        node = torch.where(low, parents[node.clamp(min=0)], node)
    return node


def fit_backoff(marginals: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, target_accuracy: float,
                iters: int = 40) -> float:
    """Smallest back-off threshold reaching ``target_accuracy`` on validation (bisection: a higher
    threshold only backs off further, so accuracy cannot fall)."""
    targets = torch.as_tensor(targets).long().to(marginals.device)
    start = marginals.masked_fill(~end_mask(taxonomy, "leaves").to(marginals.device), -1.0).argmax(1)  # once

    def acc(t: float) -> float:
        return float(covers(backoff_nodes(marginals, taxonomy, t, start), targets, taxonomy).float().mean())

    if acc(0.0) >= target_accuracy:
        return 0.0
    lo, hi = 0.0, 1.0 + 1e-6
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if acc(mid) >= target_accuracy else (mid, hi)
    return hi


# ---------------------------------------------------------------------- split-conformal hedging
def ranked_classes(q: torch.Tensor, taxonomy: Taxonomy) -> tuple[torch.Tensor, torch.Tensor]:
    """End classes by falling probability: ``(B, C)`` their node ids and the mass *before* each rank."""
    ends = end_mask(taxonomy, "leaves").to(q.device) | (q > 0).any(0)
    ids = ends.nonzero().squeeze(1)
    qs, order = q[:, ids].sort(1, descending=True)
    return ids[order], qs.cumsum(1) - qs


#: ranks whose lowest common ancestors are found per pass; the search stops once every row is answered
_RANKS = 512


def _topk_lcas(ranked: torch.Tensor, taxonomy: Taxonomy, start: int, depth: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest common ancestors of the top-k classes for k in ``start + 1 .. start + _RANKS`` and the depth
    reached. They all share the top class's path down to their LCA, so its depth is the smallest depth of
    ``lca(top class, k-th class)`` so far (``depth``: that of the ranks before ``start``): one pairwise LCA per
    rank (binary lifting) and a running minimum, never a (B, C, depth) table."""
    tables = tree_tables(taxonomy, ranked.device)
    first = ranked[:, :1]
    d = tables.depth[tables.lca(first, ranked[:, start:start + _RANKS])].cummin(1).values
    if depth is not None:
        d = torch.minimum(d, depth.unsqueeze(1))
    return torch.where(d > 0, tables.paths[first.squeeze(1)].gather(1, (d - 1).clamp(min=0)), 0), d[:, -1]


def conformal_threshold(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, alpha: float,
                        scores: torch.Tensor | None = None) -> float:
    """Split-conformal calibration of :func:`conformal_nodes` on held-out (validation) samples.

    The answer for threshold τ is the lowest common ancestor of the end classes whose higher-ranked
    mass is ≤ τ (the top class always counts). These answers are nested (a larger τ gives an ancestor),
    so each sample has a score ``s`` = the smallest τ at which its answer covers the truth
    (:func:`conformal_scores`, passed as ``scores`` when several α share them); τ̂ is the
    ``⌈(n+1)(1−α)⌉``-th smallest score. **Guarantee**: if calibration and test samples are
    exchangeable, ``P(answer covers the truth) ≥ 1 − α`` on a new sample, for any model and however
    badly calibrated it is (marginal over samples, not per image). τ̂ = ∞ (the root) when n is too small.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = conformal_scores(q, targets, taxonomy) if scores is None else scores
    n = len(scores)
    k = math.ceil((n + 1) * (1 - alpha))
    return float("inf") if k > n else float(scores[k - 1])


def conformal_scores(q: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """``(B,)`` sorted: per sample the smallest τ whose :func:`conformal_nodes` answer covers its target."""
    targets = torch.as_tensor(targets).long().to(q.device)
    ranked, before = ranked_classes(q, taxonomy)
    tables = tree_tables(taxonomy, q.device)
    first = torch.full((len(q),), -1, dtype=torch.long, device=q.device)  # the first covering rank, per row
    depth = None
    for start in range(0, ranked.shape[1], _RANKS):  # answers are nested: stop once every row is covered
        lca, depth = _topk_lcas(ranked, taxonomy, start, depth)
        ok = (lca == 0) | tables.is_ancestor(lca, targets.unsqueeze(1))
        found = (first < 0) & ok.any(1)
        first[found] = start + ok[found].float().argmax(1)
        if bool((first >= 0).all()):
            break
    return before.gather(1, first.unsqueeze(1)).squeeze(1).sort().values  # the root covers: all found


def conformal_nodes(q: torch.Tensor, taxonomy: Taxonomy, tau: float,
                    ranked: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``(B,)`` answers at threshold ``tau`` (see :func:`conformal_threshold`); ``ranked``: ``q``'s classes by
    falling probability when the caller keeps them for several τ (:func:`ranked_classes`)."""
    ranked, before = ranked_classes(q, taxonomy) if ranked is None else ranked
    k = (before <= tau + 1e-7).sum(1).clamp(min=1)  # at least the top class
    out, depth = torch.zeros(len(q), dtype=torch.long, device=q.device), None
    for start in range(0, int(k.max()) if len(q) else 0, _RANKS):  # only the ranks some row needs
        lca, depth = _topk_lcas(ranked, taxonomy, start, depth)
        here = (k > start) & (k <= start + lca.shape[1])
        out[here] = lca[here].gather(1, (k[here] - 1 - start).unsqueeze(1)).squeeze(1)
    return out


# ---------------------------------------------------------------------- CRM
def expected_lca_height(q: torch.Tensor | EndDistribution, taxonomy: Taxonomy, temperature: Temperature = 1.0
                        ) -> torch.Tensor:
    """``(B, N+1)``: for every answer, the expected height of its lowest common ancestor with the truth
    under ``q`` (CRM's risk), from ancestor sums in O(N·depth) per image (:mod:`hiervision.bayes`), never
    an (N+1)² table of pairwise LCA heights. Given an :class:`EndDistribution`, of its ``q(temperature)``,
    computed once and kept there."""
    if isinstance(q, EndDistribution):
        return torch.from_numpy(-_expected(q, taxonomy, "severity", temperature)).to(q.device, torch.float32)
    scores = bayes.expected_scores(q.detach().cpu().double().numpy(), taxonomy, "severity")
    return torch.from_numpy(-scores).to(q.device, torch.float32)


def _expected(dist: EndDistribution, taxonomy: Taxonomy, metric: str, temperature: Temperature) -> np.ndarray:
    """:func:`hiervision.bayes.expected_scores` of ``dist.q(temperature)``, once per distribution."""
    key = marginals.as_temperature(temperature)
    return dist.cached(("expected", metric, key), lambda: bayes.expected_scores(
        dist.q(key).detach().cpu().double().numpy(), taxonomy, metric))


def crm_nodes(q: torch.Tensor, taxonomy: Taxonomy, allowed: Allowed | None = None,
              risk: torch.Tensor | None = None) -> torch.Tensor:
    """Karthik et al.'s Conditional Risk Minimisation: ``(B,)`` the end class ``c`` minimising
    ``Σ_y q(y)·height(lca(c, y))``, the expected mistake severity (ties → the more probable class);
    ``allowed``: among these end classes only (:mod:`hiervision.restrict`); ``risk``: that expected height when
    already at hand (:func:`expected_lca_height`)."""
    risk = (expected_lca_height(q, taxonomy) if risk is None else risk).to(q.dtype)
    ends = (q > 0).any(0) | end_mask(taxonomy, "leaves").to(q.device)
    if allowed is not None:
        ends = ends & torch.from_numpy(allowed.ends).to(q.device)
    risk = risk - 1e-6 * q  # tie-break towards probability
    return risk.masked_fill(~ends, float("inf")).argmin(1)


def bayes_nodes(q: torch.Tensor, taxonomy: Taxonomy, metric: str, allow_inner: bool = False,
                allowed: Allowed | None = None, scores: np.ndarray | None = None) -> torch.Tensor:
    """``(B,)`` long: per image the node (never the root) that maximises the expected ``metric`` under the
    end-class distribution ``q`` ``(B, N+1)`` (:func:`~hiervision.distributions.end_distribution`): ``"hf1"``
    (Kiritchenko's per-image hierarchical F1), ``"severity"`` (minus the LCA height: :func:`crm_nodes`' answer) or
    ``"path_accuracy"`` (the most probable end class). ``allow_inner``: the answer may be an inner node;
    otherwise an end class. Exact, ties to the more probable node; O(N·depth) per image on ancestor
    sums (the derivation and costs: :mod:`hiervision.bayes`, the numpy code the runtime shares). ``scores``: the
    expected scores when already at hand."""
    nodes = bayes.bayes_nodes(q.detach().cpu().double().numpy(), taxonomy, metric, allow_inner,
                              bayes.answerable(allowed, allow_inner), scores)
    return torch.from_numpy(nodes).long().to(q.device)


def rule_nodes(dist: EndDistribution, taxonomy: Taxonomy, temperature: Temperature, decode: str,
               allowed: Allowed | None = None) -> torch.Tensor:
    """``(B,)`` the answers of ``decode`` (``argmax | crm | bayes:METRIC[:inner]``) on ``dist`` at ``temperature``,
    answering among ``allowed`` (``q`` renormalised over them first). Without ``allowed`` they and the expected
    scores behind them are made once per distribution: the post-hoc step's reports ask for each rule again."""
    rule, metric, inner = bayes.decode_rule(decode)
    key = marginals.as_temperature(temperature)
    if allowed is None:
        return dist.cached(("nodes", decode, key), lambda: _rule_nodes(dist, taxonomy, key, rule, metric, inner))
    q = restricted(dist.q(key), allowed)
    if rule == "argmax":
        return q.masked_fill(~torch.from_numpy(allowed.ends).to(q.device), -1.0).argmax(1)
    if rule == "crm":
        return crm_nodes(q, taxonomy, allowed)
    return bayes_nodes(q, taxonomy, metric, inner, allowed)


def _rule_nodes(dist: EndDistribution, taxonomy: Taxonomy, temperature: Temperature, rule: str, metric: str | None,
                inner: bool) -> torch.Tensor:
    q = dist.q(temperature)
    if rule == "argmax":
        return dist.prediction.nodes.to(q.device)
    if rule == "crm":
        return crm_nodes(q, taxonomy, risk=expected_lca_height(dist, taxonomy, temperature))
    return bayes_nodes(q, taxonomy, metric, inner, scores=_expected(dist, taxonomy, metric, temperature))


# ---------------------------------------------------------------------- whole predictions
def restricted(q: torch.Tensor, allowed: Allowed) -> torch.Tensor:
    """``q`` renormalised over the allowed end classes (:func:`hiervision.restrict.restrict_q`), as a tensor."""
    return torch.from_numpy(restrict_q(q.detach().cpu().numpy(), allowed)).to(q)


def restrict_prediction(prediction: Prediction, taxonomy: Taxonomy, allowed: Allowed) -> Prediction:
    """The prediction a head scoring every class makes when only ``allowed`` may be answered: its scores the
    node marginals of the renormalised distribution, its answer the most probable allowed class. Every rule and
    metric reading it sees the restricted model (a single temperature commutes with the renormalisation)."""
    q = restricted(end_distribution(prediction, taxonomy), allowed)
    end = q.masked_fill(~torch.from_numpy(allowed.ends).to(q.device), -1.0).argmax(1)
    return Prediction(taxonomy.path_matrix.to(q.device)[end], node_marginals(q, taxonomy),
                      q.gather(1, end.unsqueeze(1)).squeeze(1), None)


def calibrate(prediction: Prediction | EndDistribution, taxonomy: Taxonomy, temperature: Temperature = 1.0,
              decode: str = "argmax", allowed: Allowed | None = None) -> Prediction:
    """A prediction whose ``scores`` are the temperature-scaled node marginals and whose
    ``path_prob`` is the scaled probability of its answer; ``decode`` (``argmax | crm |
    bayes:METRIC[:inner]``) also replaces the paths by :func:`crm_nodes`' or :func:`bayes_nodes`' answers
    (an inner answer's probability is that it covers the truth). Multi-label predictions come back
    unchanged (their sigmoids are thresholded, not normalised). Given the prediction's
    :class:`~hiervision.distributions.EndDistribution`, every rule calibrated from it shares its ``q`` and
    marginals (the answers' ``scores`` are then one tensor).

    ``allowed`` (:mod:`hiervision.restrict`): ``q`` is renormalised over those end classes before the rule
    answers, and argmax answers the most probable of them (heads that score every class; a path decoder's
    own search is restricted by the runtime, ``hiervision predict``)."""
    rule, metric, inner = bayes.decode_rule(decode)
    raw = prediction.prediction if isinstance(prediction, EndDistribution) else prediction
    if raw.labels is not None or (marginals.is_identity(temperature) and rule == "argmax" and allowed is None):
        return raw
    dist = distribution_of(prediction, taxonomy)
    q, m = dist.q(temperature), dist.node_marginals(temperature)
    if allowed is not None:
        q = restricted(q, allowed)
        m = node_marginals(q, taxonomy)
    if rule == "argmax" and allowed is None:
        paths, end = raw.paths, raw.nodes
    else:
        end = rule_nodes(dist, taxonomy, temperature, decode, allowed)
        paths = taxonomy.path_matrix.to(q.device)[end]
    prob = (m if inner else q).gather(1, end.clamp(min=0).unsqueeze(1)).squeeze(1)
    return Prediction(paths, m, prob, None)


def set_temperature(model: torch.nn.Module, temperature: Temperature) -> None:
    """Keep a temperature (one, or one per tree level) in the model's ``temperature`` buffer, whose shape
    follows it, so that the next checkpoint carries it."""
    model.temperature = torch.tensor(temperature, dtype=torch.float32, device=model.temperature.device)


def fit_decisions(model, val: Prediction | EndDistribution, val_targets: torch.Tensor, taxonomy: Taxonomy,
                  run_dir: str | os.PathLike | None = None,
                  targets: Sequence[float] = (0.9, 0.95, 0.99), per_level: bool = False) -> dict:
    """After training: fit the temperature on the validation predictions (one, or one per level with
    ``per_level``; kept in ``model.temperature`` so the next checkpoint carries it), then λ for each
    accuracy target and the split-conformal τ for α = 1 − target on the calibrated marginals; written
    to ``decisions.json`` when ``run_dir`` is given. ``val``: the raw (temperature 1) prediction or its
    :class:`~hiervision.distributions.EndDistribution`.
    Returns ``{"temperature", "hedge": {target: λ}, "conformal": {target: τ}}``."""
    val_targets = torch.as_tensor(val_targets).long()
    dist = distribution_of(val, taxonomy)
    t = fit_temperature(dist.q(), val_targets, taxonomy, per_level)
    set_temperature(model, t)
    qt, m = dist.q(t), dist.node_marginals(t)  # kept in dist: evaluate_hedging reads the same ones
    scores = conformal_scores(qt, val_targets, taxonomy)  # one ranking serves every target
    out = {"temperature": t,
           "hedge": {str(a): fit_lambda(m, val_targets, taxonomy, a) for a in targets},
           "conformal": {str(a): conformal_threshold(qt, val_targets, taxonomy, 1 - a, scores) for a in targets}}
    if run_dir is not None:
        save_decisions(run_dir, **out)
    return out


def evaluate_hedging(val: Prediction | EndDistribution, val_targets: torch.Tensor, test: Prediction | EndDistribution,
                     test_targets: torch.Tensor, taxonomy: Taxonomy, target: float,
                     temperature: Temperature = 1.0, fitted: dict | None = None) -> dict:
    """The ``hedged`` entry of an evaluation report at one accuracy target: λ fitted on ``val``,
    :func:`coverage_report` on ``test``, and beside it the naive back-off baseline and the
    split-conformal answers (α = 1 − target), all on the same temperature-scaled marginals. ``val`` and
    ``test``: raw predictions or their :class:`~hiervision.distributions.EndDistribution` (one per split
    serves every target). ``fitted``: :func:`fit_decisions`'s output on the same scores, whose λ and conformal
    threshold for ``target`` are used instead of fitting them again."""
    val_targets = torch.as_tensor(val_targets).long()
    test_targets = torch.as_tensor(test_targets).long()
    dv, dt = distribution_of(val, taxonomy), distribution_of(test, taxonomy)
    qv, qt = dv.q(temperature), dt.q(temperature)
    mv, mt = dv.node_marginals(temperature), dt.node_marginals(temperature)
    key = str(target)
    lam = fitted["hedge"][key] if fitted and key in fitted["hedge"] else fit_lambda(mv, val_targets, taxonomy, target)
    thr = fit_backoff(mv, val_targets, taxonomy, target)
    tau = (fitted["conformal"][key] if fitted and key in fitted["conformal"] else
           conformal_threshold(qv, val_targets, taxonomy, 1 - target) if target < 1 else float("inf"))
    # one ranking of the test classes serves every target
    ranked = dt.cached(("ranked", marginals.as_temperature(temperature)), lambda: ranked_classes(qt, taxonomy))
    return {
        "target": target,
        "lambda": lam,
        "temperature": marginals.as_temperature(temperature),
        **coverage_report(hedge_nodes(mt, taxonomy, lam), test_targets, taxonomy),
        "baseline": {"threshold": thr, **coverage_report(backoff_nodes(mt, taxonomy, thr), test_targets, taxonomy)},
        "conformal": {"alpha": 1 - target, "tau": tau if math.isfinite(tau) else None,
                      **coverage_report(conformal_nodes(qt, taxonomy, tau, ranked), test_targets, taxonomy)},
    }


# ---------------------------------------------------------------------- curves and records
def accuracy_specificity_curve(
    val_marginals: torch.Tensor, val_targets: torch.Tensor, test_marginals: torch.Tensor,
    test_targets: torch.Tensor, taxonomy: Taxonomy, targets: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
) -> list[dict]:
    """For each accuracy target: λ fitted on validation, the test :func:`coverage_report` at it, and the
    naive back-off baseline fitted the same way (``baseline``)."""
    rows = []
    for t in targets:
        lam = fit_lambda(val_marginals, val_targets, taxonomy, t)
        thr = fit_backoff(val_marginals, val_targets, taxonomy, t)
        rows.append({"target": t, "lambda": lam,
                     **coverage_report(hedge_nodes(test_marginals, taxonomy, lam), test_targets, taxonomy),
                     "baseline": {"threshold": thr, **coverage_report(backoff_nodes(test_marginals, taxonomy, thr),
                                                                   test_targets, taxonomy)}})
    return rows


def hedge_records(prediction: Prediction | EndDistribution, taxonomy: Taxonomy, lam: float,
                  temperature: Temperature = 1.0) -> list[dict]:
    """Per image ``{"node", "path", "probability"}``: the hedged answer of each prediction, for
    ``predict --accuracy`` and the server to attach under a ``hedged`` key."""
    m = distribution_of(prediction, taxonomy).node_marginals(temperature)
    nodes = hedge_nodes(m, taxonomy, lam).tolist()
    return [{"node": taxonomy.names[n], "path": [taxonomy.names[p] for p in taxonomy.path(n)],
             "probability": round(float(m[i, n]), 6)} for i, n in enumerate(nodes)]


def save_decisions(run_dir: str | os.PathLike, **values) -> Path:
    """Merge ``values`` (e.g. ``temperature``, ``hedge = {target: λ}``) into the run's ``decisions.json``."""
    path = Path(run_dir) / DECISIONS_FILE
    data = load_decisions(run_dir)
    data.update(values)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_decisions(run_dir: str | os.PathLike) -> dict:
    """The run's ``decisions.json`` (``{}`` when absent); one clear error when it is not valid JSON."""
    path = Path(run_dir) / DECISIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "temperature" in data:
        try:
            t = marginals.as_temperature(data["temperature"])
        except (TypeError, ValueError):
            t = None
        if t is None or not np.all(np.asarray(t) > 0):
            raise ValueError(f"{path}: 'temperature' must be a positive number or a list of them (one per level), "
                             f"got {data['temperature']!r}")
        data["temperature"] = t
    return data
