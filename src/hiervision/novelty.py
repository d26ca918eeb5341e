"""Classes the model has never seen: how well a rule answers them at their right ancestor (Lee et al., CVPR 2018).

Under ``data.holdout_leaves`` some end classes are taken out of training and of the tree; their test images
are labelled with their nearest ancestor that is still in the tree. A rule that may answer inner nodes is then
judged on two kinds of image at once: a *known* image is right when the answer is its end class, a *novel* one
when the answer is exactly its ancestor ("an unknown kind of Dogs": not Dogs' parent, not a breed). A threshold
trades one for the other; Lee et al.'s known–novel accuracy curve sweeps it, and its area, and the novel
accuracy at 50 % known accuracy, summarise a rule.

* :func:`climbing_curve` — the climbing rule (:mod:`hiervision.rollup`) over every threshold, exactly: an image
  is answered right over an interval of thresholds, so the curve is read off sorted interval ends;
* :func:`points_curve` — a rule with another knob (DARTS' λ, the bias on a novelty head's novel classes:
  :func:`novel_bias_answers`), from its answers at a grid of values;
* :func:`accuracies` — one rule's answers (a Bayes rule with inner answers has no knob): known and novel
  accuracy, and the mean tree distance of novel answers from their right ancestor.

Numpy only. ``marginals`` ``(B, N+1)`` node marginals, ``start`` the ``(B,)`` node each image climbs from,
``targets`` ``(B,)`` the right answers, ``novel`` ``(B,)`` bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from hiervision.records import TreeView

__all__ = ["NOVEL_BIASES", "accuracies", "climbing_curve", "curve_summary", "novel_bias_answers", "points_curve"]


def _check(start, targets, novel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, t = np.asarray(start, dtype=np.int64).reshape(-1), np.asarray(targets, dtype=np.int64).reshape(-1)
    nv = np.asarray(novel, dtype=bool).reshape(-1)
    if not (len(s) == len(t) == len(nv)) or not len(s):
        raise ValueError(f"start, targets and novel must have the same length ≥ 1, got {len(s)}, {len(t)}, {len(nv)}")
    if nv.all() or not nv.any():
        raise ValueError("known–novel accuracy needs both known and novel images (data.holdout_leaves)")
    return s, t, nv


def accuracies(answers, targets, novel, tree: TreeView) -> dict:
    """``{"known", "novel", "novel_distance"}`` of one set of answers: the share of known images answered with
    their end class, of novel images answered with exactly their nearest ancestor in the tree, and the mean
    number of tree edges between a novel image's answer and that ancestor (0 = right)."""
    a = np.asarray(answers, dtype=np.int64).reshape(-1)
    _, t, nv = _check(a, targets, novel)
    right = a == t
    lca = tree.lca(a[nv], t[nv])
    dist = tree.depths[a[nv]] + tree.depths[t[nv]] - 2 * tree.depths[lca]
    return {"known": float(right[~nv].mean()), "novel": float(right[nv].mean()),
            "novel_distance": float(dist.mean())}


def climbing_curve(marginals, start, targets, novel, tree: TreeView, at: float | None = None) -> dict:
    """The known–novel accuracy curve of the climbing rule from ``start`` over every threshold θ (answer: the
    deepest node on the start's path whose marginal is ≥ θ): :func:`curve_summary` of its points (``at``: as
    there). Image i is
    right for θ in ``(g_i, f_i]``: ``f_i`` the marginal of its right answer on the path (none: never right),
    ``g_i`` that of the path node just below it (−inf when it is the start)."""
    s, t, nv = _check(start, targets, novel)
    m = np.asarray(marginals, dtype=np.float64)
    paths = tree.paths[s]  # (B, D)
    real = paths > 0
    keys = np.where(real, np.take_along_axis(m, np.where(real, paths, 0), 1), -np.inf)
    hit = real & (paths == t[:, None])
    on = hit.any(1)
    d = hit.argmax(1)
    f = np.where(on, keys[np.arange(len(s)), d], -np.inf)
    # keys are −inf past a path's end, so the node below the last one reads −inf too
    below = np.where(d + 1 < paths.shape[1], keys[np.arange(len(s)), np.minimum(d + 1, paths.shape[1] - 1)], -np.inf)
    g = np.where(on, below, -np.inf)
    thetas = np.unique(np.concatenate([[0.0], f[on], np.nextafter(g[np.isfinite(g)], np.inf), [math.nextafter(1, 2)]]))

    def share(rows: np.ndarray) -> np.ndarray:  # right at each θ: #{f ≥ θ} − #{g ≥ θ}, as g < f on the path
        fs, gs = np.sort(f[rows]), np.sort(g[rows])
        n = len(fs)
        return ((n - np.searchsorted(fs, thetas, "left")) - (n - np.searchsorted(gs, thetas, "left"))) / n

    return curve_summary(share(~nv), share(nv), at)


