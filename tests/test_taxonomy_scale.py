"""Huge and odd trees: 100k nodes wide or deep stream through ``taxonomy show``; CSV rows may name the root."""

from __future__ import annotations

import tracemalloc

import pytest

from hiervision import Taxonomy, TaxonomyError
from hiervision.cli import main
from hiervision.tree.formats import MAX_INDENT

N = 100_000


@pytest.fixture(scope="module")
def deep() -> Taxonomy:
    return Taxonomy(["root"] + [f"n{i}" for i in range(N)], [-1, *range(N)])


def test_deep_tree_renders_lazily_in_bounded_memory(deep):
    assert deep.max_depth == N
    lines = deep.iter_render()
    assert next(lines).startswith("root  (1 classes · 100000 nodes · depth 100000)")
    tracemalloc.start()
    try:
        count, widest = 0, 0
        for line in lines:
            count, widest = count + 1, max(widest, len(line))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == N
    assert widest < 2 * MAX_INDENT + 40  # indentation stops growing; the depth is written instead
    assert peak < 5_000_000  # a few MB at most: nothing proportional to nodes × depth


@pytest.mark.slow
def test_deep_tree_through_the_cli(deep, tmp_path, capsys):
    deep.save(tmp_path / "deep.json")
    assert main(["taxonomy", "show", str(tmp_path / "deep.json"), "--max-nodes", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["root  (1 classes · 100000 nodes · depth 100000)", "  n0", "    n1", "      n2",
                   f"... ({N - 3} more)"]
    assert main(["taxonomy", "show", str(tmp_path / "deep.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == N + 1 and out[-1] == "  " * MAX_INDENT + f"[depth {N}] n{N - 1}"


@pytest.mark.slow
def test_deep_and_wide_csv(tmp_path, capsys):
    deep_csv = tmp_path / "deep.csv"
    deep_csv.write_text("parent,child\n" + "".join(f"n{i},n{i + 1}\n" for i in range(N - 1)))
    tax = Taxonomy.from_csv(deep_csv)
    assert (len(tax), tax.max_depth) == (N, N)
    wide_csv = tmp_path / "wide.csv"
    wide_csv.write_text("parent,child\n" + "".join(f"g{i % 100},c{i}\n" for i in range(N)))
    assert main(["taxonomy", "validate", str(wide_csv)]) == 0
    assert "100000 classes · 100100 nodes · depth 2" in capsys.readouterr().out


def test_deepest_parent_rule_is_iterative_on_deep_dags():
    """WordNet's rule (keep the deepest parent) used to recurse once per level."""
    n = 20_000
    edges = [(f"n{i}", f"n{i + 1}") for i in range(n)] + [("n0", "x"), (f"n{n}", "x")]
    tax = Taxonomy.from_edges(edges, multi_parent="deepest")
    x = tax.index("x")
    assert tax.depth(x) == n + 2
    with pytest.raises(TaxonomyError, match="cycle"):
        Taxonomy.from_edges([("a", "b"), ("b", "c"), ("c", "b"), ("a", "c")], multi_parent="deepest")


def test_csv_that_names_root_maps_it_to_the_root(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("parent,child\nroot,animal\nanimal,cat\nroot,plant\n")
    tax = Taxonomy.from_csv(f)
    assert tax.names == ("root", "animal", "cat", "plant")
    assert tax.parents == (-1, 0, 1, 0)
    assert tax == Taxonomy.from_parent_map({"animal": None, "cat": "animal", "plant": None})
    f.write_text("parent,child\nroot,animal\nthing,animal\n")
    with pytest.raises(TaxonomyError, match="node 'animal' has two parents: 'root' and 'thing'"):
        Taxonomy.from_csv(f)
    f.write_text("parent,child\nanimal,root\n")
    with pytest.raises(TaxonomyError, match="node 'root' is the root: it cannot be the child of 'animal'"):
        Taxonomy.from_csv(f)


def test_bad_csv_bytes_are_one_line(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes(b"parent,child\n\xff\xfe,a\n")
    with pytest.raises(TaxonomyError, match="t.csv: not a UTF-8 text file"):
        Taxonomy.from_csv(f)
    f.write_text("parent,child\na,\n")
    with pytest.raises(TaxonomyError, match=r"t.csv:2: row needs both a parent and a child"):
        Taxonomy.from_csv(f)
    f.write_text("parent,child\n  ,b\n")
    with pytest.raises(TaxonomyError, match=r"t.csv:2: row needs both"):
        Taxonomy.from_csv(f)
