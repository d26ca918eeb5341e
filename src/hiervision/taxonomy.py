"""The class tree that every dataset, model, decoder and metric shares: :class:`Taxonomy`.

A :class:`Taxonomy` is the tree core (:class:`hiervision.tree.core.Tree`: structure, queries,
transformations) with its readers and writers (:mod:`hiervision.tree.formats`) and its tensors and
label encoders (:mod:`hiervision.tree.tables`) attached as thin delegates, so callers keep one
object: ``Taxonomy.from_csv(...)``, ``taxonomy.path_matrix``, ``taxonomy.encode_levels(labels)``.
The conventions (node 0 the root, :data:`PAD`, :data:`EOS`, :data:`IGNORE`) are in
:mod:`hiervision.tree`; the numpy arrays every table comes from are ``taxonomy.view``.

The tree is immutable; transformations (pruning, chain collapsing, depth capping) return a
new :class:`Taxonomy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch

from hiervision.tree import EOS, IGNORE, PAD, TaxonomyError, formats, tables
from hiervision.tree.core import Tree
from hiervision.tree.tables import TreeTables

__all__ = ["EOS", "IGNORE", "PAD", "Taxonomy", "TaxonomyError", "TreeTables"]


class Taxonomy(Tree):
    """A rooted tree of classes with O(1) path/depth queries and the label encodings of every head.

    Build it with one of the ``from_*`` constructors rather than calling this directly; see
    :class:`~hiervision.tree.core.Tree` for the structure and :mod:`hiervision.tree.formats` for the formats.
    """

    # ------------------------------------------------------------------ readers and writers
    from_parent_map = classmethod(formats.from_parent_map)
    from_edges = classmethod(formats.from_edges)
    from_csv = classmethod(formats.from_csv)
    from_paths = classmethod(formats.from_paths)
    from_folders = classmethod(formats.from_folders)
    from_coarse_fine = classmethod(formats.from_coarse_fine)
    from_openimages = classmethod(formats.from_openimages)
    from_wordnet = classmethod(formats.from_wordnet)
    from_dict = classmethod(formats.from_dict)
    load = classmethod(formats.load)
    to_dict = formats.to_dict
    save = formats.save
    render = formats.render
    iter_render = formats.iter_render

    # ------------------------------------------------------------------ tensors (the view's arrays, not copies)
    path_matrix = cached_property(tables.path_matrix)
    depth_tensor = cached_property(tables.depth_tensor)
    parent_tensor = cached_property(tables.parent_tensor)
    level_position = cached_property(tables.level_position)
    ancestor_matrix = cached_property(tables.ancestor_matrix)

    @cached_property
    def _by_depth(self) -> tuple[torch.Tensor, list[int]]:
        return tables.levels_by_depth(self)

    # ------------------------------------------------------------------ label encodings (ids checked here)
    def _nodes(self, nodes) -> torch.Tensor:
        t = torch.as_tensor(nodes, dtype=torch.long)
        if t.numel() and (t.min() < 1 or t.max() >= self.num_nodes):
            bad = t[(t < 1) | (t >= self.num_nodes)][0].item()
            raise TaxonomyError(f"label id {bad} is not a class of this tree (1..{len(self)})")
        return t

    def encode_paths(self, nodes) -> torch.Tensor:
        """``(B,) → (B, D)`` node ids per level, padded with :data:`PAD`."""
        t = self._nodes(nodes)
        return tables.encode_paths(self.path_matrix.to(t.device), t)

    def encode_levels(self, nodes) -> torch.Tensor:
        """Per-level cross-entropy targets ``(B, D)``: global node ids, :data:`IGNORE` past the path's end."""
        t = self._nodes(nodes)
        return tables.encode_levels(self.path_matrix.to(t.device), t)

    def encode_level_positions(self, nodes) -> torch.Tensor:
        """Per-level targets ``(B, D)`` as the index *within each level* (for one softmax per level)."""
        t = self._nodes(nodes)
        return tables.encode_level_positions(self.path_matrix.to(t.device), self.level_position.to(t.device), t)

    def encode_sequence(self, nodes) -> torch.Tensor:
        """Variable-length decoder targets ``(B, D + 1)``: the path, then :data:`EOS`, then :data:`IGNORE`."""
        t = self._nodes(nodes)
        return tables.encode_sequence(self.path_matrix.to(t.device), self.depth_tensor.to(t.device), t)

    def encode_onehot(self, nodes, eos: bool = False) -> torch.Tensor:
        """Koo et al.'s path encoding ``(B, T, N+1)``: step t is one-hot over all nodes.

        Column 0 is the EOS column; with ``eos=True`` one extra step marks the end. Koo's ``y_t``
        (over the N classes only) is ``encode_onehot(x)[..., 1:]``. Steps past the end are all zero.
        """
        steps = self.encode_sequence(nodes) if eos else self.encode_levels(nodes)
        return tables.encode_onehot(steps, self.num_nodes)

    def encode_multihot(self, node_sets: Iterable[Iterable[int]]) -> torch.Tensor:
        """Multi-label targets ``(B, N+1)``: every node on any labelled path (ancestors included)."""
        sets = [self._nodes(list(s)) for s in node_sets]
        marks = torch.zeros(len(sets), self.num_nodes, dtype=torch.bool)
        for row, s in enumerate(sets):
            marks[row, s] = True
        return self.close_upwards(marks).float()

    def close_upwards(self, marks: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` bool marks → the marks plus all their ancestors (root column cleared), in O(B·N)."""
        by_depth, bounds = self._by_depth
        return tables.close_upwards(marks, self.parent_tensor.to(marks.device), by_depth.to(marks.device), bounds)

    def path_ends(self, closed: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` ancestor-closed bool sets → the nodes with no member child (the paths' ends)."""
        return tables.path_ends(closed, self.parent_tensor.to(closed.device))
