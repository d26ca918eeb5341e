"""Readers and writers of class trees: every file format in one place, apart from the tree core.

Readers take the class to build as their first argument (``Taxonomy.from_csv`` is
``classmethod(from_csv)``), so the core never imports them and every reader returns the caller's
class; writers take a tree. Formats: hiervision's JSON (``to_dict`` / ``from_dict`` / ``save`` /
``load``), ``{child: parent}`` maps, ``(parent, child)`` edges and their CSV, ``/``-separated paths
and folder trees, (coarse, fine) pairs, Open Images' hierarchy JSON, WordNet is-a edges, and the
indented text rendering. Every bad file is one :class:`~hiervision.tree.TaxonomyError` line.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from hiervision.runfolder import atomic_write_json
from hiervision.tree import TaxonomyError
from hiervision.tree.core import Tree

__all__ = [
    "FORMAT", "from_coarse_fine", "from_csv", "from_dict", "from_edges", "from_folders", "from_openimages",
    "from_parent_map", "from_paths", "from_wordnet", "iter_render", "load", "render", "save", "to_dict",
]

FORMAT = "hiervision-taxonomy"
MAX_INDENT = 32  # render: deeper nodes are not indented further

T = TypeVar("T", bound=Tree)


def from_parent_map(
    cls: type[T],
    parent_of: Mapping[str, str | None],
    root: str = "root",
    external_ids: Mapping[str, str] | None = None,
) -> T:
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


def from_edges(
    cls: type[T],
    edges: Iterable[tuple[str, str]],
    root: str = "root",
    names: Mapping[str, str] | None = None,
    multi_parent: str = "error",
) -> T:
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


def from_csv(cls: type[T], path: str | os.PathLike, root: str = "root") -> T:
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
    return from_edges(cls, edges, root=root)


def from_paths(cls: type[T], paths: Iterable[str], root: str = "root") -> T:
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
    _no_lookalikes(nodes)
    ordered = sorted(nodes, key=lambda n: n.split("/"))
    parent_of = {n: (n.rsplit("/", 1)[0] if "/" in n else None) for n in ordered}
    tax = from_parent_map(cls, parent_of, root=root)
    return cls([root] + [n.rsplit("/", 1)[-1] for n in tax.names[1:]], tax.parents, [None, *tax.names[1:]])


def _no_lookalikes(nodes: set[str]) -> None:
    """Two siblings whose names differ only by case or Unicode normal form ("Dogs" and "dogs", "é" composed
    and decomposed) would be two classes that a person reads as one: refused, both spellings shown."""
    seen: dict[str, str] = {}
    for n in sorted(nodes):
        key = unicodedata.normalize("NFC", n).casefold()
        if key in seen:
            raise TaxonomyError(f"{seen[key]!r} and {n!r} differ only by case or Unicode form: two classes a "
                                "person reads as one (rename one)")
        seen[key] = n


def _names_fit(names: dict[str, str], edges: list[tuple[str, str]], names_file) -> None:
    """A names file that names none of the hierarchy's ids is the wrong file (every class would be called by its
    id): refused; one that names only some of them is said in one warning line."""
    if names_file is None:
        return
    ids = {n for edge in edges for n in edge}
    named = sum(i in names for i in ids)
    if ids and not named:
        raise TaxonomyError(f"{names_file}: names none of the hierarchy's {len(ids):,} ids (the wrong file?)")
    if named < len(ids):
        print(f"hiervision: warning: {names_file}: names {named:,} of the hierarchy's {len(ids):,} ids; the others "
              "keep their ids as names", file=sys.stderr)


def from_folders(cls: type[T], root_dir: str | os.PathLike, root: str = "root") -> T:
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
    return from_paths(cls, dirs, root=root)


def from_coarse_fine(cls: type[T], pairs: Iterable[tuple[str, str]], root: str = "root") -> T:
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
    return from_parent_map(cls, parent_of, root=root)


def from_openimages(
    cls: type[T],
    hierarchy_json: str | os.PathLike,
    descriptions_csv: str | os.PathLike | None = None,
) -> T:
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
    _names_fit(names, edges, descriptions_csv)
    top = data["LabelName"]
    tax = from_edges(cls, edges, root=names.get(top, "Entity"), names=names, multi_parent="first")
    # the file's top node became a class under our root: remove it so its children hang at depth 1
    return tax.collapse(lambda t, n: t.external_ids[n] == top)


#: where Debian's ``wordnet-base`` puts the WordNet 3.0 database (``$WNSEARCHDIR`` overrides it)
WORDNET_DIR = Path(os.environ.get("WNSEARCHDIR", "/usr/share/wordnet"))


def from_wordnet(
    cls: type[T],
    hierarchy_file: str | os.PathLike | None = None,
    names_file: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    max_depth: int | None = None,
    keep_chains: bool = False,
    all_synsets: bool = False,
) -> T:
    """WordNet is-a edges → tree: from the WordNet database (a folder holding ``data.noun``; by default Debian's
    ``wordnet-base``, :data:`WORDNET_DIR`: :func:`read_wordnet_db`) or from an edge list (BREEDS
    ``class_hierarchy.txt``: ``parent child`` wnids per line, names from ``names_file``).

    The explicit rule, in order:

    0. with ``all_synsets``, every synset of ``names_file`` that no edge names (WordNet's instances —
       people, places — whose instance-of links the BREEDS edge list leaves out: 7,714 of its 82,115)
       becomes a class under the root, as any node without a parent does;
    1. a synset with several hypernyms keeps the *deepest* one (see :meth:`from_edges`);
    2. when ``classes`` (wnids) is given, nodes that no class reaches are dropped;
    3. single-child chains are collapsed: an inner node with one child that is not itself a
       class is removed and its child moves up (also at the top, so the root has ≥ 2 children
       unless only one class exists) — unless ``keep_chains``: then every synset stays a node, for a
       tree as big as WordNet itself rather than the shortest one that separates the classes (BREEDS'
       WordNet: 68,326 nodes collapsed, 74,402 kept, 82,116 kept with ``all_synsets``);
    4. ``max_depth`` caps path length by dropping the lowest intermediate nodes of long paths.
    """
    hierarchy_file = WORDNET_DIR if hierarchy_file is None else hierarchy_file
    if Path(hierarchy_file).is_dir():  # the WordNet database itself (Debian's wordnet-base)
        if names_file is not None or all_synsets:
            raise TaxonomyError(f"{hierarchy_file}: a WordNet database names its synsets and holds every one "
                                "(leave out --names and --all-synsets)")
        edges, names = read_wordnet_db(hierarchy_file)
    else:
        edges, names = _wordnet_edges(hierarchy_file, names_file)
    if all_synsets:
        if names_file is None:
            raise TaxonomyError(f"{hierarchy_file}: all_synsets needs the names file (the list of synsets, --names)")
        named = {n for edge in edges for n in edge}
        edges += [("entity", wnid) for wnid in names if wnid not in named]  # naming the root hangs them under it
    tax = from_edges(cls, edges, root="entity", names=names, multi_parent="deepest")
    # the top synset "entity" is the root itself, not a lone child of it
    tax = tax.collapse(lambda t, n: t.parents[n] == 0 and t.names[n] == t.names[0] and len(t.children[0]) == 1)
    keep: set[int] | None = None
    if classes is not None:
        idx = tax.external_index
        missing = [c for c in classes if c not in idx]
        if missing:
            raise TaxonomyError(f"{hierarchy_file}: class {missing[0]!r} is not in the hierarchy")
        keep = {idx[c] for c in classes}
        tax = tax.prune(keep)
        keep = {tax.external_index[c] for c in classes}
    if not keep_chains:
        tax = tax.collapse_chains(protect=keep)
    if max_depth is not None:
        tax = tax.cap_depth(max_depth)
    return tax


def _wordnet_edges(hierarchy_file, names_file) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``parent child`` wnid lines (BREEDS ``class_hierarchy.txt``) and a ``wnid<TAB>name`` file."""
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
    _names_fit(names, edges, names_file)
    return edges, names