def points_curve(answer_fn: Callable[[float], np.ndarray], values: Iterable[float], targets, novel,
                 tree: TreeView, at: float | None = None) -> dict:
    """The known–novel curve of a rule with a knob that is not one threshold on one path (DARTS' λ): one point
    per value, :func:`curve_summary` of them."""
    pts = [accuracies(answer_fn(float(v)), targets, novel, tree) for v in values]
    if not pts:
        raise ValueError("values must hold at least one knob setting")
    return curve_summary(np.array([p["known"] for p in pts]), np.array([p["novel"] for p in pts]), at)


#: Lee et al.'s sweep of the bias on the novel classes' logits (``test.py``: powers of two each way), with the
#: two ends that answer only known classes and only novel ones
NOVEL_BIASES = (-64.0, *(-(2.0 ** k) for k in range(4, -4, -1)), 0.0, *(2.0 ** k for k in range(-3, 5)), 64.0)


def novel_bias_answers(q: np.ndarray, bias: float, tree: TreeView) -> np.ndarray:
    """``(B,)`` answers of a head whose inner classes mean "novel under this node" (``end_nodes="all"``, the
    ``hnd`` head) with ``bias`` added to those classes' logits: the most probable node of ``log q + bias``
    on inner nodes."""
    with np.errstate(divide="ignore"):
        score = np.log(np.asarray(q, dtype=np.float64))
    score[:, 0] = -np.inf  # the root is no class
    return np.argmax(score + bias * ~tree.end_mask("leaves"), axis=1)


def _novel_at(known: np.ndarray, novel: np.ndarray, level: float) -> float | None:
    """The best novel accuracy among the points whose known accuracy is at least ``level`` (None if none is):
    what the rule gives up on novel images to keep that much of the known ones."""
    ok = known >= level - 1e-12
    return float(novel[ok].max()) if ok.any() else None


def curve_summary(known: np.ndarray, novel: np.ndarray, at: float | None = None, max_points: int = 100) -> dict:
    """``{"area", "novel_at_50", "novel_at", "known", "novel"}`` of a known–novel curve: the area under its
    upper envelope with known accuracy from 0 to its largest value (Lee et al.'s AUC; points are thinned to the
    Pareto front, so a rule is not punished for its dominated settings), the novel accuracy at 50 % known
    accuracy, and with ``at`` the novel accuracy at that known accuracy (e.g. the flat model's own); the front
    itself thinned to ``max_points`` (both ends kept) for reports."""
    known, novel = np.asarray(known, dtype=np.float64), np.asarray(novel, dtype=np.float64)
    order = np.lexsort((-novel, -known))  # known falling, then novel falling
    k, n = known[order], novel[order]
    front_k, front_n, best = [], [], -1.0
    for a, b in zip(k, n):
        if b > best + 1e-12:
            front_k.append(a)
            front_n.append(b)
            best = b
    fk, fn = np.array(front_k[::-1]), np.array(front_n[::-1])  # known rising
    if fk[0] > 0:  # a step down to known accuracy 0 keeps the best novel accuracy
        fk, fn = np.concatenate([[0.0], fk]), np.concatenate([[fn[0]], fn])
    area = float(np.sum(np.diff(fk) * (fn[1:] + fn[:-1]) / 2))
    keep = np.unique(np.round(np.linspace(0, len(fk) - 1, min(len(fk), max_points))).astype(np.int64))
    return {"area": area, "novel_at_50": _novel_at(known, novel, 0.5),
            "novel_at": None if at is None else _novel_at(known, novel, at),
            "known": [float(x) for x in fk[keep]], "novel": [float(x) for x in fn[keep]]}
