"""The tree algorithms without dense tables, held to the dense code they replace.

Every function here that once read the (N+1)² ancestor table (or a (N+1)×C slice of it) is compared,
on seeded random trees of variable depth, with that dense code kept below as a test-local oracle; and
the new primitives (Euler intervals, binary-lifting LCA, level-by-level sums) get property tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hiervision import marginals
from hiervision.decoding import (
    beam_search,
    best_leaf_below,
    exact_best_path,
    next_token_mask,
    prefix_logprob,
    tree_tables,
)
from hiervision.losses import hxe_loss, soft_label_targets
from hiervision.models import create_model
from hiervision.taxonomy import EOS, PAD, Taxonomy, TreeTables


def random_tree(rng: np.random.Generator, n: int, max_children: int = 4) -> Taxonomy:
    """A random tree of ``n`` classes with variable depth: each new node hangs under a random earlier one
    that still has room (so leaves sit at many depths)."""
    parents, room = [-1], {0: max_children}
    for v in range(1, n + 1):
        p = int(rng.choice(sorted(room)))
        parents.append(p)
        room[p] -= 1
        if not room[p]:
            del room[p]
        room[v] = max_children
    return Taxonomy(["root"] + [f"n{i}" for i in range(1, n + 1)], parents)


TREES = [random_tree(np.random.default_rng(seed), n) for seed, n in enumerate([1, 2, 5, 9, 17, 30, 48])]
trees = pytest.mark.parametrize("tree", TREES, ids=lambda t: f"N{len(t)}d{t.max_depth}")


def tree_strategy():
    return st.lists(st.integers(0, 10**6), min_size=1, max_size=40).map(
        lambda picks: Taxonomy(["root"] + [f"n{i}" for i in range(1, len(picks) + 1)],
                               [-1] + [p % v for v, p in enumerate(picks, start=1)]))


# ---------------------------------------------------------------------- the dense oracles (the replaced code)
def dense_anc(tree: Taxonomy) -> torch.Tensor:
    """``A[n, m]``: m is n or an ancestor of n (root excluded), built from paths, not from the code under test."""
    a = torch.zeros(tree.num_nodes, tree.num_nodes, dtype=torch.bool)
    for n in range(1, tree.num_nodes):
        a[n, list(tree.path(n))] = True
    return a


def dense_prefix_logprob(tree, node_logprob):
    lp = node_logprob.float().clamp(min=-1e4)
    lp[:, 0] = 0
    return lp @ dense_anc(tree).T.float()


def dense_best_leaf_below(tree, path_logprob, given):
    below = dense_anc(tree)[:, given].T & torch.tensor(tree.view.leaf_mask)
    lp, nodes = path_logprob.masked_fill(~below, float("-inf")).max(1)
    return nodes, lp


def dense_transition_mask(tree, end_nodes):
    n = tree.num_nodes
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[torch.tensor(tree.parents[1:]), torch.arange(1, n)] = True
    mask[:, EOS] = torch.tensor(tree.view.end_mask(end_nodes))
    return mask


def dense_soft_label_targets(tree, targets, classes, beta):
    pm = tree.path_matrix
    pa, pb = torch.broadcast_tensors(pm[classes.unsqueeze(0)], pm[targets.unsqueeze(1)])
    shared = ((pa == pb) & (pa >= 0)).long().cumprod(-1).sum(-1)
    lca = torch.where(shared > 0, pa.gather(-1, (shared - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0)
    heights = torch.tensor(tree.heights, dtype=torch.float32)
    h_t = heights[targets].unsqueeze(1)
    d = (heights[lca] - h_t).clamp(min=0) / (heights[0] - h_t).clamp(min=1)
    return torch.softmax(-beta * d, dim=1)


def dense_hxe_loss(logp, targets, classes, tree, alpha):
    anc = dense_anc(tree)
    under = anc[classes].T
    node_lp = torch.logsumexp(logp.unsqueeze(1).masked_fill(~under.unsqueeze(0), float("-inf")), dim=2)
    node_lp = torch.cat([torch.zeros_like(node_lp[:, :1]), node_lp[:, 1:]], 1)
    cond = (node_lp - node_lp[:, tree.parent_tensor]).clamp(min=-1e4)
    weight = torch.exp(-alpha * torch.tensor(tree.heights, dtype=logp.dtype))
    return -(cond * weight * anc[targets].float()).sum(1).mean()


def dense_end_distribution(scores, tree, ends="leaves"):
    """marginals.end_distribution as it was with the dense table (temperature 1)."""
    view = tree.view
    anc = dense_anc(tree).numpy()
    par, levels = np.asarray(view.parents), view.levels
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, 1).copy()
    s[:, 0] = 1.0
    mask = view.end_mask(ends)
    child_sum = np.zeros_like(s)
    np.add.at(child_sum.T, par[1:], s[:, 1:].T)
    if ends == "all":
        q = np.where(view.end_mask("leaves"), s, np.clip(s - child_sum, 0, None)) * mask
        return q / np.clip(q.sum(1, keepdims=True), 1e-12, None)
    n_leaves = (anc & mask[:, None]).sum(0).astype(np.float64)
    n_leaves[0] = mask.sum()
    rest = np.clip(s - child_sum, 0, None)
    unscored = s <= 0
    n_unscored = np.zeros_like(s)
    np.add.at(n_unscored.T, par[1:], (unscored[:, 1:] * n_leaves[1:]).T)
    m = np.zeros_like(s)
    m[:, 0] = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        for idx in levels:
            p = par[idx]
            u, nu, cs = rest[:, p], n_unscored[:, p], child_sum[:, p]
            w = s[:, idx] + np.where(unscored[:, idx], u * n_leaves[idx] / np.maximum(nu, 1), 0.0)
            w = w + np.where(nu > 0, 0.0, u * s[:, idx] / np.maximum(cs, 1e-12))
            total = np.zeros_like(s)
            np.add.at(total.T, p, w.T)
            share = np.where(total[:, p] > 0, w / np.maximum(total[:, p], 1e-12),
                             n_leaves[idx] / np.maximum(n_leaves[p], 1))
            m[:, idx] = m[:, p] * share
    q = m * mask
    return q / np.clip(q.sum(1, keepdims=True), 1e-12, None)


def dense_temper_level(c, stop, tree, ends, level, t):
    view = tree.view
    par = np.asarray(view.parents)
    kids, halts = view.levels[level - 1], marginals._halts(view, ends, level)
    ck, sk = c[:, kids] ** (1 / t), stop[:, halts] ** (1 / t)
    z = ck @ (par[kids][:, None] == np.arange(view.num_nodes)).astype(np.float64)
    z[:, halts] += sk
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(z[:, par[kids]] > 0, ck / z[:, par[kids]], 0.0),
                np.where(z[:, halts] > 0, sk / z[:, halts], 0.0))


def slow_lca(tree, a, b):
    shared = set(tree.path(a)) & set(tree.path(b))
    return max(shared, key=tree.depth, default=0)


# ---------------------------------------------------------------------- properties of the new primitives
@settings(max_examples=40, deadline=None)
@given(tree_strategy(), st.data())
def test_ancestry_is_path_membership_and_lca_is_the_deepest_shared_node(tree, data):
    view = tree.view
    n = tree.num_nodes
    u = np.arange(n)[:, None]
    on_path = np.zeros((n, n), dtype=bool)  # [u, v]: u on v's path, or u the root
    on_path[0] = True
    for v in range(1, n):
        on_path[list(tree.path(v)), v] = True
    assert np.array_equal(view.is_ancestor(u, np.arange(n)[None]), on_path)
    assert (view.tout - view.tin).tolist() == [len(tree.subtree(v)) for v in range(n)]
    a = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20)))
    b = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=len(a), max_size=len(a))))
    lca = view.lca(a, b)
    assert np.array_equal(lca, view.lca(b, a))  # symmetric
    assert view.is_ancestor(lca, a).all() and view.is_ancestor(lca, b).all()  # an ancestor of both
    assert lca.tolist() == [slow_lca(tree, x, y) for x, y in zip(a.tolist(), b.tolist())]
    tables = TreeTables(tree)
    assert torch.equal(tables.lca(torch.from_numpy(a), torch.from_numpy(b)), torch.from_numpy(lca))


@trees
def test_classes_sorted_by_tin_list_each_subtree_as_one_range(tree):
    """What flat's inner-target loss relies on: the end classes under a node are one contiguous run."""
    view = tree.view
    leaves = np.array(tree.leaves)
    order = leaves[np.argsort(view.tin[leaves])]
    for v in range(tree.num_nodes):
        inside = np.flatnonzero(view.is_ancestor(v, order))
        assert inside.size and np.array_equal(inside, np.arange(inside[0], inside[-1] + 1))
        assert set(order[inside].tolist()) == set(tree.subtree(v)) & set(tree.leaves)


