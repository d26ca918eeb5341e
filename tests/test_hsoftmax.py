"""The children (hierarchical) step softmax of Guo's and DHNN's decoders, against the dense masked softmax.

The oracle everywhere is the dense code: logits over all N+1 columns, masked to the tokens allowed
after the node read (:func:`~hiervision.decoding.next_token_mask`), log-softmaxed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import training_losses
from hiervision.config import ConfigError, validate_config
from hiervision.decoding import beam_search, next_token_mask, prefix_logprob, sequence_targets, tree_tables
from hiervision.models import create_model
from hiervision.models.step_softmax import ChildrenSoftmax, resolve_step_softmax, resolve_width
from hiervision.taxonomy import EOS, IGNORE, PAD, Taxonomy
from hiervision.tree.tables import segment_logsumexp, sibling_log_softmax, step_candidates, step_csr

VAR = Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y", "b/z/4/q", "b/w", "b/z/5", "c"])
FIXED = Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y/3", "b/z/4", "b/z/5", "b/w/6"])
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 16, "backbone_kwargs": {"width": 0.25}}
HEADS = {"guo_rnn": {"embed_size": 8, "hidden_size": 16},
         "dhnn_s2s": {"input_size": 8, "hidden_size": 16, "pool_fallback": "project"}}


def random_tree(num_nodes: int, seed: int) -> Taxonomy:
    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, num_nodes)]  # node i hangs below an earlier one
    return Taxonomy(["root"] + [f"n{i}" for i in range(1, num_nodes)], parents)


def dense_logprob(logits: torch.Tensor, tables, contexts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The oracle: ``(M, N+1)`` log-softmax over the allowed tokens, ``-inf`` elsewhere."""
    allowed = next_token_mask(tables, contexts, ends)
    return logits.masked_fill(~allowed, float("-inf")).log_softmax(1).masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- the tree part
@pytest.mark.parametrize("seed", range(4))
def test_step_csr_and_segment_logsumexp_agree_with_the_dense_masked_softmax(seed: int) -> None:
    tax = random_tree(40, seed)
    tables = tree_tables(tax)
    g = torch.Generator().manual_seed(seed)
    ends = tables.end_mask(torch.rand(tax.num_nodes, generator=g) < 0.5) | tables.leaf_mask
    ptr, tokens, slot = step_csr(tables.parent, ends)
    n = tax.num_nodes
    contexts = torch.randint(0, n, (30,), generator=g)
    logits = torch.randn(30, n, generator=g) * 5
    seg, pos, start = step_candidates(ptr, contexts)
    tok = tokens[pos]
    # the candidates of each context are exactly its allowed tokens, in the dense row's (id) order
    allowed = next_token_mask(tables, contexts, ends)
    for m in range(30):
        assert tok[seg == m].tolist() == allowed[m].nonzero().squeeze(1).tolist()
    assert bool((start == torch.searchsorted(seg, torch.arange(30))).all() or len(seg) == 0)
    assert bool((tokens[slot[1:]] == torch.arange(1, n)).all())  # every node sits at its slot, once
    lse = segment_logsumexp(logits[seg, tok], seg, 30)
    want = dense_logprob(logits, tables, contexts, ends)
    torch.testing.assert_close(logits[seg, tok] - lse[seg], want[seg, tok])
    # an empty segment's log-sum-exp is -inf; huge logits do not overflow
    assert segment_logsumexp(torch.tensor([1e4, 1e4]), torch.tensor([0, 0]), 2).tolist() == pytest.approx(
        [1e4 + np.log(2), float("-inf")])


