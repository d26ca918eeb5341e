"""Bayes-optimal decisions (hiervision.bayes, decisions.bayes_nodes): against a brute-force search over
every candidate on random variable-depth trees, plus hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiervision import bayes
from hiervision.decisions import bayes_nodes, crm_nodes
from hiervision.records import TreeView
from hiervision.taxonomy import Taxonomy


def random_tree(rng: np.random.Generator, n: int) -> Taxonomy:
    """Node i hangs under a random earlier node: depths vary, some chains, some bushes."""
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n + 1)]
    return Taxonomy([f"n{i}" for i in range(n + 1)], parents)


def random_q(rng: np.random.Generator, tax: Taxonomy, rows: int, inner_mass: bool) -> np.ndarray:
    """Dirichlet rows over the leaves (and, with ``inner_mass``, inner nodes too: labels that stop
    early), with some exact zeros and some exact ties."""
    ends = list(range(1, tax.num_nodes)) if inner_mass else list(tax.leaves)
    q = np.zeros((rows, tax.num_nodes))
    q[:, ends] = rng.dirichlet(np.full(len(ends), 0.5), size=rows)
    q[:, ends] *= rng.random((rows, len(ends))) > 0.3
    q[0, ends] = 1.0  # a row of exact ties
    q[q.sum(1) == 0, ends[0]] = 1.0
    return q / q.sum(1, keepdims=True)


def score(tax: Taxonomy, metric: str, a: int, t: int) -> float:
    """The metric of answering ``a`` when the truth is ``t``, from the definitions."""
    if metric == "path_accuracy":
        return float(a == t)
    if metric == "severity":
        return -float(tax.heights[tax.lca(a, t)])
    pa, pt = set(tax.path(a)), set(tax.path(t))
    return 2 * len(pa & pt) / (len(pa) + len(pt))


def brute_force(q: np.ndarray, tax: Taxonomy, metric: str, allow_inner: bool) -> tuple[np.ndarray, list[int]]:
    """Every candidate against every truth: the expected scores and the documented tie-break."""
    n = tax.num_nodes
    expected = np.full(q.shape, -np.inf)
    answers = []
    for r, row in enumerate(q):
        truths = [t for t in range(1, n) if row[t] > 0]
        for a in range(1, n):
            expected[r, a] = sum(row[t] * score(tax, metric, a, t) for t in truths)
        cands = [a for a in range(1, n) if allow_inner or not tax.children[a] or row[a] > 0]
        best = max(expected[r, a] for a in cands)
        near = [a for a in cands if expected[r, a] >= best - 1e-9 * max(abs(best), 1)]
        cover = {a: sum(row[t] for t in range(1, n) if a in tax.path(t)) for a in near}
        answers.append(max(near, key=lambda a: (row[a], cover[a], -a)))
    return expected, answers


@pytest.mark.parametrize("metric", bayes.BAYES_METRICS)
@pytest.mark.parametrize("allow_inner", [False, True])
@pytest.mark.parametrize("inner_mass", [False, True], ids=["leaf-labels", "inner-labels"])
def test_agrees_with_brute_force_on_random_trees(metric: str, allow_inner: bool, inner_mass: bool) -> None:
    rng = np.random.default_rng([bayes.BAYES_METRICS.index(metric), allow_inner, inner_mass])
    for trial in range(6):
        tax = random_tree(rng, int(rng.integers(3, 16)))
        q = random_q(rng, tax, 5, inner_mass)
        expected, answers = brute_force(q, tax, metric, allow_inner)
        np.testing.assert_allclose(bayes.expected_scores(q, tax, metric)[:, 1:], expected[:, 1:], atol=1e-12)
        got = bayes_nodes(torch.from_numpy(q).float(), tax, metric, allow_inner)
        assert got.dtype == torch.long and got.tolist() == answers, f"trial {trial}: tree {tax.parents}"


def test_the_runtime_copy_reads_the_tree_view_and_answers_the_same() -> None:
    rng = np.random.default_rng(3)
    tax = random_tree(rng, 40)
    view = TreeView(tax.names, tax.parents)
    q = random_q(rng, tax, 16, inner_mass=False)
    for metric in bayes.BAYES_METRICS:
        for inner in (False, True):
            torch_answer = bayes_nodes(torch.from_numpy(q), tax, metric, inner).numpy()
            np.testing.assert_array_equal(bayes.bayes_nodes(q, view, metric, inner), torch_answer)


def test_severity_is_crm_and_path_accuracy_is_the_most_probable_class() -> None:
    rng = np.random.default_rng(4)
    tax = random_tree(rng, 60)
    q = torch.from_numpy(random_q(rng, tax, 64, inner_mass=False)[1:])  # no tie row: argmax's tie rule differs
    assert bayes_nodes(q, tax, "severity").tolist() == crm_nodes(q, tax).tolist()
    assert bayes_nodes(q, tax, "path_accuracy").tolist() == q.argmax(1).tolist()


# Tree: root/A,B; A→C,D; C→H; B→E (depths: H 3, D E 2). q: H .32, D .28, E .40.
HAND = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "H": "C", "E": "B"})
A, B, C, D, H, E = range(1, 7)


def test_hand_case_each_metric_has_its_own_answer() -> None:
    q = torch.zeros(1, 7, dtype=torch.float64)
    q[0, [H, D, E]] = torch.tensor([0.32, 0.28, 0.40], dtype=torch.float64)
    # hF1: H .32 + D .28·2·1/(3+2) = .432; D .28 + .32·.4 = .408; E .40; C .32·.8 + .28·.5 = .396
    exp = bayes.expected_scores(q.numpy(), HAND, "hf1")[0]
    assert exp[[H, D, E, C]] == pytest.approx([0.432, 0.408, 0.40, 0.396])
    assert bayes_nodes(q, HAND, "hf1").tolist() == [H]
    assert bayes_nodes(q, HAND, "path_accuracy").tolist() == [E]  # the most probable class
    # LCA heights: root 3, A 2, C B 1. risk H = .28·2 + .4·3 = 1.76, D = .32·2 + 1.2 = 1.84, E = .6·3 = 1.8
    assert -bayes.expected_scores(q.numpy(), HAND, "severity")[0, [H, D, E]] == pytest.approx([1.76, 1.84, 1.8])
    assert bayes_nodes(q, HAND, "severity").tolist() == [H]


def test_hf1_backs_off_to_an_inner_node_when_allowed() -> None:
    tax = Taxonomy.from_paths(["X/x1", "X/x2", "X/x3", "X/x4", "Y"])
    x, y = tax.index("X"), tax.index("Y")
    q = torch.zeros(1, tax.num_nodes)
    q[0, list(tax.children[x])] = 0.2
    q[0, y] = 0.2
    # a leaf x_i: .2 + .6·2·1/4 = .5; X: .8·2·1/3 = .533; Y: .2
    assert bayes_nodes(q, tax, "hf1", allow_inner=True).tolist() == [x]
    assert bayes_nodes(q, tax, "hf1").tolist() == [tax.children[x][0]]  # ties between leaves: lowest id
    assert bayes_nodes(q, tax, "severity", allow_inner=True).tolist() == [tax.children[x][0]]
    assert bayes_nodes(q, tax, "path_accuracy", allow_inner=True).tolist() == [tax.children[x][0]]


def test_ties_go_to_the_likelier_truth() -> None:
    # B has one leaf E: answering B or E scores the same under LCA height when E is impossible, and
    # the truth can only be a class with mass
    tax = HAND
    q = torch.zeros(1, 7)
    q[0, H] = 1.0
    assert bayes_nodes(q, tax, "severity", allow_inner=True).tolist() == [H]
    q = torch.zeros(1, 7)
    q[0, [D, E]] = 0.5  # D and E tie on every metric: the lower id
    for metric in bayes.BAYES_METRICS:
        assert bayes_nodes(q, tax, metric).tolist() == [D]


def test_bad_input_is_one_line() -> None:
    q = torch.zeros(2, 7)
    with pytest.raises(ValueError, match="decode metric must be one of"):
        bayes_nodes(q, HAND, "wu_palmer")
    with pytest.raises(ValueError, match=r"must be \(B, 7\)"):
        bayes_nodes(torch.zeros(2, 5), HAND, "hf1")


def test_cost_is_linear_in_the_tree() -> None:
    """A 20k-node tree answers without an (N+1)² table (which alone would take 3.2 GB)."""
    rng = np.random.default_rng(5)
    n = 20_000
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n + 1)]  # random recursive tree: depth ~ 25
    tax = TreeView(tuple(f"n{i}" for i in range(n + 1)), tuple(parents))
    q = np.zeros((2, n + 1))
    leaves = np.flatnonzero(tax.end_mask("leaves"))
    q[:, leaves] = rng.dirichlet(np.ones(len(leaves)), size=2)
    for metric in bayes.BAYES_METRICS:
        assert bayes.bayes_nodes(q, tax, metric, allow_inner=True).shape == (2,)


def test_the_runtime_rule_needs_no_torch():
    import subprocess
    import sys

    code = """
import sys
import numpy as np
from hiervision.bayes import decide_records
from hiervision.records import TreeView
tree = TreeView(("root", "a", "b", "x", "y", "z", "w"), (-1, 0, 0, 1, 1, 1, 1))
scores = np.array([1.0, 0.8, 0.2, 0.2, 0.2, 0.2, 0.2])  # node marginals: every leaf .2
rec = {"path_ids": [1, 3], "path_probability": 0.2, "node_scores": scores, "top_k": []}
out = decide_records(tree, "leaves", [rec], "bayes:hf1:inner")[0]
assert out["path_ids"] == [1] and abs(out["path_probability"] - 0.8) < 1e-9, out
assert decide_records(tree, "leaves", [rec], "argmax")[0] is rec
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)
