"""Training options of the autoregressive heads (guo_rnn, dhnn_s2s) for deep variable-length trees:
scheduled sampling, the end token's loss weight, per-step level weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiervision.decoding import next_token_mask, scheduled_feed, tree_tables
from hiervision.models import create_model
from hiervision.taxonomy import EOS, IGNORE, Taxonomy


@pytest.fixture
def fixed_tree() -> Taxonomy:
    return Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y/3", "b/z/4", "b/z/5", "b/w/6"])


@pytest.fixture
def var_tree() -> Taxonomy:
    return Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y", "b/z/4/q", "b/w"])


def _guo(tax: Taxonomy, **kw):
    torch.manual_seed(0)
    return create_model("guo_rnn", tax, backbone="resnet20", in_chans=1, image_size=16,
                        backbone_kwargs={"width": 0.25}, embed_size=8, hidden_size=16, **kw)


def _s2s(tax: Taxonomy, **kw):
    torch.manual_seed(0)
    return create_model("dhnn_s2s", tax, in_chans=1, image_size=16, conversion="linear",
                        backbone_kwargs={"width": 0.25}, input_size=16, hidden_size=16, **kw)


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def _targets(tax: Taxonomy) -> torch.Tensor:
    return torch.tensor(list(range(1, tax.num_nodes)))


# ----------------------------------------------------------------------------- scheduled_feed
def test_scheduled_feed_extremes_and_tree_restriction(koo_tree):
    logits = torch.zeros(3, koo_tree.num_nodes)
    logits[:, koo_tree.index("G")] = 5.0  # G is best overall, but only a child of B may follow B
    logits[:, koo_tree.index("C")] = 1.0
    logits[:, koo_tree.index("B")] = 2.0
    prev = torch.tensor([koo_tree.index("A"), koo_tree.index("B"), 0])
    tables = tree_tables(koo_tree)
    allowed = next_token_mask(tables, prev, tables.end_mask("leaves"))
    teacher = torch.tensor([9, 9, 9])
    assert torch.equal(scheduled_feed(logits, allowed, teacher, 0.0), teacher)
    own = scheduled_feed(logits, allowed, teacher, 1.0)
    # after A: its best child C (not G or B); after B: G; at the start: a level-1 node, B
    assert own.tolist() == [koo_tree.index(n) for n in ("C", "G", "B")]
    mixed = [scheduled_feed(logits, allowed, teacher, 0.5) for _ in range(20)]
    assert any((m == teacher).any() for m in mixed) and any((m == own).any() for m in mixed)


# ----------------------------------------------------------------------------- guo_rnn
@pytest.mark.parametrize("tree", ["fixed_tree", "var_tree"])
def test_guo_scheduled_sampling_p0_is_teacher_forcing(tree, request):
    tax = request.getfixturevalue(tree)
    plain, sampled = _guo(tax), _guo(tax, scheduled_sampling=0.0)
    x, y = _images(len(_targets(tax))), _targets(tax)
    torch.manual_seed(1)
    a = plain.loss(plain(x), y)
    torch.manual_seed(1)
    b = sampled.loss(sampled(x), y)
    assert torch.equal(a, b)
    # the step-by-step sampled unroll at p = 0 gives the teacher-forced logits too
    v = plain.eval()(x)["v"]
    tokens = plain._tokens(tax.encode_paths(y))
    logits, fed = plain.unroll_sampled(v, tokens, 0.0)
    torch.testing.assert_close(logits, plain.unroll(v, tokens))
    assert torch.equal(fed, tokens)


def test_guo_scheduled_sampling_p1_feeds_own_greedy_choices(fixed_tree):
    m = _guo(fixed_tree, scheduled_sampling=1.0).eval()
    x, y = _images(6), _targets(fixed_tree)[-6:]
    v = m(x)["v"]
    tokens = m._tokens(fixed_tree.encode_paths(y))
    logits, fed = m.unroll_sampled(v, tokens, 1.0)
    greedy = m.decode({"v": v}).paths  # decode: greedy, inside the tree
    assert torch.equal(fed[:, 1:], greedy[:, :-1])  # step t read the greedy choice of step t-1
    assert not torch.equal(fed, tokens)  # ... not the truth (an untrained head gets paths wrong)
    # and the loss under p = 1 in training is the loss of those logits against the true levels
    m.train()
    want = F.cross_entropy(logits.transpose(1, 2), fixed_tree.encode_levels(y), reduction="none").sum(1).mean()
    torch.testing.assert_close(m.loss({"v": v}, y), want)


def test_guo_end_weight_and_level_weights_by_hand(var_tree):
    x, y = _images(len(_targets(var_tree))), _targets(var_tree)
    base = _guo(var_tree, end_nodes="all")  # inner labels end their paths: every target has an end token
    steps = base.num_steps
    weights = [0.5 + t for t in range(steps)]
    m = _guo(var_tree, end_nodes="all", end_weight=3.0, level_weights=weights)
    v = base(x)["v"]
    base.eval(), m.eval()
    seq = var_tree.encode_sequence(y)
    logits = base.unroll(v, base._tokens(var_tree.encode_paths(y)))
    per = F.cross_entropy(logits.transpose(1, 2), seq, ignore_index=IGNORE, reduction="none")
    w = torch.tensor(weights).expand_as(per) * torch.where(seq == EOS, 3.0, 1.0)
    torch.testing.assert_close(m.loss({"v": v}, y), (per * w).sum(1).mean())
    assert not torch.isclose(m.loss({"v": v}, y), base.loss({"v": v}, y))
    with pytest.raises(ValueError, match="level_weights"):
        _guo(var_tree, level_weights=[1.0])
    with pytest.raises(ValueError, match="scheduled_sampling"):
        _guo(var_tree, scheduled_sampling=1.5)
    with pytest.raises(ValueError, match="end_weight"):
        _guo(var_tree, end_weight=-1)


@pytest.mark.slow
def test_guo_scheduled_sampling_trains(var_tree):
    """Gradients flow under p = 0.5 (the choice itself is detached) and the loss goes down."""
    m = _guo(var_tree, scheduled_sampling=0.5)
    x, y = _images(len(_targets(var_tree))), _targets(var_tree)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = m.loss(m(x), y)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


# ----------------------------------------------------------------------------- dhnn_s2s
def test_s2s_scheduled_sampling_p0_and_p1(var_tree):
    x, y = _images(len(_targets(var_tree))), _targets(var_tree)
    plain, p0 = _s2s(var_tree), _s2s(var_tree, scheduled_sampling=0.0)
    torch.testing.assert_close(p0.loss(p0(x), y), plain.loss(plain(x), y))
    m = _s2s(var_tree, scheduled_sampling=1.0, beam_width=1).eval()
    out = m(x)
    paths = var_tree.encode_paths(y)
    logits0, fed0 = m.sampled(out, paths, 0.0)
    torch.testing.assert_close(logits0, m._teacher_forced(out, paths))
    logits, fed = m.sampled(out, paths, 1.0)
    greedy = m.decode(out).paths  # beam width 1 = greedy inside the tree
    for row in range(len(y)):  # up to where the greedy path ends, step t read its choice at t-1
        n = int((greedy[row] >= 0).sum())
        assert fed[row, 1 : n + 1].tolist() == greedy[row, :n].tolist()[: fed.shape[1] - 1]
    m.train()
    m.dropout.p = 0.0
    seq = var_tree.encode_sequence(y)
    per = F.cross_entropy(logits.transpose(1, 2), seq, ignore_index=IGNORE, reduction="none")
    valid = (seq != IGNORE).float()
    want = ((per * valid).sum(0) / valid.sum(0).clamp(min=1)).sum()
    torch.testing.assert_close(m.loss(out, y), want)


def test_s2s_end_weight_by_hand(var_tree):
    x, y = _images(len(_targets(var_tree))), _targets(var_tree)
    base, m = _s2s(var_tree).eval(), _s2s(var_tree, end_weight=0.25).eval()
    out = base(x)
    seq = var_tree.encode_sequence(y)
    logits = base._teacher_forced(out, var_tree.encode_paths(y))
    per = F.cross_entropy(logits.transpose(1, 2), seq, ignore_index=IGNORE, reduction="none")
    per = per * torch.where(seq == EOS, 0.25, 1.0)
    valid = (seq != IGNORE).float()
    want = ((per * valid).sum(0) / valid.sum(0).clamp(min=1)).sum()
    torch.testing.assert_close(m.loss(out, y), want)
    with pytest.raises(ValueError, match="feed: label"):
        _s2s(var_tree, feed="output", scheduled_sampling=0.5)