@pytest.mark.parametrize("seed", range(3))
def test_wide_contexts_share_one_product_with_the_same_values_and_gradients(seed: int, monkeypatch) -> None:
    """A node with many children (a WordNet root has thousands) is scored as one dense block for all its rows
    instead of gathering a weight row per candidate: the dense oracle's log-probabilities, the same gradients."""
    from hiervision.models import step_softmax

    tax = random_tree(60, seed)  # node i below an earlier one: the first nodes have many children
    tables = tree_tables(tax)
    g = torch.Generator().manual_seed(seed)
    ends = tables.end_mask("leaves")
    layer = ChildrenSoftmax(tables, ends)
    out = nn.Linear(5, tax.num_nodes)
    contexts = torch.cat([torch.zeros(4, dtype=torch.long), torch.randint(0, tax.num_nodes, (16,), generator=g)])
    contexts = torch.where(tables.leaf_mask[contexts] | (tables.height[contexts] > 0), contexts, 0)
    h = torch.randn(20, 5, generator=g)
    want = dense_logprob(out(h).detach(), tables, contexts, ends)
    targets = want.argmax(1)
    targets[:2] = want.masked_fill(want == float("-inf"), 0).argmin(1)[:2]  # some unlikely allowed ones too
    results = []
    # every candidate gathered; every context read twice or more shared; the biggest shared; only the largest
    for share_above, most in ((10**9, 32), (0, 10**3), (12, 32), (0, 1)):
        monkeypatch.setattr(step_softmax, "SHARE_ABOVE", share_above)
        monkeypatch.setattr(step_softmax, "MAX_SHARED", most)
        with torch.no_grad():
            lp, tok = layer.candidates(out, h, contexts)
        torch.testing.assert_close(lp, want.gather(1, tok).masked_fill(lp == float("-inf"), float("-inf")))
        hh = h.clone().requires_grad_()
        out.zero_grad()
        got = layer.target_logprob(out, hh, contexts, targets)
        torch.testing.assert_close(got.detach(), want.gather(1, targets[:, None])[:, 0])
        (got * torch.linspace(0, 1, len(got))).sum().backward()
        results.append((hh.grad, out.weight.grad.clone(), out.bias.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", range(3))
def test_children_softmax_layer_matches_the_dense_oracle(seed: int) -> None:
    tax = random_tree(30, seed)
    tables = tree_tables(tax)
    g = torch.Generator().manual_seed(seed)
    ends = tables.end_mask("leaves")
    layer = ChildrenSoftmax(tables, ends)
    out = nn.Linear(6, tax.num_nodes)
    h = torch.randn(20, 6, generator=g)
    contexts = torch.randint(0, tax.num_nodes, (20,), generator=g)
    contexts = torch.where(tables.leaf_mask[contexts] | (tables.height[contexts] > 0), contexts, 0)
    want = dense_logprob(out(h).detach(), tables, contexts, ends)
    with torch.no_grad():
        # the exported step's raw logits of asked tokens, normalised over the allowed ones as the runtime does
        z = layer.logits(out, h, torch.arange(tax.num_nodes))
        torch.testing.assert_close(z.masked_fill(want == float("-inf"), float("-inf")).log_softmax(1), want)
        torch.testing.assert_close(layer.logits(out, h, torch.tensor([4, 2])), z[:, [4, 2]])
        lp, tok = layer.candidates(out, h, contexts)
        torch.testing.assert_close(lp, want.gather(1, tok).masked_fill(lp == float("-inf"), float("-inf")))
        assert bool((torch.logsumexp(lp, 1) .abs() < 1e-5).all())  # each row sums to 1
        targets = torch.randint(0, tax.num_nodes, (20,), generator=g)
        targets[:3] = torch.tensor([EOS, IGNORE, PAD])
        torch.testing.assert_close(layer.target_logprob(out, h, contexts, targets),
                                   torch.where(targets >= 0, want.gather(1, targets.clamp(min=0)[:, None])[:, 0],
                                               float("-inf")))
        greedy = layer.greedy(out, h, contexts)
    assert greedy.tolist() == want.argmax(1).tolist()


def test_step_softmax_option() -> None:
    assert resolve_step_softmax("auto", 1000) == "full" and resolve_step_softmax("auto", 1001) == "children"
    with pytest.raises(ValueError, match="model.step_softmax must be"):
        resolve_step_softmax("sparse", 10)
    for name in HEADS:
        with pytest.raises(ValueError, match="step_softmax"):
            create_model(name, VAR, **SMALL, **HEADS[name], step_softmax="tree")
    with pytest.raises(ValueError, match="feed: label"):
        create_model("dhnn_s2s", VAR, **SMALL, **HEADS["dhnn_s2s"], feed="output", step_softmax="children")
    assert create_model("guo_rnn", VAR, **SMALL, **HEADS["guo_rnn"]).children_softmax is None  # auto, small


def test_decoder_widths_left_at_auto_halve_above_ten_thousand_nodes() -> None:
    assert resolve_width("hidden_size", "auto", 512, 10_000) == 512
    assert resolve_width("hidden_size", "auto", 512, 10_001) == 256
    assert resolve_width("hidden_size", 300, 512, 10**5) == 300  # a width the user names is kept
    with pytest.raises(ValueError, match="model.embed_size must be a whole number"):
        resolve_width("embed_size", 0, 256, 10)
    big = random_tree(10_001, 0)
    guo = create_model("guo_rnn", big, **SMALL)
    assert (guo.embed.embedding_dim, guo.cell.hidden_size) == (128, 256)
    assert create_model("guo_rnn", VAR, **SMALL).cell.hidden_size == 512  # the paper-sized width below
    s2s = create_model("dhnn_s2s", big, **SMALL, pool_fallback="project", embed_size="auto")
    assert (s2s.features.p, s2s.hidden_size, s2s.embed.embedding_dim) == (128, 256, 128)
    assert validate_config({"model": {"hidden_size": "auto", "embed_size": "auto"}})["model"]["hidden_size"] == "auto"
    with pytest.raises(ConfigError, match="model.hidden_size"):
        validate_config({"model": {"hidden_size": "wide"}})


# ----------------------------------------------------------------------------- the heads
def build(name: str, tax: Taxonomy, **kw):
    torch.manual_seed(0)
    return create_model(name, tax, **SMALL, **HEADS[name], step_softmax="children", **kw).eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def dense_steps(model, outputs: dict, paths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's per-step log-probabilities ``(B, T, N+1)`` under teacher forcing, and the tokens read."""
    tokens = model._tokens(paths)
    logits = model.unroll(outputs["v"], tokens) if hasattr(model, "unroll") else model._teacher_forced(outputs, paths)
    return dense_logprob(logits.flatten(0, 1), model.tables, tokens.flatten(), model.ends).view_as(logits), tokens


CASES = [("guo_rnn", VAR, {}), ("guo_rnn", VAR, {"end_nodes": "all"}), ("guo_rnn", FIXED, {}),
         ("dhnn_s2s", VAR, {}), ("dhnn_s2s", VAR, {"end_nodes": "leaves"})]


@pytest.mark.parametrize("name,tax,kw", CASES)
@pytest.mark.parametrize("shallow", [False, True])
def test_loss_is_the_dense_masked_cross_entropy(name: str, tax: Taxonomy, kw: dict, shallow: bool) -> None:
    model = build(name, tax, **kw)
    # every node (leaves and coarse labels), or only the shallow ones: the decoder then runs fewer steps
    targets = torch.tensor([n for n in range(1, tax.num_nodes) if not shallow or tax.depth(n) <= 2])
    x = images(len(targets))
    with torch.no_grad():
        outputs = model(x)
        got = model.loss(outputs, targets)
        lp, tokens = dense_steps(model, outputs, model.tables.encode_paths(targets))
        model.children_softmax = None  # the same weights under the full softmax's code, for its weighting
        seq = (model.tables.encode_sequence(targets) if name == "dhnn_s2s" or model.end_token
               else model.tables.encode_levels(targets))[:, : lp.shape[1]]
        # an end token where a path may not stop (a coarse label, end_nodes "leaves") teaches nothing
        seq = seq.masked_fill((seq == EOS) & ~model.ends[targets][:, None], IGNORE)
        per = -lp.gather(2, seq.clamp(min=0)[..., None])[..., 0]
        per = per.masked_fill(seq == IGNORE, 0)
        if name == "guo_rnn":
            want = (per * model.level_weights[: seq.shape[1]]).sum(1).mean()
        else:
            want = model._weighted(per, (seq != IGNORE).float())
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,tax,kw", CASES)
@pytest.mark.parametrize("width", [1, 3])
def test_decode_path_logprob_and_export_step_agree(name: str, tax: Taxonomy, kw: dict, width: int) -> None:
    model = build(name, tax, **kw)
    model.set_beam_width(width) if width > 1 else None
    x = images()
    with torch.no_grad():
        outputs = model(x)
        pred = model.predict(x)
        # the search over the exported step (asked every token, normalised over the allowed ones as the runtime
        # does) finds the same paths; exported states are batch-first, the torch search reorders an LSTM's
        # (layers, B·k, W) on dim 1
        flip = (lambda st: tuple(t.transpose(0, 1) for t in st)) if name == "dhnn_s2s" else (lambda st: st)
        assert model.decoder_settings()["candidates"]

        def step(tokens, st):
            z, *st = model.export_step(tokens, *flip(st), candidates=torch.arange(model.taxonomy.num_nodes))
            allowed = next_token_mask(model.tables, tokens, model.ends)
            return z.masked_fill(~allowed, float("-inf")).log_softmax(-1), flip(st)

        k = model.beam_width if width > 1 else 1
        start = flip(tuple(s.repeat_interleave(k, 0) for s in model.export_encoder(x)))
        steps = model.num_steps if name == "guo_rnn" else model._out_steps
        beams, lp = beam_search(model.tables, step, len(x), k, model.end_nodes, steps, start)
        assert beams[:, 0].tolist() == pred.paths[:, : beams.shape[2]].tolist()
        torch.testing.assert_close(pred.path_prob.log(), lp[:, 0])
        # path_logprob is the sum the search ranked by, and the dense oracle's sum over the same steps
        found = model.path_logprob(outputs, pred.paths)
        torch.testing.assert_close(found, lp[:, 0])
        steps_lp, _ = dense_steps(model, outputs, pred.paths)
        end = name == "dhnn_s2s" or model.end_token
        seq = sequence_targets(model.tables, pred.paths, end, steps_lp.shape[1])
        want = steps_lp.gather(2, seq.clamp(min=0)[..., None])[..., 0].masked_fill(seq == IGNORE, 0).sum(1)
        torch.testing.assert_close(found, want)
        # the node scores are the decoded path's prefix probabilities (collected during the search)
        assert_prefix_scores(pred, steps_lp)


def assert_prefix_scores(pred, steps_lp: torch.Tensor) -> None:
    """``pred.scores`` on each path node = exp(the oracle's summed step log-probabilities up to it); 0 off the path."""
    paths = pred.paths
    taken = steps_lp[:, : paths.shape[1]].gather(2, paths.clamp(min=0)[..., None])[..., 0]
    cum = taken.masked_fill(paths == PAD, 0).cumsum(1)
    got = pred.scores.gather(1, paths.clamp(min=0))
    torch.testing.assert_close(got.masked_fill(paths == PAD, 0), cum.exp().masked_fill(paths == PAD, 0))
    assert int((pred.scores > 0).sum()) == int((paths != PAD).sum())


def test_decode_given_continues_below_the_given_node_with_children_softmax() -> None:
    model = build("guo_rnn", VAR)
    x = images(4)
    given = torch.tensor([VAR.index("a"), VAR.index("b"), VAR.index("z"), VAR.index("c")])
    with torch.no_grad():
        outputs = model(x)
        pred = model.decode_given(outputs, given)
        free = model.decode(outputs)
    assert pred.paths[:, 0].tolist() == [VAR.index("a"), VAR.index("b"), VAR.index("b"), VAR.index("c")]
    assert bool(model.tables.is_ancestor(given, pred.nodes).all())
    # the given prefix's nodes score what the decoder gives them, as the dense oracle over the whole path does
    with torch.no_grad():
        assert_prefix_scores(pred, dense_steps(model, outputs, pred.paths)[0])
    assert free.paths.shape[0] == 4


@pytest.mark.parametrize("name", list(HEADS))
def test_a_few_training_steps_lower_the_children_softmax_loss(name: str) -> None:
    model = build(name, VAR).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = images(8), torch.tensor([VAR.index(n) for n in ["1", "2", "y", "q", "w", "5", "c", "x"]])
    losses = training_losses(model, x, y, opt, 15)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", list(HEADS))
def test_scheduled_sampling_under_children_softmax_trains_and_drops_off_path_steps(name: str) -> None:
    model = build(name, VAR, scheduled_sampling=1.0).train()
    y = torch.tensor([VAR.index(n) for n in ["1", "2", "q", "w"]])
    loss = model.loss(model(images(4)), y)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.out.weight.grad is not None and torch.isfinite(model.out.weight.grad).all()


def test_training_touches_only_the_candidates_output_rows() -> None:
    # the cost is O(Σ fan-out): rows of the output layer outside the steps' candidates get no gradient
    model = build("guo_rnn", VAR).train()
    y = torch.tensor([VAR.index("1")])  # root → a → x → 1 → end: candidates a, b, c; x, y; 1, 2; then the end
    model.loss(model(images(1)), y).backward()  # alone after a leaf, whose probability is 1 (no gradient)
    touched = set((model.out.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1).tolist())
    assert touched == {VAR.index(n) for n in ["a", "b", "c", "x", "y", "1", "2"]}


# ----------------------------------------------------------------------------- dhnn_rnn: each node at its own level
@pytest.mark.parametrize("seed", range(3))
def test_sibling_log_softmax_is_the_dense_masked_one(seed: int) -> None:
    tax = random_tree(30, seed)
    parent = tree_tables(tax).parent
    x = torch.randn(5, tax.num_nodes, generator=torch.Generator().manual_seed(seed)) * 4
    siblings = parent[1:, None] == parent[None, 1:]  # (N, N): the oracle, tiny trees only
    want = x[:, 1:] - torch.logsumexp(x[:, None, 1:].masked_fill(~siblings, float("-inf")), 2)
    got = sibling_log_softmax(x, parent)
    torch.testing.assert_close(got[:, 1:], want)
    assert bool((got[:, 0] == 0).all())


def rnn(**kw):
    torch.manual_seed(0)
    return create_model("dhnn_rnn", FIXED, **SMALL, input_size=8, hidden_size=16, pool_fallback="project",
                        step_softmax="children", **kw).eval()


def rnn_oracle(model, h: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)``: node n's logit at its level's step, log-softmaxed among its siblings with a dense mask."""
    tables = model.tables
    logits = F.pad(model.out(h), (1, 0))  # (B, T, N+1)
    z = logits[:, (tables.depth - 1).clamp(min=0), torch.arange(FIXED.num_nodes)]
    siblings = tables.parent[1:, None] == tables.parent[None, 1:]
    return F.pad(z[:, 1:] - torch.logsumexp(z[:, None, 1:].masked_fill(~siblings, float("-inf")), 2), (1, 0))


def test_dhnn_rnn_children_loss_and_decoding_match_the_dense_oracle() -> None:
    model = rnn()
    x, targets = images(9), torch.tensor([n for n in range(1, FIXED.num_nodes)])[:9]
    with torch.no_grad():
        outputs = model(x)
        node_lp = rnn_oracle(model, outputs["h"])
        levels = model.tables.encode_levels(targets)
        per = -node_lp.gather(1, levels.clamp(min=0)).masked_fill(levels == IGNORE, 0)
        torch.testing.assert_close(model.loss(outputs, targets), model._weighted(per, (levels != IGNORE).float()))
        pred = model.predict(x)
        leaves = torch.tensor(FIXED.leaves)
        path_lp = prefix_logprob(model.tables, node_lp)
        best = leaves[path_lp[:, leaves].argmax(1)]
        assert pred.nodes.tolist() == best.tolist()
        torch.testing.assert_close(pred.path_prob.log(), path_lp.gather(1, best[:, None])[:, 0])
        torch.testing.assert_close(model.path_logprob(outputs, pred.paths), pred.path_prob.log())
        torch.testing.assert_close(pred.scores[:, 1:], path_lp[:, 1:].exp())  # each node's exact marginal
        model.set_beam_width(3)
        assert model.predict(x).nodes.tolist() == best.tolist()  # the best path also wins a beam of 3 here


def test_dhnn_rnn_children_softmax_trains_and_refuses_what_reads_every_score() -> None:
    model = rnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = images(6), torch.tensor(FIXED.leaves)
    losses = training_losses(model, x, y, opt, 15)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="children is not available with residual"):
        rnn(residual=True)
    plain = create_model("dhnn_rnn", FIXED, **SMALL, input_size=8, hidden_size=16, pool_fallback="project",
                         residual=True)  # auto: full here (a small tree, and the residual arc)
    assert plain.children_softmax is None
