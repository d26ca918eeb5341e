"""Hierarchical selective classification: risk–coverage curves and thresholds with a guarantee.

Goren, Galil & El-Yaniv (NeurIPS 2024, "Hierarchical Selective Classification") judge a rule that may
answer an inner node instead of a leaf by two numbers: its *hierarchical coverage* (how specific the
answers are: ``1 - log|ends(v)| / log|ends|``, 1 at a leaf, 0 at the root — Deng et al.'s normalised
specificity) and its *hierarchical risk* (1 − the share of answers that cover the truth: the truth or one
of its ancestors; the root always does). Sweeping a rule's threshold traces a risk–coverage curve; the
area under it (hAURC) ranks rules and models independently of any one threshold.

* :func:`climbing_curve` — the climbing rule of :mod:`hiervision.rollup` (climb from a start node until a
  marginal meets θ) over *every* θ, exactly, by sorting events rather than looping over a grid;
* :func:`selective_curve` — the non-hierarchical baseline (the start node or the root);
* :func:`lambda_curve` — any rule with a knob (DARTS' λ), from a grid;
* :func:`guaranteed_threshold` — a θ whose accuracy is ≥ a target with a chosen confidence (a PAC form of
  the paper's threshold algorithm), and :func:`threshold_misses`, which checks it on random splits.

Numpy only (no PyTorch, no scipy): the runtime and reports read it. ``marginals`` are ``(B, N+1)`` node
marginals (:func:`hiervision.marginals.node_marginals`), ``start`` the ``(B,)`` node each image climbs
from, ``targets`` the ``(B,)`` true node ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from hiervision.records import TreeView
from hiervision.rollup import Thresholds, climb

__all__ = ["ROOT_ONLY", "RiskCoverage", "binomial_tails", "climbing_curve", "coverage_values",
           "guaranteed_threshold", "lambda_curve", "selective_curve", "threshold_misses", "tight_thresholds"]

#: a threshold no marginal reaches (marginals are probabilities): every image is answered at the root
ROOT_ONLY = 2.0


def coverage_values(tree: TreeView, ends: str = "leaves") -> np.ndarray:
    """``(N+1,)`` hierarchical coverage ``1 - log|ends(v)| / log|ends|`` of answering each node: how much
    of the way from "anything" (the root, 0) to one end class (1) the answer goes."""
    counts = tree.subtree_sum(tree.end_mask(ends).astype(np.float64)[None])[0]
    total = counts[0]
    if total <= 1:  # one end class: any answer below the root names it
        out = np.ones(tree.num_nodes)
    else:
        out = 1.0 - np.log(np.maximum(counts, 1.0)) / math.log(total)
    out[0] = 0.0
    return out


@dataclass(frozen=True)
class RiskCoverage:
    """A risk–coverage curve, points sorted by falling coverage (rising threshold): ``risk`` is
    1 − hierarchical accuracy over all images at that threshold, ``coverage`` the mean coverage."""

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray

    @property
    def area(self) -> float:
        """hAURC: the trapezoid area of risk over coverage (what ``sklearn.metrics.auc`` gives), so a rule
        that stays accurate while specific scores low."""
        c, r = self.coverage, self.risk
        if len(c) < 2:
            return 0.0
        return float(np.sum((c[:-1] - c[1:]) * (r[:-1] + r[1:]) / 2.0))

    def as_dict(self, max_points: int = 200) -> dict:
        """JSON-able ``{"area", "points", "thresholds", "coverage", "risk"}``, the curve thinned to at most
        ``max_points`` (both ends kept) so a report stays small; ``area`` is the full curve's. A threshold
        that is not a finite number (a grid point added for the root) is ``None``."""
        if max_points < 2:
            raise ValueError(f"max_points must be ≥ 2, got {max_points}")
        n = len(self.coverage)
        keep = np.unique(np.round(np.linspace(0, n - 1, min(n, max_points))).astype(np.int64)) if n else []
        return {"area": self.area, "points": n,
                "thresholds": [float(t) if math.isfinite(t) else None for t in self.thresholds[keep]],
                "coverage": [float(c) for c in self.coverage[keep]],
                "risk": [float(r) for r in self.risk[keep]]}


def _inputs(marginals, start, targets, tree: TreeView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked float64 marginals and int64 ids: one-line errors instead of an index error deep inside."""
    m = np.asarray(marginals, dtype=np.float64)
    s, t = np.asarray(start, dtype=np.int64).reshape(-1), np.asarray(targets, dtype=np.int64).reshape(-1)
    if m.ndim != 2 or m.shape[1] != tree.num_nodes:
        raise ValueError(f"marginals must be (B, {tree.num_nodes}) node marginals, got shape {m.shape}")
    if not len(m) or len(s) != len(m) or len(t) != len(m):
        raise ValueError(f"marginals, start and targets must have the same length ≥ 1, got "
                         f"{len(m)}, {len(s)}, {len(t)}")
    if not np.isfinite(m).all():
        raise ValueError("marginals must be finite")
    for name, ids in (("start", s), ("targets", t)):
        if ids.min() < 0 or ids.max() >= tree.num_nodes:
            raise ValueError(f"{name} must be node ids in 0..{tree.num_nodes - 1}")
    return m, s, t


