"""The numpy view of a class tree: the one place its arrays (paths, depths, parents, leaves) are computed.

Torch-free on purpose: the ONNX runtime and the server read ``taxonomy.json`` into a :class:`TreeView`
without PyTorch, and :class:`~hiervision.tree.core.Tree` keeps one as its ``view``, from which the
torch tables (:mod:`hiervision.tree.tables`) are made without another copy of the same walk.
Every array is O(N·depth) but :attr:`TreeView.ancestors`, the one dense (N+1)² table, built on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from hiervision.tree import PAD

__all__ = ["TreeView"]


@dataclass(frozen=True)
class TreeView:
    """Names and parents of a class tree (node 0 = root, classes 1..N) with the arrays derived from them.

    It checks only what its own arrays need (lengths, a root, parents in range, no cycle):
    :class:`~hiervision.tree.core.Tree` validates trees (unique sibling names, ...); this reads one
    that was already saved by it. Arrays are computed on first use and shared: treat them as read-only.
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    children: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    depths: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.parents)
        if len(self.names) != n or not n or self.parents[0] != -1:
            raise ValueError("tree: names and parents must have the same length and node 0 must be the root")
        kids: list[list[int]] = [[] for _ in range(n)]
        for v in range(1, n):
            p = self.parents[v]
            if not 0 <= p < n:
                raise ValueError(f"tree: node {v} has parent {p}, not a node id")
            kids[p].append(v)
        # depths top-down from the root; a node the walk never reaches lies on a cycle
        depth = np.full(n, -1, dtype=np.int64)
        depth[0], stack = 0, [0]
        while stack:
            v = stack.pop()
            for c in kids[v]:
                depth[c] = depth[v] + 1
                stack.append(c)
        if (depth < 0).any():
            raise ValueError(f"tree: node {int(np.flatnonzero(depth < 0)[0])} lies on a cycle")
        object.__setattr__(self, "children", tuple(tuple(k) for k in kids))
        object.__setattr__(self, "depths", depth)

    # ------------------------------------------------------------------ reading a saved tree
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

    # ------------------------------------------------------------------ queries and arrays
    @property
    def num_nodes(self) -> int:
        """N + 1 (the root included), the width of every per-node vector."""
        return len(self.parents)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of names and parents: a checkpoint or an exported model made for another tree (a renamed,
        moved or dropped class) is refused by comparing it."""
        return hashlib.sha256(json.dumps([list(self.names), list(self.parents)]).encode()).hexdigest()[:16]

    @cached_property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def path(self, node: int) -> tuple[int, ...]:
        """Node ids from depth 1 down to ``node`` (empty for the root)."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node]
        return tuple(reversed(out))

    @cached_property
    def parent(self) -> np.ndarray:
        """``(N+1,)`` parent ids; the root points to itself so gathers stay in range."""
        return np.array([0, *self.parents[1:]], dtype=np.int64)

    @cached_property
    def levels(self) -> tuple[np.ndarray, ...]:
        """``levels[d]``: ids of the nodes at depth ``d + 1``, ascending (one stable sort, O(N log N))."""
        order = np.argsort(self.depths, kind="stable")
        bounds = np.searchsorted(self.depths[order], np.arange(1, self.max_depth + 2))
        return tuple(order[bounds[d] : bounds[d + 1]] for d in range(self.max_depth))

    @cached_property
    def paths(self) -> np.ndarray:
        """``(N+1, D)``: row n is the path of node n padded with :data:`~hiervision.tree.PAD` (root: all PAD).

        Built one depth at a time (a node's row is its parent's plus itself): O(N·D) like its size.
        """
        paths = np.full((self.num_nodes, self.max_depth), PAD, dtype=np.int64)
        for d, rows in enumerate(self.levels, start=1):
            paths[rows, : d - 1] = paths[self.parent[rows], : d - 1]
            paths[rows, d - 1] = rows
        return paths

    @cached_property
    def ancestors(self) -> np.ndarray:
        """``(N+1, N+1)`` bool: ``A[n, m]`` is true when m is n or an ancestor of n (root excluded).

        Dense, so built only where a decoder or marginal still reads it; everything else here is O(N·D).
        """
        a = np.zeros((self.num_nodes, self.num_nodes), dtype=bool)
        rows, cols = np.nonzero(self.paths != PAD)
        a[rows, self.paths[rows, cols]] = True
        return a

    @cached_property
    def leaf_mask(self) -> np.ndarray:
        """``(N+1,)`` bool, true at nodes without children (the root is never one)."""
        mask = np.array([not k for k in self.children], dtype=bool)
        mask[0] = False
        return mask

    @cached_property
    def level_position(self) -> np.ndarray:
        """``(N+1,)``: index of each node within its level, in id order (root: -1), for per-level heads."""
        pos = np.full(self.num_nodes, -1, dtype=np.int64)
        for rows in self.levels:
            pos[rows] = np.arange(len(rows))
        return pos

    def end_mask(self, end_nodes: str = "leaves") -> np.ndarray:
        """``(N+1,)`` bool, where a path may stop: ``"leaves"`` or ``"all"`` (never the root)."""
        if end_nodes == "all":
            mask = np.ones(self.num_nodes, dtype=bool)
        elif end_nodes == "leaves":
            mask = self.leaf_mask.copy()
        else:
            raise ValueError(f"end_nodes must be 'leaves' or 'all', got {end_nodes!r}")
        mask[0] = False
        return mask
