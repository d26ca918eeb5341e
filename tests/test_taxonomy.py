"""Tests for :mod:`hiervision.taxonomy`: constructors, validation, queries, encodings and transformations.

Real-data tests use the Open Images and WordNet files under ``../shared/data`` (or ``$HIERVISION_DATA``)
and skip when absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hiervision.taxonomy import EOS, IGNORE, PAD, Taxonomy, TaxonomyError

DATA = Path(os.environ.get("HIERVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OI_JSON = DATA / "openimages" / "bbox_labels_600_hierarchy.json"
OI_CSV = DATA / "openimages" / "class-descriptions-boxable.csv"
WN_DIR = DATA / "imagenet" / "breeds" / "wordnet"
WN_HIER = WN_DIR / "class_hierarchy.txt"
WN_NAMES = WN_DIR / "node_names.txt"
WN_1K = WN_DIR / "dataset_class_info.json"
TINY_WNIDS = DATA / "tiny-imagenet-200" / "wnids.txt"

needs_openimages = pytest.mark.skipif(not (OI_JSON.exists() and OI_CSV.exists()), reason="Open Images files absent")
needs_wordnet = pytest.mark.skipif(
    not (WN_HIER.exists() and WN_NAMES.exists() and TINY_WNIDS.exists()), reason="WordNet / Tiny-ImageNet files absent"
)


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """Every TaxonomyError is a single line that names what went wrong."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def koo() -> Taxonomy:
    """Koo's slide example: Root; A, B; A -> C, D; B -> E, F, G (ids A=1 ... G=7)."""
    return Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B"})


# ---------------------------------------------------------------------- constructors
def test_from_parent_map_ids_follow_input_order(koo: Taxonomy) -> None:
    assert koo.names == ("root", "A", "B", "C", "D", "E", "F", "G")
    assert koo.parents == (-1, 0, 0, 1, 1, 2, 2, 2)
    assert len(koo) == 7 and koo.num_nodes == 8
    assert koo.external_ids == (None,) * 8


def test_from_parent_map_root_name_and_external_ids() -> None:
    t = Taxonomy.from_parent_map({"a": "top", "b": "a"}, root="top", external_ids={"a": "x1"})
    assert t.names == ("top", "a", "b") and t.parents == (-1, 0, 1)
    assert t.external_ids == (None, "x1", None)
    assert t.index("x1") == 1


def test_from_parent_map_errors() -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_parent_map({"a": None, "b": "nope"})
    one_line_error(e, "'b'", "'nope'", "unknown parent")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_parent_map({"root": None})
    one_line_error(e, "'root'")


# hand DAG: x has two parents (P1 at depth 1, P2 at depth 2); y has two equally deep parents
DAG = [("top", "P1"), ("top", "Q"), ("Q", "P2"), ("P1", "x"), ("P2", "x"), ("top", "Zed"), ("top", "Abe")]
DAG += [("Zed", "y"), ("Abe", "y")]


def test_from_edges_multi_parent_error_names_node() -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_edges(DAG)
    one_line_error(e, "'x'", "'P1'", "'P2'", "two parents")


def test_from_edges_multi_parent_first_keeps_first_edge() -> None:
    t = Taxonomy.from_edges(DAG, multi_parent="first")
    assert t.path_name(t.index("x")) == "top/P1/x"
    assert t.path_name(t.index("y")) == "top/Zed/y"
    # ids are external ids; nodes never a child hang under the artificial root
    assert t.names[0] == "root" and t.children[0] == (t.index("top"),)
    assert t.external_ids[t.index("x")] == "x"


def test_from_edges_multi_parent_deepest_keeps_most_specific() -> None:
    t = Taxonomy.from_edges(DAG, multi_parent="deepest")
    assert t.path_name(t.index("x")) == "top/Q/P2/x"
    # tie on depth: broken by the smaller parent (external) id, "Abe" < "Zed", not by input order
    assert t.path_name(t.index("y")) == "top/Abe/y"


def test_from_edges_bad_option_cycle_and_display_names() -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_edges(DAG, multi_parent="last")
    one_line_error(e, "'last'")
    for mode in ("error", "first", "deepest"):
        with pytest.raises(TaxonomyError) as e:
            Taxonomy.from_edges([("t", "u"), ("a", "b"), ("b", "c"), ("c", "a")], multi_parent=mode)
        one_line_error(e, "cycle")
    # readable names: siblings sharing one get their id appended; external ids keep the identity
    t = Taxonomy.from_edges([("t", "i1"), ("t", "i2"), ("t", "i3")], names={"t": "T", "i1": "dup", "i2": "dup"})
    assert t.names == ("root", "T", "dup (i1)", "dup (i2)", "i3")
    assert t.external_ids == (None, "t", "i1", "i2", "i3")