def test_a_deep_chain_needs_no_recursion_and_little_memory():
    n = 20_000
    view = Taxonomy(["root"] + [f"n{i}" for i in range(n)], [-1, *range(n)]).view
    assert view.tin[-1] == n and view.tout[1] == n + 1
    assert view.lift.shape == (15, n + 1)  # ⌈log2(n + 1)⌉ rows: O(N log D)
    assert view.lca(np.array([n, 5]), np.array([7, n])).tolist() == [7, 5]


# ---------------------------------------------------------------------- new against the dense oracle
@trees
def test_view_sums_match_the_dense_products(tree):
    rng = np.random.default_rng(0)
    anc = dense_anc(tree).numpy().astype(np.float64)
    x = rng.random((3, tree.num_nodes))
    expected = x @ anc
    expected[:, 0] = x.sum(1)
    assert np.allclose(tree.view.subtree_sum(x), expected)
    assert np.allclose(marginals.node_marginals(x, tree), expected)
    y = x.copy()
    y[:, 0] = 0
    assert np.allclose(tree.view.path_sum(x), y @ anc.T)
    child_of = dense_transition_mask(tree, "leaves").numpy()[:, 1:].T.astype(np.float64)  # (N, N+1): [c, p]
    assert np.allclose(tree.view.children_sum(x), x[:, 1:] @ child_of)
    for d, idx in enumerate(tree.view.levels):
        assert np.allclose(tree.view.children_sum(x[:, idx], level=d), x[:, idx] @ child_of[idx - 1])


