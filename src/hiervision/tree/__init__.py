"""The class tree, in layers: conventions (here), the numpy view, the core, its formats and its torch tables.

Conventions (used everywhere in hiervision):

* Node ``0`` is the artificial root; classes are nodes ``1..N``.
* A *path* is the sequence of node ids from depth 1 down to a node (the root is left out).
  Padded path arrays use :data:`PAD` (-1) after the end.
* Vectors "over nodes" have ``N + 1`` columns indexed by node id. Column 0 (the root, never a
  class) doubles as the **end-of-path token** :data:`EOS` for variable-length decoders.
* Targets for losses are padded with :data:`IGNORE` (-100), the ``ignore_index`` of
  :func:`torch.nn.functional.cross_entropy`.

Modules, lowest first (each imports only those above it in this list):

* :mod:`hiervision.tree.view` — :class:`~hiervision.tree.view.TreeView`, the numpy arrays of a tree
  (paths, depths, parents, leaves); torch-free, so the ONNX runtime and the server use it as is;
* :mod:`hiervision.tree.core` — :class:`~hiervision.tree.core.Tree`: validation, structure, queries
  and the transformations (prune, collapse, cap depth); an immutable value;
* :mod:`hiervision.tree.formats` — readers and writers (JSON, parent/child CSV, folders, paths,
  coarse/fine pairs, WordNet, Open Images, the text rendering);
* :mod:`hiervision.tree.tables` — the torch side: label encoders and
  :class:`~hiervision.tree.tables.TreeTables`, the tables as model buffers.

:class:`hiervision.taxonomy.Taxonomy` is the tree with all of them attached (``Taxonomy.from_csv``,
``taxonomy.encode_paths``, ...), what the rest of the package uses. This package's ``__init__``
stays import-light (no numpy, no torch) so that importing the view costs only numpy.
"""

from __future__ import annotations

__all__ = ["EOS", "IGNORE", "PAD", "TaxonomyError"]

PAD = -1
IGNORE = -100
EOS = 0


class TaxonomyError(ValueError):
    """A tree that cannot be built or a label that is not in it (always a one-line message)."""
