"""HiE (Jain et al., NeurIPS 2023): the amendment rule, the coarse classes on a variable-depth tree, and
that each of its two networks is trained by its own cross-entropy only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiervision.models import create_model
from hiervision.taxonomy import Taxonomy

SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 16, "backbone_kwargs": {"width": 0.25}}
VARIABLE = Taxonomy.from_paths(["a/c/x", "a/c/y", "a/d", "b"])


def build(tax: Taxonomy):
    torch.manual_seed(0)
    return create_model("hie", tax, **SMALL)


def test_the_answer_is_the_fine_softmax_times_the_parents_coarse_softmax_renormalised():
    tax = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f", "b/g"])
    model = build(tax).eval()
    out = model(torch.randn(3, 1, 16, 16))
    fine, coarse = out["fine"].softmax(1), out["coarse"].softmax(1)
    parent_col = {tax.index("a"): 0, tax.index("b"): 1}  # the groups in node order
    by_hand = torch.stack([fine[:, i] * coarse[:, parent_col[tax.parents[leaf]]]
                           for i, leaf in enumerate(model.classes.tolist())], 1)
    by_hand = by_hand / by_hand.sum(1, keepdim=True)
    torch.testing.assert_close(out["logits"].softmax(1), by_hand)
    pred = model.decode(out)
    assert pred.paths[:, -1].tolist() == model.classes[by_hand.argmax(1)].tolist()


def test_on_a_variable_depth_tree_the_coarse_classes_are_the_groups_of_sibling_leaves():
    model = build(VARIABLE)
    groups = {}
    for leaf, g in zip(model.classes.tolist(), model.leaf_group.tolist()):
        groups.setdefault(g, set()).add(VARIABLE.names[leaf])
    # a holds leaf d and the sub-tree c: nested parents, disjoint groups
    assert sorted(map(sorted, groups.values())) == [["b"], ["d"], ["x", "y"]]


def test_each_network_is_trained_by_its_own_cross_entropy_and_coarse_labels_by_their_marginal():
    model = build(VARIABLE).train()
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([VARIABLE.index(n) for n in ("a/c/x", "a/d", "b", "a")])  # the last is coarse-only
    out = model(x)
    loss = model.loss(out, t)
    fine_lp, coarse_lp = out["fine"].log_softmax(1), out["coarse"].log_softmax(1)
    col = {n: i for i, n in enumerate(model.classes.tolist())}
    group = model.leaf_group.tolist()
    leaves = [[VARIABLE.index("a/c/x")], [VARIABLE.index("a/d")], [VARIABLE.index("b")],
              [VARIABLE.index(p) for p in ("a/c/x", "a/c/y", "a/d")]]
    fine = -torch.stack([fine_lp[i, [col[n] for n in ls]].logsumexp(0) for i, ls in enumerate(leaves)]).mean()
    coarse = -torch.stack([coarse_lp[i, sorted({group[col[n]] for n in ls})].logsumexp(0)
                           for i, ls in enumerate(leaves)]).mean()
    torch.testing.assert_close(loss, fine + coarse)
    # no parameter is shared: the fine loss alone leaves the coarse network without a gradient
    model.zero_grad()
    F.nll_loss(model(x)["fine"].log_softmax(1), torch.tensor([col[n[0]] for n in leaves])).backward()
    assert all(p.grad is None for p in [*model.coarse_backbone.parameters(), *model.coarse_fc.parameters()])


def test_a_tree_with_one_parent_of_leaves_is_refused_in_one_line():
    with pytest.raises(ValueError, match="model hie: every leaf hangs from one parent") as err:
        build(Taxonomy.from_paths(["a", "b", "c"]))
    assert "\n" not in str(err.value)


def test_both_backbones_are_the_backbone_group():
    model = build(VARIABLE)
    groups = model.param_groups()
    n_backbone = sum(p.numel() for p in groups["backbone"])
    assert n_backbone == sum(p.numel() for p in model.backbone.parameters()) * 2
    assert {id(p) for p in groups["head"]} == {id(p) for p in [*model.fc.parameters(), *model.coarse_fc.parameters()]}


def test_precomputed_features_are_refused_in_one_line():
    from hiervision.config import ConfigError
    from hiervision.training import cached_features

    model = build(VARIABLE)
    with pytest.raises(ConfigError, match="train.precompute_features: model HiEClassifier does not run on one"):
        cached_features(model, None, 8, torch.device("cpu"), None)  # refused before any data is read