@trees
def test_torch_sums_match_the_dense_products(tree):
    torch.manual_seed(0)
    tables = tree_tables(tree)
    anc = dense_anc(tree)
    x = torch.randn(4, tree.num_nodes, dtype=torch.float64)
    expected = x @ anc.double()
    expected[:, 0] = x.sum(1)
    assert torch.allclose(tables.subtree_sum(x), expected)
    # values given at some nodes only (a flat softmax's classes): zero elsewhere, then the same sums
    nodes = torch.tensor(tree.leaves)
    x_at = torch.zeros_like(x)
    x_at[:, nodes] = x[:, nodes]
    assert torch.allclose(tables.scatter_subtree_sum(x[:, nodes], nodes), tables.subtree_sum(x_at))
    # in log space, with terms far below fp32's exp range (-200): the oracle's exact logsumexp
    lx = torch.randn(4, tree.num_nodes) * 3 - torch.tensor([0.0, 200.0, 0.0, 0.0]).unsqueeze(1)
    lx[:, 0] = float("-inf")
    lx.requires_grad_()
    got = tables.subtree_logsumexp(lx)
    ref = torch.logsumexp(lx.detach().unsqueeze(1).masked_fill(~anc.T.unsqueeze(0), float("-inf")), 2)
    ref[:, 0] = torch.logsumexp(lx.detach(), 1)
    assert torch.allclose(got, ref, atol=1e-4)
    got[:, 1:].sum().backward()
    assert torch.isfinite(lx.grad).all()


