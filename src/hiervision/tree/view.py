"""The numpy view of a class tree: the one place its arrays (paths, depths, parents, leaves) are computed.

Torch-free on purpose: the ONNX runtime and the server read ``taxonomy.json`` into a :class:`TreeView`
without PyTorch, and :class:`~hiervision.tree.core.Tree` keeps one as its ``view``, from which the
torch tables (:mod:`hiervision.tree.tables`) are made without another copy of the same walk.

Every array is O(N·depth) or less, so trees of 10^5 classes fit: "u is an ancestor of v" is a
comparison of depth-first intervals (:attr:`TreeView.tin` / :attr:`TreeView.tout`), the lowest common
ancestor comes from a binary-lifting table (:meth:`TreeView.lca`), and sums over subtrees or along paths
run level by level (:meth:`TreeView.subtree_sum`, :meth:`TreeView.path_sum`). The one dense (N+1)²
table, :attr:`TreeView.ancestors`, is an oracle for small trees and tests only, built on demand.
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

__all__ = ["TreeView", "lowest_common_ancestor"]


def lowest_common_ancestor(a, b, depth, lift, xp):
    """LCA of same-shaped id arrays by binary lifting: lift the deeper node by the depth difference, one
    bit at a time, then lift both while their ancestors differ. ``xp`` is numpy or torch (the torch
    tables call this too), with ``depth`` ``(N+1,)`` and ``lift`` ``(K, N+1)`` arrays of that library."""
    swap = depth[a] < depth[b]
    a, b = xp.where(swap, b, a), xp.where(swap, a, b)  # a is now the deeper one
    diff = depth[a] - depth[b]
    for k in range(lift.shape[0]):
        a = xp.where(((diff >> k) & 1) == 1, lift[k][a], a)
    for k in range(lift.shape[0] - 1, -1, -1):
        ua, ub = lift[k][a], lift[k][b]
        move = ua != ub
        a, b = xp.where(move, ua, a), xp.where(move, ub, b)
    return xp.where(a == b, a, lift[0][a])


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

        Dense: for small trees and tests only (the oracle the O(N·D) code here is checked against, and
        what the decision rules not yet rewritten read). Nothing on a model's path builds it.
        """
        a = np.zeros((self.num_nodes, self.num_nodes), dtype=bool)
        rows, cols = np.nonzero(self.paths != PAD)
        a[rows, self.paths[rows, cols]] = True
        return a

    @cached_property
    def _euler(self) -> tuple[np.ndarray, np.ndarray]:
        order, stack = [], [0]  # preorder, children in id order: one iterative walk, any depth
        while stack:
            v = stack.pop()
            order.append(v)
            stack.extend(reversed(self.children[v]))
        tin = np.empty(self.num_nodes, dtype=np.int64)
        tin[np.asarray(order, dtype=np.int64)] = np.arange(self.num_nodes)
        return tin, tin + self.subtree_sum(np.ones((1, self.num_nodes), dtype=np.int64))[0]

    @property
    def tin(self) -> np.ndarray:
        """``(N+1,)`` preorder position of every node (children in id order; root 0). A subtree is the
        contiguous block ``tin[u] <= tin[v] < tout[u]``, so any set of nodes sorted by ``tin`` lists the
        members under one node as one range."""
        return self._euler[0]

    @property
    def tout(self) -> np.ndarray:
        """``(N+1,)`` one past the last preorder position in each node's subtree (``tin`` + its size)."""
        return self._euler[1]

    def is_ancestor(self, u, v) -> np.ndarray:
        """Bool (broadcast over id arrays): ``u`` is ``v`` or one of its ancestors (the root is everyone's)."""
        tin, tout = self._euler
        u, v = np.asarray(u), np.asarray(v)
        return (tin[u] <= tin[v]) & (tin[v] < tout[u])

    @cached_property
    def lift(self) -> np.ndarray:
        """``(K, N+1)`` binary-lifting table: ``lift[k, v]`` is v's ancestor ``2^k`` levels up (the root
        stays the root), ``K = max(1, ⌈log2(D + 1)⌉)``: O(N log D) memory for O(log D) LCA queries."""
        k = max(1, int(self.max_depth).bit_length())
        up = np.empty((k, self.num_nodes), dtype=np.int64)
        up[0] = self.parent
        for i in range(1, k):
            up[i] = up[i - 1][up[i - 1]]
        return up

    def lca(self, a, b) -> np.ndarray:
        """Lowest common ancestor of node id arrays ``a`` and ``b`` (broadcast; 0 when only the root is shared)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        return lowest_common_ancestor(a, b, self.depths, self.lift, np)

    @cached_property
    def _groups(self) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]:
        """Per level (``levels`` order): (the order that sorts its nodes by parent, those nodes so sorted,
        their distinct parents, where each parent's run starts), so a level's values add into their
        parents with one ``reduceat``."""
        out = []
        for idx in self.levels:
            order = np.argsort(self.parent[idx], kind="stable")
            par = self.parent[idx[order]]
            starts = np.flatnonzero(np.r_[True, par[1:] != par[:-1]])
            out.append((order, idx[order], par[starts], starts))
        return tuple(out)

    def subtree_sum(self, x: np.ndarray, nodes_first: bool = False, inplace: bool = False) -> np.ndarray:
        """``(B, N+1)`` values per node → each node's sum over its subtree (itself included; the root's
        column holds the row's total), bottom-up one level at a time: O(B·N), never a (N+1)² product.
        ``nodes_first``: ``x`` is ``(N+1, ...)`` (any trailing axes), and so is the result. ``inplace``: into
        ``x`` itself (a caller's scratch buffer: on a 10⁵-node tree fresh pages cost more than the sums)."""
        out = x if inplace else np.array(x, copy=True)
        for _, kids, par, starts in reversed(self._groups):
            if nodes_first:
                out[par] += np.add.reduceat(out[kids], starts, axis=0)
            else:
                out[:, par] += np.add.reduceat(out[:, kids], starts, axis=1)
        return out

    def children_sum(self, x: np.ndarray, level: int | None = None) -> np.ndarray:
        """``(B, N+1)`` float64: column p holds the sum of ``x`` over p's children (0 at leaves). ``x`` is
        ``(B, N+1)`` values per node, or with ``level=d`` the ``(B, len(levels[d]))`` values of the nodes at
        depth ``d + 1`` in ``levels[d]``'s order (then only their parents' columns are filled)."""
        out = np.zeros((len(x), self.num_nodes))
        for d in range(self.max_depth) if level is None else (level,):
            order, kids, par, starts = self._groups[d]
            out[:, par] = np.add.reduceat(x[:, kids] if level is None else x[:, order], starts, axis=1)
        return out

    def path_sum(self, x: np.ndarray, nodes_first: bool = False, inplace: bool = False) -> np.ndarray:
        """``(B, N+1)`` values per node → each node's sum along its path from depth 1 (the root's own
        value left out, its column 0), top-down one level at a time. ``nodes_first``, ``inplace``: as in
        :meth:`subtree_sum`."""
        out = x if inplace else np.array(x, copy=True)
        view = out if nodes_first else out.T
        view[0] = 0
        for idx in self.levels[1:]:
            view[idx] += view[self.parent[idx]]
        return out

    @cached_property
    def heights(self) -> np.ndarray:
        """``(N+1,)`` longest distance from each node down to a leaf below it (0 at leaves)."""
        h = np.zeros(self.num_nodes, dtype=np.int64)
        for idx in reversed(self.levels):
            np.maximum.at(h, self.parent[idx], h[idx] + 1)
        return h

    @cached_property
    def child_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr, ids)``: node v's children are ``ids[ptr[v]:ptr[v + 1]]``, ascending — a search step reads
        the few tokens allowed after its nodes from these O(N) arrays instead of an (N+1)-wide mask."""
        ptr = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum([len(k) for k in self.children], out=ptr[1:])
        ids = np.fromiter((c for k in self.children for c in k), dtype=np.int64, count=int(ptr[-1]))
        return ptr, ids

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
