import pytest
import torch
import torch.nn.functional as F

from hiervision.models import create_model, list_models


def _model(tree, **kw):
    torch.manual_seed(0)
    return create_model("flat", tree, backbone="resnet20", in_chans=1, **kw)


def test_registry():
    assert "flat" in list_models()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", None)


def test_leaf_loss_is_cross_entropy_and_inner_target_is_marginal(koo_tree):
    m = _model(koo_tree)
    x = torch.randn(4, 1, 16, 16)
    out = m(x)
    leaves = list(koo_tree.leaves)  # C, D, E, F, G
    targets = torch.tensor([leaves[0], leaves[3], leaves[4], leaves[1]])
    ce = F.cross_entropy(out["logits"], torch.tensor([0, 3, 4, 1]))
    assert m.loss(out, targets).item() == pytest.approx(ce.item(), rel=1e-5)
    # a coarse-only label (B) is trained by the probability mass of the leaves under it: E, F, G
    b = koo_tree.index("B")
    p = out["logits"].softmax(1)
    expected = -torch.log(p[:, 2:].sum(1)).mean()
    assert m.loss(out, torch.full((4,), b)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_predict_gives_valid_paths_with_marginal_scores(koo_tree):
    m = _model(koo_tree)
    pred = m.predict(torch.randn(8, 1, 16, 16))
    assert pred.paths.shape == (8, 2)
    for path in pred.paths.tolist():
        assert koo_tree.is_valid_path(path)
    # node score = sum of its leaves' probabilities; the levels each sum to one
    assert torch.allclose(pred.scores[:, [1, 2]].sum(1), torch.ones(8), atol=1e-5)
    assert torch.allclose(pred.scores[:, 3:].sum(1), torch.ones(8), atol=1e-5)
    assert torch.allclose(pred.path_prob, pred.scores.gather(1, pred.nodes[:, None]).squeeze(1))


def test_end_nodes_all_predicts_inner_nodes(koo_tree):
    m = _model(koo_tree, end_nodes="all")
    assert m.fc.out_features == 7
    out = m(torch.randn(3, 1, 16, 16))
    loss = m.loss(out, torch.tensor([1, 2, 7]))
    assert torch.isfinite(loss)


def test_multilabel_loss_uses_closed_sets_and_decodes_sets(koo_tree):
    m = _model(koo_tree, multi_label=True)
    out = m(torch.randn(2, 1, 16, 16))
    marks = torch.zeros(2, 8, dtype=torch.bool)
    marks[0, koo_tree.index("C")] = marks[0, koo_tree.index("G")] = True
    marks[1, koo_tree.index("E")] = True
    closed = koo_tree.close_upwards(marks).float()[:, 1:]
    expected = F.binary_cross_entropy_with_logits(out["logits"], closed)
    assert m.loss(out, marks).item() == pytest.approx(expected.item(), rel=1e-5)
    m.threshold.fill_(0.0)  # everything passes: the ends are the leaves
    pred = m.decode(out)
    assert pred.labels[:, list(koo_tree.leaves)].all() and not pred.labels[:, [0, 1, 2]].any()