@trees
def test_decoding_matches_the_dense_code(tree):
    torch.manual_seed(1)
    lp = torch.randn(5, tree.num_nodes).log_softmax(1)
    lp[0, 1] = float("-inf")  # a node of probability 0: both floor it at -1e4
    assert torch.allclose(prefix_logprob(tree, lp), dense_prefix_logprob(tree, lp), atol=1e-3)
    for ends in ("leaves", "all"):
        nodes, best = exact_best_path(tree, lp, ends)
        dense = dense_prefix_logprob(tree, lp).masked_fill(~torch.tensor(tree.view.end_mask(ends)), float("-inf"))
        assert torch.allclose(best, dense.max(1).values, atol=1e-3)
        assert torch.allclose(dense.gather(1, nodes.unsqueeze(1)).squeeze(1), best, atol=1e-3)
        every = torch.arange(tree.num_nodes)
        assert torch.equal(next_token_mask(tree_tables(tree), every, tree_tables(tree).end_mask(ends)),
                           dense_transition_mask(tree, ends))
        last = torch.randint(0, tree.num_nodes, (3, 2))
        ends_mask = tree_tables(tree).end_mask(ends)
        assert torch.equal(next_token_mask(tree_tables(tree), last, ends_mask), dense_transition_mask(tree, ends)[last])
    path_lp = dense_prefix_logprob(tree, lp)
    given = torch.randint(1, tree.num_nodes, (5,))
    nodes, best = best_leaf_below(tree, path_lp, given)
    ref_nodes, ref_best = dense_best_leaf_below(tree, path_lp, given)
    assert torch.equal(best, ref_best) and torch.equal(path_lp.gather(1, nodes.unsqueeze(1)).squeeze(1), ref_best)


@trees
def test_beam_search_over_independent_scores_finds_the_exact_best_path(tree):
    """With one node score table per step, a wide enough beam is the exact search (dense-oracle scored)."""
    torch.manual_seed(2)
    lp = torch.randn(3, tree.num_nodes).log_softmax(1)
    lp[:, 0] = 0  # ending is free

    def step(tokens, state):
        return lp.repeat_interleave(tree.num_nodes, 0), state

    paths, scores = beam_search(tree, step, 3, beam_width=tree.num_nodes, end_nodes="leaves")
    best = dense_prefix_logprob(tree, lp).masked_fill(~torch.tensor(tree.view.leaf_mask), float("-inf")).max(1)
    assert torch.allclose(scores[:, 0], best.values, atol=1e-4)
    for row in paths[:, 0].tolist():
        assert tree.is_valid_path([n for n in row if n != PAD])


@trees
def test_marginals_match_the_dense_code(tree):
    rng = np.random.default_rng(3)
    scores = rng.random((4, tree.num_nodes))
    scores[0, rng.integers(1, tree.num_nodes, 3)] = 0  # unscored children take the leaf-count route
    for ends in ("leaves", "all"):
        assert np.allclose(marginals.end_distribution(scores, tree, ends), dense_end_distribution(scores, tree, ends))
        q = marginals.end_distribution(scores, tree, ends)
        c, stop = marginals.conditionals(q, tree, ends)
        for level in range(1, tree.max_depth + 1):
            got = marginals.temper_level(c, stop, tree, ends, level, 1.7)
            for g, r in zip(got, dense_temper_level(c, stop, tree, ends, level, 1.7)):
                assert np.allclose(g, r)


@trees
def test_losses_match_the_dense_code(tree):
    torch.manual_seed(4)
    for classes in (torch.tensor(tree.leaves), torch.arange(1, tree.num_nodes)):
        targets = torch.randint(1, tree.num_nodes, (6,))
        if len(classes) < tree.num_nodes - 1:
            targets = classes[torch.randint(0, len(classes), (6,))]
            targets[0] = tree.parents[int(targets[0])] or int(targets[0])  # a coarse target too
        assert torch.allclose(soft_label_targets(tree, targets, classes, 5.0),
                              dense_soft_label_targets(tree, targets, classes, 5.0))
        logits = (torch.randn(6, len(classes)) * 4).requires_grad_()
        new = hxe_loss(logits.log_softmax(1), targets, classes, tree, 0.3)
        (g_new,) = torch.autograd.grad(new, logits)
        old = dense_hxe_loss(logits.log_softmax(1), targets, classes, tree, 0.3)
        (g_old,) = torch.autograd.grad(old, logits)
        assert torch.allclose(new, old, atol=1e-5) and torch.allclose(g_new, g_old, atol=1e-5)


