"""Decisions the user controls: the roll-up at their thresholds (hiervision.rollup) and answers restricted to a
subtree or a class list (hiervision.restrict), by hand and through the torch, runtime and CLI front ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hiervision.cli import main
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
from hiervision.decisions import calibrate
from hiervision.export import sidecar, torch_engine
from hiervision.marginals import node_marginals
from hiervision.models.registry import create_model
from hiervision.records import TreeView
from hiervision.restrict import Allowed, restrict_q, restricted_marginals
from hiervision.rollup import Thresholds, check_ranks, climb, trace
from hiervision.runtime import Predictor, beam_search
from hiervision.training import train

# root -> Animals(1), Plants(2); Animals -> Dogs(3), Cats(4); Dogs -> Beagle(5), Pug(6); Cats -> Siamese(7);
# Plants -> Rose(8)
TREE = TreeView(names=("root", "Animals", "Plants", "Dogs", "Cats", "Beagle", "Pug", "Siamese", "Rose"),
                parents=(-1, 0, 0, 1, 1, 3, 3, 4, 2))
Q = np.array([[0, 0, 0, 0, 0, 0.41, 0.35, 0.14, 0.10]])  # Beagle 0.41, Dogs 0.76, Animals 0.90
M = node_marginals(Q, TREE)
META = {"in_chans": 1, "image_size": [28, 28], "mean": [0.286], "std": [0.353]}
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 28, "backbone_kwargs": {"width": 0.25}}


@pytest.mark.parametrize(("min_prob", "levels", "stop"), [
    (None, "3=0.8,2=0.6", "Dogs"),     # the species only above 0.8, else the genus above 0.6
    (None, "3=0.8,2=0.8", "Animals"),  # else the level above (threshold 0 there)
    (0.95, None, "root"),              # nothing on the path is that sure
    (0.4, None, "Beagle"),             # the answer itself meets it
    (0.5, "1=0.0", "Dogs"),            # a per-level value wins over the global one
    (0.0, "3=1.0,2=1.0,1=1.0", "root"),
])
def test_the_climb_stops_at_the_deepest_node_that_meets_its_threshold(min_prob, levels, stop):
    th = Thresholds.of(TREE, min_prob, levels)
    node = int(climb(M, np.array([5]), TREE, th)[0])
    assert TREE.names[node] == stop
    if levels:  # the same thresholds by rank name
        named = levels.replace("3=", "species=").replace("2=", "genus=").replace("1=", "kingdom=")
        assert Thresholds.of(TREE, min_prob, named, ranks=("kingdom", "genus", "species")) == th
    assert (trace(M[0], 5, TREE, th)["node"] or "root") == stop


def test_the_trace_says_where_and_why_it_stopped():
    t = trace(M[0], 5, TREE, Thresholds.of(TREE, None, "3=0.8,2=0.6"))
    assert t["why"] == "stopped at Dogs: Beagle 0.41 < 0.80"
    assert t["path"] == ["Animals", "Dogs"] and t["stopped"] and t["depth"] == 2
    assert [s["met"] for s in t["trace"]] == [True, True, False]
    assert [s["threshold"] for s in t["trace"]] == [0.0, 0.6, 0.8]
    reached = trace(M[0], 5, TREE, Thresholds.of(TREE, 0.3))
    assert reached["why"] == "reached Beagle: 0.41 ≥ 0.30" and not reached["stopped"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: Thresholds.of(TREE, 1.5), "--min-prob: a probability threshold must lie in [0, 1]"),
    (lambda: Thresholds.of(TREE, float("nan")), "--min-prob: a probability threshold must lie in [0, 1]"),
    (lambda: Thresholds.of(TREE, None, "4=0.5"), "--min-prob-at: level 4 does not exist; this tree's levels are 1..3"),
    (lambda: Thresholds.of(TREE, None, "0=0.5"), "levels start at 1"),
    (lambda: Thresholds.of(TREE, None, "2=0.5,2=0.6"), "level 2 is given twice"),
    (lambda: Thresholds.of(TREE, None, "two=0.5"), "'two' is neither a level (1 = under the root) nor a rank (this"),
    (lambda: Thresholds.of(TREE, None, "genus=0.5", ranks=("kingdom", "family", "species")),
     "'genus' is neither a level (1 = under the root) nor a rank (kingdom, family, species)"),
    (lambda: check_ranks(("a", "b", "c", "d"), TREE), "data.ranks: names 4 ranks, but the tree has 3 levels"),
    (lambda: check_ranks(("a", "a"), TREE), "data.ranks: a rank is named twice"),
    (lambda: Allowed.of(TREE, within="Wolf,Dogs,Fox"), "--within: not in the tree: 'Wolf', 'Fox'"),
    (lambda: Allowed.of(TREE, class_names=["Dogs"]), "'Dogs' is not an end class"),
    (lambda: Allowed.of(TREE, within="Cats", class_names=["Beagle"]), "leaves no end class to answer"),
])
def test_bad_thresholds_and_names_are_one_line(call, message):
    with pytest.raises(ValueError, match=".*") as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_class_file_with_unknown_or_duplicate_names_is_one_line(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("\ufeffBeagle\n# my list\n\nSiamese\nBeagle\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'Beagle' is listed twice"):
        Allowed.of(TREE, classes=f)
    f.write_text("Beagle\nUnicorn\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the tree: 'Unicorn'"):
        Allowed.of(TREE, classes=f)
    f.write_text("Animals/Dogs/Beagle\nRose\n", encoding="utf-8")  # a path names a class too
    assert np.flatnonzero(Allowed.of(TREE, classes=f).ends).tolist() == [5, 8]


def test_the_restricted_distribution_is_renormalised_over_the_allowed_classes():
    allowed = Allowed.of(TREE, within="Cats,Plants")
    q = restrict_q(Q, allowed)
    assert np.allclose(q[0, [7, 8]], [0.14 / 0.24, 0.10 / 0.24]) and q[0, [5, 6]].sum() == 0
    assert allowed.reach.tolist() == [True, True, True, False, True, False, False, True, True]
    m = node_marginals(q, TREE)
    assert m[0, 3] == 0 and np.isclose(m[0, 1], 0.14 / 0.24)



def test_restricted_marginals_read_on_demand_equal_the_dense_ones():
    rng = np.random.default_rng(0)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, 200)]  # a random tree, node ids in any order
    tree = TreeView(names=tuple(f"n{i}" for i in range(200)), parents=tuple(parents))
    leaves = np.flatnonzero(tree.end_mask("leaves"))
    allowed = Allowed.of(tree, class_names=[f"n{i}" for i in leaves[::3]])
    q = rng.random((4, 200)) * tree.end_mask("leaves")
    q[1, allowed.ends] = 0  # no mass on the allowed classes: spread evenly, as restrict_q does
    dense = node_marginals(restrict_q(q, allowed), tree)
    lazy = restricted_marginals(q[:, allowed.order], allowed)
    assert np.allclose(np.stack([np.asarray(m) for m in lazy]), dense, atol=1e-12)
    assert all(np.isclose(m[v], dense[r, v]) for r, m in enumerate(lazy) for v in (0, 5, int(leaves[0])))

def _flat(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("flat", fashion_mnist_taxonomy(), **SMALL).eval()


def test_restricted_flat_answers_the_argmax_over_the_allowed_classes_in_torch_and_the_runtime():
    tax = fashion_mnist_taxonomy()
    model = _flat()
    images = torch.rand(64, 1, 28, 28)
    allowed = Allowed.of(tax.view, within="Shoes,Bottoms")
    pred = model.predict((images - 0.286) / 0.353)
    probs = pred.scores  # flat: complete node marginals
    want = torch.where(torch.from_numpy(allowed.ends), probs, torch.tensor(-1.0)).argmax(1)
    got = calibrate(pred, tax, 1.0, "argmax", allowed)
    assert torch.equal(got.nodes, want)
    renormalised = probs.gather(1, want[:, None])[:, 0] / probs[:, allowed.ends].sum(1)
    assert torch.allclose(got.path_prob, renormalised, atol=1e-5)
    records = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model)).predict_arrays(
        images.numpy(), allowed=allowed)
    assert [r["path_ids"][-1] for r in records] == want.tolist()
    assert np.allclose([r["path_probability"] for r in records], got.path_prob.numpy(), atol=1e-5)
    rows = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model)).predict_arrays(
        images.numpy(), allowed=allowed, node_scores=True)
    assert np.allclose([r["node_scores"] for r in rows], got.scores.numpy(), atol=1e-5)
    assert all(r["allowed"] == {"description": "within Shoes, Bottoms", "classes": 4} for r in records)


def test_a_head_whose_inner_nodes_hold_mass_is_restricted_the_same_in_torch_and_the_runtime():
    tax = fashion_mnist_taxonomy()
    torch.manual_seed(2)
    model = create_model("soft_max_margin", tax, **SMALL).eval()  # a softmax over every node: not leaf marginals
    images = torch.rand(32, 1, 28, 28)
    allowed = Allowed.of(tax.view, within="Tops,Shoes")
    got = calibrate(model.predict((images - 0.286) / 0.353), tax, 1.0, "argmax", allowed)
    records = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model)).predict_arrays(
        images.numpy(), allowed=allowed)
    assert [r["path_ids"][-1] for r in records] == got.nodes.tolist()
    assert np.allclose([r["path_probability"] for r in records], got.path_prob.numpy(), atol=1e-5)


@pytest.mark.parametrize("rule", ["crm", "bayes:hf1", "bayes:hf1:inner"])
def test_decision_rules_answer_inside_the_restriction_and_the_runtime_agrees(rule):
    tax = fashion_mnist_taxonomy()
    model = _flat(1)
    images = torch.rand(32, 1, 28, 28)
    allowed = Allowed.of(tax.view, within="Tops,Shoes")
    got = calibrate(model.predict((images - 0.286) / 0.353), tax, 1.0, rule, allowed).nodes
    assert allowed.reach[got.numpy()].all()
    if not rule.endswith("inner"):
        assert allowed.ends[got.numpy()].all()
    records = Predictor(sidecar={**sidecar(model, META), "decode": rule}, engine=torch_engine(model)).predict_arrays(
        images.numpy(), allowed=allowed)
    assert [r["path_ids"][-1] for r in records] == got.tolist()
    assert all(r["decode"] == rule for r in records)  # each record names the rule that answered it


def test_the_runtime_rollup_matches_the_climb_on_its_own_marginals():
    tax = fashion_mnist_taxonomy()
    model = _flat(2)
    images = torch.rand(16, 1, 28, 28)
    th = Thresholds.of(tax.view, 0.5, "3=0.7")
    records = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model)).predict_arrays(
        images.numpy(), node_scores=True, thresholds=th)
    m = model.predict((images - 0.286) / 0.353).scores.double().numpy()
    want = climb(m, np.array([r["path_ids"][-1] for r in records]), tax.view, th)
    assert [r["rollup"]["path_ids"][-1] if r["rollup"]["path_ids"] else 0 for r in records] == want.tolist()


@pytest.mark.parametrize("variant", [("guo_rnn", {"embed_size": 8, "hidden_size": 16, "decode": "beam"}),
                                     ("dhnn_s2s", {"conversion": "pool", "pool_fallback": "project", "input_size": 16,
                                                   "hidden_size": 16, "feed": "output", "decode": "beam"})])
def test_path_decoders_search_only_allowed_paths(variant):
    name, cfg = variant
    tax = fashion_mnist_taxonomy()
    torch.manual_seed(0)
    model = create_model(name, tax, **SMALL, **cfg).eval()
    allowed = Allowed.of(tax.view, within="Accessories,Dresses")
    records = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), top_k=3).predict_arrays(
        np.random.RandomState(0).rand(24, 1, 28, 28).astype(np.float32), allowed=allowed)
    for r in records:
        assert allowed.ends[r["path_ids"][-1]]
        assert all(allowed.ends[alt["path_ids"][-1]] for alt in r["top_k"])


def test_masked_beam_search_never_enters_a_subtree_without_an_allowed_class():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(TREE.num_nodes), size=(6, 4)))  # (B, steps, N+1)
    allowed = Allowed.of(TREE, class_names=["Pug", "Rose"])
    rep = np.repeat(lp, 3, axis=0)
    paths, scores, _ = beam_search(TREE, lambda tokens, t: (rep[:, t], t + 1), 6, 3, "leaves", 4, 0, allowed=allowed)
    for row, sc in zip(paths, scores):
        for p, s in zip(row, sc):
            if np.isfinite(s):
                assert [int(n) for n in p if n > 0][-1] in (6, 8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hiervision.config import load_config

    cfg = load_config(overrides=["data={name: synthetic, n_train: 320, n_test: 256, size: 16, "
                                 "ranks: [orientation, group, shape]}",
                                 "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
                                 "train.epochs=2", "train.batch_size=64", "train.progress=false", "train.amp=none",
                                 "eval.batch_size=256", "eval.min_prob=0.3", "eval.within=horizontal"])
    out = tmp_path_factory.mktemp("run") / "run"
    train(cfg, out)
    return out


def test_evaluate_reports_rollup_restriction_hAURC_and_a_guaranteed_threshold(tiny_run, tmp_path, capsys):
    assert main(["evaluate", str(tiny_run), "--min-prob-at", "group=0.5", "--target-accuracy", "0.8",
                 "--confidence", "0.9", "--device", "cpu", "--report", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "risk_coverage.png").stat().st_size > 0
    out = json.loads(capsys.readouterr().out)
    assert out["rollup"]["thresholds"] == {"1": 0.3, "2": 0.5, "3": 0.3}  # the run's eval.min_prob fills the rest
    assert out["allowed"]["description"] == "within horizontal" and out["allowed"]["skipped"] > 0
    assert set(out["selective"]) == {"argmax", "climbing", "climbing_t1", "crm", "bayes:hf1", "darts"}
    assert all(0 <= c["area"] <= 1 for c in out["selective"].values())
    g = out["guaranteed"]
    assert g["target_accuracy"] == 0.8 and 0 <= g["misses"]["miss_rate"] <= 1 and "reached" in g
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics["selective"]) == set(out["selective"])


def test_predict_applies_the_runs_defaults_and_flags_override_them(tiny_run, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(img)
    assert main(["predict", str(tiny_run), str(img)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["allowed"]["description"] == "within horizontal" and rec["path"][0] == "horizontal"
    assert rec["rollup"]["trace"][0]["threshold"] == 0.3
    assert main(["predict", str(tiny_run), str(img), "--within", "vertical", "--min-prob", "0.9",
                 "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "rollup_why" in rows[0] and rows[1].startswith(f"{img},vertical > ")
    assert main(["predict", str(tiny_run), str(img), "--within", "Nowhere"]) == 1
    assert "--within: not in the tree: 'Nowhere'" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(img), "--min-prob-at", "shape=0.99"]) == 0  # by the run's ranks
    assert json.loads(capsys.readouterr().out)["rollup"]["trace"][2]["threshold"] == 0.99
    assert main(["predict", str(tiny_run), str(img), "--min-prob-at", "genus=0.5"]) == 1
    assert "nor a rank (orientation, group, shape)" in capsys.readouterr().err


def test_an_export_carries_the_defaults_and_a_bad_sidecar_value_is_one_line(tiny_run, tmp_path):
    from hiervision.runtime import load_sidecar

    onnx = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run), "--out", str(onnx)]) == 0
    side = json.loads(onnx.with_suffix(".json").read_text())
    assert side["within"] == ["horizontal"] and side["min_prob"] == 0.3
    assert side["ranks"] == ["orientation", "group", "shape"]
    assert Predictor(onnx, thresholds=None).ranks == ("orientation", "group", "shape")
    side["within"] = ["Nowhere"]
    onnx.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="key 'within': not in the tree: 'Nowhere'"):
        load_sidecar(onnx)
