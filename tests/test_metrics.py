"""Hand-computed checks of every metric on Koo's slide tree (plus one deeper node), and hiclass cross-checks."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from hiervision.decisions import node_marginals, rewards
from hiervision.decoding import Prediction, threshold_paths
from hiervision.metrics import (
    depth_severity,
    evaluate,
    hierarchical_prf,
    leaf_accuracy,
    length_diagnostics,
    level_accuracy,
    mistake_severity,
    node_accuracy,
    node_accuracy_final_only,
    node_f1,
    node_prf,
    operating_curve,
    pareto_area,
    path_accuracy,
    path_f1,
    path_prf,
    select_threshold,
    target_paths,
    valid_path_rate,
    valid_paths,
)
from hiervision.taxonomy import PAD, Taxonomy

A, B, C, D, E, F, G, H = range(1, 9)
LEAVES = (D, E, F, G, H)


@pytest.fixture
def tree() -> Taxonomy:
    """Root/A,B; A→C,D; B→E,F,G; C→H. Heights: H,D,E,F,G 0; C,B 1; A 2; root 3."""
    t = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B", "H": "C"})
    assert [t.index(n) for n in "ABCDEFGH"] == [A, B, C, D, E, F, G, H]
    return t


def paths(*rows: list[int]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [PAD] * (width - len(r)) for r in rows])


def ends(num_nodes: int, *sets: set[int]) -> torch.Tensor:
    out = torch.zeros(len(sets), num_nodes, dtype=torch.bool)
    for i, s in enumerate(sets):
        out[i, list(s)] = True
    return out


# Four samples with variable-depth targets H, C, E, A (inner nodes are labels):
#   pred A/C/H  vs true A/C/H  — exact
#   pred A/D    vs true A/C    — right parent, wrong child
#   pred B/E    vs true B/E    — exact
#   pred A/C    vs true A      — deeper than the target
PRED = [[A, C, H], [A, D], [B, E], [A, C]]
TARGETS = [H, C, E, A]


def test_target_paths(tree):
    assert target_paths(torch.tensor(TARGETS), tree).tolist() == paths([A, C, H], [A, C], [B, E], [A]).tolist()


def test_single_label_accuracies(tree):
    pred, true = paths(*PRED), target_paths(torch.tensor(TARGETS), tree)
    assert path_accuracy(pred, true) == 0.5
    # target nodes 3+2+2+1 = 8, correct 3+1+2+1 = 7 (the extra C of the last row is ignored)
    assert node_accuracy(pred, true) == 7 / 8
    assert level_accuracy(pred, true) == pytest.approx([1.0, 2 / 3, 1.0])
    assert leaf_accuracy(pred, true) == 0.5


def test_widths_are_aligned(tree):
    true = paths([A, C, H], [B, E])
    assert path_accuracy(paths([A, C], [B, E]), true) == 0.5
    assert path_accuracy(paths([A, C, H, PAD, PAD], [B, E, PAD, PAD, PAD]), true) == 1.0
    assert node_accuracy(paths([A, C], [B, E]), true) == 4 / 5
    assert level_accuracy(paths([A], [B]), true) == [1.0, 0.0, 0.0]


def test_node_accuracy_remark1_vs_final_only(tree):
    pred_nodes = torch.tensor([H, D, A, C])
    true = paths([A, C, H], [A, C], [A, C], [A])
    # Remark 1: the implied path A/D of a wrong D still earns A
    assert node_accuracy(tree.encode_paths(pred_nodes), true) == (3 + 1 + 1 + 1) / 8
    # final only: D earns nothing, A earns itself at level 1, C is not on the path A
    assert node_accuracy_final_only(pred_nodes, true) == (3 + 0 + 1 + 0) / 8


def test_hierarchical_prf_by_hand(tree):
    pred, true = paths(*PRED), target_paths(torch.tensor(TARGETS), tree)
    # |P∩T| = 3,1,2,1  |P| = 3,2,2,2  |T| = 3,2,2,1
    hp, hr, hf = hierarchical_prf(pred, true, tree)
    assert (hp, hr) == pytest.approx((7 / 9, 7 / 8))
    assert hf == pytest.approx(14 / 17)
    mp, mr, mf = hierarchical_prf(pred, true, tree, average="macro")
    assert mp == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert mr == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert mf == pytest.approx((1 + 0.5 + 1 + 2 / 3) / 4)  # mean of per-sample F1
    with pytest.raises(ValueError):
        hierarchical_prf(pred, true, tree, average="weighted")  # type: ignore[arg-type]


def test_hierarchical_prf_invalid_path_brings_ancestors(tree):
    # A/E is not a path: E implies B, so P = {A, B, E}, T = {B, E}
    hp, hr, _ = hierarchical_prf(paths([A, E]), paths([B, E]), tree)
    assert (hp, hr) == pytest.approx((2 / 3, 1.0))
    # an empty prediction has an empty set: precision 0 instead of a division error
    assert hierarchical_prf(paths([PAD]), paths([B]), tree) == (0.0, 0.0, 0.0)


def test_mistake_severity(tree):
    # E vs H meet at the root (height 3), D vs H at A (2), F vs E at B (1)
    assert mistake_severity(torch.tensor([E, D, F, G]), torch.tensor([H, H, E, G]), tree) == 2.0
    assert mistake_severity(torch.tensor([C]), torch.tensor([H]), tree) == 1.0  # an ancestor: LCA is C
    assert mistake_severity(torch.tensor([PAD]), torch.tensor([D]), tree) == 3.0  # no prediction: root
    assert mistake_severity(torch.tensor([H, E]), torch.tensor([H, E]), tree) is None


def test_depth_severity_counts_the_true_paths_missed_levels(tree):
    # H (depth 3) for D (depth 2) meets at A: LCA height 2, but D's path misses one level
    assert mistake_severity(torch.tensor([H]), torch.tensor([D]), tree) == 2.0
    assert depth_severity(torch.tensor([H]), torch.tensor([D]), tree) == 1.0
    assert depth_severity(torch.tensor([D, E]), torch.tensor([H, D]), tree) == (2 + 2) / 2  # 3 − 1, 2 − 0
    assert depth_severity(torch.tensor([H]), torch.tensor([H]), tree) is None


def brute_force_curve(m: torch.Tensor, targets: list[int], tree: Taxonomy, tau: float) -> tuple[float, float, float]:
    """(specificity, correct, exact) at threshold tau: each image answers the most specific node of
    marginal ≥ tau (ties: the more probable, then the deeper, then the deeper-first id order)."""
    info = (rewards(tree) / rewards(tree).max()).tolist()
    out = []
    for row, t in zip(m.tolist(), targets):
        row[0] = 1.0
        ok = [v for v in range(tree.num_nodes) if row[v] >= tau]
        a = min(ok, key=lambda v: (-info[v], -row[v], -tree.depths[v], v))
        lca = tree.lca(a, t)
        out.append((info[a], float(lca in (a, t)), float(a == t)))
    return tuple(sum(x) / len(out) for x in zip(*out))


def test_operating_curve_matches_brute_force(tree):
    rng = np.random.default_rng(0)
    q = torch.zeros(40, tree.num_nodes, dtype=torch.float64)
    q[:, list(LEAVES)] = torch.from_numpy(rng.dirichlet(np.full(5, 0.4), size=40))
    q[0] = 0.0
    q[0, D] = 1.0  # a sure image: its first answer is already the leaf
    targets = [LEAVES[int(i)] for i in rng.integers(0, 5, 40)]
    m = node_marginals(q, tree)
    curve = operating_curve(m, torch.tensor(targets), tree)
    assert curve["threshold"][0] == 1.0 and curve["threshold"] == sorted(curve["threshold"], reverse=True)
    for i, tau in enumerate(curve["threshold"]):
        expected = brute_force_curve(m, targets, tree, tau)
        got = (curve["specificity"][i], curve["correct"][i], curve["exact"][i])
        assert got == pytest.approx(expected, abs=1e-6), f"threshold {tau}"
    assert curve["specificity"][-1] == pytest.approx(1.0)  # at the lowest threshold every image answers a leaf
    assert curve["correct_area"] == pytest.approx(pareto_area(curve["specificity"], curve["correct"]))
    assert 0 < curve["exact_area"] <= curve["correct_area"] <= 1


def test_operating_curve_hand_cases(tree):
    perfect = operating_curve(node_marginals(torch.eye(9)[[D, H]].double(), tree), torch.tensor([D, H]), tree)
    assert perfect["correct_area"] == 1.0 and perfect["exact_area"] == 1.0
    # one image, q: D .6, E .4 → the root at τ = 1, then D from .6 (A ties with it there, D is more
    # specific); E at .4 is not more specific than D, so the answer stays D
    q = torch.zeros(1, 9, dtype=torch.float64)
    q[0, D], q[0, E] = 0.6, 0.4
    curve = operating_curve(node_marginals(q, tree), torch.tensor([E]), tree)
    assert curve["threshold"] == pytest.approx([1.0, 0.6])
    assert curve["correct"] == [1.0, 0.0] and curve["exact"] == [0.0, 0.0]
    assert curve["correct_area"] == 0.0  # wrong at every specificity above the root's 0
    # Pareto area: the front at x is the best y at x or beyond
    assert pareto_area(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.4, 0.6])) == pytest.approx(0.6)


def test_valid_paths(tree):
    pred = paths(
        [A, C, H],  # valid
        [A, E],  # E is not A's child
        [C],  # C is not under the root
        [PAD, PAD],  # empty
        [A, PAD, C],  # node after PAD
        [B, F],  # valid
        [A, 0],  # EOS / root id inside a path
        [A, 99],  # not a node
    )
    assert valid_paths(pred, tree).tolist() == [True, False, False, False, False, True, False, False]
    assert valid_path_rate(pred, tree) == 2 / 8


def test_multilabel_f1_by_hand(tree):
    n = tree.num_nodes
    true = ends(n, {C, E}, {G})
    pred = ends(n, {C, F}, {G, D})
    # paths: TP = C, G; 4 predicted, 3 true
    assert path_prf(pred, true) == pytest.approx((2 / 4, 2 / 3, 4 / 7))
    assert path_f1(pred, true) == pytest.approx(4 / 7)
    # nodes: pred {A,C,B,F} + {B,G,A,D}, true {A,C,B,E} + {B,G}: TP 3 + 2
    assert node_prf(pred, true, tree) == pytest.approx((5 / 8, 5 / 6, 5 / 7))
    assert node_f1(pred, true, tree) == pytest.approx(5 / 7)
    # the root column never counts
    pred[:, 0] = True
    assert path_f1(pred, true) == pytest.approx(4 / 7)


def test_select_threshold_hand_optimum(tree):
    # one image whose only path is A/D
    scores = torch.zeros(1, tree.num_nodes)
    scores[0, [A, B, C, D, E, F, G, H]] = torch.tensor([0.9, 0.45, 0.4, 0.6, 0.1, 0.1, 0.1, 0.3])
    true = ends(tree.num_nodes, {D})
    grid = [0.2, 0.35, 0.42, 0.5, 0.7, 0.95]
    # path ends per threshold: {H,D,B} {C,D,B} {D,B} {D} {A} {} → F1 .5 .5 .67 1 0 0
    assert select_threshold(scores, true, tree, grid=grid) == (0.5, 1.0)
    assert select_threshold(scores, true, tree, metric="node_f1", grid=grid) == (0.5, 1.0)
    # with only the two lowest thresholds the tie goes to the smaller one
    assert select_threshold(scores, true, tree, grid=[0.35, 0.2]) == (0.2, 0.5)
    thr, val = select_threshold(scores, true, tree)  # default grid 0.05..0.95
    assert val == 1.0 and 0.45 < thr <= 0.6


def _random_tree(rng: random.Random, top: int = 4, fan: tuple[int, int] = (0, 4)) -> Taxonomy:
    """Random 3-level tree with unique names (so hiclass label sets match node sets) and variable depth."""
    parent_of: dict[str, str | None] = {}
    for i in range(top):
        parent_of[f"t{i}"] = None
        for j in range(rng.randint(1, 4)):
            parent_of[f"t{i}.{j}"] = f"t{i}"
            for k in range(rng.randint(*fan)):
                parent_of[f"t{i}.{j}.{k}"] = f"t{i}.{j}"
    return Taxonomy.from_parent_map(parent_of)


@pytest.mark.parametrize("metric", ["path_f1", "node_f1"])
def test_select_threshold_matches_threshold_paths(metric):
    rng = random.Random(1)
    tree = _random_tree(rng)
    torch.manual_seed(0)
    b = 300
    scores = torch.rand(b, tree.num_nodes)
    true = threshold_paths(tree, (scores + 0.3 * torch.randn_like(scores)).clamp(0, 1), 0.5)
    grid = [i / 20 for i in range(1, 20)]
    brute = []
    for thr in grid:
        pred = threshold_paths(tree, scores, thr)
        brute.append(path_f1(pred, true) if metric == "path_f1" else node_f1(pred, true, tree))
    best = max(range(len(grid)), key=lambda i: (brute[i], -i))
    thr, val = select_threshold(scores, true, tree, metric=metric, grid=grid)
    assert thr == grid[best]
    assert val == pytest.approx(brute[best])


@pytest.mark.slow
def test_hierarchical_prf_matches_hiclass():
    hiclass_metrics = pytest.importorskip("hiclass.metrics")
    rng = random.Random(0)
    tree = _random_tree(rng)
    classes = list(range(1, tree.num_nodes))
    n = 200
    true_nodes = torch.tensor([rng.choice(classes) for _ in range(n)])
    # mostly near misses so that overlaps vary: a random node of the same top branch, or anywhere
    pred_nodes = torch.tensor(
        [t if rng.random() < 0.3 else rng.choice(tree.subtree(tree.path(t)[0])) for t in true_nodes.tolist()]
    )
    pred_nodes[::5] = torch.tensor([rng.choice(classes) for _ in range(len(pred_nodes[::5]))])
    pred, true = tree.encode_paths(pred_nodes), tree.encode_paths(true_nodes)

    def names(p: torch.Tensor) -> list[list[str]]:
        return [[tree.names[i] if i != PAD else "" for i in row] for row in p.tolist()]

    y_pred, y_true = names(pred), names(true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hiclass warns on per-sample F1 of disjoint sets
        for average in ("micro", "macro"):
            expected = (
                hiclass_metrics.precision(y_true, y_pred, average=average),
                hiclass_metrics.recall(y_true, y_pred, average=average),
                hiclass_metrics.f1(y_true, y_pred, average=average),
            )
            assert hierarchical_prf(pred, true, tree, average=average) == pytest.approx(expected)


def test_length_diagnostics_by_hand(tree):
    true = target_paths(torch.tensor(TARGETS), tree)  # A/C/H, A/C, B/E, A
    d = length_diagnostics(paths(*PRED), true)
    # A/D vs A/C: right length, wrong at level 2; A/C vs A: one node too many (ran on past the end)
    assert d["length_confusion"] == {1: {2: 1}, 2: {2: 2}, 3: {3: 1}}
    assert (d["too_short"], d["too_long"], d["right_length"]) == (0.0, 0.25, 0.75)
    assert (d["stopped_early"], d["ran_on"]) == (0.0, 0.25)
    assert d["first_wrong_level"] == {2: 2}
    assert d["level_accuracy_given_prefix"] == pytest.approx([1.0, 2 / 3, 1.0])
    assert d["path_accuracy_by_length"] == {1: 0.0, 2: 0.5, 3: 1.0}
    assert d["num_samples_by_length"] == {1: 1, 2: 2, 3: 1}
    # stopping early on a right prefix vs a wrong first branch that compounds
    d = length_diagnostics(paths([A], [B, E], [A, C, H]), paths([A, C, H], [A, C, H], [A, C, H]))
    assert (d["too_short"], d["stopped_early"], d["ran_on"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0)
    assert d["first_wrong_level"] == {1: 1, 2: 1}
    # level 2 is scored only where level 1 was right (A and A/C/H): one of the two gets it
    assert d["level_accuracy_given_prefix"] == pytest.approx([2 / 3, 0.5, 1.0])
    json.dumps(d)


def test_evaluate_single_label(tree):
    pred = paths(*PRED)
    prediction = Prediction(pred, torch.rand(4, tree.num_nodes), torch.rand(4))
    report = evaluate(prediction, torch.tensor(TARGETS), tree)
    assert report.pop("level_accuracy") == pytest.approx([1.0, 2 / 3, 1.0])
    # true paths of length 1 (A: predicted A/C, too deep), 2 (C wrong, E right) and 3 (H right)
    assert report.pop("path_accuracy_by_length") == {1: 0.0, 2: 0.5, 3: 1.0}
    assert report.pop("length_diagnostics") == length_diagnostics(pred, target_paths(torch.tensor(TARGETS), tree))
    # calibration, distance @k and HOPS have their own hand-computed tests (test_decisions.py, below)
    decision_keys = {"ece", "ece_mass", "ece_per_level", "ece_per_level_mass", "hdist@1", "hdist@5", "hdist@20",
                     "hops", "operating_area_correct", "operating_area_exact"}
    assert decision_keys <= set(report)
    decision_values = {k: report.pop(k) for k in decision_keys}
    assert report == pytest.approx(
        {
            "path_accuracy": 0.5,
            "node_accuracy": 7 / 8,
            "leaf_accuracy": 0.5,
            "hierarchical_precision": 7 / 9,
            "hierarchical_recall": 7 / 8,
            "hierarchical_f1": 14 / 17,
            "hierarchical_f1_macro": (1 + 0.5 + 1 + 2 / 3) / 4,
            "mistake_severity": 2.0,  # D vs C and C vs A both meet at A
            "depth_severity": 0.5,  # D misses C's level 2; C answers below A, missing none of A's path
            "valid_path_rate": 1.0,
            "num_samples": 4,
        }
    )
    json.dumps(report)
    # targets given as paths give the same report
    as_paths = evaluate(prediction, target_paths(torch.tensor(TARGETS), tree), tree)
    assert as_paths.pop("level_accuracy") == pytest.approx([1.0, 2 / 3, 1.0])
    assert as_paths.pop("path_accuracy_by_length") == {1: 0.0, 2: 0.5, 3: 1.0}
    as_paths.pop("length_diagnostics")
    assert as_paths == {**report, **decision_values}
    # no mistakes: severity is None, still JSON
    perfect = evaluate(Prediction(tree.encode_paths([H, E]), torch.zeros(2, 9), torch.ones(2)), [H, E], tree)
    assert perfect["mistake_severity"] is None and perfect["path_accuracy"] == 1.0
    json.dumps(perfect)


def test_evaluate_multi_label(tree):
    n = tree.num_nodes
    true = ends(n, {C, E}, {G})
    pred = ends(n, {C, F}, {G, D})
    prediction = Prediction(paths([A, C], [B, G]), torch.rand(2, n), torch.rand(2), labels=pred)
    report = evaluate(prediction, true, tree)
    assert report == pytest.approx(
        {"path_f1": 4 / 7, "path_precision": 0.5, "path_recall": 2 / 3, "node_f1": 5 / 7, "num_samples": 2}
    )
    json.dumps(report)
    # ancestor-closed float targets (Taxonomy.encode_multihot) are reduced to their path ends
    assert evaluate(prediction, tree.encode_multihot([[C, E], [G]]), tree) == report
    # without labels a prediction is its single path: C and G are both right, E is missed
    single = evaluate(Prediction(paths([A, C], [B, G]), torch.rand(2, n), torch.rand(2)), true, tree)
    assert single["path_precision"] == 1.0 and single["path_recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("density", [0.002, 0.05, 0.5])
def test_closure_matches_dense_reference(density):
    from hiervision.metrics import _deepest

    tree = _random_tree(random.Random(3))
    torch.manual_seed(3)
    marks = torch.rand(200, tree.num_nodes) < density
    marks[:, 0] = False
    # reference: the dense product with the ancestor matrix
    closed = (marks.float() @ tree.ancestor_matrix.float()) > 0
    assert torch.equal(tree.close_upwards(marks), closed)
    # path ends of a closed set are its deepest nodes; closing them gives the set back
    deepest = _deepest(tree, marks)
    assert torch.equal(tree.close_upwards(deepest), closed)
    assert torch.equal(_deepest(tree, deepest), deepest)


def _ranked(tree, order: list[str]) -> torch.Tensor:
    """One image's end-class scores that rank ``order`` first to last."""
    q = torch.zeros(1, tree.num_nodes)
    for r, name in enumerate(order):
        q[0, tree.names.index(name)] = (len(order) - r) / 100
    return q


