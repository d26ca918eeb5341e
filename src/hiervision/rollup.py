"""Answers at inner nodes, at thresholds the user sets: the roll-up ("climbing") rule and its trace.

A user who says "the species only above 0.8, else the genus above 0.6, else the family" wants the
*climbing* rule of Goren, Galil & El-Yaniv (NeurIPS 2024, "Hierarchical Selective Classification"):
start from the answer a decision rule gave (the model's own path, CRM's, a Bayes answer) and climb
towards the root until a node's probability — its node marginal, the chance the truth lies under it —
meets that node's threshold. Marginals never grow down a path, so this is the deepest node on the
path that meets its threshold, and the root (probability 1) always does.

Thresholds come as one number for every level (``--min-prob 0.8``), one per level
(``--min-prob-at 3=0.8,2=0.6``: depth = threshold, unnamed levels take the global one, default 0; or by
rank, ``species=0.8,genus=0.6``, where the run names its levels in ``data.ranks``), or both;
:class:`Thresholds` holds them as one array over depths. :func:`climb` gives the answers for a batch,
:func:`trace` the readable account of one: each node on the path with its probability and its threshold,
and a sentence that says where and why it stopped ("stopped at Dogs: Beagle 0.41 < 0.80").

Numpy only (the runtime and the server use it without PyTorch); the probabilities are whatever node
marginals the caller has — calibrated with the run's temperature and restricted to the allowed classes
(:mod:`hiervision.restrict`) before a rule answers, in every front end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hiervision.records import TreeView
from hiervision.restrict import RestrictedMarginals

__all__ = ["Thresholds", "check_ranks", "climb", "parse_levels", "rollup_record", "trace"]


def _probability(value, where: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a probability threshold must be a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{where}: a probability threshold must lie in [0, 1], got {value!r}")
    return p


def check_ranks(ranks: Sequence[str] | None, tree: TreeView, where: str = "data.ranks") -> tuple[str, ...]:
    """The names of the tree's levels, depth 1 first (``data.ranks: [family, genus, species]``): distinct,
    non-empty, no more than the tree has levels. One line naming what is wrong otherwise."""
    if not ranks:
        return ()
    if isinstance(ranks, str) or not all(isinstance(r, str) and r.strip() for r in ranks):
        raise ValueError(f"{where}: must be a list of level names, depth 1 first, got {ranks!r}")
    out = tuple(r.strip() for r in ranks)
    if len(set(out)) < len(out):
        raise ValueError(f"{where}: a rank is named twice ({', '.join(out)})")
    if len(out) > tree.max_depth:
        raise ValueError(f"{where}: names {len(out)} ranks, but the tree has {tree.max_depth} levels")
    return out


def parse_levels(spec: str | Mapping | None, where: str = "--min-prob-at",
                 ranks: Sequence[str] = ()) -> dict[int, float]:
    """``"3=0.8,2=0.6"`` (or a mapping ``{3: 0.8}``, as a config gives it) → ``{3: 0.8, 2: 0.6}``;
    depth 1 is the level under the root. A level may also be named by its rank (``species=0.8``, with
    ``ranks`` the names of depths 1, 2, ...). One line naming the bad entry otherwise."""
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, Mapping) else (
        part.split("=", 1) if "=" in part else (part, None) for part in str(spec).split(",") if part.strip())
    depth_of = {r: d for d, r in enumerate(ranks, start=1)}
    out: dict[int, float] = {}
    for level, value in items:
        if value is None:
            raise ValueError(f"{where}: expected LEVEL=PROBABILITY entries such as 3=0.8,2=0.6, got {level!r}")
        key = str(level).strip()
        try:
            d = depth_of[key] if key in depth_of else int(key)
        except ValueError:
            named = f"a rank ({', '.join(ranks)})" if ranks else "a rank (this tree names none: data.ranks)"
            raise ValueError(f"{where}: {key!r} is neither a level (1 = under the root) nor {named}") from None
        if d < 1:
            raise ValueError(f"{where}: levels start at 1 (the level under the root), got {d}")
        if d in out:
            raise ValueError(f"{where}: level {d} is given twice")
        out[d] = _probability(value, f"{where} level {key}")
    return out


@dataclass(frozen=True)
class Thresholds:
    """A probability threshold per tree depth (``at[d]`` for depth ``d``; the root's, ``at[0]``, is 0).

    Build with :meth:`of` from what a user typed; a level deeper than the tree is refused there."""

    at: tuple[float, ...]

    @classmethod
    def of(cls, tree: TreeView, min_prob: float | None = None, levels: str | Mapping | None = None,
           where: tuple[str, str] = ("--min-prob", "--min-prob-at"), ranks: Sequence[str] = ()) -> Thresholds | None:
        """Thresholds for ``tree`` from a global ``min_prob`` and per-level ``levels`` (which win where
        given; a level by depth or by its name in ``ranks``); ``None`` when neither is given (no roll-up).
        ``where``: how messages name the two."""
        per = parse_levels(levels, where[1], ranks)
        if min_prob is None and not per:
            return None
        base = 0.0 if min_prob is None else _probability(min_prob, where[0])
        depth = int(tree.max_depth)
        deep = [d for d in per if d > depth]
        if deep:
            raise ValueError(f"{where[1]}: level {deep[0]} does not exist; this tree's levels are 1..{depth}")
        return cls(tuple([0.0] + [per.get(d, base) for d in range(1, depth + 1)]))

    def as_dict(self) -> dict[str, float]:
        """``{"1": t1, ...}``: what a record and ``decisions.json`` keep."""
        return {str(d): t for d, t in enumerate(self.at) if d > 0}


def climb(marginals: np.ndarray, start: np.ndarray, tree: TreeView, thresholds: Thresholds) -> np.ndarray:
    """``(B,)`` answers: the deepest node on each start node's path (the start included) whose marginal
    meets its depth's threshold — the root when none does. ``marginals``: ``(B, N+1)`` node marginals."""
    m = np.asarray(marginals, dtype=np.float64)
    start = np.asarray(start, dtype=np.int64)
    paths = tree.paths[np.clip(start, 0, None)]  # (B, D): node at each depth, PAD past the end
    thr = np.asarray(thresholds.at[1:], dtype=np.float64)[: paths.shape[1]]
    real = paths > 0
    ok = real & (np.take_along_axis(m, np.where(real, paths, 0), 1) >= thr[None, : paths.shape[1]])
    deepest = np.where(ok, np.arange(1, paths.shape[1] + 1), 0).max(1)  # depth of the deepest node that meets
    return np.where(deepest > 0, np.take_along_axis(paths, np.clip(deepest - 1, 0, None)[:, None], 1)[:, 0], 0)


def trace(marginals: np.ndarray, start: int, tree: TreeView, thresholds: Thresholds, digits: int = 6) -> dict:
    """One image's roll-up, readable: ``{"node", "path", "path_ids", "probability", "depth", "stopped",
    "why", "trace": [{"node", "probability", "threshold", "met"}, ...]}`` over the start node's path.

    ``why`` is the sentence a person reads: "reached Beagle: 0.91 ≥ 0.80", or "stopped at Dogs: Beagle
    0.41 < 0.80" (the first node below the answer that fell short). Every probability is the node's
    marginal (1-D ``marginals`` for this image)."""
    m = marginals if isinstance(marginals, RestrictedMarginals) else np.asarray(marginals, dtype=np.float64).reshape(-1)
    path = [int(n) for n in tree.path(int(start))] if start > 0 else []
    limits = [thresholds.at[d] for d in range(1, len(path) + 1)]  # Thresholds.of covers every depth of its tree
    steps = [{"node": tree.names[n], "probability": round(float(m[n]), digits), "threshold": t, "met": bool(m[n] >= t)}
             for n, t in zip(path, limits)]
    k = max((d for d, s in enumerate(steps, start=1) if s["met"]), default=0)
    node = path[k - 1] if k else 0
    if k == len(path) and path:
        last = steps[-1]
        why = f"reached {last['node']}: {last['probability']:.2f} ≥ {last['threshold']:.2f}"
    elif path:
        short = steps[k]  # the first node below the answer: it fell short of its threshold
        at = tree.names[node] if node else "the root"
        why = f"stopped at {at}: {short['node']} {short['probability']:.2f} < {short['threshold']:.2f}"
    else:
        why = "no class to climb from"
    return {"node": tree.names[node] if node else "", "path": [tree.names[n] for n in path[:k]],
            "path_ids": path[:k], "probability": round(float(m[node]) if node else 1.0, digits), "depth": k,
            "stopped": k < len(path), "why": why, "trace": steps}


def rollup_record(record: dict, marginals: np.ndarray, tree: TreeView, thresholds: Thresholds) -> dict:
    """``record`` (a prediction record) with its ``rollup`` entry: :func:`trace` from the record's own
    answer (its last ``path_ids`` node). An error record stays as it is."""
    if "error" in record:
        return record
    ids: Sequence[int] = record.get("path_ids") or []
    return {**record, "rollup": trace(marginals, int(ids[-1]) if ids else 0, tree, thresholds)}
