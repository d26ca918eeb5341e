"""Answers restricted to the classes a user allows: a subtree (``--within Insecta``) or a list (``--classes FILE``).

A camera-trap user in one region, a lab with its own species list: the model knows more classes than
may be answered. The end-class distribution ``q`` is renormalised exactly over the allowed end classes
(the others get 0; every inner node's marginal is recomputed from them), and only then does a decision
rule answer (argmax, CRM, Bayes, hedging, the roll-up): so "restricted to my list" means the model's
own conditional distribution given that the truth is on the list, not a filter on its top answers.
Decoders that search paths (a beam search) search only the paths that can reach an allowed class
(:attr:`Allowed.reach`).

Numpy only: the runtime, the server and ``evaluate`` share it. Names are resolved by :func:`node_ids`:
a node's name where it is unique in the tree, else its path from the root (``Animals/Dogs`` or
``Animals > Dogs``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiervision.records import TreeView

__all__ = ["Allowed", "RestrictedMarginals", "node_ids", "read_class_file", "restrict_q", "restricted_marginals"]


def _lookup(tree: TreeView) -> tuple[dict[str, list[int]], dict[str, int]]:
    by_name: dict[str, list[int]] = {}
    by_path: dict[str, int] = {}
    for n in range(1, tree.num_nodes):
        by_name.setdefault(tree.names[n], []).append(n)
        by_path["/".join(tree.names[p] for p in tree.path(n))] = n
    return by_name, by_path


def node_ids(tree: TreeView, names: Iterable[str], where: str) -> list[int]:
    """Node ids of ``names`` (a unique name, or a path joined by ``/`` or `` > ``); one line naming every
    unknown or ambiguous one (with the paths that would tell the ambiguous ones apart)."""
    by_name, by_path = _lookup(tree)
    ids, unknown, ambiguous = [], [], []
    for raw in names:
        name = raw.strip()
        key = "/".join(part.strip() for part in name.replace(" > ", "/").split("/"))
        if key in by_path:
            ids.append(by_path[key])
        elif len(by_name.get(name, ())) == 1:
            ids.append(by_name[name][0])
        elif name in by_name:
            paths = [" > ".join(tree.names[p] for p in tree.path(n)) for n in by_name[name][:3]]
            ambiguous.append(f"{name!r} (say which: {'; '.join(paths)})")
        else:
            unknown.append(repr(name))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"{where}: not in the tree: {', '.join(unknown[:5])}{more}")
    if ambiguous:
        raise ValueError(f"{where}: more than one node has the name {ambiguous[0]}")
    return ids


def read_class_file(path: str | os.PathLike) -> list[str]:
    """The class names of a ``--classes`` file: one per line (a byte-order mark, blank lines and lines
    starting with ``#`` are skipped). Duplicates and an empty file are one line each."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"--classes {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--classes {p}: cannot be read as UTF-8 text ({e.__class__.__name__})") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"--classes {p}: names no class (one end class per line)")
    seen: set[str] = set()
    dupes = [n for n in names if n in seen or seen.add(n)]
    if dupes:
        raise ValueError(f"--classes {p}: {dupes[0]!r} is listed twice")
    return names


@dataclass(frozen=True)
class Allowed:
    """The end classes an answer may name: ``ends`` ``(N+1,)`` bool over node ids, and ``reach``, the
    nodes with an allowed end class at or below them (what a path search may enter). ``order``: the
    allowed end classes in depth-first order, and ``span`` ``(2, N+1)``: each node's subtree as the block
    ``order[span[0, v]:span[1, v]]`` (what :func:`restricted_marginals` sums over)."""

    ends: np.ndarray
    reach: np.ndarray
    #: what the user asked for, for messages and records ("within Dogs", "12 classes from my-list.txt")
    description: str
    order: np.ndarray
    span: np.ndarray

    @classmethod
    def of(cls, tree: TreeView, within: str | Iterable[str] | None = None, classes: str | os.PathLike | None = None,
           class_names: Iterable[str] | None = None, end_nodes: str = "leaves",
           where: tuple[str, str] = ("--within", "--classes")) -> Allowed | None:
        """The allowed set from ``within`` (node names, comma-separated or a list: their subtrees),
        ``classes`` (a class file) or ``class_names`` (the same as a list); both kinds given: the classes
        in those subtrees. ``None`` when nothing restricts. ``where``: how messages name the two (a flag,
        a config key, a sidecar key)."""
        if isinstance(within, str):
            within = [w for w in within.split(",") if w.strip()]
        if classes is not None:
            class_names = read_class_file(classes)
        if not within and class_names is None:
            return None
        end = tree.end_mask(end_nodes)
        ends = end.copy()
        said = []
        if within:
            roots = node_ids(tree, within, where[0])
            inside = np.zeros(tree.num_nodes, dtype=bool)
            inside[roots] = True
            ends &= tree.path_sum(inside[None].astype(np.float64))[0] > 0  # an allowed root is on its path
            said.append("within " + ", ".join(tree.names[r] for r in roots))
        if class_names is not None:
            names = list(class_names)
            said_classes = f"{where[1]} {classes}" if classes else where[1]
            ids = node_ids(tree, names, said_classes)
            inner = [tree.names[i] for i in ids if not end[i]]
            if inner:
                raise ValueError(f"{said_classes}: {inner[0]!r} is not an end class (name a subtree with {where[0]})")
            if len(set(ids)) < len(ids):
                raise ValueError(f"{said_classes}: a class is named twice (by its name and by its path)")
            listed = np.zeros(tree.num_nodes, dtype=bool)
            listed[ids] = True
            ends &= listed
            said.append(f"{len(ids)} listed classes")
        if not ends.any():
            raise ValueError(f"{' and '.join(said)}: leaves no end class to answer")
        reach = tree.subtree_sum(ends[None].astype(np.float64))[0] > 0
        reach[0] = True
        order = np.flatnonzero(ends)
        order = order[np.argsort(tree.tin[order])]
        at = tree.tin[order]
        span = np.stack([np.searchsorted(at, tree.tin), np.searchsorted(at, tree.tout)])
        return cls(ends, reach, " and ".join(said), order, span)

    def as_dict(self) -> dict:
        """``{"description", "classes"}`` for records and reports (the class count, not the list)."""
        return {"description": self.description, "classes": int(self.ends.sum())}


def restrict_q(q: np.ndarray, allowed: Allowed) -> np.ndarray:
    """``(B, N+1)`` ``q`` renormalised over the allowed end classes (the others 0). A row that gives the
    allowed classes no mass at all spreads it evenly over them (the model has no preference among them)."""
    q = np.asarray(q, dtype=np.float64) * allowed.ends
    total = q.sum(1, keepdims=True)
    even = allowed.ends / allowed.ends.sum()
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), even)


