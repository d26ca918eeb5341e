"""Prediction records: the shared result format, built without torch."""

import subprocess
import sys

import numpy as np
import pytest

from hiervision.records import TreeView, error_record, prediction_record, top_k_ends
from hiervision.taxonomy import PAD, Taxonomy


@pytest.fixture
def tax() -> Taxonomy:
    return Taxonomy.from_paths(["a/x", "a/y", "b/z", "b/w/q"])


def test_tree_view_matches_taxonomy(tax, tmp_path):
    tax.save(tmp_path / "t.json")
    tree = TreeView.load(tmp_path / "t.json")
    assert tree.names == tuple(tax.names) and tree.num_nodes == tax.num_nodes
    assert all(tree.path(n) == tax.path(n) for n in range(tax.num_nodes))
    assert tree.max_depth == tax.max_depth
    assert list(np.flatnonzero(tree.end_mask("leaves"))) == sorted(tax.leaves)
    assert not tree.end_mask("all")[0] and tree.end_mask("all")[1:].all()


def test_top_k_ends_ranks_and_pads():
    p = np.array([[0.9, 0.1, 0.5, 0.0, 0.3], [0, 0, 0, 0.2, 0]])
    nodes, probs = top_k_ends(p, 3)
    assert nodes[0].tolist() == [2, 4, 1]  # column 0 (root) never counts
    assert np.allclose(probs[0], [0.5, 0.3, 0.1])
    assert nodes[1].tolist() == [3, -1, -1] and probs[1].tolist() == [0.2, 0, 0]
    with pytest.raises(ValueError, match="top-k"):
        top_k_ends(p, 0)


def test_prediction_record_fields(tax):
    tree = TreeView(tuple(tax.names), tuple(tax.parents))
    leaf = tax.index("q")
    path = list(tax.path(leaf))
    scores = np.linspace(0, 1, tax.num_nodes)
    rec = prediction_record("img.png", tree, [*path, -1], 0.25, scores,
                            top_k=[(path, 0.25), (list(tax.path(tax.index("z"))), 0.125), ([-1], 0.0)])
    assert rec["path"] == ["b", "w", "q"] and rec["path_ids"] == path
    assert rec["node_probabilities"] == [round(float(scores[n]), 6) for n in path]
    assert [a["path"] for a in rec["top_k"]] == [["b", "w", "q"], ["b", "z"]]
    assert rec["top_k"][1]["probability"] == 0.125 and "paths" not in rec
    multi = prediction_record("m.png", tree, path, 0.5, scores, paths=[path, [tax.index("a"), tax.index("x")]])
    assert multi["paths"] == [["b", "w", "q"], ["a", "x"]]
    assert error_record("bad.png", "cannot read\n image") == {"file": "bad.png", "error": "cannot read image"}


def test_records_module_does_not_import_torch():
    code = "import sys, hiervision.records; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_top_k_ends_matches_a_full_stable_sort_ties_and_invalid_entries_included():
    """The partition that picks each row's k best gives what sorting all N+1 entries gives: best first,
    ties to the lower node id, no root, no invalid entry (≤ 0, NaN), PAD and 0 past the valid ends."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        rows, n, k = int(rng.integers(1, 6)), int(rng.integers(2, 40)), int(rng.integers(1, 8))
        p = (rng.choice([0.0, 0.1, 0.2, 0.3, -1.0, np.nan, 0.5], size=(rows, n)) if trial % 2
             else rng.random((rows, n)))
        q = np.where(np.isfinite(p) & (p > 0), p, -1.0)
        q[:, 0] = -1.0
        order = np.argsort(-q, axis=1, kind="stable")[:, : min(k, n)]
        best = np.take_along_axis(q, order, 1)
        nodes, probs = top_k_ends(p, k)
        assert nodes.shape == probs.shape == (rows, k)
        assert (nodes[:, : min(k, n)] == np.where(best > 0, order, PAD)).all()
        assert np.allclose(probs[:, : min(k, n)], np.clip(best, 0, None))
        assert (nodes[:, min(k, n):] == PAD).all() and (probs[:, min(k, n):] == 0).all()
