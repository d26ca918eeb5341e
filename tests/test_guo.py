"""Guo et al.'s CNN-RNN framework: the LSTM with v at every gate, generators, CNN-RNN*, coarse-only data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import FMNIST
from hiervision.config import load_config, merge
from hiervision.data import build_data
from hiervision.data.base import coarsen_labels, split_fine_coarse
from hiervision.decoding import next_token_mask, tree_tables
from hiervision.distributed import DistEnv
from hiervision.experiment import load_run
from hiervision.metrics import valid_paths
from hiervision.models import create_model
from hiervision.models.backbones import create_backbone
from hiervision.models.guo import VisualLSTMCell
from hiervision.taxonomy import EOS, Taxonomy
from hiervision.training import pseudo_label, train

FEAT = 16


@pytest.fixture
def fixed_tree() -> Taxonomy:
    return Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y/3", "b/z/4", "b/z/5", "b/w/6"])


@pytest.fixture
def var_tree() -> Taxonomy:
    return Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y", "b/z/4/q", "b/w"])


def _rnn(tax: Taxonomy, **kw):
    torch.manual_seed(0)
    return create_model("guo_rnn", tax, backbone="resnet20", in_chans=1, image_size=16,
                        backbone_kwargs={"width": 0.25}, embed_size=8, hidden_size=16, **kw)


def _feats(n: int) -> torch.Tensor:
    return torch.randn(n, FEAT, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- the LSTM of eqs. 2-7
def test_cell_is_eqs_2_to_7_with_v_in_every_gate():
    torch.manual_seed(0)
    cell = VisualLSTMCell(5, 7, 4)
    x, v, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 4), torch.randn(3, 4)
    wx, wh, wv = (w.chunk(4, 0) for w in (cell.x2g.weight, cell.h2g.weight, cell.v2g.weight))
    b = cell.x2g.bias.chunk(4)
    pre = [x @ wx[k].T + h @ wh[k].T + v @ wv[k].T + b[k] for k in range(4)]  # i, f, o, g
    i, f, o, g = torch.sigmoid(pre[0]), torch.sigmoid(pre[1]), torch.sigmoid(pre[2]), torch.tanh(pre[3])
    c_ref = f * c + i * g
    h_ref = o * torch.tanh(c_ref)
    h_out, c_out = cell(x, (h, c), cell.visual(v))
    assert h_out.shape == (3, 4) and c_out.shape == (3, 4)
    torch.testing.assert_close(h_out, h_ref)
    torch.testing.assert_close(c_out, c_ref)
    # every gate has its own weights on v (4 blocks of H rows), and all of them receive gradient
    h_out.sum().backward()
    assert cell.v2g.weight.shape == (16, 7)
    for block in cell.v2g.weight.grad.chunk(4, 0):
        assert block.abs().sum() > 0


def test_v_enters_every_step_and_gradient_reaches_the_cnn(fixed_tree):
    m = _rnn(fixed_tree)
    v = _feats(4).requires_grad_()
    tokens = torch.zeros(4, 3, dtype=torch.long)
    logits = m.unroll(v, tokens)
    assert logits.shape == (4, 3, fixed_tree.num_nodes)
    # the last step's output depends on v directly, not only through the state carried from step 1:
    # with the recurrence cut (W_h = 0, no memory carried), v still moves step 3's output
    with torch.no_grad():
        m.cell.h2g.weight.zero_()
        m.cell.x2g.bias[m.cell.hidden_size: 2 * m.cell.hidden_size] = -1e4  # forget gate shut: no c carried
    out = m.unroll(v, tokens)[:, 2]
    (grad,) = torch.autograd.grad(out.sum(), v)
    assert grad.abs().sum() > 0
    # end to end: the loss reaches the backbone's first conv
    m = _rnn(fixed_tree)
    images = torch.randn(4, 1, 16, 16)
    m.loss(m(images), torch.tensor(fixed_tree.leaves[:4])).backward()
    assert m.backbone.stem[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- teacher forcing vs free running
def test_teacher_forcing_feeds_true_labels_free_running_feeds_its_own(fixed_tree):
    m = _rnn(fixed_tree).eval()
    v = _feats(6)
    targets = torch.tensor(fixed_tree.leaves)
    paths = fixed_tree.encode_paths(targets)
    # loss = eq. 8 on the logits of a run fed [start, y_1, y_2]
    logits = m.unroll(v, torch.cat([torch.zeros(6, 1, dtype=torch.long), paths[:, :2]], 1))
    ref = F.cross_entropy(logits.transpose(1, 2), paths, reduction="none").sum(1).mean()
    torch.testing.assert_close(m.loss({"v": v}, targets), ref)
    # greedy decoding: each step feeds back its own best child (the paper's argmax, kept inside the tree)
    pred = m.decode({"v": v})
    tables = tree_tables(fixed_tree)
    tok = torch.zeros(6, dtype=torch.long)
    state = m._zero_state(6, v)
    vg = m.cell.visual(v)
    manual = []
    for _ in range(fixed_tree.max_depth):
        state = m.cell(m.embed(tok), state, vg)
        tok = m.out(state[0]).masked_fill(~next_token_mask(tables, tok, tables.end_mask()), float("-inf")).argmax(1)
        manual.append(tok)
    assert torch.equal(pred.paths, torch.stack(manual, 1))
    # where the first predicted level is wrong, the two regimes see different inputs at step 2
    wrong = pred.paths[:, 0] != paths[:, 0]
    if wrong.any():
        free = m.unroll(v, torch.cat([torch.zeros(6, 1, dtype=torch.long), pred.paths[:, :2]], 1))
        assert not torch.allclose(free[wrong, 1], logits[wrong, 1])


def test_beam_is_at_least_as_likely_as_greedy(var_tree):
    v = _feats(8)
    greedy = _rnn(var_tree).eval().decode({"v": v})
    beam = _rnn(var_tree, decode="beam", beam_width=5).eval().decode({"v": v})
    assert bool((beam.path_prob >= greedy.path_prob - 1e-6).all())


# ----------------------------------------------------------------------------- variable length, end token
def test_variable_length_generation_stops_at_the_end_token_inside_the_tree(var_tree):
    """Overfit paths of lengths 2, 3 and 4 (and one stopping at an inner node with end_nodes=all)."""
    for end_nodes, labels in (("leaves", ["a/x/1", "a/y", "b/z/4/q", "b/w"]),
                              ("all", ["a/x/1", "a/y", "b/z", "b/w"])):
        m = _rnn(var_tree, end_nodes=end_nodes)
        assert m.end_token and m.num_steps == var_tree.max_depth + 1
        targets = torch.tensor([var_tree.index(name) for name in labels])
        v = torch.eye(4, FEAT) * 3
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        for _ in range(150):
            opt.zero_grad()
            m.loss({"v": v}, targets).backward()
            opt.step()
        pred = m.eval().decode({"v": v})
        assert torch.equal(pred.nodes, targets), end_nodes
        assert bool(valid_paths(pred.paths, var_tree).all())
        # the end token is what stops them: it is the most likely token right after each path
        steps = m.unroll(v, m._tokens(pred.paths)).argmax(-1)
        depth = var_tree.depth_tensor[targets]
        assert bool((steps[torch.arange(4), depth] == EOS).all())
    # an untrained model's paths are valid too, and end at leaves under end_nodes="leaves"
    pred = _rnn(var_tree).eval().decode({"v": _feats(32)})
    assert bool(valid_paths(pred.paths, var_tree).all())
    assert set(pred.nodes.tolist()) <= set(var_tree.leaves)


# ----------------------------------------------------------------------------- CNN-RNN*
@pytest.mark.parametrize("tree", ["fixed_tree", "var_tree"])
def test_cnn_rnn_star_paths_pass_through_the_given_label(tree, request):
    tax = request.getfixturevalue(tree)
    m = _rnn(tax).eval()
    v = _feats(len(tax.leaves))
    given = tax.path_matrix[torch.tensor(tax.leaves), 0]  # the true level-1 node of every leaf
    pred = m.decode_given({"v": v}, given)
    assert torch.equal(pred.paths[:, 0], given)
    assert bool(valid_paths(pred.paths, tax).all())
    # it is the greedy continuation from the given prefix: for a given level-2 node of the fixed tree,
    # the leaf is the most likely child after feeding start, level-1 node, given node
    if tree == "fixed_tree":
        mid = tax.path_matrix[torch.tensor(tax.leaves), 1]
        pred = m.decode_given({"v": v}, mid)
        logits = m.unroll(v, torch.stack([torch.zeros_like(mid), tax.path_matrix[mid, 0], mid], 1))[:, 2]
        children = next_token_mask(tree_tables(tax), mid, tree_tables(tax).end_mask())
        assert torch.equal(pred.paths[:, 2], logits.masked_fill(~children, float("-inf")).argmax(1))
        assert torch.equal(pred.paths[:, 1], mid)


def test_flat_and_multihead_condition_on_the_given_label(fixed_tree):
    images = torch.randn(6, 1, 16, 16)
    given = fixed_tree.path_matrix[torch.tensor(fixed_tree.leaves), 1]
    for name, kw in (("flat", {}), ("guo_multihead", {"strategy": "parallel"})):
        m = create_model(name, fixed_tree, backbone="resnet20", in_chans=1, image_size=16,
                         backbone_kwargs={"width": 0.25}, **kw)
        pred = m.predict_given(images, given)
        assert torch.equal(pred.paths[:, 1], given), name
    m = create_model("dhnn_rnn", fixed_tree, backbone="resnet20", in_chans=1, image_size=16,
                     backbone_kwargs={"width": 0.25}, conversion="linear", input_size=16, hidden_size=8)
    with pytest.raises(NotImplementedError, match="cannot condition"):
        m.predict_given(images, given)


# ----------------------------------------------------------------------------- masked loss (coarse-only labels)
def test_coarse_only_labels_train_only_their_levels(fixed_tree, var_tree):
    m = _rnn(fixed_tree)
    v = _feats(2).requires_grad_()
    leaf = fixed_tree.index("a/x/1")
    coarse = torch.tensor([fixed_tree.index("a"), fixed_tree.index("a")])
    # the loss of a level-1 label is the level-1 term of the full label's loss
    logits = m.unroll(v, torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(m.loss({"v": v}, coarse), F.cross_entropy(logits[:, 0], coarse))
    # and nothing pushes the finer outputs: the output layer's gradient comes from step 1 alone
    m.zero_grad()
    m.loss({"v": v}, coarse).backward()
    g_coarse = m.out.weight.grad.clone()
    m.zero_grad()
    F.cross_entropy(m.unroll(v, torch.zeros(2, 1, dtype=torch.long))[:, 0], coarse).backward()
    torch.testing.assert_close(g_coarse, m.out.weight.grad)
    assert m.loss({"v": v}, torch.tensor([leaf, leaf])) > m.loss({"v": v}, coarse)
    # on a variable-depth tree with paths ending at leaves, a coarse label does not teach "stop here"
    m = _rnn(var_tree)
    a = torch.tensor([var_tree.index("a")])
    logits = m.unroll(_feats(1), torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(m.loss({"v": _feats(1)}, a), F.cross_entropy(logits[:, 0], a))
    # multi-head: only the heads of the levels the label has
    mh = create_model("guo_multihead", fixed_tree, backbone="resnet20", in_chans=1, image_size=16,
                      backbone_kwargs={"width": 0.25})
    out = mh.forward_head(_feats(2))
    pos = fixed_tree.encode_level_positions(coarse)
    torch.testing.assert_close(mh.loss(out, coarse), F.cross_entropy(out["level1"], pos[:, 0]))


# ----------------------------------------------------------------------------- multi-head generators
def test_multihead_strategies_wire_the_layers_as_in_fig_2(fixed_tree):
    sizes = [len(level) for level in fixed_tree.levels]  # 2, 4, 6
    kw = dict(backbone="resnet20", in_chans=1, image_size=16, backbone_kwargs={"width": 0.25})
    feat = create_backbone("resnet20", in_chans=1, width=0.25).num_features
    ins = {"parallel": [feat] * 3, "coarse_to_fine": [feat, 2, 4], "fine_to_coarse": [4, 6, feat]}
    for strategy, expected in ins.items():
        m = create_model("guo_multihead", fixed_tree, strategy=strategy, **kw)
        assert [h.in_features for h in m.heads] == expected
        assert [h.out_features for h in m.heads] == sizes
        pred = m.predict(torch.randn(3, 1, 16, 16))
        assert pred.paths.shape == (3, 3)
    # independent per-level argmax may leave the tree; exact decoding never does
    m = create_model("guo_multihead", fixed_tree, decode="exact", **kw)
    assert bool(valid_paths(m.predict(torch.randn(16, 1, 16, 16)).paths, fixed_tree).all())
    # coarse-specific network: one head, paths stop at its level
    m = create_model("guo_multihead", fixed_tree, levels=[1], **kw)
    assert len(m.heads) == 1 and m.predict(torch.randn(2, 1, 16, 16)).paths.shape == (2, 1)
    with pytest.raises(ValueError, match="same depth"):
        create_model("guo_multihead", Taxonomy.from_paths(["a/b", "c"]), **kw)
    with pytest.raises(ValueError, match="strategy"):
        create_model("guo_multihead", fixed_tree, strategy="diagonal", **kw)


# ----------------------------------------------------------------------------- S_fine / S_coarse
def test_split_fine_coarse_is_disjoint_nested_and_keeps_true_labels(fixed_tree):
    targets = torch.tensor(fixed_tree.leaves * 50)
    n = len(targets)
    _, cut_mask = coarsen_labels(targets, fixed_tree, 0.5, 1, 7)
    keep, tgt, mask = split_fine_coarse(targets, fixed_tree, 0.2, 0.5, 1, 7)
    assert len(keep) == round(0.2 * n) + round(0.5 * n) and len(set(keep.tolist())) == len(keep)
    assert torch.equal(keep[mask], torch.nonzero(cut_mask).flatten())  # S_coarse = coarsen_labels' choice
    assert torch.equal(tgt[~mask], targets[keep][~mask])  # S_fine keeps its full labels
    assert bool((fixed_tree.depth_tensor[tgt[mask]] == 1).all())
    # the protocols see the same S_fine and S_coarse
    keep_drop, _, m_drop = split_fine_coarse(targets, fixed_tree, 0.2, 0.5, 1, 7, "drop")
    keep_true, t_true, m_true = split_fine_coarse(targets, fixed_tree, 0.2, 0.5, 1, 7, "oracle")
    assert torch.equal(keep_drop, keep[~mask]) and not m_drop.any()
    assert torch.equal(keep_true, keep) and torch.equal(t_true, targets[keep]) and not m_true.any()
    with pytest.raises(ValueError, match="fine_fraction"):
        split_fine_coarse(targets, fixed_tree, 0.6, 0.5, 1, 7)


def _partial_cfg(tiny_cfg, **data):
    return merge(tiny_cfg, {
        "data": {"fine_fraction": 0.3, "coarse_fraction": 0.5, "coarse_level": 2, **data},
        "model": {"name": "guo_rnn", "embed_size": 16, "hidden_size": 32},
        "train": {"epochs": 1, "grad_clip": 5.0},
    })


def test_pseudo_labels_are_written_only_for_s_coarse(tiny_cfg, tmp_path):
    cfg = _partial_cfg(tiny_cfg)
    data = build_data(cfg["data"])
    truth = build_data({**cfg["data"], "coarse_labels": "oracle"}).train.targets
    mask = data.train.coarse_mask
    assert mask.any() and not mask.all()
    new = pseudo_label(cfg, data, tmp_path / "round1", True, DistEnv(0, 1, 0, torch.device("cpu")), None)
    tax = data.taxonomy
    # S_fine's true labels untouched; every S_coarse label is now a leaf below its given coarse label
    assert torch.equal(new.train.targets[~mask], truth[~mask])
    assert torch.equal(new.train.coarse_mask, mask)
    pseudo, coarse = new.train.targets[mask], data.train.targets[mask]
    assert set(pseudo.tolist()) <= set(tax.leaves)
    assert bool(tax.ancestor_matrix[pseudo, coarse].all())
    # the first round saw S_fine only, and its accuracy against the held-back truth is recorded
    _, _, _, meta = load_run(tmp_path / "round1")
    report = json.loads((tmp_path / "round1" / "pseudo_labels.json").read_text())
    assert report["count"] == int(mask.sum())
    assert report["accuracy"] == pytest.approx(float((pseudo == truth[mask]).float().mean()))
    assert "S_coarse 0 " in json.loads((tmp_path / "round1" / "metrics.json").read_text())["data_note"]


def test_pseudo_label_run_end_to_end_and_its_errors(tiny_cfg, tmp_path):
    cfg = merge(_partial_cfg(tiny_cfg), {"train": {"pseudo_labels": True}, "eval": {"given_level": 2}})
    metrics = train(cfg, tmp_path)
    assert (tmp_path / "round1" / "best.pt").exists()
    assert "pseudo-labelled" in metrics["data_note"]
    assert metrics["given"]["level_accuracy"][:2] == [1.0, 1.0]  # CNN-RNN*: the given levels are right
    with pytest.raises(ValueError, match="pseudo_labels"):
        train(merge(tiny_cfg, {"train": {"pseudo_labels": True}}), tmp_path / "none")


# ----------------------------------------------------------------------------- pre-computed features
@pytest.mark.slow
def test_precomputed_features_train_only_the_head_from_a_run_checkpoint(tiny_cfg, tmp_path):
    train(tiny_cfg, tmp_path / "flat")  # a flat run: its best.pt is the CNN
    cfg = merge(tiny_cfg, {
        "model": {"name": "guo_rnn", "embed_size": 16, "hidden_size": 32,
                  "backbone_kwargs": {"width": 0.5, "pretrained_path": str(tmp_path / "flat" / "best.pt")}},
        "train": {"precompute_features": True, "epochs": 3, "optimizer": "adam", "lr": 0.01,
                  "feature_cache": str(tmp_path / "features")},  # not the user's own cache
    })
    metrics = train(cfg, tmp_path / "rnn")
    _, _, flat, _ = load_run(tmp_path / "flat")
    _, _, rnn, _ = load_run(tmp_path / "rnn")
    for (k, a), b in zip(flat.backbone.state_dict().items(), rnn.backbone.state_dict().values()):
        assert torch.equal(a, b), k  # frozen: weights and batch-norm statistics as loaded
    losses = [float(line.split(",")[2]) for line in (tmp_path / "rnn" / "log.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]  # the head learns on the cached features
    # (its accuracy against the flat run's own classifier is a benchmark question, not a test's: on this tiny
    # synthetic set both sit near chance and their order flips with the split)
    assert 0 <= metrics["node_accuracy"] <= 1 and metrics["valid_path_rate"] == 1.0
    # a head that reads stage maps cannot run on pooled features
    bad = merge(tiny_cfg, {"model": {"name": "dhnn_rnn", "conversion": "linear", "input_size": 16, "hidden_size": 8},
                           "train": {"precompute_features": True}})
    with pytest.raises(ValueError, match="precompute_features"):
        train(bad, tmp_path / "bad")


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
@pytest.mark.skipif(not any(FMNIST.glob("train-images-idx3-ubyte*")), reason="real Fashion-MNIST not installed")
def test_short_real_training_run_learns(tmp_path):
    """Real Fashion-MNIST, 3-level tree, CNN-RNN generator: loss falls, paths far above chance (10 %)."""
    cfg = load_config(overrides=[
        "data={name: fashion_mnist, limit_train: 3000, limit_test: 1000}",
        "model={name: guo_rnn, backbone: resnet20, backbone_kwargs: {width: 0.5}, embed_size: 32, hidden_size: 64}",
        "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.progress=false", "train.amp=none",
        "train.grad_clip=5.0", "train.augment={pad: 0, flip: false}", "eval.given_level=2",
    ])
    metrics = train(cfg, tmp_path)
    losses = [float(line.split(",")[2]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert losses[1] < losses[0]
    assert metrics["path_accuracy"] > 0.5 and metrics["level_accuracy"][0] > 0.9
    assert metrics["valid_path_rate"] == 1.0
    # CNN-RNN*: with the true level-2 group given, the fine class is at least as often right
    assert metrics["given"]["level_accuracy"][2] >= metrics["level_accuracy"][2]