def _path_keys(m: np.ndarray, start: np.ndarray, tree: TreeView) -> tuple[np.ndarray, np.ndarray]:
    """``(nodes, keys)``, each ``(B, D)``: the start's path (PAD past its end) and, per node, the largest
    marginal at or below it on the path (−inf at PAD). The climbing answer at θ is the deepest node whose
    key is ≥ θ, and keys fall down the path: for coherent marginals the key is the marginal itself."""
    nodes = tree.paths[start]
    real = nodes > 0
    raw = np.where(real, np.take_along_axis(m, np.where(real, nodes, 0), 1), -np.inf)
    return nodes, np.maximum.accumulate(raw[:, ::-1], axis=1)[:, ::-1]


def _event_curve(nodes: np.ndarray, keys: np.ndarray, targets: np.ndarray, tree: TreeView,
                 ends: str) -> RiskCoverage:
    """The exact curve of "answer the deepest node of ``nodes[i]`` whose key is ≥ θ (the root if none)"
    over every θ, keys falling along each row. Node d's event adds ``v(p_d) − v(p_{d−1})`` to coverage and
    ``c(p_d) − c(p_{d−1})`` to correctness once θ ≤ its key: sort the events by falling key, add them up,
    read the sums where the key changes. O(B·D log(B·D))."""
    b = len(nodes)
    v = coverage_values(tree, ends)
    real = nodes > 0
    here = np.where(real, nodes, 0)
    above = np.concatenate([np.zeros((b, 1), dtype=np.int64), here[:, :-1]], axis=1)
    covers = tree.is_ancestor(here, targets[:, None]).astype(np.int64)
    covers_above = tree.is_ancestor(above, targets[:, None]).astype(np.int64)
    live = real & np.isfinite(keys)
    key = keys[live]
    order = np.argsort(-key, kind="stable")
    key = key[order]
    d_cov = np.cumsum((v[here] - v[above])[live][order])
    d_cor = np.cumsum((covers - covers_above)[live][order])
    last = np.flatnonzero(np.r_[key[1:] != key[:-1], True]) if len(key) else np.zeros(0, dtype=np.int64)
    top = max(1.0, float(key[0])) if len(key) else 1.0
    thresholds = np.r_[key[last][::-1], np.nextafter(top, np.inf)]
    coverage = np.r_[d_cov[last][::-1] / b, 0.0]
    risk = np.r_[-d_cor[last][::-1] / b, 0.0]  # every image starts correct at the root
    return RiskCoverage(thresholds, np.maximum(coverage, 0.0), risk)


def climbing_curve(marginals, start, targets, tree: TreeView, ends: str = "leaves") -> RiskCoverage:
    """The exact risk–coverage curve of the climbing rule (:func:`hiervision.rollup.climb` with one θ at
    every depth) over every θ: one point per distinct marginal on the start paths, from the start nodes
    themselves (smallest θ) up to θ > 1 (every answer the root: coverage 0, risk 0)."""
    m, s, t = _inputs(marginals, start, targets, tree)
    nodes, keys = _path_keys(m, s, tree)
    return _event_curve(nodes, keys, t, tree, ends)


def selective_curve(marginals, start, targets, tree: TreeView, ends: str = "leaves") -> RiskCoverage:
    """The non-hierarchical baseline's curve (HSC's "Selective" rule, "argmax" in reports): answer the start
    node when its marginal is ≥ θ, else abstain to the root — the climbing machinery on a path of one node."""
    m, s, t = _inputs(marginals, start, targets, tree)
    nodes = np.where(s > 0, s, -1)[:, None]
    keys = np.where(s > 0, m[np.arange(len(s)), s], -np.inf)[:, None]
    return _event_curve(nodes, keys, t, tree, ends)


