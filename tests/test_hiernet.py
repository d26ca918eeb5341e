"""HierNet (Tempfli & Sándor): grouping by confusion, the tree-shaped CNN, conditional vs routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FMNIST
from hiervision.cli import main
from hiervision.config import load_config, merge
from hiervision.data import build_data
from hiervision.data.base import move_to_tree
from hiervision.experiment import load_run
from hiervision.induce import confusion_probability_matrix, group_classes, induce_taxonomy
from hiervision.models import create_model
from hiervision.models.backbones import create_backbone
from hiervision.models.hiernet import AUTO_ROUTERS
from hiervision.taxonomy import Taxonomy
from hiervision.training import train

KW = dict(backbone="resnet20", in_chans=1, image_size=16, backbone_kwargs={"width": 0.25})


@pytest.fixture
def two_level() -> Taxonomy:
    return Taxonomy.from_paths(["g1/a", "g1/b", "g1/c", "g2/d", "g2/e", "f"])


@pytest.fixture
def deep() -> Taxonomy:
    return Taxonomy.from_paths(["x/p/1", "x/p/2", "x/q", "y/r/3", "y/r/4", "y/s/5/z"])


# ----------------------------------------------------------------------------- confusion and grouping
def test_cpm_rows_are_mean_predicted_distributions():
    probs = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.0, 0.5, 0.5]])
    cpm = confusion_probability_matrix(probs, torch.tensor([0, 0, 2, 1]), 3)
    torch.testing.assert_close(cpm, torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5], [0.1, 0.1, 0.8]],
                                                 dtype=torch.float64))
    with pytest.raises(ValueError, match="no validation samples of class 1"):
        confusion_probability_matrix(probs, torch.tensor([0, 0, 2, 2]), 3)


def _cpm() -> np.ndarray:
    """5 classes (binary-exact values): 0-1 confused (proximity 0.375), 2-3 (0.25), 1-2 a little (0.125), 4 alone."""
    cpm = np.zeros((5, 5))
    cpm[0, 1], cpm[1, 0] = 0.25, 0.125
    cpm[2, 3], cpm[3, 2] = 0.125, 0.125
    cpm[1, 2] = 0.125
    return cpm + np.eye(5) * 0.5


def test_grouping_merges_closest_pairs_under_both_constraints():
    cpm = _cpm()
    assert group_classes(cpm, p_min=0.05, g_max=4) == [[0, 1], [2, 3], [4]]  # {01}-{23}: 0.125 / 4 pairs
    assert group_classes(cpm, p_min=0.03, g_max=4) == [[0, 1, 2, 3], [4]]  # 0.03125 > p_min: merged
    assert group_classes(cpm, p_min=0.03, g_max=3) == [[0, 1], [2, 3], [4]]  # size 4 > g_max
    assert group_classes(cpm, p_min=0.03, g_max=1) == [[0], [1], [2], [3], [4]]
    assert group_classes(cpm, p_min=0.3, g_max=4) == [[0, 1], [2], [3], [4]]  # only 0.375 exceeds 0.3
    assert group_classes(cpm, p_min=0.375, g_max=4) == [[0], [1], [2], [3], [4]]  # must exceed, not equal
    assert group_classes(cpm, p_min=0.05, g_max=4, classes=[2, 3, 4]) == [[2, 3], [4]]


def test_recursive_grouping_makes_a_deeper_tree():
    names = ["a", "b", "c", "d", "e"]
    flat_groups = induce_taxonomy(_cpm(), names, p_min=0.05, g_max=4)
    assert flat_groups.render().count("group") == 2 and flat_groups.max_depth == 2
    tree = induce_taxonomy(_cpm(), names, p_min=[0.03, 0.2], g_max=[4, 2])
    assert tree.max_depth == 3
    assert tree.path_name(tree.index("group1/group1.1/a")) == "group1/group1.1/a"
    assert {tree.names[c] for c in tree.children[tree.index("group1/group1.2")]} == {"c", "d"}
    assert tree.parents[tree.index("e")] == 0  # a group of one is a class under its parent
    # a round that splits nothing adds no level
    same = induce_taxonomy(_cpm(), names, p_min=[0.05, 0.9], g_max=4)
    assert same.max_depth == 2


# ----------------------------------------------------------------------------- the network
def test_conditional_probabilities_sum_to_one_over_the_classes(two_level, deep):
    for tax in (two_level, deep):
        m = create_model("hiernet", tax, split=[4, 6] if tax is deep else 5, extra_blocks=2, **KW).eval()
        lp = m(torch.randn(5, 1, 16, 16))["node_logprob"]
        leaves = list(tax.leaves)
        torch.testing.assert_close(lp[:, leaves].exp().sum(1), torch.ones(5))
        # every inner node's probability is the sum of its children's (the product rule along paths)
        for n in range(1, tax.num_nodes):
            if tax.children[n]:
                torch.testing.assert_close(lp[:, n].exp(), lp[:, list(tax.children[n])].exp().sum(1))


def _confident(m, tax, choice: dict[int, int]) -> None:
    """Routers that always pick ``choice[node]`` (by a large bias)."""
    with torch.no_grad():
        for key, router in m.routers.items():
            router.fc.weight.zero_()
            router.fc.bias.zero_()
            router.fc.bias[list(tax.children[int(key)]).index(choice[int(key)])] = 20.0


def test_routing_follows_the_argmax_router_and_matches_conditional_when_confident(two_level):
    torch.manual_seed(0)
    m = create_model("hiernet", two_level, split=5, **KW).eval()
    images = torch.randn(8, 1, 16, 16)
    # routing = Algorithm 1: the root router's argmax child, then that group's argmax class
    root = m.routers["0"](m.trunk(images)).argmax(1)
    m.set_eval_mode("routing")
    pred = m.predict(images)
    kids = torch.tensor(two_level.children[0])
    assert torch.equal(pred.paths[:, 0], kids[root])
    for i, node in enumerate(kids[root].tolist()):
        if two_level.children[node]:
            x = m.edges[str(node)](m.trunk(images[i : i + 1]))
            best = m.routers[str(node)](x).argmax(1)
            assert pred.paths[i, 1] == two_level.children[node][int(best)]
    # confident routers: the product of probabilities peaks on the routed class, so both agree
    g2, e = two_level.index("g2"), two_level.index("g2/e")
    _confident(m, two_level, {0: g2, two_level.index("g1"): two_level.index("g1/a"), g2: e})
    routed = m.predict(images)
    m.set_eval_mode("conditional")
    assert torch.equal(m.predict(images).paths, routed.paths)
    assert bool((routed.nodes == e).all())


def test_routing_runs_one_route_per_image(two_level):
    m = create_model("hiernet", two_level, split=5, eval_mode="routing", **KW).eval()
    # a root router that sends image i to child i % 3 (class f, group g1, group g2)
    m.routers["0"].forward = lambda x: torch.eye(3)[torch.arange(len(x)) % 3] * 10
    seen: dict[str, int] = {}
    for key, edge in m.edges.items():
        edge.register_forward_hook(lambda mod, inp, out, key=key: seen.__setitem__(key, len(inp[0])))
    pred = m.predict(torch.randn(16, 1, 16, 16))
    routed = {key: int((pred.paths[:, 0] == int(key)).sum()) for key in m.edges}
    assert sorted(routed.values()) == [5, 5]  # 16 images: 6 to the class f, 5 down each group's branch
    assert seen == routed  # each branch ran on exactly its own images
    m.set_eval_mode("conditional")
    seen.clear()
    m.predict(torch.randn(16, 1, 16, 16))
    assert seen == dict.fromkeys(m.edges, 16)  # conditional evaluation runs every branch on every image


def _count(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def test_parameter_count_against_the_backbone(two_level):
    net = create_backbone("resnet20", in_chans=1, width=0.25)
    blocks = list(net.blocks)
    m = create_model("hiernet", two_level, split=5, extra_blocks=2, **KW)
    c9 = blocks[8].conv2.out_channels  # blocks 6-8 (the root router's extra ones too) share this width
    expected = (_count([net.stem, *blocks[:5]])  # trunk
                + 2 * _count(blocks[5:])  # one branch per group (g1, g2); class f needs none
                + _count(blocks[5:7]) + c9 * 3 + 3  # root router: 2 extra blocks, 3 children
                + c9 * 3 + 3 + c9 * 2 + 2)  # group routers at the end of the route: no extra blocks
    assert sum(p.numel() for p in m.parameters()) == expected


def test_transfer_copies_the_backbone_weights_exactly(two_level, tmp_path):
    torch.manual_seed(3)
    net = create_backbone("resnet20", in_chans=1, width=0.25)
    for p in net.parameters():
        p.data.normal_()
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    m = create_model("hiernet", two_level, split=5, extra_blocks=2, backbone="resnet20", in_chans=1, image_size=16,
                     backbone_kwargs={"width": 0.25, "pretrained_path": str(tmp_path / "backbone.pt")})
    blocks = list(net.blocks)

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert same(m.trunk[0], net.stem) and all(same(m.trunk[1 + i], blocks[i]) for i in range(5))
    assert len(m.edges) == 2
    for key in m.edges:
        assert all(same(m.edges[key][i], blocks[5 + i]) for i in range(4))
    assert all(same(m.routers["0"].extra[i], blocks[5 + i]) for i in range(2))
    # copies, not shared: training one branch leaves the other alone
    first, second = m.edges.values()
    assert first[0].conv1.weight.data_ptr() != second[0].conv1.weight.data_ptr()


def test_bad_split_and_backbone_give_clear_errors(two_level):
    with pytest.raises(ValueError, match="model.split"):
        create_model("hiernet", two_level, split=9, **KW)
    with pytest.raises(ValueError, match="stem"):
        create_model("hiernet", two_level, backbone="vgg16", in_chans=1, image_size=32)


# ----------------------------------------------------------------------------- branch_depth (big trees)
@pytest.fixture
def uneven() -> Taxonomy:
    """Depths 2-4 below a and b, a one-child node (u) inside b's sub-tree."""
    return Taxonomy.from_paths(["a/c", "a/d/x", "a/d/y", "b/e", "b/f/u/v", "b/f/w", "b/g", "h"])


