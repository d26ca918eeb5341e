"""The tree core: a validated, immutable class tree and its structural queries.

Structure only (names, parents, children, depths, paths, ancestors, LCA, levels, the fingerprint)
and the transformations that return a new tree (prune, collapse, cap depth). Reading and writing
files lives in :mod:`hiervision.tree.formats`, tensors in :mod:`hiervision.tree.tables`; the arrays
come from the numpy :attr:`Tree.view`. Use :class:`hiervision.taxonomy.Taxonomy`, which adds those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import TypeVar

import numpy as np

from hiervision.tree import TaxonomyError
from hiervision.tree.view import TreeView

__all__ = ["Tree"]

T = TypeVar("T", bound="Tree")


class Tree:
    """A rooted tree of classes with O(1) depth and O(depth) path queries; immutable (transformations copy).

    Args:
        names: name of every node; ``names[0]`` is the root.
        parents: parent id of every node; ``parents[0]`` must be ``-1``.
        external_ids: optional external identifier per node (WordNet ``n0...``, Open Images ``/m/...``).
    """

    def __init__(
        self,
        names: Sequence[str],
        parents: Sequence[int],
        external_ids: Sequence[str | None] | None = None,
    ) -> None:
        names = [str(n) for n in names]
        parents = [int(p) for p in parents]
        if len(names) != len(parents):
            raise TaxonomyError(f"{len(names)} names but {len(parents)} parents")
        if len(names) < 2:
            raise TaxonomyError("empty tree: it needs at least one class below the root")
        if parents[0] != -1:
            raise TaxonomyError(f"node 0 ({names[0]!r}) must be the root (parent -1), got {parents[0]}")
        self.names: tuple[str, ...] = tuple(names)
        self.parents: tuple[int, ...] = tuple(parents)
        ext = list(external_ids) if external_ids is not None else [None] * len(names)
        if len(ext) != len(names):
            raise TaxonomyError(f"{len(names)} names but {len(ext)} external ids")
        self.external_ids: tuple[str | None, ...] = tuple(ext)
        self._validate()
        #: the numpy arrays of this tree (paths, depths, leaves, ...), shared with the torch tables
        self.view = TreeView(self.names, self.parents)
        self.children: tuple[tuple[int, ...], ...] = self.view.children
        self.depths: tuple[int, ...] = tuple(self.view.depths.tolist())

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        n = len(self.names)
        for i, p in enumerate(self.parents[1:], start=1):
            if p == -1:
                raise TaxonomyError(f"node {self.names[i]!r} has no parent (only the root may)")
            if not 0 <= p < n:
                raise TaxonomyError(f"node {self.names[i]!r} has unknown parent id {p}")
            if p == i:
                raise TaxonomyError(f"cycle: node {self.names[i]!r} is its own parent")
        # cycle check: every node must reach the root
        state = [0] * n  # 0 unseen, 1 on stack, 2 done
        state[0] = 2
        for start in range(1, n):
            chain = []
            v = start
            while state[v] == 0:
                state[v] = 1
                chain.append(v)
                v = self.parents[v]
            if state[v] == 1:
                raise TaxonomyError(f"cycle through node {self.names[v]!r}")
            for c in chain:
                state[c] = 2
        seen: dict[tuple[int, str], int] = {}
        for i in range(1, n):
            key = (self.parents[i], self.names[i])
            if key in seen:
                raise TaxonomyError(
                    f"duplicate name {self.names[i]!r} under parent {self.names[self.parents[i]]!r}"
                )
            seen[key] = i

    def _topological(self) -> list[int]:
        """Node ids depth-first from the root, parents before children."""
        order, stack = [], [0]
        while stack:
            v = stack.pop()
            order.append(v)
            stack.extend(reversed(self.children[v]))
        return order

    @property
    def fingerprint(self) -> str:
        """Hash of names and parents (:attr:`TreeView.fingerprint`): a checkpoint made for another tree is refused."""
        return self.view.fingerprint

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and (self.names, self.parents) == (other.names, other.parents)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __len__(self) -> int:
        """Number of classes N (the root is not counted)."""
        return len(self.names) - 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={len(self)}, leaves={len(self.leaves)}, depth={self.max_depth})"

    # ------------------------------------------------------------------ lookups
    @property
    def num_nodes(self) -> int:
        """N + 1: the width of every vector over nodes (root/EOS column included)."""
        return len(self.names)

    @cached_property
    def external_index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.external_ids) if e is not None}

    @cached_property
    def _name_index(self) -> dict[str, list[int]]:
        idx: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            idx.setdefault(n, []).append(i)
        return idx

    def index(self, key: str | int) -> int:
        """Node id of a name, an external id, a ``/``-separated name path, or an id."""
        if isinstance(key, (int, np.integer)):
            if not 0 <= int(key) < self.num_nodes:
                raise TaxonomyError(f"node id {key} is not in the tree (0..{len(self)})")
            return int(key)
        if key in self.external_index:
            return self.external_index[key]
        hits = self._name_index.get(key, [])
        if len(hits) == 1:
            return hits[0]
        if "/" in key:
            return self._walk(key)
        if len(hits) > 1:
            paths = " or ".join(self.path_name(h) for h in hits[:2])
            raise TaxonomyError(f"label {key!r} is ambiguous: write its path ({paths})")
        raise TaxonomyError(f"label {key!r} is not in the tree")

    def _walk(self, key: str) -> int:
        """A ``/``-separated name path from the root. A class whose own name holds ``/`` (Fashion-MNIST's
        ``T-shirt/top``) is found too: at each level the longest run of parts that names a child is taken."""
        node, parts, i = 0, key.strip("/").split("/"), 0
        while i < len(parts):
            names = {self.names[c]: c for c in self.children[node]}
            j = next((j for j in range(len(parts), i, -1) if "/".join(parts[i:j]) in names), None)
            if j is None:
                raise TaxonomyError(f"label {key!r} is not in the tree (no {parts[i]!r} under {self.names[node]!r})")
            node, i = names["/".join(parts[i:j])], j
        return node

    def path_name(self, node: int, sep: str = "/") -> str:
        return sep.join(self.names[n] for n in self.path(node))

    # ------------------------------------------------------------------ structure
    @cached_property
    def leaves(self) -> tuple[int, ...]:
        """Nodes without children, in id order (the classes of a flat softmax)."""
        return tuple(i for i in range(1, self.num_nodes) if not self.children[i])

    @property
    def max_depth(self) -> int:
        return self.view.max_depth

    @cached_property
    def is_fixed_depth(self) -> bool:
        """True when every leaf has the same depth (required by fixed-path-length models)."""
        return len({self.depths[n] for n in self.leaves}) == 1

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """``levels[d]`` = node ids at depth ``d + 1``, ascending."""
        return tuple(tuple(level.tolist()) for level in self.view.levels)

    def depth(self, node: int) -> int:
        return self.depths[node]

    def path(self, node: int) -> tuple[int, ...]:
        """Node ids from depth 1 down to ``node`` (empty for the root)."""
        return self.view.path(node)

    def ancestors(self, node: int) -> tuple[int, ...]:
        """Strict ancestors, root excluded, top first."""
        return self.path(node)[:-1]

    def is_valid_path(self, path: Sequence[int]) -> bool:
        """A sequence is valid when it starts below the root and each node is the previous one's child."""
        prev = 0
        for n in path:
            n = int(n)
            if not 0 < n < self.num_nodes or self.parents[n] != prev:
                return False
            prev = n
        return len(path) > 0

    def lca(self, a: int, b: int) -> int:
        """Lowest common ancestor (0 when only the root is shared)."""
        while self.depths[a] > self.depths[b]:
            a = self.parents[a]
        while self.depths[b] > self.depths[a]:
            b = self.parents[b]
        while a != b:
            a, b = self.parents[a], self.parents[b]
        return a

    def distance(self, a: int, b: int) -> int:
        """Number of edges between two nodes."""
        return self.depths[a] + self.depths[b] - 2 * self.depths[self.lca(a, b)]

    @cached_property
    def heights(self) -> tuple[int, ...]:
        """Longest distance from each node down to a leaf below it (0 for leaves): :attr:`TreeView.heights`."""
        return tuple(self.view.heights.tolist())

    def subtree(self, node: int) -> list[int]:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            out.append(v)
            stack.extend(self.children[v])
        return sorted(out)

    # ------------------------------------------------------------------ transformations
    def _rebuild(self: T, keep: Sequence[int], new_parent: Mapping[int, int], root_name: str | None = None) -> T:
        """New taxonomy over ``keep`` (old ids, in order) with parents given by old ids."""
        remap = {0: 0}
        for n in keep:
            remap[n] = len(remap)
        names = [root_name or self.names[0]] + [self.names[n] for n in keep]
        ext = [self.external_ids[0]] + [self.external_ids[n] for n in keep]
        parents = [-1] + [remap[new_parent[n]] for n in keep]
        # moving nodes up can make two same-named nodes siblings: tell them apart by their id
        count: dict[tuple[int, str], int] = {}
        for i in range(1, len(names)):
            count[(parents[i], names[i])] = count.get((parents[i], names[i]), 0) + 1
        for i in range(1, len(names)):
            if count[(parents[i], names[i])] > 1:
                names[i] = f"{names[i]} ({ext[i] or keep[i - 1]})"
        # parents must come before children for readability: reorder topologically
        tax = type(self)(names, parents, ext)
        order = [n for n in tax._topological() if n]
        pos = {0: 0, **{n: i + 1 for i, n in enumerate(order)}}
        return type(self)(
            [tax.names[0]] + [tax.names[n] for n in order],
            [-1] + [pos[tax.parents[n]] for n in order],
            [tax.external_ids[0]] + [tax.external_ids[n] for n in order],
        )

    def prune(self: T, keep: Iterable[int]) -> T:
        """Keep the given nodes and their ancestors; drop every node that none of them reaches."""
        kept: set[int] = set()
        for n in keep:
            kept.update(self.path(n))
        order = sorted(kept)
        return self._rebuild(order, {n: self.parents[n] for n in order})

    def collapse(self: T, remove: Callable[[T, int], bool], root_name: str | None = None) -> T:
        """Remove the nodes where ``remove(self, node)`` holds; children move up to the nearest kept ancestor."""
        dropped = {n for n in range(1, self.num_nodes) if remove(self, n)}
        keep = [n for n in range(1, self.num_nodes) if n not in dropped]
        new_parent = {}
        for n in keep:
            p = self.parents[n]
            while p in dropped:
                p = self.parents[p]
            new_parent[n] = p
        return self._rebuild(keep, new_parent, root_name=root_name)

    def collapse_chains(self: T, protect: Iterable[int] | None = None) -> T:
        """Remove inner nodes with exactly one child (unless protected, e.g. labelled classes).

        The root is treated the same way: while it would be left with a single inner child, that
        child goes too, so the tree does not start with a chain.
        """
        protect = set(protect or ())
        drop = {n for n in range(1, self.num_nodes) if len(self.children[n]) == 1 and n not in protect}

        def kept_children(v: int) -> list[int]:
            out, stack = [], list(self.children[v])
            while stack:
                c = stack.pop()
                if c in drop:
                    stack.extend(self.children[c])
                else:
                    out.append(c)
            return out

        top = kept_children(0)
        while len(top) == 1 and self.children[top[0]] and top[0] not in protect:
            drop.add(top[0])
            top = kept_children(top[0])
        return self.collapse(lambda t, n: n in drop)

    def cap_depth(self: T, max_depth: int) -> T:
        """Make every path at most ``max_depth`` long by dropping the lowest intermediate nodes.

        Each node keeps its top ``max_depth - 1`` ancestors; leaves are never dropped, so every
        class survives. Inner nodes deeper than the cap (no longer on any kept chain) disappear.
        """
        if max_depth < 1:
            raise TaxonomyError(f"max_depth must be ≥ 1, got {max_depth}")
        keep_inner: set[int] = set()
        for leaf in self.leaves:
            keep_inner.update(self.path(leaf)[: max_depth - 1])
        return self.collapse(lambda t, n: bool(t.children[n]) and n not in keep_inner)