def test_hops_matches_hand_computed_cases():
    """Sani & Anand's HOPS by hand: truth a1 in A{a1, a2}, B{b1, b2}: ideal ranks e = [0, 1, 2, 2], position
    weights [1, .5, .25, .125] (the last group falls from .25 towards 0), the reversed order's error
    2 + .5 + .25 + .25 = 3; a ranking b1, a1, a2, b2 has ranks [2, 0, 1, 2]: error 2 + .5 + .25 = 2.75."""
    from hiervision.metrics import hops

    t = Taxonomy.from_paths(["A/a1", "A/a2", "B/b1", "B/b2"])
    y = torch.tensor([t.names.index("a1")])
    for order, want in ((["b1", "a1", "a2", "b2"], 1 - 2.75 / 3), (["a2", "a1", "b1", "b2"], 1 - 1.5 / 3),
                        (["a1", "a2", "b2", "b1"], 1.0), (["b1", "b2", "a2", "a1"], 0.0)):
        assert hops(_ranked(t, order), y, t) == {"hops": pytest.approx(want), "hops_images": 1}
    # HOPS@2: against the ideal order with its top two reversed (error 1.5); clipped at 0
    assert hops(_ranked(t, ["a2", "a1", "b1", "b2"]), y, t, k=2)["hops"] == 0.0
    assert hops(_ranked(t, ["a1", "a2", "b2", "b1"]), y, t, k=2)["hops"] == 1.0
    # three levels, a middle group of two: e = [0, 1, 2, 2, 3, 3], weights [1, .5, .25, .1875, .125, .0625],
    # reversed error 4.4375; swapping the first two costs 1 + .5
    t3 = Taxonomy.from_paths(["A/x/a1", "A/x/a2", "A/y/a3", "A/y/a4", "B/z/b1", "B/z/b2"])
    q = _ranked(t3, ["a2", "a1", "a3", "a4", "b1", "b2"])
    assert hops(q, torch.tensor([t3.names.index("a1")]), t3)["hops"] == pytest.approx(1 - 1.5 / 4.4375)


def test_hops_scores_evenly_spaced_images_on_a_budget(monkeypatch):
    import hiervision.metrics as M

    t = Taxonomy.from_paths(["A/a1", "A/a2", "B/b1", "B/b2"])
    q = torch.cat([_ranked(t, ["a1", "a2", "b1", "b2"])] * 10)
    y = torch.full((10,), t.names.index("a1"))
    assert M.hops(q, y, t)["hops_images"] == 10
    monkeypatch.setattr(M, "HOPS_PAIRS", 12)  # 3 images of 4 classes
    assert M.hops(q, y, t) == {"hops": 1.0, "hops_images": 3}