@pytest.mark.parametrize("end_nodes", ["leaves", "all"])
@pytest.mark.parametrize("tree", TREES[2::2], ids=lambda t: f"N{len(t)}d{t.max_depth}")
def test_flat_matches_its_dense_class_paths(tree, end_nodes):
    torch.manual_seed(5)
    model = create_model("flat", tree, backbone="resnet20", in_chans=1, end_nodes=end_nodes).eval()
    classes = model.classes
    class_paths = dense_anc(tree)[classes].T  # (N+1, C): the buffer the model no longer holds
    logits = torch.randn(6, len(classes)) * 3
    probs = logits.softmax(1)
    targets = classes[torch.randint(0, len(classes), (6,))]
    targets[:2] = torch.tensor([tree.parents[int(t)] or int(t) for t in targets[:2]])  # coarse targets
    out = {"logits": logits}
    if end_nodes == "leaves":
        allowed = class_paths[targets]
        dense_loss = -torch.logsumexp(logits.log_softmax(1).masked_fill(~allowed, float("-inf")), 1).mean()
        assert torch.allclose(model.loss(out, targets), dense_loss)
    pred = model.decode(out)
    assert torch.allclose(pred.scores, probs @ class_paths.T.float(), atol=1e-6)
    given = pred.nodes.clone()
    given[:3] = torch.tensor([tree.parents[int(n)] or int(n) for n in given[:3]])
    cond = model.decode_given(out, given)
    dense_best, dense_idx = probs.masked_fill(~class_paths[given], 0).max(1)
    assert torch.equal(cond.path_prob, dense_best) and torch.equal(cond.nodes, classes[dense_idx])
    model.forward = lambda images: out  # export_outputs runs the network: let it give these logits
    exported = model.export_outputs(torch.zeros(6, 1, 8, 8))
    assert torch.allclose(exported["scores"], probs @ class_paths.T.float(), atol=1e-6)
    dense_path = torch.log(probs @ F.one_hot(classes, tree.num_nodes).float())
    assert torch.equal(exported["path_logprob"], dense_path)


@pytest.mark.parametrize("end_nodes", ["leaves", "all"])
def test_flat_on_a_big_tree_holds_no_nodes_by_classes_table(end_nodes):
    """Every buffer of a flat model is O(N·depth) (the (N+1)×C class-path table is gone), and it decodes."""
    tree = random_tree(np.random.default_rng(7), 3_000, max_children=6)
    model = create_model("flat", tree, backbone="resnet20", in_chans=1, end_nodes=end_nodes).eval()
    bound = (tree.max_depth + 8) * tree.num_nodes  # paths (N+1)×D, the lifting table, a few vectors
    assert all(b.numel() <= bound for _, b in model.named_buffers())
    assert sum(b.numel() for _, b in model.named_buffers()) < 4 * bound
    pred = model.decode({"logits": torch.randn(2, len(model.classes))})
    assert torch.allclose(pred.scores[:, tree.children[0]].sum(1), torch.ones(2))


def test_the_level_sums_never_change_their_input_even_for_one_row():
    """With one row the transpose is contiguous: a sum that works in place must still copy (a one-image
    batch once had its log-probabilities rewritten by prefix_logprob, and DARTS' rewards by subtree_sum)."""
    tree = Taxonomy.from_paths(["a/b/c", "a/d", "e"])
    tables = tree_tables(tree)
    for rows in (1, 3):
        x = torch.rand(rows, tree.num_nodes)
        before = x.clone()
        tables.subtree_sum(x)
        tables.path_sum(x)
        tables.subtree_logsumexp(x.log())
        assert torch.equal(x, before)
