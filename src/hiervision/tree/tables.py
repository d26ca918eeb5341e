"""The torch side of the tree: its tables as tensors, the label encoders, and :class:`TreeTables`.

Every table is the numpy view's array (:attr:`hiervision.tree.core.Tree.view`) as a tensor: the
functions here that a :class:`~hiervision.taxonomy.Taxonomy` caches (``path_matrix``, ``depth_tensor``,
...) share the view's memory, and :class:`TreeTables` copies them once into a model's buffers. The
encoders are written once, on plain tensors, and used by both: a taxonomy checks label ids first
(one host sync), a model's tables do not (labels were checked where the data set was read).

Tables are O(N·depth) or less (trees reach 10^5 classes): ancestry is a comparison of depth-first
intervals (``tin`` / ``tout``), the LCA a binary-lifting walk (:func:`lca`), and sums over subtrees or
along paths go level by level (:func:`subtree_sum`, :func:`subtree_logsumexp`, :func:`path_sum`).
:func:`ancestor_matrix`, the dense (N+1)² table, is for small trees and tests only (an oracle, and what
the decision rules not yet rewritten read); no model or decoder builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from hiervision.tree import EOS, IGNORE, PAD
from hiervision.tree.core import Tree
from hiervision.tree.view import lowest_common_ancestor

__all__ = [
    "TreeTables", "ancestor_matrix", "carried_levels", "close_upwards", "column_index", "depth_tensor",
    "encode_level_positions", "encode_levels", "encode_onehot", "encode_paths", "encode_sequence",
    "is_ancestor", "lca", "level_labels", "level_position", "levels_by_depth", "parent_tensor", "path_ends",
    "path_matrix", "path_sum", "segment_logsumexp", "sibling_log_softmax", "step_candidates", "step_csr",
    "subtree_logsumexp", "subtree_sum",
]


# ---------------------------------------------------------------------- class columns and carried levels (heads)
def column_index(nodes: torch.Tensor | Sequence[int], num_nodes: int) -> torch.Tensor:
    """``(num_nodes,)``: the column of each node among a head's classes ``nodes``, −1 for a node that is no
    class — how a head reads a node-id target as a column of its logits."""
    nodes = torch.as_tensor(nodes, dtype=torch.long)
    index = torch.full((num_nodes,), -1, dtype=torch.long)
    index[nodes] = torch.arange(len(nodes))
    return index


def carried_levels(tree: Tree) -> list[list[int]]:
    """Node ids of each level 1..D−1 with shallower leaves carried down: level l holds the nodes at depth
    l and the leaves above it (the per-level heads' classes on a tree whose leaves lie at several depths)."""
    leaves = set(tree.leaves)
    out: list[list[int]] = []
    carried: list[int] = []
    for level in tree.levels[:-1]:
        out.append(sorted([*level, *carried]))
        carried += [n for n in level if n in leaves]
    return out


def level_labels(tables: TreeTables, nodes: list[int], lv: int) -> torch.Tensor:
    """``(N,)``: each node's class index at carried level ``lv`` (whose classes are ``nodes``) — its ancestor
    there, itself when a leaf above it — and −1 for an inner node above the level (a target too coarse)."""
    num_nodes = tables.taxonomy.num_nodes
    on = tables.paths[:, lv - 1]
    label = torch.where(on >= 0, on, torch.where(tables.leaf_mask, torch.arange(num_nodes), PAD))
    return torch.where(label >= 0, column_index(nodes, num_nodes)[label.clamp(min=0)], -1)


# ---------------------------------------------------------------------- a tree's tables, sharing its view's arrays
def path_matrix(tree: Tree) -> torch.Tensor:
    """``(N+1, D)`` long tensor: row n is the path of node n padded with :data:`PAD`."""
    return torch.from_numpy(tree.view.paths)


def depth_tensor(tree: Tree) -> torch.Tensor:
    """``(N+1,)`` long depth of every node (root 0)."""
    return torch.from_numpy(tree.view.depths)


def parent_tensor(tree: Tree) -> torch.Tensor:
    """``(N+1,)`` long parent ids; the root points to itself so gathers stay in range."""
    return torch.from_numpy(tree.view.parent)


def level_position(tree: Tree) -> torch.Tensor:
    """``(N+1,)`` long: index of each node within its level (root: -1), for per-level heads."""
    return torch.from_numpy(tree.view.level_position)


def ancestor_matrix(tree: Tree) -> torch.Tensor:
    """``(N+1, N+1)`` bool: ``A[n, m]`` is true when m is n or an ancestor of n (root excluded).

    Dense: small trees and tests only (see the module's docstring)."""
    return torch.from_numpy(tree.view.ancestors)


def levels_by_depth(tree: Tree) -> tuple[torch.Tensor, list[int]]:
    """Node ids sorted by depth and where each depth starts: ``ids[bounds[d]:bounds[d + 1]]`` is level ``d``."""
    levels = tree.view.levels
    bounds = np.cumsum([0, *(len(level) for level in levels)]).tolist()
    return torch.from_numpy(np.concatenate(levels)), bounds


# ---------------------------------------------------------------------- encoders, on tensors (no id checks)
def encode_paths(paths: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """``(B,) → (B, D)`` node ids per level, :data:`PAD` after the end."""
    return paths[nodes]


def encode_levels(paths: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Per-level cross-entropy targets ``(B, D)``: node ids, :data:`IGNORE` past the path's end."""
    p = paths[nodes]
    return p.masked_fill(p == PAD, IGNORE)


def encode_level_positions(paths: torch.Tensor, positions: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Per-level targets ``(B, D)`` as the index within each level, :data:`IGNORE` past the end."""
    p = paths[nodes]
    return positions[p.clamp(min=0)].masked_fill(p == PAD, IGNORE)


def encode_sequence(paths: torch.Tensor, depth: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Variable-length decoder targets ``(B, D + 1)``: the path, then :data:`EOS`, then :data:`IGNORE`."""
    p = torch.cat([paths[nodes], torch.full_like(nodes, PAD).unsqueeze(1)], dim=1)
    p = p.scatter(1, depth[nodes].unsqueeze(1), EOS)
    return p.masked_fill(p == PAD, IGNORE)


def encode_onehot(steps: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``(B, T)`` targets (:data:`IGNORE` padded) → ``(B, T, N+1)`` one-hot rows, all zero where ignored."""
    out = torch.zeros(*steps.shape, num_nodes, device=steps.device)
    valid = steps != IGNORE
    out[valid] = torch.nn.functional.one_hot(steps[valid], num_nodes).float()
    return out


def close_upwards(marks: torch.Tensor, parent: torch.Tensor, by_depth: torch.Tensor,
                  bounds: Sequence[int]) -> torch.Tensor:
    """``(B, N+1)`` bool marks → the marks plus all their ancestors (root column cleared).

    Bottom-up OR, one level at a time (``by_depth`` / ``bounds`` from :func:`levels_by_depth`): O(B·N),
    not a dense O(B·N²) product, and on the marks' device.
    """
    c = marks.T.bool().to(torch.int32).contiguous()
    for d in range(len(bounds) - 2, 0, -1):  # deepest level first; level 0's parent is the root, cleared below
        idx = by_depth[bounds[d] : bounds[d + 1]]
        c.index_add_(0, parent[idx], c[idx].clamp(max=1))
    c[0] = 0
    return (c > 0).T.contiguous()


def path_ends(closed: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)`` ancestor-closed bool sets → the nodes with no member child (the paths' ends)."""
    closed = closed.bool()
    has_child = torch.zeros(closed.shape[1], closed.shape[0], dtype=torch.int32, device=closed.device)
    has_child.index_add_(0, parent[1:], closed[:, 1:].T.to(torch.int32))
    ends = closed & ~(has_child > 0).T
    ends[:, 0] = False
    return ends


# ---------------------------------------------------------------------- tree algorithms on tensors, O(B·N) each
def is_ancestor(tin: torch.Tensor, tout: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bool (broadcast over id tensors): ``u`` is ``v`` or one of its ancestors (the root is everyone's)."""
    tv = tin[v]
    return (tin[u] <= tv) & (tv < tout[u])


def lca(depth: torch.Tensor, lift: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lowest common ancestor of node id tensors ``a`` and ``b`` (broadcast), by binary lifting:
    O(log D) gathers per pair, so a ``(B, C)`` grid of pairs costs O(B·C·log D), not a (N+1)² table."""
    a, b = torch.broadcast_tensors(a, b)
    return lowest_common_ancestor(a, b, depth, lift, torch)


def _levels(by_depth: torch.Tensor, bounds: Sequence[int], deepest_first: bool):
    order = range(len(bounds) - 2, -1, -1) if deepest_first else range(len(bounds) - 1)
    return (by_depth[bounds[d] : bounds[d + 1]] for d in order)


def _nodes_first_copy(x: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)`` → a contiguous ``(N+1, B)`` copy. Always a copy: with one row the transpose is already
    contiguous, and ``.contiguous()`` would hand back ``x``'s own storage for the in-place sums to change."""
    return x.T.clone(memory_format=torch.contiguous_format)


def subtree_sum(x: torch.Tensor, parent: torch.Tensor, by_depth: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """``(B, N+1)`` values per node → each node's sum over its subtree (itself included; column 0 holds
    the row's total): children add into their parents one level at a time, deepest first. O(B·N).

    The sums run on a ``(N+1, B)`` copy: a level's rows add into their parents' rows, contiguous."""
    out = _nodes_first_copy(x)
    for idx in _levels(by_depth, bounds, deepest_first=True):
        out.index_add_(0, parent[idx], out[idx])
    return out.T


def subtree_logsumexp(x: torch.Tensor, parent: torch.Tensor, by_depth: torch.Tensor,
                      bounds: Sequence[int]) -> torch.Tensor:
    """:func:`subtree_sum` in log space: ``log Σ exp(x)`` over each node's subtree, shifted by the largest
    term per node, so tiny probabilities (log-probabilities below -87 in fp32) keep their exact logs."""
    out = _nodes_first_copy(x)
    for idx in _levels(by_depth, bounds, deepest_first=True):
        p = parent[idx]
        up = torch.unique(p)  # only the parents change: no exp/log of the -inf of nodes with nothing below yet
        shift = out.detach().scatter_reduce(0, p.unsqueeze(1).expand(-1, out.shape[1]), out[idx].detach(), "amax")
        shift = shift.masked_fill(~torch.isfinite(shift), 0)
        kids = torch.zeros_like(out).index_add(0, p, (out[idx] - shift[p]).exp())
        total = kids[up] + (out[up] - shift[up]).exp()
        out = out.index_copy(0, up, total.log() + shift[up])
    return out.T


def path_sum(x: torch.Tensor, parent: torch.Tensor, by_depth: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """``(B, N+1)`` values per node → each node's sum along its path from depth 1 (column 0 is 0): every
    level adds its parents' finished sums, top-down. O(B·N), not a product with a (N+1)² table."""
    out = _nodes_first_copy(x)
    out[0] = 0
    for idx in list(_levels(by_depth, bounds, deepest_first=False))[1:]:
        out.index_add_(0, idx, out[parent[idx]])
    return out.T


# ---------------------------------------------------------------------- a decoder's next tokens, ragged (O(N) memory)
def step_csr(parent: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens a tree-restricted decoder may emit after each node, as one ragged (CSR) table.

    After node ``c`` (the root at the start) come :data:`EOS` when ``ends[c]`` lets a path stop there, then
    ``c``'s children in id order — the order of a dense ``(N+1,)`` row, so ties break alike. Returns
    ``(ptr, tokens, slot)``: ``tokens[ptr[c]:ptr[c + 1]]`` are the tokens after ``c``; ``slot[n]`` is node
    ``n``'s position in ``tokens`` (in its parent's run; ``slot[0]`` unused). O(N) memory, no (N+1)² table.
    """
    n = len(parent)
    kids = parent[1:]
    fan_out = torch.bincount(kids, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=parent.device)
    ptr[1:] = (fan_out + ends.long()).cumsum(0)
    order = torch.argsort(kids, stable=True) + 1  # node ids grouped by parent, each group in id order
    first = torch.zeros(n + 1, dtype=torch.long, device=parent.device)  # where each parent's group starts in order
    first[1:] = fan_out.cumsum(0)
    rank = torch.arange(n - 1, device=parent.device) - first[parent[order]]
    slot = torch.zeros(n, dtype=torch.long, device=parent.device)
    slot[order] = ptr[parent[order]] + ends.long()[parent[order]] + rank
    tokens = torch.full((int(ptr[-1]),), EOS, dtype=torch.long, device=parent.device)
    tokens[slot[1:]] = torch.arange(1, n, device=parent.device)  # the rest (the first of a stopping node) is EOS
    return ptr, tokens, slot


def step_candidates(ptr: torch.Tensor, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ragged candidates of ``contexts`` ``(M,)`` under :func:`step_csr`'s ``ptr``: ``(seg, pos, start)`` —
    for each candidate its context's row ``seg`` and its position ``pos`` in the table's ``tokens``; ``start``
    ``(M,)`` where each row's candidates begin in the flat list. O(Σ fan-out), never (M, N)."""
    counts = ptr[contexts + 1] - ptr[contexts]
    seg = torch.repeat_interleave(torch.arange(len(contexts), device=contexts.device), counts)
    start = counts.cumsum(0) - counts
    pos = ptr[contexts][seg] + torch.arange(len(seg), device=contexts.device) - start[seg]
    return seg, pos, start


def segment_logsumexp(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``log Σ exp(x)`` over the entries of each segment (``seg`` ``(S,)`` row ids): ``(num_segments,)``,
    ``-inf`` for an empty one. Shifted by each segment's largest entry (scatter amax) before the exp, so
    it is exact where a plain exp would under- or overflow; differentiable in ``x``."""
    shift = torch.full((num_segments,), float("-inf"), dtype=x.dtype, device=x.device)
    shift = shift.scatter_reduce(0, seg, x.detach(), "amax")
    shift = shift.masked_fill(~torch.isfinite(shift), 0)
    total = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add(0, seg, (x - shift[seg]).exp())
    return total.log() + shift


def sibling_log_softmax(x: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)`` scores per node → each node's log-softmax among its siblings (the children of its
    parent; column 0, the root, is 0): a hierarchical softmax's node terms, by scatter amax / scatter add
    over the parent ids, O(B·N) — no (N+1)² sibling mask."""
    kids = x[:, 1:]
    idx = parent[1:].expand(len(x), -1)
    shift = torch.full_like(x, float("-inf")).scatter_reduce(1, idx, kids.detach(), "amax")
    shift = shift.masked_fill(~torch.isfinite(shift), 0).gather(1, idx)
    total = torch.zeros_like(x).scatter_add(1, idx, (kids - shift).exp())
    return torch.nn.functional.pad(kids - shift - total.gather(1, idx).log(), (1, 0))


class TreeTables(nn.Module):
    """The tree's lookup tables as non-persistent buffers, for the per-step code of a model.

    Every loss and decode reads some table (paths, depths, depth-first intervals, the lifting table,
    where paths may end), all O(N·depth) or less. As buffers of the model they move once with
    ``model.to(device)`` instead of being copied from the CPU on every call, and they stay out of
    ``state_dict`` (the tree is saved on its own). The encoders never check label ids on the host
    (that check is a device→host sync per step); labels are checked once, where the data set is read.
    Tables are bool/long, so ``model.to(torch.float64)`` leaves them as they are.
    """

    def __init__(self, taxonomy: Tree) -> None:
        super().__init__()
        self.taxonomy = taxonomy
        view = taxonomy.view
        by_depth, self.level_bounds = levels_by_depth(taxonomy)
        tables = {
            "paths": view.paths, "depth": view.depths, "parent": view.parent, "level_position": view.level_position,
            "leaf_mask": view.leaf_mask, "by_depth": by_depth, "tin": view.tin, "tout": view.tout, "lift": view.lift,
            "height": np.asarray(taxonomy.heights, dtype=np.int64),
        }
        for name, t in tables.items():  # copies: in-place edits of a buffer must not reach the tree's view
            self.register_buffer(name, torch.as_tensor(t).clone(), persistent=False)

    def end_mask(self, end_nodes: torch.Tensor | str | None = None) -> torch.Tensor:
        """``(N+1,)`` bool where a path may stop (see :func:`hiervision.decoding.end_mask`)."""
        if isinstance(end_nodes, torch.Tensor):
            mask = end_nodes.to(self.leaf_mask.device, torch.bool).clone()
        elif end_nodes == "all":
            mask = torch.ones_like(self.leaf_mask)
        elif end_nodes in (None, "leaves"):
            mask = self.leaf_mask.clone()
        else:
            raise ValueError(f"end_nodes must be 'leaves', 'all' or a bool tensor, got {end_nodes!r}")
        mask[0] = False  # the root is not a class
        return mask

    def encode_paths(self, nodes: torch.Tensor) -> torch.Tensor:
        return encode_paths(self.paths, nodes)

    def encode_levels(self, nodes: torch.Tensor) -> torch.Tensor:
        return encode_levels(self.paths, nodes)

    def encode_level_positions(self, nodes: torch.Tensor) -> torch.Tensor:
        return encode_level_positions(self.paths, self.level_position, nodes)

    def encode_sequence(self, nodes: torch.Tensor) -> torch.Tensor:
        return encode_sequence(self.paths, self.depth, nodes)

    def close_upwards(self, marks: torch.Tensor) -> torch.Tensor:
        return close_upwards(marks, self.parent, self.by_depth, self.level_bounds)

    def is_ancestor(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return is_ancestor(self.tin, self.tout, u, v)

    def lca(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lca(self.depth, self.lift, a, b)

    def subtree_sum(self, x: torch.Tensor) -> torch.Tensor:
        return subtree_sum(x, self.parent, self.by_depth, self.level_bounds)

    def scatter_subtree_sum(self, values: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` values at ``nodes`` (distinct ids, ascending for speed) → ``(B, N+1)`` sum over each
        node's subtree: a flat softmax's node marginals. The values land in a fresh ``(N+1, B)`` block that is
        summed in place — no working copy, which at 10^5 nodes is a good part of a flat prediction."""
        rows = values.new_zeros(len(self.parent), len(values)).index_copy_(0, nodes, values.T.contiguous())
        for idx in _levels(self.by_depth, self.level_bounds, deepest_first=True):
            rows.index_add_(0, self.parent[idx], rows[idx])
        return rows.T

    def subtree_logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        return subtree_logsumexp(x, self.parent, self.by_depth, self.level_bounds)

    def path_sum(self, x: torch.Tensor) -> torch.Tensor:
        return path_sum(x, self.parent, self.by_depth, self.level_bounds)