def read_wordnet_db(folder: str | os.PathLike = WORDNET_DIR) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(edges, names)`` of WordNet's noun hierarchy from its database (``data.noun``; Debian's
    ``wordnet-base`` installs it in ``/usr/share/wordnet``): an edge per hypernym (``@``) and per instance
    hypernym (``@i``: a person or place under its class, not the root), ids ``n`` + offset (ImageNet's wnids).
    A synset is named by its first lemma; where lemmas collide, by the lemma and its first hypernym's
    ("bank (slope)"), and by its wnid too where even that collides."""
    path = Path(folder) / "data.noun"
    if not path.is_file():
        raise TaxonomyError(f"{folder}: no WordNet database (data.noun) here; install Debian's wordnet-base "
                            "(apt-get install wordnet-base) or give its folder")
    lemma: dict[str, str] = {}
    parent: dict[str, str] = {}
    edges: list[tuple[str, str]] = []
    for line in _read_text(path).splitlines():
        if not line or line.startswith("  "):  # the licence header
            continue
        f = line.split(" ")
        wnid, words = "n" + f[0], int(f[3], 16)
        lemma[wnid] = f[4].replace("_", " ")
        at = 4 + 2 * words
        for k in range(int(f[at])):
            symbol, target, pos = f[at + 1 + 4 * k : at + 4 + 4 * k]
            if symbol in ("@", "@i") and pos == "n":
                edges.append(("n" + target, wnid))
                parent.setdefault(wnid, "n" + target)
    counts = Counter(lemma.values())
    names = {w: n if counts[n] == 1 else f"{n} ({lemma.get(parent.get(w, ''), 'top')})" for w, n in lemma.items()}
    again = Counter(names.values())
    return edges, {w: n if again[n] == 1 else f"{n[:-1]}, {w})" for w, n in names.items()}


def to_dict(tree: Tree) -> dict:
    """The ``hiervision-taxonomy`` JSON object: format tag, version, fingerprint and one entry per node."""
    nodes = []
    for i in range(len(tree.names)):
        node = {"id": i, "name": tree.names[i], "parent": tree.parents[i]}
        if tree.external_ids[i] is not None:
            node["external_id"] = tree.external_ids[i]
        nodes.append(node)
    return {"format": FORMAT, "version": 1, "fingerprint": tree.fingerprint, "nodes": nodes}


def from_dict(cls: type[T], data: Mapping, source: str = "taxonomy") -> T:
    """Read what :func:`to_dict` writes, validated as any tree; ``source`` names it in errors."""
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


def save(tree: Tree, path: str | os.PathLike) -> None:
    """Write the JSON format atomically: a failed write leaves the old file (see :mod:`hiervision.runfolder`)."""
    atomic_write_json(path, to_dict(tree), indent=1)


def load(cls: type[T], path: str | os.PathLike) -> T:
    """Read a file :func:`save` wrote; every way it can be unreadable is one line naming it."""
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
    return from_dict(cls, data, source=str(path))


def render(tree: Tree, max_nodes: int | None = None) -> str:
    """Indented text view of the tree (what ``hiervision taxonomy show`` prints)."""
    return "\n".join(iter_render(tree, max_nodes))


def iter_render(tree: Tree, max_nodes: int | None = None) -> Iterator[str]:
    """:meth:`render` one line at a time, depth-first without recursion, so that printing a
    100k-node or 100k-deep tree needs memory for the tree only. Indentation stops growing at
    depth :data:`MAX_INDENT`; deeper lines show their depth instead (else line i would be i wide)."""
    yield f"{tree.names[0]}  ({len(tree.leaves)} classes · {len(tree)} nodes · depth {tree.max_depth})"  # classes: ends
    shown, stack = 1, list(reversed(tree.children[0]))
    while stack:
        n = stack.pop()
        if max_nodes is not None and shown > max_nodes:
            yield f"... ({tree.num_nodes - shown} more)"
            return
        e = tree.external_ids[n]
        ext = f"  [{e}]" if e and e != tree.names[n] else ""
        d = tree.depths[n]
        indent = "  " * d if d <= MAX_INDENT else "  " * MAX_INDENT + f"[depth {d}] "
        yield f"{indent}{tree.names[n]}{ext}"
        shown += 1
        stack.extend(reversed(tree.children[n]))


# ---------------------------------------------------------------------- helpers
def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TaxonomyError(f"{path}: cannot read ({e.strerror})") from None


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
