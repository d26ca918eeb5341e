"""Prediction records: the one JSON-able result per image that ``hiervision predict``, the ONNX
runtime and the server all return, so a client never special-cases where a prediction came from.

Torch-free on purpose (numpy only): the runtime and the server build records without PyTorch.
:class:`TreeView` is the small read-only view of ``taxonomy.json`` they need for that.

A record::

    {"file": str, "path": [names], "path_ids": [ints], "path_probability": float,
     "node_probabilities": [one float per node on the path],
     "top_k": [{"path": [names], "path_ids": [ints], "probability": float}, ...]}

multi-label records add ``"paths"`` (the thresholded set, as lists of names); an image that could
not be read gives ``{"file": ..., "error": "one line"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = ["TreeView", "error_record", "prediction_record", "top_k_ends"]

PAD = -1  # same convention as hiervision.taxonomy (kept here so this module does not import torch)


@dataclass(frozen=True)
class TreeView:
    """Names and parents of a class tree (node 0 = root, classes 1..N), with the few derived
    arrays decoding needs. The full :class:`~hiervision.taxonomy.Taxonomy` validates trees; this
    only reads one that was already saved by it."""

    names: tuple[str, ...]
    parents: tuple[int, ...]
    _paths: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.parents) or not self.parents or self.parents[0] != -1:
            raise ValueError("tree: names and parents must have the same length and node 0 must be the root")
        paths: list[tuple[int, ...]] = [()] * len(self.parents)
        for n in range(1, len(self.parents)):  # parents may come after children: walk up each node
            chain, p = [n], self.parents[n]
            while p > 0:
                chain.append(p)
                p = self.parents[p]
                if len(chain) > len(self.parents):
                    raise ValueError(f"tree: node {n} lies on a cycle")
            paths[n] = tuple(reversed(chain))
        object.__setattr__(self, "_paths", tuple(paths))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "taxonomy") -> TreeView:
        """Read the ``hiervision-taxonomy`` JSON format (what ``Taxonomy.save`` writes)."""
        try:
            nodes = sorted(data["nodes"], key=lambda n: n["id"])
            if [n["id"] for n in nodes] != list(range(len(nodes))):
                raise ValueError(f"{source}: node ids must be 0..N without gaps")
            return cls(tuple(str(n["name"]) for n in nodes), tuple(int(n["parent"]) for n in nodes))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a hiervision taxonomy ({e!r})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> TreeView:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the taxonomy ({e})") from None
        return cls.from_dict(data, source=str(path))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of names and parents, the same as :attr:`hiervision.taxonomy.Taxonomy.fingerprint`: an
        exported model's sidecar stores it, so an edited tree (a renamed or moved class) is refused."""
        return hashlib.sha256(json.dumps([list(self.names), list(self.parents)]).encode()).hexdigest()[:16]

    @property
    def num_nodes(self) -> int:
        """N + 1 (the root included), the width of every per-node vector."""
        return len(self.parents)

    def path(self, node: int) -> tuple[int, ...]:
        """Node ids from depth 1 down to ``node`` (empty for the root)."""
        return self._paths[node]

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self._paths)

    @property
    def depths(self) -> np.ndarray:
        """``(N+1,)`` depth of every node (root 0)."""
        return np.array([len(p) for p in self._paths], dtype=np.int64)

    @property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for n in range(1, len(self.parents)):
            kids[self.parents[n]].append(n)
        return tuple(tuple(k) for k in kids)

    def end_mask(self, end_nodes: str = "leaves") -> np.ndarray:
        """``(N+1,)`` bool, where a path may stop: ``"leaves"`` or ``"all"`` (never the root)."""
        if end_nodes == "all":
            mask = np.ones(self.num_nodes, dtype=bool)
        elif end_nodes == "leaves":
            mask = np.array([not k for k in self.children], dtype=bool)
        else:
            raise ValueError(f"end_nodes must be 'leaves' or 'all', got {end_nodes!r}")
        mask[0] = False
        return mask


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
    # stable sort on the negated probabilities: ties keep the lower node id first, as torch's max does
    order = np.argsort(-p, axis=1, kind="stable")[:, :k_eff]
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
    scores = np.asarray(node_scores, dtype=np.float64)
    record: dict = {
        "file": str(file),
        "path": [tree.names[n] for n in ids],
        "path_ids": ids,
        "path_probability": round(float(path_probability), digits),
        "node_probabilities": [round(float(scores[n]), digits) for n in ids],
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


def error_record(file: str, message: str) -> dict:
    """The record of an image that could not be predicted: the others in the batch still are."""
    return {"file": str(file), "error": " ".join(str(message).split())}
