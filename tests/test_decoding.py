"""Decoders against brute force and hand cases."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hiervision.decoding import (
    Prediction,
    beam_search,
    exact_best_path,
    next_token_mask,
    threshold_paths,
    tree_tables,
)
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


# ----------------------------------------------------------------------------- Koo's Algorithm 1
def _precomputed(step_lp: torch.Tensor, k: int):
    """A step function over fixed per-step log-probabilities (B, S, N+1), as FPL heads give."""
    rep = step_lp.repeat_interleave(k, 0)
    return lambda tokens, t: (rep[:, t], t + 1)


def _koo_steps(koo, o1: dict, o2: dict) -> torch.Tensor:
    """(1, 2, N+1) log-scores from the slides' per-node outputs (missing nodes: probability 0)."""
    lp = torch.full((1, 2, koo.num_nodes), float("-inf"))
    for t, o in enumerate((o1, o2)):
        for name, p in o.items():
            lp[0, t, koo.index(name)] = math.log(p) if p > 0 else float("-inf")
    return lp


def test_beam_search_slides_worked_example(koo_tree):
    """Slides: o_1 = (A..G) = (.3,.4,.1,.1,.1,0,..), o_2 = (0,.1,0,.1,.1,.2,.5), k = 1 → {Root, B, G}."""
    o1 = dict(zip("ABCDEFG", (0.3, 0.4, 0.1, 0.1, 0.1, 0.0, 0.0)))
    o2 = dict(zip("ABCDEFG", (0.0, 0.1, 0.0, 0.1, 0.1, 0.2, 0.5)))
    lp = _koo_steps(koo_tree, o1, o2)
    paths, scores = beam_search(koo_tree, _precomputed(lp, 1), 1, beam_width=1, max_steps=2, state=0)
    assert [koo_tree.names[n] for n in paths[0, 0].tolist()] == ["B", "G"]
    assert scores[0, 0].item() == pytest.approx(math.log(0.4 * 0.5))


def test_beam_and_exact_differ_when_the_greedy_first_step_is_wrong(koo_tree):
    # B wins step 1 (.55 > .45) but all of B's children are weak; A → C is the best path overall
    o1 = {"A": 0.45, "B": 0.55}
    o2 = {"C": 0.9, "D": 0.1, "E": 0.35, "F": 0.3, "G": 0.3}
    lp = _koo_steps(koo_tree, o1, o2)
    node_lp = lp[:, 0].clone()
    depth2 = [koo_tree.index(c) for c in "CDEFG"]
    node_lp[0, depth2] = lp[0, 1, depth2]
    exact, exact_lp = exact_best_path(koo_tree, node_lp)
    assert koo_tree.names[exact.item()] == "C"
    greedy, greedy_lp = beam_search(koo_tree, _precomputed(lp, 1), 1, beam_width=1, max_steps=2, state=0)
    assert [koo_tree.names[n] for n in greedy[0, 0].tolist()] == ["B", "E"]
    assert greedy_lp[0, 0] < exact_lp[0]
    wide, wide_lp = beam_search(koo_tree, _precomputed(lp, 2), 1, beam_width=2, max_steps=2, state=0)
    assert koo_tree.names[wide[0, 0, -1].item()] == "C"
    assert wide_lp[0, 0].item() == pytest.approx(exact_lp[0].item(), abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_full_width_beam_equals_exact_search_and_paths_are_valid(seed, koo_tree):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(6, 2, koo_tree.num_nodes, generator=g).log_softmax(-1)
    lp[..., 0] = float("-inf")  # fixed depth: no end token
    node_lp = torch.zeros(6, koo_tree.num_nodes)
    for n in range(1, koo_tree.num_nodes):
        node_lp[:, n] = lp[:, koo_tree.depth(n) - 1, n]
    _, exact_lp = exact_best_path(koo_tree, node_lp)
    k = len(koo_tree.leaves)
    paths, scores = beam_search(koo_tree, _precomputed(lp, k), 6, beam_width=k, max_steps=2, state=0)
    assert torch.allclose(scores[:, 0], exact_lp, atol=1e-5)
    for b in range(6):
        for beam in range(k):
            assert koo_tree.is_valid_path(paths[b, beam].tolist())
        assert (scores[b, :-1] >= scores[b, 1:]).all()  # best first


def test_beam_search_stops_at_inner_nodes_and_carries_decoder_state(koo_tree):
    """An autoregressive step: the next distribution depends on the fed token and the state."""
    A, B, E = (koo_tree.index(x) for x in "ABE")
    n = koo_tree.num_nodes
    calls = []

    def step(tokens, state):
        calls.append(state.clone())
        lp = torch.full((len(tokens), n), -5.0)
        lp[tokens == 0, A] = -0.1  # start → A
        lp[tokens == A, 0] = -0.1  # after A: stop (A is an inner node)
        lp[tokens == B, E] = -0.1
        return lp.log_softmax(-1), state + 1

    paths, scores = beam_search(koo_tree, step, 3, beam_width=2, end_nodes="all", state=torch.zeros(6, 1))
    assert [[n for n in p if n != PAD] for p in paths[:, 0].tolist()] == [[A]] * 3
    assert torch.isfinite(scores).all()
    assert [int(c[0]) for c in calls] == list(range(len(calls)))  # the state is threaded through every step
    # leaves-only ends: A may not stop, so the path must go on to a child of A
    paths, _ = beam_search(koo_tree, step, 3, beam_width=2, end_nodes="leaves", state=torch.zeros(6, 1))
    best = [[n for n in p if n != PAD] for p in paths[:, 0].tolist()]
    assert all(koo_tree.is_valid_path(p) and p[-1] in koo_tree.leaves for p in best)


def test_next_token_mask(koo_tree):
    tables = tree_tables(koo_tree)
    m = next_token_mask(tables, torch.arange(koo_tree.num_nodes), tables.end_mask("leaves"))
    A, C, D = (koo_tree.index(x) for x in "ACD")
    assert set(m[A].nonzero().flatten().tolist()) == {C, D}
    assert m[C].nonzero().flatten().tolist() == [0]  # a leaf may only stop
    assert not m[0, 0]  # the root may not stop
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(koo_tree, lambda t, s: (None, s), 1, beam_width=0)
