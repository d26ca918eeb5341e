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
    args = argparse.Namespace(batch=2, threads=1, steps=1, cap_gb=6.0, timeout=120, load=0.5)
    table = scale.render([("random 40", "flat", cell), ("random 40", "hiernet", {"error": "skipped: dense"})], args)
    assert table.startswith("## scale\n") and "python benchmarks/scale.py" in table
    assert "| random 40 | 40 |" in table and "skipped: dense" in table
    with pytest.raises(ValueError, match="random:N or json:PATH"):
        scale.load_tree("nope:3")
