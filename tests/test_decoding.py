"""Decoders against brute force and hand cases."""

from __future__ import annotations

import random

import pytest
import torch

from hiervision.decoding import Prediction, exact_best_path, threshold_paths
from hiervision.taxonomy import PAD, Taxonomy

A, B, C, D, E, F, G, H = range(1, 9)


@pytest.fixture
def tree() -> Taxonomy:
    """Root/A,B; A→C,D; B→E,F,G; C→H."""
    return Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B", "H": "C"})


def _random_tree(seed: int) -> Taxonomy:
    rng = random.Random(seed)
    parent_of: dict[str, str | None] = {}
    for i in range(40):
        parent_of[f"n{i}"] = None if i < 3 or rng.random() < 0.1 else f"n{rng.randrange(i)}"
    return Taxonomy.from_parent_map(parent_of)


@pytest.mark.parametrize("inner", [False, True])
def test_exact_best_path_matches_brute_force(inner):
    tree = _random_tree(0)
    torch.manual_seed(0)
    logprob = torch.log_softmax(torch.randn(64, tree.num_nodes), dim=1)
    if inner:  # every class may end a path (root excluded)
        end_nodes = torch.ones(tree.num_nodes, dtype=torch.bool)
        end_nodes[0] = False
        candidates = list(range(1, tree.num_nodes))
    else:
        end_nodes = None
        candidates = list(tree.leaves)
    nodes, best = exact_best_path(tree, logprob, end_nodes)
    for b in range(len(logprob)):
        totals = {n: sum(logprob[b, m].item() for m in tree.path(n)) for n in candidates}
        want = max(totals, key=totals.get)
        assert nodes[b].item() == want
        assert best[b].item() == pytest.approx(totals[want], abs=1e-5)
    if inner:
        assert any(tree.children[n] for n in nodes.tolist())  # some inner node actually won


def test_threshold_paths_hand_case(tree):
    scores = torch.zeros(2, tree.num_nodes)
    # sample 0: A, C, D pass; H fails; B fails so E (0.9) must not be kept
    scores[0, [A, B, C, D, E, H]] = torch.tensor([0.9, 0.3, 0.8, 0.7, 0.9, 0.2])
    # sample 1: the whole branch A/C/H passes, the root column is ignored
    scores[1, [0, A, C, H]] = torch.tensor([0.1, 0.6, 0.6, 0.5])
    kept = threshold_paths(tree, scores, 0.5)
    assert kept.dtype == torch.bool
    assert kept[0].nonzero().squeeze(1).tolist() == [C, D]  # deepest kept nodes only (A is not an end)
    assert kept[1].nonzero().squeeze(1).tolist() == [H]
    assert not threshold_paths(tree, scores, 0.95).any()


def test_prediction_nodes():
    p = Prediction(torch.tensor([[A, C, H], [B, E, PAD], [A, PAD, PAD]]), torch.zeros(3, 9), torch.ones(3))
    assert p.nodes.tolist() == [H, E, A]
    assert len(p) == 3
    malformed = Prediction(torch.tensor([[A, PAD, C]]), torch.zeros(1, 9), torch.ones(1))
    assert malformed.nodes.tolist() == [C]  # the last real entry, not the path length


def test_exact_best_path_never_returns_root_and_survives_zero_probabilities(tree):
    logprob = torch.log_softmax(torch.randn(4, tree.num_nodes), dim=1)
    logprob[:, A] = float("-inf")  # probability 0: everything below A is impossible
    nodes, best = exact_best_path(tree, logprob, torch.ones(tree.num_nodes, dtype=torch.bool))
    assert (nodes != 0).all() and torch.isfinite(best).all()
    assert all(A not in tree.path(n) for n in nodes.tolist())


def test_prediction_cat():
    a = Prediction(torch.tensor([[A, C]]), torch.full((1, 9), 0.1), torch.tensor([0.5]), torch.ones(1, 9, dtype=bool))
    b = Prediction(
        torch.tensor([[A, C, H], [B, PAD, PAD]]),
        torch.full((2, 9), 0.2),
        torch.tensor([0.6, 0.7]),
        torch.zeros(2, 9, dtype=bool),
    )
    out = Prediction.cat([a, b])
    assert out.paths.tolist() == [[A, C, PAD], [A, C, H], [B, PAD, PAD]]
    assert out.scores.shape == (3, 9) and out.scores[0, 0].item() == pytest.approx(0.1)
    assert out.path_prob.tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert out.labels is not None and out.labels.sum(1).tolist() == [9, 0, 0]
    assert out.nodes.tolist() == [C, H, B]
    no_labels = Prediction.cat([Prediction(a.paths, a.scores, a.path_prob)] * 2)
    assert no_labels.labels is None and len(no_labels) == 2
