"""Pieces of a big class tree for the web page: one node with a page of its children, and the predicted
path's most probable siblings at each level.

The page never downloads a tree of 10^5 nodes: it asks ``GET /taxonomy/nodes`` for the nodes it draws and
``POST /predict?siblings=K`` for the neighbourhood of the answer. Every answer here costs O(depth + fan-out)
per node, read from the :class:`~hiervision.tree.view.TreeView`'s children lists, parents and depths.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from hiervision.records import TreeView

__all__ = ["MAX_IDS", "BadNodeId", "node_record", "parse_ids", "path_siblings"]

#: most node ids one ``GET /taxonomy/nodes`` may ask for
MAX_IDS = 256


class BadNodeId(ValueError):
    """An id that is not an integer (422) or not a node of the tree (404); the message is one line."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def parse_ids(values: Iterable[str], num_nodes: int) -> list[int]:
    """``["3,17", "42"]`` → ``[3, 17, 42]`` (repeated and comma-separated ``ids`` both work), each checked."""
    items = [s.strip() for v in values for s in v.split(",") if s.strip()]
    if not items:
        raise BadNodeId("ids: give at least one node id, e.g. ids=0 (the root)", 422)
    if len(items) > MAX_IDS:
        raise BadNodeId(f"ids: {len(items)} ids, more than the limit of {MAX_IDS} per request", 422)
    ids = []
    for s in items:
        if not (s.isascii() and s.isdigit()):
            raise BadNodeId(f"ids: {s[:40]!r} is not a node id (ids are integers 0..{num_nodes - 1})", 422)
        if len(s.lstrip("0")) > len(str(num_nodes)) or int(s) >= num_nodes:  # never int() of 5,000 digits
            raise BadNodeId(f"ids: node {s[:40]}{'…' if len(s) > 40 else ''} does not exist "
                            f"(ids are 0..{num_nodes - 1})", 404)
        ids.append(int(s))
    return ids


def _brief(tree: TreeView, v: int) -> dict[str, Any]:
    return {"id": v, "name": tree.names[v], "num_children": len(tree.children[v])}


def node_record(tree: TreeView, v: int, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """Node ``v``: name, parent, depth, its path from depth 1 (ids and names), and the children
    ``offset .. offset + limit`` (in id order, each with its own child count), with ``more``, the number
    of children after that page."""
    kids = tree.children[v]
    page = kids[offset : offset + limit]
    path = tree.path(v)
    return {"id": v, "name": tree.names[v], "parent": tree.parents[v], "depth": int(tree.depths[v]),
            "path": [tree.names[n] for n in path], "path_ids": list(path), "num_children": len(kids),
            "children": [_brief(tree, c) for c in page], "more": max(0, len(kids) - offset - len(page))}


def path_siblings(tree: TreeView, path_ids: Sequence[int], node_scores: Sequence[float] | np.ndarray,
                  k: int) -> list[dict[str, Any]]:
    """One entry per level of the predicted path (and one more under its last node, if that has children):
    the parent, its child count, and its ``k`` most probable children by ``node_scores`` (the node on the
    path always among them), most probable first, each with its probability and child count."""
    scores = np.asarray(node_scores, dtype=np.float64)
    path = [int(n) for n in path_ids]
    parents = [0, *path] if not path or tree.children[path[-1]] else [0, *path[:-1]]
    levels = []
    for d, p in enumerate(parents):
        kids = np.asarray(tree.children[p], dtype=np.int64)
        top = kids
        if len(kids) > k:
            top = kids[np.argpartition(-scores[kids], k - 1)[:k]]
            on = path[d] if d < len(path) else None
            if on is not None and on not in top:
                top = np.append(top[np.argsort(-scores[top], kind="stable")][: k - 1], on)
        top = top[np.lexsort((top, -scores[top]))]  # most probable first, ties by id
        levels.append({"parent": p, "num_children": len(kids),
                       "nodes": [{**_brief(tree, int(c)), "probability": round(float(scores[c]), 6)} for c in top]})
    return levels