def lambda_curve(answer_fn: Callable[[float], np.ndarray], lambdas: Iterable[float], targets, tree: TreeView,
                 ends: str = "leaves", through_root: bool = True) -> RiskCoverage:
    """The curve of a rule with a knob that is not one threshold on one path (DARTS' λ): ``answer_fn(λ)``
    gives ``(B,)`` answers, one point per λ of ``lambdas``. ``through_root`` adds the all-root point
    (coverage 0, risk 0, threshold ``inf``) when the grid does not reach it, so areas span what the
    threshold curves span."""
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    v = coverage_values(tree, ends)
    lam, cov, risk = [], [], []
    for value in lambdas:
        answers = np.asarray(answer_fn(float(value)), dtype=np.int64).reshape(-1)
        if answers.shape != t.shape:
            raise ValueError(f"answer_fn({value}) gave {answers.shape[0]} answers for {t.shape[0]} targets")
        lam.append(float(value))
        cov.append(float(v[answers].mean()))
        risk.append(1.0 - float(tree.is_ancestor(answers, t).mean()))
    if not lam:
        raise ValueError("lambdas must hold at least one value")
    if through_root and min(cov) > 0.0:
        lam, cov, risk = [*lam, math.inf], [*cov, 0.0], [*risk, 0.0]
    order = np.argsort(-np.asarray(cov), kind="stable")
    return RiskCoverage(np.asarray(lam)[order], np.asarray(cov)[order], np.asarray(risk)[order])


def tight_thresholds(marginals, start, targets, tree: TreeView) -> np.ndarray:
    """``(B,)`` scores ``s_i``: climbing with θ answers image i correctly iff θ > s_i. ``s_i`` is the
    marginal of the highest node on the start's path that does not cover the truth (the child of the LCA
    on the path; the largest such marginal if marginals are not coherent), −inf when the start covers it.
    The whole threshold question reduces to these scalars."""
    m, s, t = _inputs(marginals, start, targets, tree)
    nodes, keys = _path_keys(m, s, tree)
    real = nodes > 0
    wrong = real & ~tree.is_ancestor(np.where(real, nodes, 0), t[:, None])
    return np.where(wrong, keys, -np.inf).max(1)


def binomial_tails(n: int, p: float) -> np.ndarray:
    """``(n+1,)``: ``P(Binomial(n, p) ≥ k)`` for k = 0..n, summed in log space (math.lgamma) so n in the
    tens of thousands neither under- nor overflows."""
    j = np.arange(n + 1)
    log_choose = math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in j])
    log_pmf = log_choose + j * math.log(p) + (n - j) * math.log1p(-p)
    return np.minimum(np.exp(np.logaddexp.accumulate(log_pmf[::-1])[::-1]), 1.0)


def _order_index(n: int, target_accuracy: float, confidence: float) -> int | None:
    """The smallest k with ``P(Bin(n, A) ≥ k) ≤ 1 − confidence`` (None if no k ≤ n has it): the k-th smallest
    score's population accuracy is Beta(k, n+1−k) distributed, and ``P(Beta < A) = P(Bin(n, A) ≥ k)``."""
    ok = np.flatnonzero(binomial_tails(n, target_accuracy)[1:] <= 1.0 - confidence)
    return int(ok[0]) + 1 if len(ok) else None


def _order_index_for(n: int, test_size: int, target_accuracy: float, confidence: float) -> int | None:
    """The smallest k for which a set of ``test_size`` new images reaches the target with probability ≥
    ``confidence``: for exchangeable scores the number J of them below the k-th smallest of n has
    ``P(J = j) = C(k−1+j, j)·C(n−k+test_size−j, test_size−j) / C(n+test_size, test_size)``, and the set misses
    when ``J < ⌈A·test_size⌉`` (what a finite test set adds to the population bound of :func:`_order_index`)."""
    need = math.ceil(target_accuracy * test_size - 1e-9)
    j = np.arange(need)
    log_total = math.lgamma(n + test_size + 1) - math.lgamma(test_size + 1) - math.lgamma(n + 1)

    def miss(k: int) -> float:  # P(J < need), decreasing in k
        a = np.array([math.lgamma(k + i) for i in j]) - math.lgamma(k) - np.array([math.lgamma(i + 1) for i in j])
        rest = n - k + test_size - j
        b = (np.array([math.lgamma(r + 1) for r in rest]) - np.array([math.lgamma(test_size - i + 1) for i in j])
             - math.lgamma(n - k + 1))
        return float(np.exp(a + b - log_total).sum())

    if need == 0:
        return 1
    if miss(n) > 1.0 - confidence:
        return None
    lo, hi = 1, n  # binary search for the first k whose miss probability is small enough
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if miss(mid) <= 1.0 - confidence else (mid + 1, hi)
    return lo


def _threshold_at(sorted_scores: np.ndarray, k: int | None) -> float:
    """θ just above the k-th smallest score (so it and every smaller one are correct); 0 when that score is
    −inf (the start is right), :data:`ROOT_ONLY` when k is None."""
    if k is None:
        return ROOT_ONLY
    s = float(sorted_scores[k - 1])
    return 0.0 if s == -math.inf else float(np.nextafter(s, np.inf))