def _reference_subtree(tax: Taxonomy, top: int, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Log-probability of the path from ``top`` to each node, one node at a time: a softmax over each
    node's siblings' logits, summed up its ancestors (the slow, obvious way)."""
    col = {n: i for i, n in enumerate(ids)}
    out = torch.zeros_like(logits)
    for i, n in enumerate(ids):
        node = n
        while node != top:
            sib = [col[c] for c in tax.children[tax.parents[node]]]
            out[:, i] += logits[:, col[node]] - torch.logsumexp(logits[:, sib], 1)
            node = tax.parents[node]
    return out


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_limited_hiernet_routes_the_top_and_classifies_each_sub_tree_below(uneven, depth):
    torch.manual_seed(0)
    m = create_model("hiernet", uneven, split=[4, 6], branch_depth=depth, **KW).eval()
    images = torch.randn(5, 1, 16, 16)
    lp = m(images)["node_logprob"]
    torch.testing.assert_close(lp[:, list(uneven.leaves)].exp().sum(1), torch.ones(5))
    for n in range(1, uneven.num_nodes):  # the product rule, through routers and sub-tree classifiers alike
        if uneven.children[n]:
            torch.testing.assert_close(lp[:, n].exp(), lp[:, list(uneven.children[n])].exp().sum(1))
    # a router only above branch_depth; each node at depth branch_depth - 1 with deeper nodes scores its sub-tree
    assert all(uneven.depth(int(k)) < depth for k in m.routers)
    frontier = {n for n in range(uneven.num_nodes) if uneven.depth(n) == depth - 1
                and any(uneven.children[c] for c in uneven.children[n])}
    assert {int(k) for k, r in m.routers.items() if hasattr(r, "ids")} == frontier
    for top in frontier:
        router, feats = m.routers[str(top)], torch.randn(5, 16, 2, 2)
        ids = router.ids.tolist()
        assert sorted(ids) == [n for n in range(1, uneven.num_nodes) if top == 0 or top in uneven.ancestors(n)]
        logits = router.fc(feats.mean(dim=(2, 3)))
        torch.testing.assert_close(router(feats), _reference_subtree(uneven, top, ids, logits))


@pytest.mark.parametrize("depth", [1, 2, None])
def test_depth_limited_routing_follows_the_best_child_at_every_node(uneven, depth):
    torch.manual_seed(1)
    m = create_model("hiernet", uneven, split=5, branch_depth=depth, **KW).eval()
    images = torch.randn(9, 1, 16, 16)
    lp = m(images)["node_logprob"]
    m.set_eval_mode("routing")
    pred = m.predict(images)
    for i in range(len(images)):
        node, route = 0, []
        while uneven.children[node]:  # a node's path log-prob ranks its siblings as its router does
            kids = list(uneven.children[node])
            node = kids[int(lp[i, kids].argmax())]
            route.append(node)
        assert [n for n in pred.paths[i].tolist() if n >= 0] == route
        torch.testing.assert_close(pred.scores[i, route], lp[i, route].exp())
        torch.testing.assert_close(pred.path_prob[i], lp[i, node].exp())


def test_branch_depth_auto_keeps_the_paper_on_small_trees_and_bounds_big_ones(two_level, deep):
    for tax in (two_level, deep):
        assert create_model("hiernet", tax, **KW).branch_depth is None
    # 255 groups of 2 under the root: 256 routers, still the paper; one more group and it is capped
    paths = [f"g{i}/{leaf}" for i in range(255) for leaf in "xy"]
    assert create_model("hiernet", Taxonomy.from_paths(paths), **KW).branch_depth is None
    wide = create_model("hiernet", Taxonomy.from_paths([*paths, "g255/x", "g255/y"]), **KW)
    assert AUTO_ROUTERS == 256 and wide.branch_depth == 1  # 256 branches would add 3 blocks each
    assert len(wide.routers) == 1 and len(wide.edges) == 0 and len(wide.trunk) == 1 + 9  # the whole backbone
    # one group on top with 300 below: its branch adds 3 of 9 blocks (≤ half), its 300 routers are too many
    tall = create_model("hiernet", Taxonomy.from_paths(["leaf", *(f"top/s{i}/{c}" for i in range(300) for c in "xy")]),
                        **KW)
    assert tall.branch_depth == 2 and set(tall.routers) == {"0", str(tall.taxonomy.index("top"))}
    for bad in (0, "deep", True, 1.5):
        with pytest.raises(ValueError, match="model.branch_depth"):
            create_model("hiernet", deep, branch_depth=bad, **KW)


def test_a_subtree_router_gives_the_same_log_probabilities_with_and_without_autograd(deep):
    """Without autograd its (M, B) passes run in place (the predict path at 10^5 nodes); they must not differ."""
    torch.manual_seed(0)
    model = create_model("hiernet", deep, branch_depth=1, **KW).eval()
    images = torch.rand(3, 1, 16, 16)
    with_grad = model(images)["node_logprob"]
    with torch.no_grad():
        without = model(images)["node_logprob"]
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), without)


def test_branch_depth_beyond_the_tree_is_the_paper(deep):
    torch.manual_seed(0)
    paper = create_model("hiernet", deep, split=[4, 6], extra_blocks=1, branch_depth=None, **KW)
    torch.manual_seed(0)
    deepest = create_model("hiernet", deep, split=[4, 6], extra_blocks=1, branch_depth=deep.max_depth, **KW)
    a, b = paper.state_dict(), deepest.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a short training run (~10 s on a shared CPU)
def test_depth_limited_hiernet_trains_saves_and_reloads(tiny_cfg, tmp_path):
    cfg = merge(tiny_cfg, {"train": {"epochs": 1}, "model": {"name": "hiernet", "branch_depth": 1, "split": 6}})
    metrics = train(cfg, tmp_path)
    assert metrics["valid_path_rate"] == 1.0 and 0 <= metrics["routing"]["path_accuracy"] <= 1
    model = load_run(tmp_path)[2]
    assert model.branch_depth == 1 and list(model.routers) == ["0"] and len(model.edges) == 0


# ----------------------------------------------------------------------------- data on an induced tree
def test_move_to_tree_relabels_by_class_name(tiny_cfg, tmp_path):
    data = build_data(tiny_cfg["data"])
    old = data.taxonomy
    ids = [old.external_ids[n] for n in old.leaves]  # synthetic leaves: names repeat, external ids do not
    tree = Taxonomy.from_parent_map({"A": None, "B": None, **{n: ("A" if i % 2 else "B") for i, n in enumerate(ids)}})
    moved = move_to_tree(data.train, tree)
    assert [tree.names[t] for t in moved.targets.tolist()] == [old.external_ids[t] for t in data.train.targets.tolist()]
    tree.save(tmp_path / "t.json")
    assert build_data({**tiny_cfg["data"], "tree": str(tmp_path / "t.json")}).taxonomy == tree
    with pytest.raises(ValueError, match="data.tree: the data's class .* is no end class of the tree"):
        move_to_tree(data.train, Taxonomy.from_paths(["x/y"]))
    # a larger tree (WordNet-like): its extra end classes are pruned away by default, kept on request
    bigger = Taxonomy.from_parent_map({"A": None, "B": None, "C": None, "extra": "C",
                                       **{n: ("A" if i % 2 else "B") for i, n in enumerate(ids)}})
    def paths(t):
        return sorted(t.path_name(n) for n in range(1, t.num_nodes))

    assert paths(move_to_tree(data.train, bigger).taxonomy) == paths(tree)
    kept = move_to_tree(data.train, bigger, unused="keep").taxonomy
    assert kept == bigger and "extra" in kept.names
    bigger.save(tmp_path / "big.json")
    assert paths(build_data({**tiny_cfg["data"], "tree": str(tmp_path / "big.json")}).taxonomy) == paths(tree)


@pytest.mark.slow
def test_induce_cli_and_hiernet_on_the_induced_tree(tiny_cfg, tmp_path):
    tiny_cfg = merge(tiny_cfg, {"data": {"val_fraction": 0.3}})  # the CPM needs validation images of every class
    train(tiny_cfg, tmp_path / "flat")
    out = tmp_path / "induced.json"
    assert main(["induce", str(tmp_path / "flat"), "--p-min", "0.01", "--g-max", "6", "--out", str(out),
                 "--plot", str(tmp_path / "tree.png")]) == 0
    tree, flat_tree = Taxonomy.load(out), load_run(tmp_path / "flat")[1]
    assert sorted(tree.external_ids[n] for n in tree.leaves) == sorted(flat_tree.external_ids[n]
                                                                       for n in flat_tree.leaves)
    assert (tmp_path / "tree.png").stat().st_size > 0
    cfg = merge(tiny_cfg, {"data": {"tree": str(out)},
                           "model": {"name": "hiernet", "split": 2, "extra_blocks": 1,
                                     "backbone_kwargs": {"width": 0.5,
                                                         "pretrained_path": str(tmp_path / "flat" / "best.pt")}}})
    metrics = train(cfg, tmp_path / "hiernet")
    assert {"routing", "eval_images_per_s"} <= set(metrics)
    assert 0 <= metrics["routing"]["path_accuracy"] <= 1 and metrics["valid_path_rate"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~90 s in a full run on a shared 2-core CPU: room for a busier one
@pytest.mark.skipif(not any(FMNIST.glob("train-images-idx3-ubyte*")), reason="real Fashion-MNIST not installed")
def test_short_real_training_run_learns(tmp_path):
    """Real Fashion-MNIST, given 3-level tree, HierNet from scratch: loss falls, routing far above chance."""
    cfg = load_config(overrides=[
        "data={name: fashion_mnist, limit_train: 3000, limit_test: 1000}",
        "model={name: hiernet, backbone: resnet20, backbone_kwargs: {width: 0.5}, split: [5, 7], extra_blocks: 1}",
        "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.progress=false", "train.amp=none",
        "train.augment={pad: 0, flip: false}",
    ])
    metrics = train(cfg, tmp_path)
    losses = [float(line.split(",")[2]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert losses[1] < losses[0]
    assert metrics["path_accuracy"] > 0.5 and metrics["routing"]["path_accuracy"] > 0.5
    assert metrics["routing"]["level_accuracy"][0] > 0.9  # the root router: Clothes vs Goods


def test_one_image_predicts_in_both_modes():
    """A single image (the server's and predict's common case) once failed: a one-child node copied its
    parent's column of the same (1, N+1) tensor in place."""
    from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
    from hiervision.models import create_model

    model = create_model("hiernet", fashion_mnist_taxonomy(), backbone="resnet20", backbone_kwargs={"width": 0.25},
                         in_chans=1, image_size=16, split=[5, 7]).eval()
    x = torch.randn(1, 1, 16, 16)
    for mode in ("conditional", "routing"):
        model.set_eval_mode(mode)
        assert model.predict(x).paths.shape[0] == 1
