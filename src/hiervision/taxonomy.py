"""The class tree: one object that every dataset, model, decoder and metric shares.

Conventions (used everywhere in hiervision):

* Node ``0`` is the artificial root; classes are nodes ``1..N``.
* A *path* is the sequence of node ids from depth 1 down to a node (the root is left out).
  Padded path tensors use :data:`PAD` (-1) after the end.
* Vectors "over nodes" have ``N + 1`` columns indexed by node id. Column 0 (the root, never a
  class) doubles as the **end-of-path token** :data:`EOS` for variable-length decoders.
* Targets for losses are padded with :data:`IGNORE` (-100), the ``ignore_index`` of
  :func:`torch.nn.functional.cross_entropy`.

The tree is immutable; transformations (pruning, chain collapsing, depth capping) return a
new :class:`Taxonomy`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["EOS", "IGNORE", "PAD", "Taxonomy", "TaxonomyError", "TreeTables"]

PAD = -1
IGNORE = -100
EOS = 0
FORMAT = "hiervision-taxonomy"
MAX_INDENT = 32  # render: deeper nodes are not indented further


class TaxonomyError(ValueError):
    """A tree that cannot be built or a label that is not in it (always a one-line message)."""


class Taxonomy:
    """A rooted tree of classes with O(1) path/depth queries and the label encodings of every head.

    Build it with one of the ``from_*`` constructors rather than calling this directly.

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
        self.children: tuple[tuple[int, ...], ...] = _children(self.parents)
        depth = [0] * len(names)
        for n in self._topological():
            if n:
                depth[n] = depth[self.parents[n]] + 1
        self.depths: tuple[int, ...] = tuple(depth)

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
        order, stack = [], [0]
        kids = _children(self.parents)
        while stack:
            v = stack.pop()
            order.append(v)
            stack.extend(reversed(kids[v]))
        return order

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parent_map(
        cls,
        parent_of: Mapping[str, str | None],
        root: str = "root",
        external_ids: Mapping[str, str] | None = None,
    ) -> Taxonomy:
        """Build from ``{child: parent}``; a parent of ``None`` (or ``root``) hangs the child under the root.

        Node order is the order of first appearance, so the result is deterministic.
        """
        names = [root]
        index = {root: 0}
        for child in parent_of:
            if child == root:
                raise TaxonomyError(f"node {child!r} has the root's name")
            if child in index:
                raise TaxonomyError(f"node {child!r} is listed twice")
            index[child] = len(names)
            names.append(child)
        parents = [-1]
        for child, parent in parent_of.items():
            if parent is None:
                parent = root
            if parent not in index:
                raise TaxonomyError(f"node {child!r} has unknown parent {parent!r}")
            parents.append(index[parent])
        ext = [None] + [(external_ids or {}).get(n) for n in names[1:]]
        return cls(names, parents, ext)

    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        root: str = "root",
        names: Mapping[str, str] | None = None,
        multi_parent: str = "error",
    ) -> Taxonomy:
        """Build from ``(parent, child)`` is-a edges (external ids; ``names`` maps id → readable name).

        Nodes that are never a child hang under the artificial root. A node with several parents
        is a DAG, not a tree; ``multi_parent`` says what to do:

        * ``"error"`` — refuse, naming the node;
        * ``"first"`` — keep the first edge in input order;
        * ``"deepest"`` — keep the parent farthest from the top (its longest chain of ancestors),
          ties broken by the smaller parent id; this keeps the most specific is-a relation.
        """
        if multi_parent not in ("error", "first", "deepest"):
            raise TaxonomyError(f"multi_parent must be 'error', 'first' or 'deepest', got {multi_parent!r}")
        parents_of: dict[str, list[str]] = {}
        order: dict[str, None] = {}
        for parent, child in edges:
            if child == root:
                raise TaxonomyError(f"node {root!r} is the root: it cannot be the child of {parent!r}")
            if parent != root:  # naming the root explicitly hangs the child under it
                order.setdefault(parent)
            order.setdefault(child)
            lst = parents_of.setdefault(child, [])
            if parent not in lst:
                lst.append(parent)
        for child, ps in parents_of.items():
            if len(ps) > 1 and multi_parent == "error":
                raise TaxonomyError(f"node {child!r} has two parents: {ps[0]!r} and {ps[1]!r}")
        chosen: dict[str, str] = {}
        if multi_parent == "deepest":
            height = _top_distances(parents_of, root)
            for child, ps in parents_of.items():
                chosen[child] = min(ps, key=lambda p: (-height.get(p, 0), p))
        else:
            chosen = {c: ps[0] for c, ps in parents_of.items()}
        parent_map = {n: (None if chosen.get(n) == root else chosen.get(n)) for n in order}
        _check_acyclic(parent_map)
        ordered = _parents_first(parent_map)
        idx = {n: i + 1 for i, n in enumerate(ordered)}
        parents = [-1] + [idx[parent_map[n]] if parent_map[n] is not None else 0 for n in ordered]
        tax_names = [root] + list(ordered)
        if names:
            # readable names are not identities: siblings sharing one get their id appended
            display = [root] + [names.get(n, n) for n in ordered]
            count: dict[tuple[int, str], int] = {}
            for i in range(1, len(display)):
                count[(parents[i], display[i])] = count.get((parents[i], display[i]), 0) + 1
            tax_names = [
                d if i == 0 or count[(parents[i], d)] == 1 else f"{d} ({ordered[i - 1]})"
                for i, d in enumerate(display)
            ]
        return cls(tax_names, parents, [None, *ordered])

    @classmethod
    def from_csv(cls, path: str | os.PathLike, root: str = "root") -> Taxonomy:
        """Build from a CSV file with a header holding ``parent`` and ``child`` columns.

        A row whose parent is ``root`` (the root's name) hangs its child directly under the root.
        """
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"parent", "child"} <= set(reader.fieldnames):
                    raise TaxonomyError(f"{path}: header must name 'parent' and 'child' columns")
                edges = []
                for line, row in enumerate(reader, start=2):
                    if not row.get("parent") or not row.get("child"):
                        raise TaxonomyError(f"{path}:{line}: row needs both a parent and a child")
                    if not isinstance(row["parent"], str) or not isinstance(row["child"], str):
                        raise TaxonomyError(f"{path}:{line}: row needs both a parent and a child")
                    parent, child = row["parent"].strip(), row["child"].strip()
                    if not parent or not child:
                        raise TaxonomyError(f"{path}:{line}: row needs both a parent and a child")
                    edges.append((parent, child))
        except OSError as e:
            raise TaxonomyError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise TaxonomyError(f"{path}: not a UTF-8 text file") from None
        except csv.Error as e:
            raise TaxonomyError(f"{path}: not a readable CSV ({e})") from None
        return cls.from_edges(edges, root=root)

    @classmethod
    def from_paths(cls, paths: Iterable[str], root: str = "root") -> Taxonomy:
        """Tree of ``/``-separated node paths (``"A"``, ``"A/B"``, ...); every prefix is a node too.

        Siblings are ordered by name, so the same set of paths always gives the same ids. Node
        names are the last path component; the full path is kept as the external id.
        """
        nodes: set[str] = set()
        for p in paths:
            parts = [x for x in str(p).strip("/").split("/") if x not in ("", ".")]
            nodes.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        if not nodes:
            raise TaxonomyError("empty tree (no paths)")
        ordered = sorted(nodes, key=lambda n: n.split("/"))
        parent_of = {n: (n.rsplit("/", 1)[0] if "/" in n else None) for n in ordered}
        tax = cls.from_parent_map(parent_of, root=root)
        return cls([root] + [n.rsplit("/", 1)[-1] for n in tax.names[1:]], tax.parents, [None, *tax.names[1:]])

    @classmethod
    def from_folders(cls, root_dir: str | os.PathLike, root: str = "root") -> Taxonomy:
        """Each sub-folder of ``root_dir`` is a node; nesting gives the tree (hidden folders skipped)."""
        root_dir = Path(root_dir)
        if not root_dir.is_dir():
            raise TaxonomyError(f"{root_dir}: not a folder")
        dirs = []
        for dirpath, dirnames, _ in os.walk(root_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in place: prunes the walk
            rel = Path(dirpath).relative_to(root_dir)
            dirs.extend((rel / d).as_posix() for d in dirnames)
        if not dirs:
            raise TaxonomyError(f"{root_dir}: empty tree (no sub-folders)")
        return cls.from_paths(dirs, root=root)

    @classmethod
    def from_coarse_fine(cls, pairs: Iterable[tuple[str, str]], root: str = "root") -> Taxonomy:
        """Two-level tree from ``(coarse, fine)`` pairs (CIFAR-100 style); repeated pairs are fine."""
        parent_of: dict[str, str | None] = {}
        fines: dict[str, str] = {}
        for coarse, fine in pairs:
            if fine in fines and fines[fine] != coarse:
                raise TaxonomyError(f"node {fine!r} has two parents: {fines[fine]!r} and {coarse!r}")
            fines[fine] = coarse
        for coarse in dict.fromkeys(fines.values()):
            parent_of[coarse] = None
        for fine, coarse in fines.items():
            if fine in parent_of:
                raise TaxonomyError(f"node {fine!r} is both a coarse and a fine class")
            parent_of[fine] = coarse
        return cls.from_parent_map(parent_of, root=root)

    @classmethod
    def from_openimages(
        cls,
        hierarchy_json: str | os.PathLike,
        descriptions_csv: str | os.PathLike | None = None,
    ) -> Taxonomy:
        """Open Images ``bbox_labels_600_hierarchy.json``: ``Subcategory`` (is-a) edges only.

        Rule for the DAG: ``Part`` edges are has-part relations, not is-a, and are dropped; a class
        listed under several parents keeps the first one met in depth-first order of the file.
        The file's own top node (``/m/0bl9f``, "Entity") becomes the artificial root.
        """
        try:
            data = json.loads(Path(hierarchy_json).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
            raise TaxonomyError(f"{hierarchy_json}: cannot read Open Images hierarchy ({why})") from None
        if not isinstance(data, dict) or not isinstance(data.get("LabelName"), str):
            raise TaxonomyError(f"{hierarchy_json}: not an Open Images hierarchy (no top 'LabelName')")
        names: dict[str, str] = {}
        if descriptions_csv is not None:
            names = {row[0]: row[1] for row in csv.reader(_read_text(descriptions_csv).splitlines()) if len(row) >= 2}
        edges: list[tuple[str, str]] = []
        stack = [(data, None)]
        while stack:
            node, parent = stack.pop()
            label = node.get("LabelName") if isinstance(node, dict) else None
            if not isinstance(label, str) or not isinstance(node.get("Subcategory", []), list):
                raise TaxonomyError(f"{hierarchy_json}: malformed entry under {parent!r} (needs LabelName)")
            if parent is not None:
                edges.append((parent, label))
            for child in reversed(node.get("Subcategory", [])):
                stack.append((child, label))
        top = data["LabelName"]
        tax = cls.from_edges(edges, root=names.get(top, "Entity"), names=names, multi_parent="first")
        # the file's top node became a class under our root: remove it so its children hang at depth 1
        return tax.collapse(lambda t, n: t.external_ids[n] == top)

    @classmethod
    def from_wordnet(
        cls,
        hierarchy_file: str | os.PathLike,
        names_file: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        max_depth: int | None = None,
    ) -> Taxonomy:
        """WordNet is-a edges (BREEDS ``class_hierarchy.txt``: ``parent child`` wnids per line) → tree.

        The explicit rule, in order:

        1. a synset with several hypernyms keeps the *deepest* one (see :meth:`from_edges`);
        2. when ``classes`` (wnids) is given, nodes that no class reaches are dropped;
        3. single-child chains are collapsed: an inner node with one child that is not itself a
           class is removed and its child moves up (also at the top, so the root has ≥ 2 children
           unless only one class exists);
        4. ``max_depth`` caps path length by dropping the lowest intermediate nodes of long paths.
        """
        names: dict[str, str] = {}
        if names_file is not None:
            for line in _read_text(names_file).splitlines():
                wnid, _, name = line.partition("\t")
                if wnid:
                    names[wnid] = name.split(",")[0].strip() or wnid
        edges = []
        for i, line in enumerate(_read_text(hierarchy_file).splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise TaxonomyError(f"{hierarchy_file}:{i}: expected 'parent child', got {line!r}")
            edges.append((parts[0], parts[1]))
        tax = cls.from_edges(edges, root="entity", names=names, multi_parent="deepest")
        keep: set[int] | None = None
        if classes is not None:
            idx = tax.external_index
            missing = [c for c in classes if c not in idx]
            if missing:
                raise TaxonomyError(f"{hierarchy_file}: class {missing[0]!r} is not in the hierarchy")
            keep = {idx[c] for c in classes}
            tax = tax.prune(keep)
            keep = {tax.external_index[c] for c in classes}
        tax = tax.collapse_chains(protect=keep)
        if max_depth is not None:
            tax = tax.cap_depth(max_depth)
        return tax

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        nodes = []
        for i in range(len(self.names)):
            node = {"id": i, "name": self.names[i], "parent": self.parents[i]}
            if self.external_ids[i] is not None:
                node["external_id"] = self.external_ids[i]
            nodes.append(node)
        return {"format": FORMAT, "version": 1, "fingerprint": self.fingerprint, "nodes": nodes}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "taxonomy") -> Taxonomy:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise TaxonomyError(f"{source}: not a hiervision taxonomy (missing format={FORMAT!r})")
        try:
            nodes = sorted(data["nodes"], key=lambda n: n["id"])
            if [n["id"] for n in nodes] != list(range(len(nodes))):
                raise TaxonomyError(f"{source}: node ids must be 0..N without gaps")
            return cls(
                [n["name"] for n in nodes],
                [n["parent"] for n in nodes],
                [n.get("external_id") for n in nodes],
            )
        except TaxonomyError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TaxonomyError(f"{source}: malformed node entry ({e!r})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON format atomically: a failed write leaves the old file (see :mod:`hiervision.runfolder`)."""
        from hiervision.runfolder import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Taxonomy:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TaxonomyError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise TaxonomyError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise TaxonomyError(f"{path}: not a UTF-8 text file") from None
        except RecursionError:
            raise TaxonomyError(f"{path}: invalid JSON (nested too deeply)") from None
        return cls.from_dict(data, source=str(path))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of names and parents: a checkpoint made for another tree is refused by comparing it."""
        h = hashlib.sha256(json.dumps([self.names, self.parents]).encode())
        return h.hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and (self.names, self.parents) == (other.names, other.parents)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __len__(self) -> int:
        """Number of classes N (the root is not counted)."""
        return len(self.names) - 1

    def __repr__(self) -> str:
        return f"Taxonomy(classes={len(self)}, leaves={len(self.leaves)}, depth={self.max_depth})"

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
            node = 0
            for part in key.strip("/").split("/"):
                match = [c for c in self.children[node] if self.names[c] == part]
                if not match:
                    raise TaxonomyError(f"label {key!r} is not in the tree (no {part!r} under {self.names[node]!r})")
                node = match[0]
            return node
        if len(hits) > 1:
            paths = " or ".join(self.path_name(h) for h in hits[:2])
            raise TaxonomyError(f"label {key!r} is ambiguous: write its path ({paths})")
        raise TaxonomyError(f"label {key!r} is not in the tree")

    def path_name(self, node: int, sep: str = "/") -> str:
        return sep.join(self.names[n] for n in self.path(node))

    # ------------------------------------------------------------------ structure
    @cached_property
    def leaves(self) -> tuple[int, ...]:
        """Nodes without children, in id order (the classes of a flat softmax)."""
        return tuple(i for i in range(1, self.num_nodes) if not self.children[i])

    @cached_property
    def max_depth(self) -> int:
        return max(self.depths)

    @cached_property
    def is_fixed_depth(self) -> bool:
        """True when every leaf has the same depth (required by fixed-path-length models)."""
        return len({self.depths[n] for n in self.leaves}) == 1

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """``levels[d]`` = node ids at depth ``d + 1``."""
        out: list[list[int]] = [[] for _ in range(self.max_depth)]
        for n in range(1, self.num_nodes):
            out[self.depths[n] - 1].append(n)
        return tuple(tuple(x) for x in out)

    def depth(self, node: int) -> int:
        return self.depths[node]

    def path(self, node: int) -> tuple[int, ...]:
        """Node ids from depth 1 down to ``node`` (empty for the root)."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node]
        return tuple(reversed(out))

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
        """Longest distance from each node down to a leaf below it (0 for leaves)."""
        h = [0] * self.num_nodes
        for n in reversed(self._topological()):
            if n:
                h[self.parents[n]] = max(h[self.parents[n]], h[n] + 1)
        return tuple(h)

    def subtree(self, node: int) -> list[int]:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            out.append(v)
            stack.extend(self.children[v])
        return sorted(out)

    # ------------------------------------------------------------------ transformations
    def _rebuild(self, keep: Sequence[int], new_parent: Mapping[int, int], root_name: str | None = None) -> Taxonomy:
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
        tax = Taxonomy(names, parents, ext)
        order = [n for n in tax._topological() if n]
        pos = {0: 0, **{n: i + 1 for i, n in enumerate(order)}}
        return Taxonomy(
            [tax.names[0]] + [tax.names[n] for n in order],
            [-1] + [pos[tax.parents[n]] for n in order],
            [tax.external_ids[0]] + [tax.external_ids[n] for n in order],
        )

    def prune(self, keep: Iterable[int]) -> Taxonomy:
        """Keep the given nodes and their ancestors; drop every node that none of them reaches."""
        kept: set[int] = set()
        for n in keep:
            kept.update(self.path(n))
        order = sorted(kept)
        return self._rebuild(order, {n: self.parents[n] for n in order})

    def collapse(self, remove, root_name: str | None = None) -> Taxonomy:
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

    def collapse_chains(self, protect: Iterable[int] | None = None) -> Taxonomy:
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

    def cap_depth(self, max_depth: int) -> Taxonomy:
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

    # ------------------------------------------------------------------ tensors for vectorised code
    @cached_property
    def path_matrix(self) -> torch.Tensor:
        """``(N+1, D)`` long tensor: row n is the path of node n padded with :data:`PAD`."""
        m = torch.full((self.num_nodes, self.max_depth), PAD, dtype=torch.long)
        for n in range(1, self.num_nodes):
            p = self.path(n)
            m[n, : len(p)] = torch.tensor(p)
        return m

    @cached_property
    def ancestor_matrix(self) -> torch.Tensor:
        """``(N+1, N+1)`` bool: ``A[n, m]`` is true when m is n or an ancestor of n (root excluded)."""
        a = torch.zeros(self.num_nodes, self.num_nodes, dtype=torch.bool)
        for n in range(1, self.num_nodes):
            a[n, list(self.path(n))] = True
        return a

    @cached_property
    def level_position(self) -> torch.Tensor:
        """``(N+1,)`` long: index of each node within its level (root: -1), for per-level heads."""
        pos = torch.full((self.num_nodes,), -1, dtype=torch.long)
        for level in self.levels:
            pos[list(level)] = torch.arange(len(level))
        return pos

    @cached_property
    def depth_tensor(self) -> torch.Tensor:
        return torch.tensor(self.depths, dtype=torch.long)

    # ------------------------------------------------------------------ label encodings (one place)
    def _nodes(self, nodes) -> torch.Tensor:
        t = torch.as_tensor(nodes, dtype=torch.long)
        if t.numel() and (t.min() < 1 or t.max() >= self.num_nodes):
            bad = t[(t < 1) | (t >= self.num_nodes)][0].item()
            raise TaxonomyError(f"label id {bad} is not a class of this tree (1..{len(self)})")
        return t

    def encode_paths(self, nodes) -> torch.Tensor:
        """``(B,) → (B, D)`` node ids per level, padded with :data:`PAD`."""
        return self.path_matrix.to(_device(nodes))[self._nodes(nodes)]

    def encode_levels(self, nodes) -> torch.Tensor:
        """Per-level cross-entropy targets ``(B, D)``: global node ids, :data:`IGNORE` past the path's end."""
        p = self.encode_paths(nodes)
        return p.masked_fill(p == PAD, IGNORE)

    def encode_level_positions(self, nodes) -> torch.Tensor:
        """Per-level targets ``(B, D)`` as the index *within each level* (for one softmax per level)."""
        p = self.encode_paths(nodes)
        pos = self.level_position.to(p.device)[p.clamp(min=0)]
        return pos.masked_fill(p == PAD, IGNORE)

    def encode_sequence(self, nodes) -> torch.Tensor:
        """Variable-length decoder targets ``(B, D + 1)``: the path, then :data:`EOS`, then :data:`IGNORE`."""
        p = self.encode_paths(nodes)
        p = torch.cat([p, torch.full_like(p[:, :1], PAD)], dim=1)
        lengths = self.depth_tensor.to(p.device)[self._nodes(nodes)]
        p[torch.arange(len(p)), lengths] = EOS
        return p.masked_fill(p == PAD, IGNORE)

    def encode_onehot(self, nodes, eos: bool = False) -> torch.Tensor:
        """Koo et al.'s path encoding ``(B, T, N+1)``: step t is one-hot over all nodes.

        Column 0 is the EOS column; with ``eos=True`` one extra step marks the end. Koo's ``y_t``
        (over the N classes only) is ``encode_onehot(x)[..., 1:]``. Steps past the end are all zero.
        """
        seq = self.encode_sequence(nodes) if eos else self.encode_levels(nodes)
        out = torch.zeros(*seq.shape, self.num_nodes, device=seq.device)
        valid = seq != IGNORE
        out[valid] = torch.nn.functional.one_hot(seq[valid], self.num_nodes).float()
        return out

    def encode_multihot(self, node_sets: Iterable[Iterable[int]]) -> torch.Tensor:
        """Multi-label targets ``(B, N+1)``: every node on any labelled path (ancestors included)."""
        rows = []
        for s in node_sets:
            s = self._nodes(list(s))
            rows.append(self.ancestor_matrix[s].any(0) if s.numel() else torch.zeros(self.num_nodes, dtype=torch.bool))
        return torch.stack(rows).float()

    @cached_property
    def parent_tensor(self) -> torch.Tensor:
        """``(N+1,)`` long parent ids; the root points to itself so gathers stay in range."""
        return torch.tensor([0, *self.parents[1:]], dtype=torch.long)

    def close_upwards(self, marks: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` bool marks → the marks plus all their ancestors (root column cleared).

        Bottom-up OR, one level at a time: O(B·N) rather than a dense O(B·N²) product.
        """
        c = marks.T.bool().to(torch.int32).contiguous()
        parents = self.parent_tensor.to(c.device)
        for level in reversed(self.levels[1:]):
            idx = torch.tensor(level, dtype=torch.long, device=c.device)
            c.index_add_(0, parents[idx], c[idx].clamp(max=1))
        c[0] = 0
        return (c > 0).T.contiguous()

    def path_ends(self, closed: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` ancestor-closed bool sets → the nodes with no member child (the paths' ends)."""
        closed = closed.bool()
        has_child = torch.zeros(closed.shape[1], closed.shape[0], dtype=torch.int32, device=closed.device)
        has_child.index_add_(0, self.parent_tensor[1:].to(closed.device), closed[:, 1:].T.to(torch.int32))
        ends = closed & ~(has_child > 0).T
        ends[:, 0] = False
        return ends

    # ------------------------------------------------------------------ display
    def render(self, max_nodes: int | None = None) -> str:
        """Indented text view of the tree (what ``hiervision taxonomy show`` prints)."""
        return "\n".join(self.iter_render(max_nodes))

    def iter_render(self, max_nodes: int | None = None) -> Iterator[str]:
        """:meth:`render` one line at a time, depth-first without recursion, so that printing a
        100k-node or 100k-deep tree needs memory for the tree only. Indentation stops growing at
        depth :data:`MAX_INDENT`; deeper lines show their depth instead (else line i would be i wide)."""
        yield f"{self.names[0]}  ({len(self)} classes, {len(self.leaves)} leaves, depth {self.max_depth})"
        shown, stack = 1, list(reversed(self.children[0]))
        while stack:
            n = stack.pop()
            if max_nodes is not None and shown > max_nodes:
                yield f"... ({self.num_nodes - shown} more)"
                return
            e = self.external_ids[n]
            ext = f"  [{e}]" if e and e != self.names[n] else ""
            d = self.depths[n]
            indent = "  " * d if d <= MAX_INDENT else "  " * MAX_INDENT + f"[depth {d}] "
            yield f"{indent}{self.names[n]}{ext}"
            shown += 1
            stack.extend(reversed(self.children[n]))


class TreeTables(nn.Module):
    """The taxonomy's lookup tables as non-persistent buffers, for the per-step code of a model.

    Every loss and decode reads some table (paths, ancestors, depths, where paths may end). As
    buffers of the model they move once with ``model.to(device)`` instead of being copied from
    the CPU on every call, and they stay out of ``state_dict`` (the tree is saved on its own).
    The encoders here mirror :class:`Taxonomy`'s but never check label ids on the host (that
    check is a device→host sync per step); labels are checked once, where the data set is read.
    Tables are bool/long, so ``model.to(torch.float64)`` leaves them as they are.
    """

    def __init__(self, taxonomy: Taxonomy) -> None:
        super().__init__()
        self.taxonomy = taxonomy
        n = taxonomy.num_nodes
        leaves = torch.zeros(n, dtype=torch.bool)
        leaves[list(taxonomy.leaves)] = True
        child_of = torch.zeros(n, n, dtype=torch.bool)  # [i, j]: j is a child of i
        child_of[taxonomy.parent_tensor[1:], torch.arange(1, n)] = True
        tables = {
            "paths": taxonomy.path_matrix, "ancestors": taxonomy.ancestor_matrix, "depth": taxonomy.depth_tensor,
            "parent": taxonomy.parent_tensor, "level_position": taxonomy.level_position, "leaf_mask": leaves,
            "child_of": child_of,
        }
        for name, t in tables.items():  # clones: in-place edits of a buffer must not reach the tree's cache
            self.register_buffer(name, t.clone(), persistent=False)

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
        """``(B,) → (B, D)`` node ids per level, :data:`PAD` after the end."""
        return self.paths[nodes]

    def encode_levels(self, nodes: torch.Tensor) -> torch.Tensor:
        """Per-level cross-entropy targets ``(B, D)``: node ids, :data:`IGNORE` past the path's end."""
        p = self.paths[nodes]
        return p.masked_fill(p == PAD, IGNORE)

    def encode_level_positions(self, nodes: torch.Tensor) -> torch.Tensor:
        """Per-level targets ``(B, D)`` as the index within each level, :data:`IGNORE` past the end."""
        p = self.paths[nodes]
        return self.level_position[p.clamp(min=0)].masked_fill(p == PAD, IGNORE)

    def encode_sequence(self, nodes: torch.Tensor) -> torch.Tensor:
        """Decoder targets ``(B, D + 1)``: the path, then :data:`EOS`, then :data:`IGNORE`."""
        p = torch.cat([self.paths[nodes], torch.full_like(nodes, PAD).unsqueeze(1)], dim=1)
        p = p.scatter(1, self.depth[nodes].unsqueeze(1), EOS)
        return p.masked_fill(p == PAD, IGNORE)

    def close_upwards(self, marks: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` bool marks → the marks plus all their ancestors (root column cleared);
        one scatter-add per level, all on the marks' device."""
        c = marks.bool().clone()
        for _ in range(self.taxonomy.max_depth - 1):
            up = torch.zeros(c.shape, dtype=torch.int32, device=c.device)
            up.index_add_(1, self.parent[1:], c[:, 1:].to(torch.int32))
            c |= up > 0
        c[:, 0] = False
        return c


# ---------------------------------------------------------------------- helpers
def _children(parents: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if i and 0 <= p < len(parents):
            kids[p].append(i)
    return tuple(tuple(k) for k in kids)


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TaxonomyError(f"{path}: cannot read ({e.strerror})") from None


def _device(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _top_distances(parents_of: Mapping[str, Sequence[str]], root: str) -> dict[str, int]:
    """Longest chain of ancestors above every node (0 for a top node), iteratively: trees can be deep."""
    height: dict[str, int] = {root: -1}
    for start in parents_of:
        if start in height:
            continue
        on_path, frames = {start}, [(start, iter(parents_of.get(start, ())))]
        while frames:
            v, pending = frames[-1]
            for p in pending:
                if p in height:
                    continue
                if p in on_path:
                    raise TaxonomyError(f"cycle through node {p!r}")
                on_path.add(p)
                frames.append((p, iter(parents_of.get(p, ()))))
                break
            else:  # every parent is done
                height[v] = 1 + max((height[p] for p in parents_of.get(v, ())), default=-1)
                frames.pop()
                on_path.discard(v)
    return height


def _check_acyclic(parent_map: Mapping[str, str | None]) -> None:
    done: set[str] = set()
    for start in parent_map:
        trail: list[str] = []
        on_trail: set[str] = set()
        v: str | None = start
        while v is not None and v not in done:
            if v in on_trail:
                raise TaxonomyError(f"cycle through node {v!r}")
            on_trail.add(v)
            trail.append(v)
            v = parent_map.get(v)
        done.update(trail)


def _parents_first(parent_map: Mapping[str, str | None]) -> list[str]:
    """Order nodes so that each parent precedes its children, otherwise keeping input order."""
    kids: dict[str | None, list[str]] = {}
    for n, p in parent_map.items():
        kids.setdefault(p, []).append(n)
    out, stack = [], list(reversed(kids.get(None, [])))
    while stack:
        v = stack.pop()
        out.append(v)
        stack.extend(reversed(kids.get(v, [])))
    return out
