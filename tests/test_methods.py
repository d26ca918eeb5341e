"""The training-time hierarchy-aware methods: HAFrame, HAF, Valmadre's soft max-margin and BiLT — their
parts by hand, then each trains a few steps, exports and predicts through the runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import training_losses
from hiervision.export import export_model, sidecar, torch_engine
from hiervision.models import create_model
from hiervision.models.bilt import path_cost
from hiervision.models.haf import unit_rows
from hiervision.models.haframe import hierarchy_aware_frame
from hiervision.runtime import Predictor
from hiervision.taxonomy import PAD, Taxonomy
from hiervision.tree.tables import carried_levels

FIXED = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f", "b/g"])
VARIABLE = Taxonomy.from_paths(["a/c/x", "a/c/y", "a/d", "b"])
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 16, "backbone_kwargs": {"width": 0.25}}
META = {"in_chans": 1, "image_size": [16, 16], "mean": [0.5], "std": [0.25]}
METHODS = ["haframe", "haf", "soft_max_margin", "bilt"]


def test_the_frame_has_the_trees_cosines():
    c, d, e, f, g = (FIXED.index(n) for n in "cdefg")
    leaves = torch.tensor([c, d, e, f, g])
    dist = torch.tensor([[FIXED.heights[FIXED.lca(int(a), int(b))] for b in leaves] for a in leaves]).double()
    frame, sim = hierarchy_aware_frame(dist.numpy(), gamma=2.0)
    np.testing.assert_allclose(frame @ frame.T, sim, atol=1e-9)  # exactly the cosines asked for
    np.testing.assert_allclose(np.linalg.norm(frame, axis=1), 1.0, atol=1e-9)
    assert sim[2, 3] > sim[0, 2]  # siblings (e, f) closer than cousins (c, e)
    # the widest separation: the next value on the authors' grid is no longer positive semi-definite
    decay = np.exp(-2 * dist.numpy() / 2)
    s_min = (sim[0, 2] - decay[0, 2]) / (1 - decay[0, 2])  # cosine = (1 − s)·decay + s
    grid = np.linspace(-1 / 4, -1, 100)
    nxt = grid[np.searchsorted(-grid, -s_min) + 1]
    assert np.linalg.eigvalsh((1 - s_min) * decay + s_min).min() >= -1e-6
    assert np.linalg.eigvalsh((1 - nxt) * decay + nxt).min() < -1e-6
    assert np.array_equal(hierarchy_aware_frame(dist.numpy())[0], frame)  # seeded: reproducible


def test_haframe_loss_is_cross_entropy_plus_the_cosine_pull():
    torch.manual_seed(0)
    model = create_model("haframe", FIXED, **SMALL)
    targets = torch.tensor([FIXED.leaves[0], FIXED.leaves[3]])
    z = 3 * model.frame[[0, 3]]  # features on their class vectors: the cosine term is 0
    out = {"logits": z @ model.frame.T, "features": z}
    ce = F.cross_entropy(out["logits"], torch.tensor([0, 3]))
    assert model.loss(out, targets) == pytest.approx(0.6 * float(ce), rel=1e-5)
    z2 = 3 * model.frame[[1, 3]]  # the first image's feature on the wrong class vector
    out2 = {"logits": z2 @ model.frame.T, "features": z2}
    aux = float((model.frame_cosines[1] - model.frame_cosines[0]).square().sum()) / 2
    ce2 = F.cross_entropy(out2["logits"], torch.tensor([0, 3]))
    assert model.loss(out2, targets) == pytest.approx(0.6 * float(ce2) + 0.4 * aux, rel=1e-5)
    assert not any(p is model.frame for p in model.parameters())  # fixed, not trained
    with pytest.raises(ValueError, match="training batch of one"):  # batch norm in the head: one clear line
        model.train()(torch.rand(1, 1, 16, 16))
    assert model.eval()(torch.rand(1, 1, 16, 16))["logits"].shape == (1, 5)
    assert "frame" not in model.state_dict()  # the tree gives it again: checkpoints carry no copy


def test_haframe_refuses_a_tree_too_big_for_its_dense_frame(monkeypatch):
    monkeypatch.setattr("hiervision.models.haframe.MAX_FRAME_CLASSES", 4)
    with pytest.raises(ValueError, match=r"model haframe: 5 classes; its frame is a dense C x C matrix"):
        create_model("haframe", FIXED, **SMALL)


def test_haframe_holds_its_transformation_head_in_the_flat_slot_and_loads_runs_saved_before():
    torch.manual_seed(0)
    model = create_model("haframe", FIXED, **SMALL).eval()
    assert isinstance(model.fc, torch.nn.Sequential) and not hasattr(model, "transform")
    old = {k.replace("fc.", "transform.", 1) if k.startswith("fc.") else k: v for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    again = create_model("haframe", FIXED, **SMALL).eval()
    again.load_state_dict(old)  # strict: every key found under its new name
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(again(x)["logits"], model(x)["logits"])


def test_haf_keeps_every_level_on_small_trees_and_bounds_its_heads_on_big_ones():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from scale import random_tree

    small = create_model("haf", VARIABLE, **SMALL)
    assert len(small.coarse) == len(carried_levels(VARIABLE))  # the paper: a head per level
    big = random_tree(3000)
    levels = carried_levels(big)
    model = create_model("haf", big, **SMALL)
    k = len(model.coarse)
    assert 1 <= k < len(levels) and 4 * sum(len(v) for v in levels[:k]) <= len(big.leaves) < 4 * sum(
        len(v) for v in levels[: k + 1])
    assert len(create_model("haf", big, coarse_levels=None, **SMALL).coarse) == len(levels)
    two = create_model("haf", big, coarse_levels=2, **SMALL)
    assert len(two.coarse) == 2 and bool((two.up2 >= 0).all())  # the fine head pairs with level 2
    with pytest.raises(ValueError, match="model.coarse_levels must be a whole number"):
        create_model("haf", big, coarse_levels=0, **SMALL)


def test_haf_level_reduction_mean_divides_the_level_terms_by_the_number_of_coarse_heads():
    torch.manual_seed(0)
    summed = create_model("haf", VARIABLE, **SMALL).train()
    mean = create_model("haf", VARIABLE, level_reduction="mean", **SMALL).train()
    mean.load_state_dict(summed.state_dict())
    images, targets = torch.rand(4, 1, 16, 16), torch.tensor(VARIABLE.leaves)
    outs = summed(images)
    ce = summed.class_loss(F.log_softmax(outs["logits"].float(), dim=1), targets)
    k = len(summed.coarse)
    assert k == 2  # two coarse levels: the mean halves what the levels add to the cross-entropy
    assert float(mean.loss(outs, targets) - ce) == pytest.approx(float(summed.loss(outs, targets) - ce) / k, rel=1e-5)
    with pytest.raises(ValueError, match="model.level_reduction must be 'sum' or 'mean'"):
        create_model("haf", VARIABLE, level_reduction="max", **SMALL)


def test_haf_unit_rows_is_f_normalize_with_a_written_out_backward():
    x = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unit_rows(x.clone().requires_grad_()), F.normalize(x, dim=1))  # the same forward, bit for bit
    assert torch.autograd.gradcheck(unit_rows, (x.clone().requires_grad_(),))


def test_haf_levels_carry_shallow_leaves_and_partition_the_leaves():
    levels = carried_levels(VARIABLE)
    a, b, c, d = (VARIABLE.index(n) for n in "abcd")
    assert levels == [sorted([a, b]), sorted([c, d, b])]  # b, a leaf at depth 1, stands for itself at depth 2
    model = create_model("haf", VARIABLE, **SMALL)
    assert len(model.coarse) == 2
    for lv in (1, 2):
        assert bool((getattr(model, f"up{lv}") >= 0).all())
    x, y = VARIABLE.index("x"), VARIABLE.index("y")
    assert model.label2[torch.tensor([x, y, b, a])].tolist() == [levels[1].index(c)] * 2 + [levels[1].index(b), -1]


def test_soft_max_margin_loss_hand_case():
    model = create_model("soft_max_margin", FIXED, **SMALL)
    n = FIXED.num_nodes - 1  # one output per node but the root
    c, a = FIXED.index("c"), FIXED.index("a")
    logits = torch.zeros(1, n)
    # incorrect margin, τ = 5: c and its ancestor a are right (0), the other 5 nodes wrong (1)
    assert model.loss({"logits": logits}, torch.tensor([c])) == pytest.approx(math.log(2 + 5 * math.exp(5)))
    coarse = model.loss({"logits": logits}, torch.tensor([a]))  # a coarse target: only a itself is right
    assert coarse == pytest.approx(math.log(1 + 6 * math.exp(5)))
    deep = create_model("soft_max_margin", FIXED, margin="depth_dist", margin_tau=1.0, **SMALL)
    # from c: a 1, c 0, d 2, b 3, e f g 4 edges
    assert deep.loss({"logits": logits}, torch.tensor([c])) == pytest.approx(
        math.log(math.e + 1 + math.exp(2) + math.exp(3) + 3 * math.exp(4)))
    # the answer is a leaf even where an inner node holds the most mass; scores are subtree sums
    logits = torch.full((1, n), -10.0)
    logits[0, a - 1], logits[0, c - 1] = 5.0, 1.0
    pred = model.decode({"logits": logits})
    assert pred.paths[0].tolist() == [a, c] and float(pred.scores[0, a]) == pytest.approx(1.0, abs=1e-3)


def test_bilt_costs_are_half_the_tree_path_rounded_up():
    model = create_model("bilt", VARIABLE, **SMALL)
    x, y, d, b = (VARIABLE.index(n) for n in "xydb")
    nodes = torch.tensor([x, y, d, b])
    lca = model.tables.lca(nodes.unsqueeze(1), nodes.unsqueeze(0))
    # x–y siblings (2 edges), x–d 3 edges, x–b 4 edges (x c a root b), d–b 3 edges
    assert path_cost(model.tables.depth, lca, nodes.unsqueeze(1), nodes.unsqueeze(0)).tolist() == [
        [0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 2], [2, 2, 2, 0]]
    fine = model.classes.tolist()
    cost = model.levels[0].tree_cost
    assert cost[fine.index(x), fine.index(y)] == 1 and cost[fine.index(x), fine.index(b)] == 2
    # levels fine → coarse: the leaves, then depth 2 (b carried down), then depth 1
    assert [len(level.mix) for level in model.levels] == [4, 3, 2]
    assert model.label1[torch.tensor([x, b])].tolist() == [sorted([VARIABLE.index("c"), d, b]).index(
        VARIABLE.index("c")), sorted([VARIABLE.index("c"), d, b]).index(b)]
    with pytest.raises(ValueError, match="training batch of one"):
        model.train()(torch.rand(1, 1, 16, 16))


def test_bilt_rescoring_starts_as_minus_the_expected_cost_and_its_loss_adds_the_levels():
    torch.manual_seed(0)
    model = create_model("bilt", FIXED, rescore_weight=0.0, **SMALL).eval()
    base = torch.randn(3, 5)
    p = base.softmax(1)
    expected_cost = p @ model.levels[0].tree_cost.T  # (B, C): each answer's expected path cost
    fine = model.levels[0]
    assert torch.allclose(fine.rescore(base, 0.0, fine.neighbours()), -expected_cost, atol=1e-6)
    # β > 0 at the start: every other class's probability, through uniform unit rows (1/√(C − 1) each)
    assert torch.allclose(fine.rescore(base, 0.5, fine.neighbours()), 0.5 * (1 - p) / 2 - expected_cost, atol=1e-6)
    # no smoothing, coarse levels weighted e^-60 ≈ 0: the loss is the base CE plus the re-scored CE
    bare = create_model("bilt", FIXED, smoothing=0.0, level_decay=60.0, **SMALL).train()
    targets = torch.tensor([FIXED.leaves[0], FIXED.leaves[3], FIXED.leaves[4]])
    idx = torch.tensor([0, 3, 4])
    out = bare.forward_head(torch.randn(3, bare.backbone.num_features))
    want = F.cross_entropy(out["base_logits"], idx) + F.cross_entropy(out["logits"], idx)
    assert float(bare.loss(out, targets).detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # the soft targets: most mass on the class, then its sibling, then its cousins
    level = bare.levels[0]
    t = F.softmax(-(level.tree_cost[0] - 0.5 * level.neighbours()[0]), dim=0)
    assert t[0] > t[1] > t[2] and torch.allclose(t[2:], t[2].expand(3))
    with pytest.raises(ValueError, match="model.smoothing must lie in"):
        create_model("bilt", FIXED, smoothing=2.0, **SMALL)


def trained(name: str, tax: Taxonomy) -> torch.nn.Module:
    """A few steps of SGD on 16 fixed images: the loss must fall."""
    torch.manual_seed(0)
    model = create_model(name, tax, **SMALL)
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([tax.leaves[i % len(tax.leaves)] for i in range(16)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = training_losses(model, x, y, opt, 12)
    assert losses[-1] < losses[0]
    return model.eval()


def assert_runtime_predicts_as_the_model(model: torch.nn.Module, predictor: Predictor) -> None:
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pred = model.predict((images - 0.5) / 0.25)
    records = predictor.predict_arrays(images.numpy())
    assert [r["path_ids"] for r in records] == [[int(n) for n in row if n != PAD] for row in pred.paths]
    assert [r["path_probability"] for r in records] == pytest.approx(pred.path_prob.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("tax", [FIXED, VARIABLE], ids=["fixed", "variable"])
def test_each_method_learns_and_predicts_through_the_runtime(name, tax):
    model = trained(name, tax)
    assert_runtime_predicts_as_the_model(model, Predictor(sidecar=sidecar(model, META), engine=torch_engine(model)))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_each_method_exports_to_onnx(name, tmp_path):
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason="the [export] extra is not installed")
    model = trained(name, VARIABLE)
    export_model(model, META, tmp_path / "m.onnx")
    assert_runtime_predicts_as_the_model(model, Predictor(tmp_path / "m.onnx", threads=1))