class RestrictedMarginals:
    """One image's node marginals under the restricted distribution, each read when asked: a node's marginal
    is the difference of two prefix sums over the allowed classes in depth-first order, so a record that
    reads its path's nodes (the answer, the roll-up) costs O(depth), not O(N) — at 10^5 nodes that is most
    of a restricted prediction. ``np.asarray`` gives every node's ``(N+1,)``."""

    __slots__ = ("prefix", "span")

    def __init__(self, prefix: np.ndarray, span: np.ndarray) -> None:
        self.prefix, self.span = prefix, span

    def __getitem__(self, node):
        return np.maximum(self.prefix[self.span[1, node]] - self.prefix[self.span[0, node]], 0.0)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.span.shape[1]


def restricted_marginals(q_allowed: np.ndarray, allowed: Allowed) -> list[RestrictedMarginals]:
    """Each image's :class:`RestrictedMarginals` from ``(B, len(allowed.order))`` probabilities of the allowed
    classes (in ``allowed.order``; any scale: a row is renormalised, one with no mass at all spread evenly
    as :func:`restrict_q` does)."""
    q = np.asarray(q_allowed, dtype=np.float64)
    prefix = np.zeros((len(q), q.shape[1] + 1))
    np.cumsum(q, axis=1, out=prefix[:, 1:])
    empty = prefix[:, -1] <= 0
    prefix /= np.where(empty, 1.0, prefix[:, -1])[:, None]
    prefix[empty] = np.arange(q.shape[1] + 1) / q.shape[1]
    return [RestrictedMarginals(row, allowed.span) for row in prefix]