def test_from_csv(tmp_path: Path) -> None:
    f = tmp_path / "tree.csv"
    f.write_text("parent,child,note\nanimal,dog,x\nanimal,cat,\n dog , puppy ,\nplant,tree,\n", encoding="utf-8")
    t = Taxonomy.from_csv(f)
    assert t.path_name(t.index("puppy")) == "animal/dog/puppy"
    assert [t.names[c] for c in t.children[0]] == ["animal", "plant"]
    bad = tmp_path / "bad.csv"
    bad.write_text("from,to\na,b\n", encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_csv(bad)
    one_line_error(e, str(bad), "header")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_csv(tmp_path / "missing.csv")
    one_line_error(e, "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("parent,child\n", encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_csv(empty)
    one_line_error(e, "empty tree")


def test_from_csv_short_row_is_a_taxonomy_error(tmp_path: Path) -> None:
    f = tmp_path / "short.csv"
    f.write_text("parent,child\na,b\nc\n", encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_csv(f)
    one_line_error(e, "short.csv")


def test_from_folders(tmp_path: Path) -> None:
    for p in ("animal/dog", "animal/cat", "plant", "plant/tree/oak"):
        (tmp_path / p).mkdir(parents=True)
    (tmp_path / "animal" / "readme.txt").write_text("files are not nodes")
    t = Taxonomy.from_folders(tmp_path)
    assert sorted(t.names[1:]) == ["animal", "cat", "dog", "oak", "plant", "tree"]
    oak = t.index("oak")
    assert t.path_name(oak) == "plant/tree/oak"
    assert t.external_ids[oak] == "plant/tree/oak"  # relative path kept as external id
    assert t.index("animal/cat") == t.index("cat")
    # deterministic: sorted folder order
    assert [t.names[c] for c in t.children[t.index("animal")]] == ["cat", "dog"]
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_folders(tmp_path / "animal" / "dog")
    one_line_error(e, "empty tree")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_folders(tmp_path / "nope")
    one_line_error(e, "nope", "not a folder")


def test_from_folders_skips_hidden_leaf_folder(tmp_path: Path) -> None:
    for p in ("a/x", "b", ".cache"):
        (tmp_path / p).mkdir(parents=True)
    t = Taxonomy.from_folders(tmp_path)
    assert sorted(t.names[1:]) == ["a", "b", "x"]


def test_from_folders_skips_hidden_subtrees(tmp_path: Path) -> None:
    for p in ("a/x", "b", ".git/objects"):
        (tmp_path / p).mkdir(parents=True)
    t = Taxonomy.from_folders(tmp_path)
    assert sorted(t.names[1:]) == ["a", "b", "x"]


def test_from_coarse_fine() -> None:
    pairs = [("vehicle", "bus"), ("animal", "cat"), ("vehicle", "car"), ("animal", "cat")]
    t = Taxonomy.from_coarse_fine(pairs)
    assert t.names == ("root", "vehicle", "animal", "bus", "cat", "car")  # order of first appearance
    assert t.is_fixed_depth and t.max_depth == 2
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_coarse_fine([("a", "x"), ("b", "x")])
    one_line_error(e, "'x'", "two parents")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_coarse_fine([("a", "b"), ("b", "c")])
    one_line_error(e, "'b'", "coarse and a fine")


# ---------------------------------------------------------------------- Open Images
def _openimages_edges() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Subcategory edges in pre-order DFS (file order) and Part edges, read independently of the library."""
    data = json.loads(OI_JSON.read_text(encoding="utf-8"))
    sub: list[tuple[str, str]] = []
    part: list[tuple[str, str]] = []

    def walk(node: dict) -> None:
        for p in node.get("Part", []):
            part.append((node["LabelName"], p["LabelName"]))
        for c in node.get("Subcategory", []):
            sub.append((node["LabelName"], c["LabelName"]))
            walk(c)

    walk(data)
    return sub, part


@pytest.fixture(scope="module")
def openimages() -> Taxonomy:
    return Taxonomy.from_openimages(OI_JSON, OI_CSV)


@needs_openimages
def test_openimages_classes_and_root(openimages: Taxonomy) -> None:
    t = openimages
    assert len(t) == 601
    assert t.names[0] == "Entity"
    assert "/m/0bl9f" not in t.external_index  # the file's top node is the artificial root
    assert t.max_depth == 5 and len(t.children[0]) >= 2
    csv_ids = {line.split(",")[0] for line in OI_CSV.read_text(encoding="utf-8").splitlines() if line}
    assert set(t.external_index) == csv_ids
    assert t.names[t.index("/m/011k07")] == "Tortoise"


@needs_openimages
def test_openimages_part_edges_dropped(openimages: Taxonomy) -> None:
    t = openimages
    sub, part = _openimages_edges()
    assert part, "the file has Part (has-part) edges"
    sub_set = set(sub)
    for whole, p in part:
        if (whole, p) not in sub_set:
            assert t.external_ids[t.parents[t.index(p)]] != whole, f"Part edge {whole} -> {p} kept"


@needs_openimages
def test_openimages_multi_parent_keeps_first_in_dfs_order(openimages: Taxonomy) -> None:
    t = openimages
    sub, _ = _openimages_edges()
    first: dict[str, str] = {}
    parents: dict[str, set[str]] = {}
    for p, c in sub:
        first.setdefault(c, p)
        parents.setdefault(c, set()).add(p)
    multi = [c for c, ps in parents.items() if len(ps) > 1]
    assert len(multi) > 10
    for c in multi:
        assert t.external_ids[t.parents[t.index(c)]] == first[c], c
    # a known case: Chopsticks is listed under Kitchen utensil first, then under Tableware
    chopsticks = t.index("/m/01_5g")
    assert t.names[chopsticks] == "Chopsticks"
    assert t.names[t.parents[chopsticks]] == "Kitchen utensil"


@needs_openimages
def test_openimages_unreadable_file_named(tmp_path: Path) -> None:
    bad = tmp_path / "h.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_openimages(bad)
    one_line_error(e, "h.json")


# ---------------------------------------------------------------------- WordNet (BREEDS) + Tiny-ImageNet
@pytest.fixture(scope="module")
def tiny_wnids() -> list[str]:
    return [w.strip() for w in TINY_WNIDS.read_text().splitlines() if w.strip()]


@pytest.fixture(scope="module")
def wordnet(tiny_wnids: list[str]) -> Taxonomy:
    return Taxonomy.from_wordnet(WN_HIER, WN_NAMES, classes=tiny_wnids)


@pytest.fixture(scope="module")
def wordnet6(tiny_wnids: list[str]) -> Taxonomy:
    return Taxonomy.from_wordnet(WN_HIER, WN_NAMES, classes=tiny_wnids, max_depth=6)


@needs_wordnet
def test_wordnet_classes_are_exactly_the_leaves(wordnet: Taxonomy, tiny_wnids: list[str]) -> None:
    t = wordnet
    assert len(tiny_wnids) == 200
    classes = {t.index(w) for w in tiny_wnids}
    assert len(classes) == 200
    assert set(t.leaves) == classes
    assert t.names[0] == "entity" and t.names[t.index("n02124075")] == "Egyptian cat"


@needs_wordnet
def test_wordnet_no_single_child_chains_and_wide_root(wordnet: Taxonomy, tiny_wnids: list[str]) -> None:
    t = wordnet
    protected = {t.index(w) for w in tiny_wnids}
    chains = [t.names[n] for n in range(1, t.num_nodes) if len(t.children[n]) == 1 and n not in protected]
    assert chains == []
    assert len(t.children[0]) >= 2
    assert t.collapse_chains(protect=protected) == t  # idempotent on the result


@needs_wordnet
def test_wordnet_max_depth_caps_and_keeps_classes(wordnet6: Taxonomy, wordnet: Taxonomy, tiny_wnids) -> None:
    assert wordnet.max_depth > 6
    t = wordnet6
    assert t.max_depth <= 6
    assert all(len(t.path(n)) <= 6 for n in range(1, t.num_nodes))
    assert {t.index(w) for w in tiny_wnids} == set(t.leaves) and len(t.leaves) == 200
    assert t == wordnet.cap_depth(6)


@needs_wordnet
def test_wordnet_deepest_parent_rule(wordnet: Taxonomy) -> None:
    t = wordnet

    def anc(wnid: str) -> set[str | None]:
        return {t.external_ids[a] for a in t.ancestors(t.index(wnid))}

    # sewing machine: home appliance (9 levels below the top) beats textile machine (8)
    sewing = t.index("n04179913")
    assert t.external_ids[t.parents[sewing]] == "n03528263"
    assert "n04417180" not in anc("n04179913")
    # computer keyboard: data input device (9) beats keyboard (7); the former is collapsed, the latter absent
    assert "n03614007" not in anc("n03085013")
    # meat loaf: loaf of bread (8, under bread) beats dish (6)
    assert "n07679356" in anc("n07871810") and "n07557434" not in anc("n07871810")
    # basketball: ball and basketball equipment tie at 8; the smaller wnid (ball, n02778669) wins
    assert t.external_ids[t.parents[t.index("n02802426")]] == "n02778669"


def _write_wordnet(tmp_path: Path, edges: list[tuple[str, str]], names: dict[str, str]) -> tuple[Path, Path]:
    h, n = tmp_path / "hier.txt", tmp_path / "names.txt"
    h.write_text("".join(f"{p} {c}\n" for p, c in edges), encoding="utf-8")
    n.write_text("".join(f"{k}\t{v}\n" for k, v in names.items()), encoding="utf-8")
    return h, n


def test_wordnet_unknown_class_and_bad_line(tmp_path: Path) -> None:
    h, _ = _write_wordnet(tmp_path, [("n1", "n2"), ("n1", "n3")], {})
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_wordnet(h, classes=["n2", "n99999999"])
    one_line_error(e, "n99999999", "hier.txt")
    bad = tmp_path / "h.txt"
    bad.write_text("n1 n2\nn1 n3 n4\n", encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_wordnet(bad)
    one_line_error(e, "h.txt:2")


def test_wordnet_small_file_rules(tmp_path: Path) -> None:
    # e -> {a, b}; a -> m -> {x, y}; b -> y (y: deeper parent m wins); z unused and pruned
    edges = [("e", "a"), ("e", "b"), ("a", "m"), ("m", "x"), ("m", "y"), ("b", "y"), ("b", "q"), ("e", "z")]
    h, n = _write_wordnet(tmp_path, edges, {"e": "entity", "m": "mid, middle", "x": "ex", "y": "why", "q": "queue"})
    t = Taxonomy.from_wordnet(h, n, classes=["x", "y", "q"])
    assert t.names[0] == "entity"
    assert {t.names[c] for c in t.leaves} == {"ex", "why", "queue"}
    assert t.path_name(t.index("y")) == "mid/why"  # a (chain link) collapsed; first lemma used as name
    assert t.path_name(t.index("q")) == "queue"  # b kept only q: chain link, removed
    assert "z" not in t.external_index


def test_wordnet_keep_chains_and_all_synsets(tmp_path: Path, capsys) -> None:
    from hiervision.cli import main

    # e -> {a, b}; a -> m -> {x, y}; b -> {y, q} (y: deeper parent m wins); i: a synset no edge names
    edges = [("e", "a"), ("e", "b"), ("a", "m"), ("m", "x"), ("m", "y"), ("b", "y"), ("b", "q")]
    h, n = _write_wordnet(tmp_path, edges, {"e": "entity", "a": "A", "b": "B", "m": "M", "i": "I"})
    t = Taxonomy.from_wordnet(h, n, classes=["x", "y", "q"], keep_chains=True)
    assert t.path_name(t.index("y")) == "A/M/y" and t.path_name(t.index("q")) == "B/q"  # entity is the root
    collapsed = Taxonomy.from_wordnet(h, n, classes=["x", "y", "q"])
    assert collapsed.path_name(collapsed.index("y")) == "M/y"
    full = Taxonomy.from_wordnet(h, n, keep_chains=True, all_synsets=True)
    assert sorted(full.external_ids[1:]) == ["a", "b", "e", "i", "m", "q", "x", "y"]  # every synset, once
    assert full.path_name(full.index("i")) == "I"  # under the root
    assert list(full.children[full.index("entity/A")]) == [full.index("entity/A/M")]  # a chain, kept
    assert len(Taxonomy.from_wordnet(h, n, keep_chains=True)) == 6  # without all_synsets: i is in no edge
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_wordnet(h, all_synsets=True)
    one_line_error(e, "hier.txt", "names")
    out = tmp_path / "t.json"
    assert main(["taxonomy", "build", str(h), "--from", "wordnet", "--names", str(n), "--keep-chains",
                 "--all-synsets", "--out", str(out)]) == 0
    assert Taxonomy.load(out) == full
    assert "names 4 of the hierarchy's 7 ids; the others keep their ids as names" in capsys.readouterr().err
    (tmp_path / "wrong.txt").write_text("n999\tsomething else\n")
    with pytest.raises(TaxonomyError) as e:  # the wrong file: it would name every class by its id
        Taxonomy.from_wordnet(h, tmp_path / "wrong.txt")
    one_line_error(e, "wrong.txt", "names none of the hierarchy's 7 ids (the wrong file?)")
    assert main(["taxonomy", "build", str(h), "--from", "folders", "--keep-chains", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--keep-chains applies to --from wordnet only" in err


@pytest.mark.skipif(not (WN_HIER.exists() and WN_NAMES.exists()), reason="WordNet files absent")
def test_whole_wordnet_with_chains_and_all_synsets_has_every_synset() -> None:
    synsets = [line.partition("\t")[0] for line in WN_NAMES.read_text(encoding="utf-8").splitlines() if line]
    t = Taxonomy.from_wordnet(WN_HIER, WN_NAMES, keep_chains=True, all_synsets=True)  # ~2 s
    assert len(t) == len(synsets) >= 80_000 and set(t.external_ids[1:]) == set(synsets)
    assert any(len(c) == 1 for c in t.children[1:])  # chains kept


def test_wordnet_same_name_synsets_become_siblings_after_collapse(tmp_path: Path) -> None:
    edges = [("e", "c"), ("c", "r"), ("r", "g1"), ("c", "g2"), ("c", "o")]
    h, n = _write_wordnet(tmp_path, edges, {"e": "E", "c": "C", "r": "R", "g1": "g", "g2": "g, robe", "o": "O"})
    t = Taxonomy.from_wordnet(h, n, classes=["g1", "g2", "o"])
    assert {t.external_ids[c] for c in t.leaves} == {"g1", "g2", "o"}


@pytest.mark.skipif(not WN_1K.exists(), reason="BREEDS class list absent")
def test_wordnet_imagenet1k_builds() -> None:
    wnids = [row[1] for row in json.loads(WN_1K.read_text())]
    t = Taxonomy.from_wordnet(WN_HIER, WN_NAMES, classes=wnids)
    assert len(t.leaves) == 1000


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("names", "parents", "needles"),
    [
        (["r", "a", "b"], [-1, 2, 1], ("cycle", "'a'")),
        (["r", "a"], [-1, 1], ("cycle", "'a'")),
        (["r", "a", "b"], [-1, 0, 7], ("unknown parent", "'b'")),
        (["r", "a", "b"], [-1, 0, -1], ("no parent", "'b'")),
        (["r", "a", "x", "x"], [-1, 0, 1, 1], ("duplicate name", "'x'", "'a'")),
        (["r"], [-1], ("empty tree",)),
        (["r", "a"], [0, 0], ("root", "'r'")),
        (["r", "a"], [-1], ("names", "parents")),
    ],
)
def test_validation_errors_are_one_line_and_name_the_node(names, parents, needles) -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy(names, parents)
    one_line_error(e, *needles)


def test_validation_via_constructors() -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_parent_map({"a": "b", "b": "a"})
    one_line_error(e, "cycle")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_parent_map({})
    one_line_error(e, "empty tree")
    # same name under different parents is fine
    t = Taxonomy(["r", "a", "b", "x", "x"], [-1, 0, 0, 1, 2])
    assert len(t) == 4
    assert issubclass(TaxonomyError, ValueError)


# ---------------------------------------------------------------------- (de)serialisation
def test_json_round_trip_and_fingerprint(tmp_path: Path, koo: Taxonomy) -> None:
    t = Taxonomy.from_parent_map({"a": None, "b": "a", "c": None}, external_ids={"b": "/m/b"})
    f = tmp_path / "tax.json"
    t.save(f)
    assert not (tmp_path / "tax.json.tmp").exists()
    u = Taxonomy.load(f)
    assert u == t and u.fingerprint == t.fingerprint and hash(u) == hash(t)
    assert u.names == t.names and u.parents == t.parents and u.external_ids == t.external_ids
    data = json.loads(f.read_text(encoding="utf-8"))
    assert data["format"] == "hiervision-taxonomy" and data["fingerprint"] == t.fingerprint
    assert koo.fingerprint != t.fingerprint and koo != t
    renamed = Taxonomy(["root", "a", "b", "d"], t.parents)
    assert renamed.fingerprint != t.fingerprint
    assert len(t.fingerprint) == 16
    # stable across runs: a pure function of names and parents
    assert Taxonomy.from_parent_map({"a": None, "b": "a", "c": None}).fingerprint == t.fingerprint


def test_json_unicode_round_trip(tmp_path: Path) -> None:
    t = Taxonomy.from_parent_map({"Käfer": None, "甲虫": "Käfer"})
    f = tmp_path / "u.json"
    t.save(f)
    assert Taxonomy.load(f) == t


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"format": "something-else", "nodes": []}',
        '{"format": "hiervision-taxonomy", "version": 1}',
        '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r"}, {"id": 1, "name": "a"}]}',
        '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r", "parent": -1}, '
        '{"id": 2, "name": "a", "parent": 0}]}',
    ],
)
def test_load_malformed_names_the_file(tmp_path: Path, content: str) -> None:
    f = tmp_path / "broken.json"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.load(f)
    one_line_error(e, str(f))


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.load(tmp_path / "absent.json")
    one_line_error(e, "absent.json")


# ---------------------------------------------------------------------- queries
def test_structure_queries(koo: Taxonomy) -> None:
    A, B, C, D, E, F, G = range(1, 8)
    assert koo.path(F) == (B, F) and koo.path(0) == ()
    assert koo.ancestors(F) == (B,)
    assert koo.depth(F) == 2 and koo.depth(A) == 1 and koo.depth(0) == 0
    assert koo.depths == (0, 1, 1, 2, 2, 2, 2, 2)
    assert koo.levels == ((A, B), (C, D, E, F, G))
    assert koo.leaves == (C, D, E, F, G)
    assert koo.heights == (2, 1, 1, 0, 0, 0, 0, 0)
    assert koo.max_depth == 2 and koo.is_fixed_depth
    assert koo.children[0] == (A, B) and koo.children[B] == (E, F, G)
    assert koo.subtree(B) == [B, E, F, G]
    assert repr(koo) == "Taxonomy(classes=7, leaves=5, depth=2)"


def test_is_valid_path(koo: Taxonomy) -> None:
    assert koo.is_valid_path((2, 6))
    assert koo.is_valid_path([1]) and koo.is_valid_path(torch.tensor([1, 3]))
    for bad in ((), (6,), (1, 6), (2, 6, 3), (0, 2), (2, 99), (-1,)):
        assert not koo.is_valid_path(bad), bad


def test_lca_and_distance(koo: Taxonomy) -> None:
    A, B, C, D, E, F, G = range(1, 8)
    assert koo.lca(C, D) == A and koo.distance(C, D) == 2
    assert koo.lca(C, F) == 0 and koo.distance(C, F) == 4
    assert koo.lca(F, B) == B and koo.distance(F, B) == 1
    assert koo.lca(F, F) == F and koo.distance(F, F) == 0
    assert koo.lca(A, B) == 0 and koo.distance(A, B) == 2
    assert koo.distance(0, G) == 2


def test_is_fixed_depth_false_for_ragged_tree() -> None:
    t = Taxonomy.from_parent_map({"a": None, "b": "a", "c": None})
    assert not t.is_fixed_depth and t.heights[0] == 2 and t.leaves == (2, 3)


def test_index_lookups() -> None:
    t = Taxonomy(["root", "A", "B", "x", "y", "x"], [-1, 0, 0, 1, 2, 2], [None, None, None, None, "/m/y", None])
    assert t.index("A") == 1 and t.index("y") == 4
    assert t.index("/m/y") == 4  # external id
    assert t.index("A/x") == 3 and t.index("B/x") == 5 and t.index("/B/x/") == 5  # name paths
    assert t.index(2) == 2 and t.index(np.int64(2)) == 2
    with pytest.raises(TaxonomyError) as e:
        t.index("x")
    one_line_error(e, "'x'", "ambiguous", "A/x", "B/x")
    with pytest.raises(TaxonomyError) as e:
        t.index("nope")
    one_line_error(e, "'nope'", "not in the tree")
    with pytest.raises(TaxonomyError) as e:
        t.index("A/y")
    one_line_error(e, "'A/y'", "'y'", "'A'")
    with pytest.raises(TaxonomyError) as e:
        t.index(6)
    one_line_error(e, "6")
    assert t.path_name(5) == "B/x" and t.path_name(5, sep=" > ") == "B > x"


# ---------------------------------------------------------------------- encodings (Koo's example)
def test_koo_onehot_example(koo: Taxonomy) -> None:
    F = koo.index("F")
    y = koo.encode_onehot([F])[..., 1:]
    assert y.shape == (1, 2, 7)
    assert y[0, 0].tolist() == [0, 1, 0, 0, 0, 0, 0]  # y1: B
    assert y[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 0]  # y2: F
    full = koo.encode_onehot([F, koo.index("A")])
    assert full.shape == (2, 2, 8) and full.dtype == torch.float32
    assert full[:, :, 0].sum() == 0  # EOS column unused without eos=True
    assert full[1, 1].sum() == 0  # A stops at depth 1: step 2 all zero
    with_eos = koo.encode_onehot([F, koo.index("A")], eos=True)
    assert with_eos.shape == (2, 3, 8)
    assert with_eos[0, 2, EOS] == 1 and with_eos[1, 1, EOS] == 1 and with_eos[1, 2].sum() == 0


def test_encode_paths_levels_positions_sequence(koo: Taxonomy) -> None:
    nodes = torch.tensor([6, 1, 3])  # F, A, C
    assert koo.encode_paths(nodes).tolist() == [[2, 6], [1, PAD], [1, 3]]
    assert koo.encode_levels(nodes).tolist() == [[2, 6], [1, IGNORE], [1, 3]]
    # within-level index: level 1 = (A, B), level 2 = (C, D, E, F, G)
    assert koo.encode_level_positions(nodes).tolist() == [[1, 3], [0, IGNORE], [0, 0]]
    assert koo.encode_sequence(nodes).tolist() == [[2, 6, EOS], [1, EOS, IGNORE], [1, 3, EOS]]
    assert EOS == 0 and IGNORE == -100 and PAD == -1
    # python lists work too; a node set of size 0 gives empty (0, D) targets
    assert koo.encode_levels([7]).tolist() == [[2, 7]]
    assert koo.encode_levels(torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_encodings_reject_non_classes(koo: Taxonomy) -> None:
    for bad in ([0], [8], [-1]):
        with pytest.raises(TaxonomyError) as e:
            koo.encode_levels(bad)
        one_line_error(e, str(bad[0]), "not a class")


def test_encode_multihot_and_close_upwards(koo: Taxonomy) -> None:
    sets = [[6], [3, 5], []]
    m = koo.encode_multihot(sets)
    assert m.shape == (3, 8) and m.dtype == torch.float32
    assert m[0].nonzero().flatten().tolist() == [2, 6]
    assert m[1].nonzero().flatten().tolist() == [1, 2, 3, 5]
    assert m[2].sum() == 0
    marks = torch.zeros(3, 8, dtype=torch.bool)
    marks[0, 6] = marks[1, 3] = marks[1, 5] = True
    closed = koo.close_upwards(marks)
    assert closed.dtype == torch.bool and torch.equal(closed, m.bool())


def test_tensor_tables(koo: Taxonomy) -> None:
    assert koo.path_matrix[6].tolist() == [2, 6] and koo.path_matrix[0].tolist() == [PAD, PAD]
    assert koo.ancestor_matrix[6].nonzero().flatten().tolist() == [2, 6]
    assert koo.level_position.tolist() == [-1, 0, 1, 0, 1, 2, 3, 4]
    assert koo.parent_tensor.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert koo.depth_tensor.tolist() == list(koo.depths)


# ---------------------------------------------------------------------- transformations
def test_prune(koo: Taxonomy) -> None:
    p = koo.prune([koo.index("F"), koo.index("C")])
    assert p.names == ("root", "A", "C", "B", "F")
    assert p.path_name(p.index("F")) == "B/F"
    assert koo.prune([koo.index("B")]).names == ("root", "B")
    assert len(koo) == 7  # the original is untouched


def test_collapse_chains() -> None:
    t = Taxonomy.from_parent_map({"a": None, "b": "a", "c": "b", "d": "c", "e": "c", "f": None})
    c = t.collapse_chains()
    assert c.path_name(c.index("d")) == "c/d"
    assert "a" not in c.names and "b" not in c.names
    kept = t.collapse_chains(protect=[t.index("b")])
    assert kept.path_name(kept.index("d")) == "b/c/d"
    # a lone child of the root that has children is a chain link too
    lone = Taxonomy.from_parent_map({"top": None, "x": "top", "y": "top"}).collapse_chains()
    assert lone.names == ("root", "x", "y")


def test_collapse_chains_top_chain_leaves_wide_root() -> None:
    t = Taxonomy.from_parent_map({"X": None, "Y": "X", "a": "Y", "b": "Y"}).collapse_chains()
    assert len(t.children[0]) == 2
    assert t.collapse_chains() == t


def test_cap_depth() -> None:
    t = Taxonomy.from_parent_map({"a": None, "b": "a", "c": "b", "d": "c", "e": "a", "f": None})
    c2 = t.cap_depth(2)
    assert c2.max_depth == 2
    assert c2.path_name(c2.index("d")) == "a/d" and c2.path_name(c2.index("e")) == "a/e"
    assert {c2.names[n] for n in c2.leaves} == {"d", "e", "f"}
    assert t.cap_depth(4) == t and t.cap_depth(10) == t
    flat = t.cap_depth(1)
    assert flat.max_depth == 1 and sorted(flat.names[1:]) == ["d", "e", "f"]
    with pytest.raises(TaxonomyError) as e:
        t.cap_depth(0)
    one_line_error(e, "max_depth")


def test_collapse_keeps_external_ids_and_root_name() -> None:
    t = Taxonomy.from_parent_map({"a": None, "b": "a"}, external_ids={"b": "/m/b"})
    c = t.collapse(lambda tax, n: tax.names[n] == "a", root_name="Entity")
    assert c.names == ("Entity", "b") and c.external_ids == (None, "/m/b")


# ---------------------------------------------------------------------- display
def test_render(koo: Taxonomy) -> None:
    text = koo.render()
    lines = text.splitlines()
    assert lines[0] == "root  (5 classes · 7 nodes · depth 2)"
    assert lines[1:4] == ["  A", "    C", "    D"]
    assert lines[-1] == "    G" and len(lines) == 8
    short = koo.render(max_nodes=3).splitlines()
    assert short[-1] == "... (4 more)" and len(short) == 5
    ext = Taxonomy.from_parent_map({"a": None}, external_ids={"a": "/m/a"}).render()
    assert ext.splitlines()[1] == "  a  [/m/a]"


# ---------------------------------------------------------------------- layers: core, formats, numpy and torch views
# ids not in parent-first order (node 1's parent is node 3), so no array may assume it
SHUFFLED = (("root", "c1", "b", "a", "c2", "d"), (-1, 3, 0, 0, 2, 4))


def test_view_arrays_follow_their_definitions() -> None:
    """The numpy view's arrays, checked against plain walks up the tree (ids deliberately not parent-first)."""
    from hiervision.tree.view import TreeView

    names, parents = SHUFFLED
    view = TreeView(names, parents)

    def walk(n: int) -> list[int]:
        out = []
        while n > 0:
            out.append(n)
            n = parents[n]
        return out[::-1]

    assert view.depths.tolist() == [len(walk(n)) for n in range(6)] == [0, 2, 1, 1, 2, 3]
    assert view.paths.tolist() == [walk(n) + [PAD] * (3 - len(walk(n))) for n in range(6)]
    assert [level.tolist() for level in view.levels] == [[2, 3], [1, 4], [5]]
    assert view.level_position.tolist() == [-1, 0, 0, 1, 1, 0]
    assert view.parent.tolist() == [0, 3, 0, 0, 2, 4]
    assert view.leaf_mask.tolist() == [False, True, False, False, False, True]
    tax = Taxonomy(names, parents)
    assert tax.levels == ((2, 3), (1, 4), (5,)) and tax.leaves == (1, 5) and tax.path(5) == (2, 4, 5)


def test_view_refuses_what_its_arrays_cannot_hold() -> None:
    from hiervision.tree.view import TreeView

    for parents, needle in (((-1, 2, 1), "cycle"), ((-1, 7), "not a node id"), ((0, 0), "root")):
        with pytest.raises(ValueError, match=needle) as e:
            TreeView(("r",) + ("x",) * (len(parents) - 1), parents)
        assert "\n" not in str(e.value)


def test_torch_tables_are_the_view_arrays(koo: Taxonomy) -> None:
    """One numpy view, one torch view: a taxonomy's tensors share the view's memory, model buffers copy it once."""
    from hiervision.tree.tables import TreeTables

    view = koo.view
    for tensor, array in ((koo.path_matrix, view.paths), (koo.depth_tensor, view.depths),
                          (koo.parent_tensor, view.parent), (koo.level_position, view.level_position),
                          (koo.ancestor_matrix, view.ancestors)):
        assert np.shares_memory(tensor.numpy(), array)
    tables = TreeTables(koo)
    for name, array in (("paths", view.paths), ("depth", view.depths), ("parent", view.parent),
                        ("level_position", view.level_position), ("leaf_mask", view.leaf_mask),
                        ("tin", view.tin), ("tout", view.tout), ("lift", view.lift)):
        buffer = getattr(tables, name)
        assert np.array_equal(buffer.numpy(), array) and not np.shares_memory(buffer.numpy(), array)
    labels = torch.tensor([3, 7, 1])
    for encode in ("encode_paths", "encode_levels", "encode_level_positions", "encode_sequence"):
        assert torch.equal(getattr(tables, encode)(labels), getattr(koo, encode)(labels)), encode
    marks = torch.zeros(2, koo.num_nodes, dtype=torch.bool)
    marks[0, 7], marks[1, 3] = True, True
    assert torch.equal(tables.close_upwards(marks), koo.close_upwards(marks))


def test_numpy_view_and_records_import_without_torch() -> None:
    """The runtime reads trees through the view: it and records must load with torch blocked."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from hiervision.tree.view import TreeView\nfrom hiervision.records import TreeView as R\n"
            "assert R is TreeView and TreeView(('r', 'a'), (-1, 0)).paths.tolist() == [[-1], [1]]")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_readers_and_transformations_return_the_callers_class(tmp_path: Path) -> None:
    from hiervision.tree import formats
    from hiervision.tree.core import Tree

    csv_file = tmp_path / "t.csv"
    csv_file.write_text("parent,child\nroot,a\na,b\n")
    tax = Taxonomy.from_csv(csv_file)
    assert type(tax) is Taxonomy and type(tax.prune([tax.index("b")])) is Taxonomy
    core = formats.from_csv(Tree, csv_file)
    assert type(core) is Tree and core == tax and not hasattr(core, "encode_paths")


def test_core_class_stays_small() -> None:
    """The tree core holds structure and queries only (issue 22: at most 400 lines); formats and tensors live apart."""
    import inspect

    from hiervision.tree.core import Tree

    lines, _ = inspect.getsourcelines(Tree)
    assert len(lines) <= 400
    assert not {"from_csv", "to_dict", "render", "path_matrix", "encode_paths"} & set(vars(Tree))


def test_wordnet_from_its_debian_database(tmp_path, capsys):
    from hiervision.cli import main
    from hiervision.tree.formats import WORDNET_DIR

    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip("WordNet's database is not installed (apt-get install wordnet-base)")
    t = Taxonomy.from_wordnet(keep_chains=True)
    assert t.names[0] == "entity" and len(t) == 82114  # every noun synset; the top synset is the root itself
    assert len(set(t.names)) == len(t.names)  # names unique, lemmas disambiguated only where they collide
    dog = t.external_index["n02084071"]
    assert t.names[dog] == "dog (canine)" and t.names[t.parents[dog]] == "canine (carnivore)"
    einstein = t.external_index["n10054657"]  # an instance synset hangs under its class, not the root
    assert t.depth(einstein) > 5
    small = Taxonomy.from_wordnet(classes=["n02084071", "n02121808"])  # dog, domestic cat
    assert sorted(small.names[n] for n in small.leaves) == ["dog (canine)", "domestic cat"]
    assert main(["taxonomy", "build", "--from", "wordnet", "--out", str(tmp_path / "wn.json")]) == 0
    assert "65157 classes" in capsys.readouterr().out
    assert main(["taxonomy", "show"]) == 1
    assert "taxonomy show needs a FILE" in capsys.readouterr().err
