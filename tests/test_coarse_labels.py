"""Labels at any level train every head: an image labelled only with an inner node ("a dog", breed unknown)
moves each registered head towards that node — the flat family by the marginal likelihood of the node (the
sum of its end classes' probabilities), the path decoders on the known prefix of the path. ``data.coarsen``
makes such labels from full ones for measuring it."""

from __future__ import annotations

import pytest
import torch

from hiervision.config import load_config
from hiervision.data import build_data
from hiervision.distributions import end_distribution, node_marginals
from hiervision.models import list_models
from test_models import FIXED, VARIABLE, build, images, supports

# (tree, a coarse label, another inner node off its path): trained on one or the other from the same start
CASES = [pytest.param(name, tax, tax.names.index(node), tax.names.index(other), id=f"{name}-{tid}-{node}")
         for name in list_models()
         for tax, tid, node, other in ((FIXED, "fixed", "b", "a"), (VARIABLE, "variable", "c", "d"))
         if supports(name, tax)]


def _marginal(model, x, node: int) -> float:
    with torch.no_grad():
        q = end_distribution(model.predict(x), model.taxonomy)
    return float(node_marginals(q, model.taxonomy)[:, node].mean())


def _trained_on(name, tax, label: int, x) -> torch.nn.Module:
    # trained in eval mode: batch norm's running statistics would otherwise make 25 steps' predictions differ
    # from the training ones for reasons that have nothing to do with the labels
    model = build(name, tax).eval()
    targets = torch.full((len(x),), label)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(25):
        loss = model.loss(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("name,tax,node,other", CASES)
def test_coarse_labels_move_every_head_towards_the_labelled_node(name, tax, node, other):
    """The same head from the same start, trained on images labelled only with an inner node or only with
    another one: the head's own loss of the first label must be clearly lower after the first; and where the
    head scores every class, the probability of the first node's subtree clearly higher. (A comparison, not a
    before/after; and a path decoder's probabilities of nodes off its decoded path are no measure: they share
    what its own path leaves.)"""
    x = images()
    on, off = _trained_on(name, tax, node, x), _trained_on(name, tax, other, x)
    targets = torch.full((len(x),), node)
    with torch.no_grad():
        loss_on, loss_off = float(on.loss(on(x), targets)), float(off.loss(off(x), targets))
    assert loss_on < loss_off - 0.1, f"{name}: loss of {tax.names[node]} {loss_on:.3f} trained on it, {loss_off:.3f}"
    if on.decoder_settings()["kind"] not in ("beam", "beam_steps"):
        p_on, p_off = _marginal(on, x, node), _marginal(off, x, node)
        assert p_on > p_off + 0.3, f"{name}: P({tax.names[node]}) {p_on:.3f} trained on it, {p_off:.3f}"


def test_data_coarsen_replaces_a_seeded_fraction_by_random_proper_ancestors():
    cfg = load_config(overrides=["data={name: fashion_mnist, coarsen: 0.4, limit_train: 1000, limit_test: 100}"])
    d = build_data(cfg["data"])
    tax = d.taxonomy
    mask = d.train.coarse_mask
    assert abs(float(mask.float().mean()) - 0.4) < 0.02
    depths = tax.depth_tensor[d.train.targets[mask]]
    assert set(depths.tolist()) == {1, 2}  # both proper ancestors of a depth-3 class occur
    again = build_data(cfg["data"])
    assert torch.equal(again.train.targets, d.train.targets)
    with pytest.raises(ValueError, match="data.coarsen: a fraction must lie in"):
        build_data(load_config(overrides=["data={name: fashion_mnist, coarsen: 1.5, limit_train: 100}"])["data"])
