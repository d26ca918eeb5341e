"""Classes never seen: the open-world protocol (data.holdout_leaves) and the known–novel accuracy curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiervision.config import load_config
from hiervision.data import build_data
from hiervision.marginals import node_marginals
from hiervision.novelty import accuracies, climbing_curve, curve_summary
from hiervision.records import TreeView
from hiervision.rollup import Thresholds, climb

# root -> A(1), B(2); A -> A1(3), A2(4); A1 -> a(5), b(6); A2 -> c(7); B -> d(8), e(9)
TREE = TreeView(names=("root", "A", "B", "A1", "A2", "a", "b", "c", "d", "e"), parents=(-1, 0, 0, 1, 1, 3, 3, 4, 2, 2))
LEAVES = np.array([5, 6, 7, 8, 9])


def _brute(m, start, targets, novel, thetas):
    known, nov = [], []
    for th in thetas:
        answers = climb(m, start, TREE, Thresholds((0.0,) + (th,) * TREE.max_depth))
        right = answers == targets
        known.append(right[~novel].mean())
        nov.append(right[novel].mean())
    return np.array(known), np.array(nov)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exact_climbing_curve_equals_a_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    q = np.zeros((300, TREE.num_nodes))
    q[:, LEAVES] = rng.dirichlet(np.ones(5) * 0.5, size=300)
    m = node_marginals(q, TREE)
    start = LEAVES[q[:, LEAVES].argmax(1)]
    novel = rng.random(300) < 0.3
    targets = np.where(novel, rng.choice([1, 2, 3, 4], 300), rng.choice(LEAVES, 300))
    got = climbing_curve(m, start, targets, novel, TREE)
    grid = np.unique(np.concatenate([[0.0], m[m > 0].ravel(), np.nextafter(m[m > 0].ravel(), 2), [1.5]]))
    want = curve_summary(*_brute(m, start, targets, novel, grid))
    assert got["area"] == pytest.approx(want["area"], abs=1e-12)
    assert got["novel_at_50"] == want["novel_at_50"]


def test_hand_case_known_and_novel_accuracy():
    # one known image (truth a, sure of it) and one novel image (truth A1, unsure between a and b)
    q = np.zeros((2, TREE.num_nodes))
    q[0, 5], q[0, 8] = 0.9, 0.1
    q[1, 5], q[1, 6], q[1, 8] = 0.45, 0.35, 0.2
    m = node_marginals(q, TREE)
    start, targets, novel = np.array([5, 5]), np.array([5, 3]), np.array([False, True])
    c = climbing_curve(m, start, targets, novel, TREE)
    # θ in (0.45, 0.8]: the novel image stops at A1 (0.8) while the known one keeps a (0.9)
    assert c["novel_at_50"] == 1.0 and c["area"] == pytest.approx(1.0)
    acc = accuracies(np.array([5, 1]), targets, novel, TREE)  # the novel one answered at A: one edge too high
    assert acc == {"known": 1.0, "novel": 0.0, "novel_distance": 1.0}
    with pytest.raises(ValueError, match="needs both known and novel images"):
        accuracies(np.array([5, 1]), targets, np.array([False, False]), TREE)


def test_curve_summary_keeps_the_pareto_front_and_the_operating_points():
    s = curve_summary(np.array([0.9, 0.8, 0.5, 0.6, 0.0]), np.array([0.0, 0.3, 0.5, 0.2, 0.9]), at=0.8)
    assert s["known"] == [0.0, 0.5, 0.8, 0.9] and s["novel"] == [0.9, 0.5, 0.3, 0.0]
    assert s["novel_at_50"] == 0.5 and s["novel_at"] == 0.3
    assert s["area"] == pytest.approx(0.5 * (0.9 + 0.5) / 2 + 0.3 * (0.5 + 0.3) / 2 + 0.1 * 0.3 / 2)


def _fmnist(holdout, **extra):
    items = ", ".join(f"{k}: {v}" for k, v in {"holdout_leaves": holdout, "limit_train": 600, "limit_test": 300,
                                                **extra}.items())
    return build_data(load_config(overrides=[f"data={{name: fashion_mnist, {items}}}"])["data"])


def test_held_out_classes_leave_training_and_the_tree_and_their_test_images_answer_their_ancestor():
    d = _fmnist("[Shirt, Sandal]")
    names = d.taxonomy.names
    assert "Shirt" not in names and "Sandal" not in names and len(d.taxonomy.leaves) == 8
    for split in (d.train, d.val):
        assert all(int(t) in set(d.taxonomy.leaves) for t in split.targets)
    assert d.novel.sum() == 60 and len(d.novel) == len(d.test)  # 30 test images per class under limit_test
    assert {names[int(t)] for t in d.test.targets[d.novel]} == {"Tops", "Shoes"}
    assert all(int(t) in set(d.taxonomy.leaves) for t in d.test.targets[~d.novel])
    assert "2 of 10 classes held out" in d.note


def test_a_fraction_is_seeded_by_the_class_path_and_never_empties_a_group():
    a, b = _fmnist(0.3), _fmnist(0.3)
    assert a.taxonomy.names == b.taxonomy.names and len(a.taxonomy.leaves) == 7
    assert "Bag" in a.taxonomy.names  # Accessories' only class cannot go
    c = _fmnist(0.3, split_seed=5)
    assert c.taxonomy.names != a.taxonomy.names


@pytest.mark.parametrize(("holdout", "message"), [
    ("[Bag]", "empties the group 'Goods/Accessories'"),
    ("[Unicorn]", "data.holdout_leaves: 1 name(s) are no end class of the tree, e.g. 'Unicorn'"),
    ("1.5", "a fraction must lie in (0, 1), got 1.5"),
    ("0.6", "only 4 of the 6 classes asked for can go without emptying a group"),
    ("[]", "must be a fraction in (0, 1) or a list of class names"),
])
def test_a_bad_holdout_is_one_line(holdout, message):
    with pytest.raises(ValueError) as e:
        _fmnist(holdout)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_folder_holds_out_classes_too(tmp_path):
    from PIL import Image

    for path in ("Animals/Dogs/Beagle", "Animals/Dogs/Pug", "Animals/Cats/Siamese", "Animals/Cats/Tabby"):
        for i in range(6):
            (tmp_path / path).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / path / f"{i}.png")
    cfg = load_config(overrides=[f"data={{name: folder, root: {tmp_path}, holdout_leaves: [Pug], check: false, "
                                 "val_fraction: 0.0, test_fraction: 0.5}"])
    d = build_data(cfg["data"])
    assert "Pug" not in d.taxonomy.names and int(d.novel.sum()) == int((d.test.targets == d.taxonomy.names.index(
        "Dogs")).sum()) > 0
    assert not torch.isin(d.train.targets, torch.tensor([d.taxonomy.names.index("Dogs")])).any()


def test_a_run_with_held_out_classes_reports_the_open_world_in_metrics_and_evaluate(tmp_path, capsys):
    import json

    from hiervision.cli import main
    from hiervision.training import train

    cfg = load_config(overrides=["data={name: synthetic, n_train: 320, n_test: 256, size: 16, holdout_leaves: 0.3}",
                                 "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
                                 "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.amp=none"])
    train(cfg, tmp_path / "run")
    ow = json.loads((tmp_path / "run" / "metrics.json").read_text())["open_world"]
    assert ow["novel_images"] > 0 and ow["argmax"]["novel"] == 0.0
    assert 0 <= ow["climbing"]["area"] <= 1 and 0 <= ow["darts"]["area"] <= 1
    assert set(ow["bayes:hf1:inner"]) == {"known", "novel", "novel_distance"}
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["open_world"]["climbing"]["area"] == ow["climbing"]["area"]


def test_the_leave_one_out_loss_equals_the_softmax_without_each_subtree():
    from hiervision.models.registry import create_model
    from hiervision.taxonomy import Taxonomy

    tax = Taxonomy(list(TREE.names), list(TREE.parents))
    torch.manual_seed(0)
    model = create_model("hnd", tax, backbone="resnet20", in_chans=1, image_size=8, backbone_kwargs={"width": 0.25})
    logits = torch.randn(4, 9, dtype=torch.float64)  # column c: node c + 1; inner nodes are "novel under" classes
    targets = torch.tensor([5, 7, 9, 3])  # a, c, e and a coarse label A1
    got = model.leave_one_out(torch.log_softmax(logits, 1), targets)
    want = []
    for row, y in zip(logits, targets.tolist()):
        path = list(TREE.path(y))
        terms = []
        for parent, a in zip(path, path[1:]):  # a below depth 1: leave a's subtree out, answer "novel under parent"
            keep = [c for c in range(1, 10) if not TREE.is_ancestor(a, c)]
            terms.append(-torch.log_softmax(row[[c - 1 for c in keep]], 0)[keep.index(parent)])
        if terms:
            want.append(torch.stack(terms).mean())
    assert torch.allclose(got.double(), torch.stack(want).mean(), atol=1e-6)


def test_a_novelty_head_answers_novel_under_an_ancestor_in_metrics_and_the_runtime(tmp_path):
    import json

    from hiervision.cli import main
    from hiervision.records import mark_novel
    from hiervision.runtime import Predictor
    from hiervision.training import train

    rec = {"file": "x", "path": ["A", "A1"], "path_ids": [1, 3]}
    assert mark_novel(rec, TREE) == {**rec, "novel": True, "under": "A > A1"}
    assert mark_novel({**rec, "path": ["A", "A1", "a"], "path_ids": [1, 3, 5]}, TREE)["novel"] is False
    cfg = load_config(overrides=["data={name: synthetic, n_train: 320, n_test: 256, size: 16, holdout_leaves: 0.3}",
                                 "model={name: hnd, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
                                 "train.epochs=2", "train.batch_size=64", "train.progress=false", "train.amp=none"])
    train(cfg, tmp_path / "run")
    ow = json.loads((tmp_path / "run" / "metrics.json").read_text())["open_world"]
    curve = ow["novel_bias"]
    assert 0 <= curve["area"] <= 1 and set(ow) >= {"argmax", "climbing", "darts"}
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["decoder"] == {"kind": "exact", "end_nodes": "all", "novel": True}
    records = Predictor(tmp_path / "m.onnx").predict_arrays(np.random.default_rng(0).random((32, 3, 16, 16)))
    assert all(isinstance(r["novel"], bool) for r in records)
    assert all(("under" in r) == r["novel"] and (not r["novel"] or r["under"] == " > ".join(r["path"]))
               for r in records)
