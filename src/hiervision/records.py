"""Prediction records: the one JSON-able result per image that ``hiervision predict``, the ONNX
runtime and the server all return, so a client never special-cases where a prediction came from.

Torch-free on purpose (numpy only): the runtime and the server build records without PyTorch.
:class:`~hiervision.tree.view.TreeView` (re-exported here) is the numpy view of ``taxonomy.json`` they need.

A record::

    {"file": str, "path": [names], "path_ids": [ints], "path_probability": float,
     "node_probabilities": [one float per node on the path],
     "top_k": [{"path": [names], "path_ids": [ints], "probability": float}, ...]}

multi-label records add ``"paths"`` (the thresholded set, as lists of names); an image that could
not be read gives ``{"file": ..., "error": "one line"}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hiervision.tree import PAD
from hiervision.tree.view import TreeView

__all__ = ["TreeView", "error_record", "mark_novel", "prediction_record", "top_k_ends"]


def top_k_ends(path_prob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable path ends from ``(B, N+1)`` probabilities of the path that ends at each
    node (0, or any negative value, where a path may not end): ``(nodes, probs)``, each ``(B, k)``,
    best first; rows with fewer than ``k`` possible ends are padded with node PAD and probability 0.

    This is how heads that score every path at once (flat, per-level heads, HierNet's conditional
    output) rank alternatives; autoregressive heads get theirs from a beam search instead."""
    if k < 1:
        raise ValueError(f"top-k must be ≥ 1, got {k}")
    p = np.asarray(path_prob, dtype=np.float64)
    p = np.where(np.isfinite(p) & (p > 0), p, -1.0)
    p[:, 0] = -1.0  # the root is never a class
    k_eff = min(k, p.shape[1])
    # only the entries at least as probable as each row's k-th are sorted (a partition finds it: O(N), not
    # a sort of all N+1 per image); the sort is stable on the negated probabilities, so ties keep the lower
    # node id first, as torch's max does
    kth = -np.partition(-p, k_eff - 1, axis=1)[:, k_eff - 1]
    order = np.empty((len(p), k_eff), dtype=np.int64)
    for r, row in enumerate(p):
        idx = np.flatnonzero(row >= kth[r])
        order[r] = idx[np.argsort(-row[idx], kind="stable")[:k_eff]]
    probs = np.take_along_axis(p, order, 1)
    nodes = np.where(probs > 0, order, PAD)
    probs = np.clip(probs, 0.0, None)
    if k_eff < k:
        nodes = np.pad(nodes, ((0, 0), (0, k - k_eff)), constant_values=PAD)
        probs = np.pad(probs, ((0, 0), (0, k - k_eff)))
    return nodes, probs


def _ids(path: Sequence[int] | np.ndarray) -> list[int]:
    return [int(n) for n in path if int(n) != PAD and int(n) > 0]


def prediction_record(
    file: str,
    tree: TreeView,
    path_ids: Sequence[int] | np.ndarray,
    path_probability: float,
    node_scores: Sequence[float] | np.ndarray,
    top_k: Sequence[tuple[Sequence[int] | np.ndarray, float]] = (),
    paths: Sequence[Sequence[int]] | None = None,
    digits: int = 6,
) -> dict:
    """One image's record.

    Args:
        path_ids: the decoded path (node ids from depth 1; PAD entries are dropped).
        node_scores: ``(N+1,)`` the model's per-node scores (``Prediction.scores``); the record keeps
            those of the nodes on the path.
        top_k: ``(path ids, probability)`` alternatives, best first (empty paths are dropped).
        paths: multi-label only, the thresholded set of paths (node ids each).
        digits: rounding of the probabilities, so JSON lines stay short.
    """
    ids = _ids(path_ids)
    record: dict = {
        "file": str(file),
        "path": [tree.names[n] for n in ids],
        "path_ids": ids,
        "path_probability": round(float(path_probability), digits),
        "node_probabilities": [round(float(node_scores[n]), digits) for n in ids],  # any array indexed by node id
        "top_k": [],
    }
    for alt, prob in top_k:
        alt_ids = _ids(alt)
        if alt_ids:
            record["top_k"].append({"path": [tree.names[n] for n in alt_ids], "path_ids": alt_ids,
                                    "probability": round(float(prob), digits)})
    if paths is not None:
        record["paths"] = [[tree.names[n] for n in _ids(p)] for p in paths]
    return record


def mark_novel(record: dict, tree: TreeView) -> dict:
    """``record`` of a head whose inner answers mean "a kind never seen under this node" (the ``hnd`` head's
    own answers) with ``novel`` (the answer is an inner node) and, when it is, ``under``: its path, as a
    person reads it ("Animals > Dogs")."""
    if "error" in record or not record.get("path_ids"):
        return record
    novel = bool(tree.children[record["path_ids"][-1]])
    return {**record, "novel": novel, **({"under": " > ".join(record["path"])} if novel else {})}


def error_record(file: str, message: str) -> dict:
    """The record of an image that could not be predicted: the others in the batch still are."""
    return {"file": str(file), "error": " ".join(str(message).split())}
