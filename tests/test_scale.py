"""benchmarks/scale.py: the trees it draws and one cell, tiny (the numbers themselves live in RESULTS.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402


@pytest.mark.parametrize("size", [3, 50, 2_000])
def test_random_trees_have_2_to_12_children_per_inner_node_and_variable_depth(size):
    tree = scale.random_tree(size, seed=size)
    assert size <= tree.num_nodes <= size + 1  # the last parent gets at least 2 children
    assert {len(c) for c in tree.children if c} <= set(range(2, 13))
    if size >= 50:
        assert len({tree.depth(leaf) for leaf in tree.leaves}) > 2  # leaves at many depths
    assert scale.random_tree(size, seed=size) == tree  # seeded


def test_one_cell_runs_and_the_table_names_the_command():
    cell = scale.run_cell("random:40", "flat", steps=1, batch=2, threads=1)
    assert cell["nodes"] == 40 and cell["train_s"] > 0 and cell["predict_s"] > 0 and cell["peak_rss_mb"] > 0
    args = argparse.Namespace(batch=2, threads=1, steps=1, cap_gb=6.0, timeout=120, load=0.5, section="scale",
                              repeat=1)
    table = scale.render([("random 40", "flat", cell), ("random 40", "hiernet", {"error": "skipped: dense"})], args)
    assert table.startswith("## scale\n") and "python benchmarks/scale.py" in table and "rounds" not in table
    args.section, args.repeat = "scale flat", 3
    assert scale.render([("random 40", "flat", cell)], args).startswith("## scale flat\n")
    assert "median over 3 rounds" in scale.render([("random 40", "flat", cell)], args)
    assert "| random 40 | 40 |" in table and "skipped: dense" in table
    with pytest.raises(ValueError, match="random:N, json:PATH or one of wordnet, wordnet-full"):
        scale.load_tree("nope:3")


def test_hiernet_runs_on_every_tree_and_bounds_its_branches_on_big_ones():
    cell = scale.run_cell("random:40", "hiernet", steps=1, batch=2, threads=1)
    assert cell["nodes"] == 40 and cell["train_s"] > 0 and cell["predict_s"] > 0


def test_wordnet_trees_are_built_by_the_cli_with_their_flags(tmp_path, monkeypatch):
    (tmp_path / "class_hierarchy.txt").write_text("e a\ne b\na m\nm x\nm y\nb q\nb r\n")
    (tmp_path / "node_names.txt").write_text("e\tentity\na\tA\nb\tB\nm\tM\nlone\tan instance\n")
    monkeypatch.setattr(scale, "BREEDS", tmp_path)
    monkeypatch.setattr(scale.tempfile, "gettempdir", lambda: str(tmp_path))
    collapsed, full = scale.load_tree("wordnet"), scale.load_tree("wordnet-full")
    assert len(full) == 9 and full.names[full.children[0][-1]] == "an instance"  # every synset (+ the root)
    assert len(collapsed) == len(full) - 3  # e (a chain at the top) and a (one child) collapsed; no instance
    assert scale.wordnet_tree("wordnet-full") == tmp_path / "hiervision-wordnet-full-tree.json"  # built once


def test_repeated_rounds_keep_each_timings_median_and_the_largest_memory():
    rounds = [{"nodes": 40, "train_s": t, "predict_s": p, "peak_rss_mb": m}
              for t, p, m in ((0.3, 0.10, 500.0), (0.9, 0.11, 520.0), (0.2, 0.30, 510.0))]
    assert scale.median_cell(rounds) == {"nodes": 40, "train_s": 0.3, "predict_s": 0.11, "peak_rss_mb": 520.0}
    assert scale.median_cell([*rounds, {"error": "over the 6 GB cap"}]) == {"error": "over the 6 GB cap"}