def _check_levels(target_accuracy: float, confidence: float) -> tuple[float, float]:
    for name, value in (("target_accuracy", target_accuracy), ("confidence", confidence)):
        if not (isinstance(value, int | float) and 0.0 < float(value) < 1.0):
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(target_accuracy), float(confidence)


def guaranteed_threshold(marginals, start, targets, tree: TreeView, target_accuracy: float,
                         confidence: float, test_size: int | None = None) -> dict:
    """A climbing threshold θ̂ fitted on these (calibration) images whose accuracy on new exchangeable images
    is ≥ ``target_accuracy`` with probability ≥ ``confidence`` over the draw of the calibration set — of the
    population (default), or with ``test_size`` of a set of that many new images (its own sampling noise
    included, so θ̂ is more cautious).

    θ̂ lies just above the k-th smallest tight score (:func:`tight_thresholds`), k the smallest order that
    the bound allows; with too few images no k does, and θ̂ answers the root always (``"feasible": False``).
    Returns ``{"threshold", "target_accuracy", "confidence", "n", "k", "feasible", "calibration_accuracy",
    "test_size"}``."""
    target_accuracy, confidence = _check_levels(target_accuracy, confidence)
    scores = np.sort(tight_thresholds(marginals, start, targets, tree))
    k = (_order_index(len(scores), target_accuracy, confidence) if test_size is None
         else _order_index_for(len(scores), int(test_size), target_accuracy, confidence))
    theta = _threshold_at(scores, k)
    return {"threshold": theta, "target_accuracy": target_accuracy, "confidence": confidence,
            "n": len(scores), "k": k, "feasible": k is not None,
            "calibration_accuracy": float(np.mean(scores < theta)), "test_size": test_size}


def threshold_misses(marginals, start, targets, tree: TreeView, target_accuracy: float, confidence: float,
                     repeats: int = 100, seed: int = 0, calibration_fraction: float = 0.5) -> dict:
    """How often :func:`guaranteed_threshold` misses its target: over ``repeats`` random calibration/test
    splits of these images, fit θ̂ on the calibration part and measure hierarchical accuracy and coverage
    on the rest. The population bound's ``miss_rate`` may exceed ``1 − confidence`` by the test part's own
    sampling noise; ``test_set`` holds the same for θ̂ bounded for a test set of that size, whose miss rate
    stays at or below ``1 − confidence``. Returns ``{"repeats", "target_accuracy", "confidence", "test_size",
    "miss_rate", "accuracy_mean", "accuracy_min", "coverage_mean", "test_set": {the same four}}``;
    deterministic by ``seed``."""
    target_accuracy, confidence = _check_levels(target_accuracy, confidence)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a whole number ≥ 1, got {repeats!r}")
    if not (0.0 < calibration_fraction < 1.0):
        raise ValueError(f"calibration_fraction must lie strictly between 0 and 1, got {calibration_fraction!r}")
    m, s, t = _inputs(marginals, start, targets, tree)
    n_cal = int(round(calibration_fraction * len(m)))
    if not 1 <= n_cal < len(m):
        raise ValueError(f"calibration_fraction {calibration_fraction} leaves no calibration or no test images "
                         f"of {len(m)}")
    scores, v = tight_thresholds(m, s, t, tree), coverage_values(tree)
    n_test = len(m) - n_cal
    # the orders depend on the sizes only: once for every split
    orders = {"population": _order_index(n_cal, target_accuracy, confidence),
              "test_set": _order_index_for(n_cal, n_test, target_accuracy, confidence)}
    rng = np.random.default_rng(seed)
    acc, cov = np.empty((2, repeats)), np.empty((2, repeats))
    for r in range(repeats):
        perm = rng.permutation(len(m))
        cal, test = perm[:n_cal], perm[n_cal:]
        ranked = np.sort(scores[cal])
        for i, k in enumerate(orders.values()):
            theta = _threshold_at(ranked, k)
            acc[i, r] = np.mean(scores[test] < theta)
            answers = climb(m[test], s[test], tree, Thresholds((0.0,) + (theta,) * tree.max_depth))
            cov[i, r] = v[answers].mean()
    out = {"repeats": repeats, "target_accuracy": target_accuracy, "confidence": confidence, "test_size": n_test}
    for i, name in enumerate(orders):
        part = {"miss_rate": float(np.mean(acc[i] < target_accuracy)), "accuracy_mean": float(acc[i].mean()),
                "accuracy_min": float(acc[i].min()), "coverage_mean": float(cov[i].mean())}
        out.update(part) if name == "population" else out.update({name: part})
    return out
