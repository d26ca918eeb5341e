"""The post-hoc step builds each split's end-class distribution once and shares it (hiervision.distributions)."""

from __future__ import annotations

import pytest
import torch

from hiervision import bayes, decisions, distributions, marginals, metrics, posthoc
from hiervision.decoding import Prediction
from hiervision.distributions import EndDistribution, end_distribution, node_marginals
from hiervision.taxonomy import Taxonomy

LEAVES = (4, 5, 6, 7, 8)


@pytest.fixture
def tree() -> Taxonomy:
    t = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B", "H": "C"})
    assert t.leaves == LEAVES
    return t


def toy(tree: Taxonomy, n: int, seed: int) -> tuple[Prediction, torch.Tensor]:
    """Overconfident flat-style predictions: leaf logits sharpened ×3 against truth drawn from the unsharpened ones."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.full((n, tree.num_nodes), float("-inf"))
    logits[:, list(LEAVES)] = torch.randn(n, len(LEAVES), generator=gen) * 1.5
    truth = torch.multinomial(logits.softmax(1), 1, generator=gen).squeeze(1)
    q = (logits * 3).softmax(1)
    return Prediction(tree.encode_paths(q.argmax(1)), node_marginals(q, tree), q.max(1).values), truth


@pytest.mark.parametrize("temperature", [1.0, 2.5, (0.7, 1.8, 1.2)])
def test_end_distribution_object_matches_the_function_bit_for_bit(tree, temperature):
    pred, _ = toy(tree, 300, 3)
    dist = EndDistribution(pred, tree)
    q = end_distribution(pred, tree, temperature=temperature)
    assert torch.equal(dist.q(temperature), q)
    assert torch.equal(dist.node_marginals(temperature), node_marginals(q, tree))
    assert dist.q(temperature) is dist.q(temperature)  # kept, not rebuilt
    assert len(dist) == 300


@pytest.mark.parametrize("per_level", [False, True])
def test_posthoc_report_builds_each_distribution_once(tree, tmp_path, monkeypatch, per_level):
    """One report reads val and test at temperature 1 and the fitted one: at most those 4 distributions are
    pushed down the tree (the real work, marginals.end_distribution), not one per rule, metric and target."""
    calls = {"marginals": 0, "torch": 0}

    def counting(where, fn):
        def wrapped(*args, **kwargs):
            calls[where] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(marginals, "end_distribution", counting("marginals", marginals.end_distribution))
    monkeypatch.setattr(bayes, "end_distribution", counting("marginals", bayes.end_distribution))
    torch_entry = counting("torch", distributions.end_distribution)
    for module in (distributions, decisions, metrics):  # every name the torch entry point is called by
        monkeypatch.setattr(module, "end_distribution", torch_entry)
    val, val_t = toy(tree, 500, 1)
    test, test_t = toy(tree, 500, 2)
    model = torch.nn.Module()
    model.register_buffer("temperature", torch.tensor(1.0))
    rep = posthoc.posthoc_report(model, val, val_t, test, test_t, tree, tmp_path, targets=(0.9, 0.95, 0.99),
                                 decode="bayes:path_accuracy", per_level=per_level)
    assert len(rep["hedged"]) == 3 and set(rep["crm"]) == {"argmax", "crm", "bayes:hf1", "bayes:hf1:inner"}
    assert calls["marginals"] <= 4, calls  # was 17
    assert calls["torch"] <= calls["marginals"]


def test_posthoc_report_numbers_match_the_one_off_functions(tree):
    """The shared distributions give the numbers each function gives on a raw prediction."""
    val, val_t = toy(tree, 400, 1)
    test, test_t = toy(tree, 400, 2)
    model = torch.nn.Module()
    model.register_buffer("temperature", torch.tensor(1.0))
    rep = posthoc.posthoc_report(model, val, val_t, test, test_t, tree, targets=(0.9,), decode="crm")
    t = rep["temperature"]
    assert rep["hedged"][0] == decisions.evaluate_hedging(val, val_t, test, test_t, tree, 0.9, t)
    assert rep["test"]["ece"] == metrics.evaluate(decisions.calibrate(test, tree, t, "crm"), test_t, tree)["ece"]
    assert rep["calibration"]["after"] == metrics.calibration_report(end_distribution(test, tree, temperature=t),
                                                                     test_t, tree)
