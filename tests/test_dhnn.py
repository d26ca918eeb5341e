"""DHNN (Koo et al.): conversions, CNN-RNN, CNN-S2S, alternating training, multi-label, a real run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import FMNIST
from hiervision import Taxonomy
from hiervision.config import load_config
from hiervision.data import _COMMON as COMMON_KEYS
from hiervision.data import DATASETS, build_data
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
from hiervision.evaluation import predict_dataset
from hiervision.experiment import load_run
from hiervision.metrics import select_threshold
from hiervision.models import create_model
from hiervision.models.backbones import create_backbone, list_backbones
from hiervision.models.conversion import (
    ConvConversion,
    LinearConversion,
    PoolConversion,
    StageSequence,
    conv_geometry,
    default_steps,
    pool_sizes,
)
from hiervision.taxonomy import PAD
from hiervision.training import train

SMALL = {"backbone_kwargs": {"width": 0.5}, "input_size": 64, "hidden_size": 64}


def _stage_shapes(name: str, size: int, in_chans: int = 3) -> list[tuple[int, int, int]]:
    net = create_backbone(name, in_chans=in_chans).eval()
    with torch.no_grad():
        return [tuple(m.shape[1:]) for m in net.forward_features(torch.zeros(1, in_chans, size, size))]


# ----------------------------------------------------------------------------- conversions
# every backbone stage the shipped configs use, at the configs' image sizes
STAGES = [("resnet20", 28), ("resnet20", 32), ("resnet50", 224), ("vgg16", 224)]


@pytest.mark.parametrize(("backbone", "size"), STAGES)
@pytest.mark.parametrize("p", [256, 512])
def test_conversions_give_p_values_for_every_stage(backbone, size, p):
    shapes = _stage_shapes(backbone, size)
    for s, shape in enumerate(shapes):
        maps = torch.randn(2, *shape)
        assert LinearConversion(shape, p, stage=s)(maps).shape == (2, p)
        assert ConvConversion(shape, p, stage=s)(maps).shape == (2, p)
        pool = PoolConversion(shape, p, fallback="project", stage=s)
        assert pool(maps).shape == (2, p)
        if p in pool_sizes(shape):  # the exact Appendix B pooling: no trainable weights
            assert pool.project is None and not list(pool.parameters())


@pytest.mark.parametrize("w", [1, 4, 7, 8, 14, 28, 32, 56])
@pytest.mark.parametrize("p", [16, 64, 96, 256, 1024])
def test_conv_geometry_follows_appendix_a(w, p):
    g = conv_geometry((8, w, w), p)
    out = (w - g["F"] + 2 * g["Z"]) // g["G"] + 1
    assert g["K"] * out * out == p  # the formula of App. A …
    conv = ConvConversion((8, w, w), p)
    assert conv(torch.randn(1, 8, w, w)).shape == (1, p)  # … and torch agree
    if g["case"] == 1:
        assert g["F"] == w and g["K"] == p
    elif g["case"] == 2:
        assert g["F"] == g["G"] and (w + 2 * g["Z"]) % g["F"] == 0
    else:
        assert g["G"] == 1 and g["Z"] == 0


def test_linear_conversion_is_the_n_mode_product():
    conv = LinearConversion((3, 5, 4), 24, mnv=(2, 3, 4))  # a: D=3, H=5, W=4
    a = torch.randn(2, 3, 5, 4)
    u1, u2, u3 = conv.u1.detach(), conv.u2.detach(), conv.u3.detach()
    # a ×1 U¹ ×2 U² (width) ×3 U³ (height), written out element by element
    want = torch.zeros(2, 2, 4, 3)  # (B, m, v, n) in torch's (C, H, W) order
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for k in range(4):
                    want[b, i, k, j] = sum(a[b, d, y, x] * u1[i, d] * u2[j, x] * u3[k, y]
                                           for d in range(3) for y in range(5) for x in range(4))
    assert torch.allclose(conv(a), want.flatten(1), atol=1e-5)
    with pytest.raises(ValueError, match="stage 0: linear conversion needs m·n·v = p"):
        LinearConversion((3, 5, 4), 24, mnv=(2, 3, 3))


def test_pool_conversion_appendix_b_and_its_error():
    # 16x32x32 → p = 16·(32/F)²: F = 8 gives 256, no weights
    pool = PoolConversion((16, 32, 32), 256)
    assert pool.window == 8 and pool(torch.randn(1, 16, 32, 32)).shape == (1, 256)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert PoolConversion((1, 4, 4), 4)(x).tolist() == [[5.0, 7.0, 13.0, 15.0]]  # 2x2 max pooling
    # 32 channels can never give 256 by pooling a 16x16 map (32·o² is never 256)
    with pytest.raises(ValueError, match=r"stage 1: no disjoint pooling .* p values that work for this stage: "
                                         r"32, 128, 512, 2048, 8192"):
        PoolConversion((32, 16, 16), 256, stage=1)
    with pytest.raises(ValueError, match="square"):
        PoolConversion((32, 16, 8), 256)


def test_stage_sequence_means_the_stages_of_each_step():
    torch.manual_seed(0)
    shapes = [(4, 8, 8), (8, 4, 4), (16, 2, 2)]
    seq = StageSequence(shapes, [[0, 1], [2]], p=16, kind="pool", pool_mode="avg", pool_fallback="project",
                        norm=False)
    maps = [torch.randn(2, *s) for s in shapes]
    u = seq(maps)
    g = {s: seq.convert[str(s)](maps[s]) for s in range(3)}
    assert u.shape == (2, 2, 16)
    assert torch.allclose(u[:, 0], (g[0] + g[1]) / 2) and torch.allclose(u[:, 1], g[2])
    seq.norm = True  # the default: each u_t standardised over its p values
    u = seq(maps)
    assert torch.allclose(u.mean(-1), torch.zeros(2, 2), atol=1e-5)
    assert torch.allclose(u.var(-1, unbiased=False), torch.ones(2, 2), atol=1e-2)
    with pytest.raises(ValueError, match="must increase"):
        StageSequence(shapes, [[1], [0, 2]], p=16, kind="linear")
    with pytest.raises(ValueError, match="stage 5 does not exist"):
        StageSequence(shapes, [[5]], p=16, kind="linear")
    assert default_steps(4, 3) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="3 steps need at least 3 backbone stages"):
        default_steps(2, 3)


# ----------------------------------------------------------------------------- CNN-RNN
@pytest.fixture
def fixed_tree() -> Taxonomy:
    return fashion_mnist_taxonomy(variable_depth=False)


@pytest.fixture
def var_tree() -> Taxonomy:
    return fashion_mnist_taxonomy(variable_depth=True)


def _valid(tax: Taxonomy, paths: torch.Tensor) -> bool:
    return all(tax.is_valid_path([n for n in p if n != PAD]) for p in paths.tolist())


def test_cnn_rnn_needs_a_fixed_depth_tree(var_tree):
    with pytest.raises(ValueError, match=r"needs every leaf at the same depth .* use dhnn_s2s"):
        create_model("dhnn_rnn", var_tree, in_chans=1, image_size=28)


def test_cnn_rnn_outputs_loss_and_exact_decoding(fixed_tree):
    torch.manual_seed(0)
    m = create_model("dhnn_rnn", fixed_tree, in_chans=1, image_size=28, conversion="linear",
                     num_layers=3, bidirectional=True, level_weights=[1, 1, 2], **SMALL)
    x = torch.randn(4, 1, 28, 28)
    out = m(x)
    assert out["logits"].shape == (4, 3, fixed_tree.num_nodes)  # one output over all nodes per level
    leaves = torch.tensor(fixed_tree.leaves[:4])
    loss = m.loss(out, leaves)
    # Σ_t w_t · CE(y_t, softmax(o_t)) written out
    levels = fixed_tree.encode_levels(leaves)
    ce = [torch.nn.functional.cross_entropy(out["logits"][:, t], levels[:, t]) for t in range(3)]
    assert loss.item() == pytest.approx((ce[0] + ce[1] + 2 * ce[2]).item(), rel=1e-5)
    m.eval()
    out = m(x)
    pred = m.decode(out)
    assert _valid(fixed_tree, pred.paths) and all(p[-1] in fixed_tree.leaves for p in pred.paths.tolist())
    # exact decoding is never worse than beam search, and a beam as wide as the leaves is exact
    m.decode_mode, m.beam_width = "beam", 1
    greedy = m.decode(out)
    m.beam_width = len(fixed_tree.leaves)
    full = m.decode(out)
    assert (pred.path_prob >= greedy.path_prob - 1e-6).all()
    assert torch.allclose(full.path_prob, pred.path_prob, atol=1e-6)


def test_cnn_rnn_coarse_targets_train_only_their_levels(fixed_tree):
    m = create_model("dhnn_rnn", fixed_tree, in_chans=1, image_size=28, conversion="conv", **SMALL)
    out = m(torch.randn(2, 1, 28, 28))
    top = fixed_tree.levels[0][0]
    loss = m.loss(out, torch.tensor([top, top]))
    want = torch.nn.functional.cross_entropy(out["logits"][:, 0], torch.tensor([top, top]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_residual_arc(fixed_tree):
    """o_t^res = u_t + z(o_t), then the linear map to the N classes."""
    torch.manual_seed(0)
    m = create_model("dhnn_rnn", fixed_tree, in_chans=1, image_size=28, residual=True, conversion="linear",
                     **SMALL).eval()
    x = torch.randn(3, 1, 28, 28)
    u = m.sequence(x)
    h, _ = m.rnn(u)
    want = m.classify(u + m.z(m.out(h)))
    assert torch.allclose(m(x)["logits"][..., 1:], want, atol=1e-6)
    # the arc carries the CNN features past the RNN: with z = 0 the logits are c(u_t), whatever the RNN does
    with torch.no_grad():
        m.z.weight.zero_(), m.z.bias.zero_()
        for p in m.rnn.parameters():
            p.normal_()
    assert torch.allclose(m(x)["logits"][..., 1:], m.classify(u), atol=1e-6)
    assert not hasattr(create_model("dhnn_rnn", fixed_tree, in_chans=1, image_size=28, conversion="linear",
                                    **SMALL), "z")


# ----------------------------------------------------------------------------- CNN-S2S
@pytest.mark.slow
@pytest.mark.parametrize("feed", ["label", "output"])
def test_cnn_s2s_learns_paths_that_end_at_inner_nodes(var_tree, feed):
    """Overfit a fixed batch whose labels include inner nodes: decoding must stop there."""
    torch.manual_seed(0)
    m = create_model("dhnn_s2s", var_tree, in_chans=1, image_size=16, feed=feed, conversion="linear",
                     backbone_kwargs={"width": 0.25}, input_size=32, hidden_size=64)
    inner = [n for n in range(1, var_tree.num_nodes) if n not in var_tree.leaves]
    targets = torch.tensor((inner + list(var_tree.leaves))[:12])
    x = torch.randn(len(targets), 1, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = m.loss(m(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    pred = m.predict(x)
    assert _valid(var_tree, pred.paths)
    assert (pred.nodes == targets).float().mean() >= 0.9
    assert any(n in inner for n in pred.nodes.tolist())  # paths do stop at inner nodes
    assert torch.all((pred.path_prob > 0) & (pred.path_prob <= 1))


def test_cnn_s2s_options_and_errors(var_tree):
    m = create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, bidirectional=True, num_layers=2,
                     pool_fallback="project", **SMALL)
    h, c = m.encode(torch.randn(2, 1, 28, 28))
    assert h.shape == (2, 2, 2 * 64)  # both directions' final states, per layer
    assert len(m.features.steps) == 3  # one encoder step per ResNet stage
    with pytest.raises(ValueError, match="no disjoint pooling"):
        create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, input_size=256)
    with pytest.raises(ValueError, match="exact search needs"):
        create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, decode="exact", conversion="linear")
    with pytest.raises(ValueError, match="multi-label dhnn_s2s reads its previous outputs"):
        create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, multi_label=True, feed="label",
                     conversion="linear")
    with pytest.raises(ValueError, match=r"dhnn_rnn needs one step per level \(3\), got 2"):
        create_model("dhnn_rnn", fashion_mnist_taxonomy(False), in_chans=1, image_size=28, conversion="linear",
                     steps=[[0, 1], [2]])
    with pytest.raises(ValueError, match="level_weights: 4 output steps need 4 weights"):
        create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, conversion="linear", level_weights=[1, 1])


def test_multi_label_s2s_scores_and_threshold(var_tree):
    torch.manual_seed(0)
    m = create_model("dhnn_s2s", var_tree, in_chans=1, image_size=28, multi_label=True, conversion="linear",
                     **SMALL)
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    assert out["logits"].shape == (3, var_tree.max_depth, var_tree.num_nodes)
    targets = torch.zeros(3, var_tree.num_nodes, dtype=torch.bool)
    targets[0, var_tree.leaves[0]] = targets[0, var_tree.leaves[5]] = True
    targets[1, var_tree.leaves[2]] = targets[2, var_tree.levels[0][1]] = True
    assert torch.isfinite(m.loss(out, targets))
    m.threshold.fill_(0.0)  # everything passes: every leaf path is kept
    pred = m.predict(x)
    assert pred.labels[:, list(var_tree.leaves)].all()
    m.threshold.fill_(1.01)
    assert not m.predict(x).labels.any()


# ----------------------------------------------------------------------------- the engine
def _cfg(tiny_cfg: dict, **model) -> dict:
    cfg = dict(tiny_cfg)
    cfg["model"] = {"name": "dhnn_s2s", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5},
                    "conversion": "linear", "input_size": 32, "hidden_size": 32, **model}
    return cfg


def test_alternating_phases_change_only_their_group(tmp_path, tiny_cfg):
    """RNN only (CNN frozen), then CNN only, then everything — the paper's order."""
    cfg = _cfg(tiny_cfg)
    cfg["train"] = {**cfg["train"], "epochs": 3, "freeze": [{"epochs": [0, 1], "frozen": ["cnn"]},
                                                            {"epochs": [1, 2], "frozen": ["rnn"]}]}
    states = []
    for epoch in range(4):
        if epoch:
            train(cfg, tmp_path, max_epochs_this_call=1)
        states.append(torch.load(tmp_path / "last.pt", weights_only=True)["model"] if epoch else None)
    _, _, model, _ = load_run(tmp_path, "last")
    groups = model.param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    cnn = {names[id(p)] for p in groups["cnn"]}
    rnn = {names[id(p)] for p in groups["rnn"]}
    assert cnn and rnn and not cnn & rnn

    def changed(a: dict, b: dict, keys: set[str]) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in keys)

    assert not changed(states[1], states[2], rnn)  # epoch 2: RNN frozen
    assert changed(states[1], states[2], cnn)
    assert changed(states[2], states[3], cnn) and changed(states[2], states[3], rnn)  # epoch 3: all


def test_alternating_first_phase_trains_only_the_rnn(tmp_path, tiny_cfg):
    cfg = _cfg(tiny_cfg)
    cfg["train"] = {**cfg["train"], "epochs": 1, "freeze": [{"epochs": [0, 1], "frozen": ["cnn"]}]}
    cfg_start = dict(cfg, train={**cfg["train"], "epochs": 1, "lr": 1e-30, "warmup_epochs": 0})
    train(cfg_start, tmp_path / "start")  # lr 1e-30 (lr must be > 0): the seeded initial weights, unchanged
    train(cfg, tmp_path / "run")
    a = torch.load(tmp_path / "start" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    backbone = [k for k in a if k.startswith("backbone.")]
    head = [k for k in a if not k.startswith("backbone.") and "running" not in k]
    assert all(torch.equal(a[k], b[k]) for k in backbone)  # weights and BN statistics
    assert any(not torch.equal(a[k], b[k]) for k in head)


def test_multi_label_threshold_is_tuned_on_val_and_saved(tmp_path, tiny_cfg):
    cfg = _cfg(tiny_cfg)
    cfg["data"] = {**cfg["data"], "name": "synthetic_multilabel"}
    metrics = train(cfg, tmp_path)
    _, _, model, _ = load_run(tmp_path)
    assert metrics["threshold"] == pytest.approx(float(model.threshold))  # best.pt keeps the tuned value
    # and it is the F1-maximising threshold on the val predictions of that very model
    data = build_data(cfg["data"])
    pred, targets = predict_dataset(model, data, data.val, 256, torch.device("cpu"), None)
    best, _ = select_threshold(pred.scores, targets.bool(), data.taxonomy, metric="path_f1")
    assert float(model.threshold) == pytest.approx(float(best))
    assert {"path_f1", "node_f1"} <= set(metrics)


@pytest.mark.slow
@pytest.mark.skipif(not any(FMNIST.glob("train-images-idx3-ubyte*")), reason="real Fashion-MNIST not installed")
def test_short_real_training_run_learns(tmp_path):
    """Real Fashion-MNIST, 3-level tree, CNN-RNN-Resi: loss falls and paths are far above chance (10 %)."""
    cfg = load_config(overrides=[
        "data={name: fashion_mnist, limit_train: 3000, limit_test: 1000}",
        "model={name: dhnn_rnn, backbone: resnet20, backbone_kwargs: {width: 0.5}, residual: true,"
        " conversion: linear, input_size: 64, hidden_size: 64}",
        "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.progress=false", "train.amp=none",
        "train.augment={pad: 0, flip: false}",
    ])
    metrics = train(cfg, tmp_path)
    with open(tmp_path / "log.csv", encoding="utf-8") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert losses[1] < losses[0]
    assert metrics["path_accuracy"] > 0.5 and metrics["node_accuracy"] > 0.7
    assert metrics["valid_path_rate"] == 1.0


# ----------------------------------------------------------------------------- the named configs
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KOO = sorted(p for p in (CONFIGS / "koo").glob("table*/*.yaml"))
GUO = sorted(p for p in (CONFIGS / "guo").glob("table*/*.yaml"))
HIERNET = sorted(p for p in (CONFIGS / "hiernet").glob("table*/*.yaml"))


DEPTH_NAMES = {f"resnet{d}{act}" for d in (20, 32, 44, 56, 110) for act in ("", "_elu")}


def test_hiernet_configs_cover_every_table_row():
    """Tables 1-2: backbone and HierNet for n = 3, 5, 7, 9, 18, with the paper's split and extra blocks."""
    names = {f"{p.parent.name}/{p.stem}" for p in HIERNET}
    depths = (20, 32, 44, 56, 110)
    assert names == {f"table1/resnet{d}{h}" for d in depths for h in ("", "-hiernet")} | {
        f"table2/resnet{d}-elu{h}" for d in depths for h in ("", "-hiernet")}
    published = {"table1": ({3: 5, 5: 9, 7: 12, 9: 16, 18: 38}, {3: 2, 5: 3, 7: 4, 9: 5, 18: 4}),
                 "table2": ({3: 6, 5: 9, 7: 15, 9: 19, 18: 38}, {3: 2, 5: 3, 7: 2, 9: 5, 18: 4})}
    for path in HIERNET:
        model = load_config(path)["model"]
        depth = int(path.stem.split("-")[0].removeprefix("resnet"))
        assert model["backbone"] == f"resnet{depth}{'_elu' if path.parent.name == 'table2' else ''}"
        if path.stem.endswith("hiernet"):
            split, extra = published[path.parent.name]
            assert (model["split"], model["extra_blocks"]) == (split[(depth - 2) // 6], extra[(depth - 2) // 6])


def test_koo_configs_cover_every_table_row():
    names = {f"{p.parent.name}/{p.stem}" for p in KOO}
    for cnn in ("vgg", "res"):
        assert {f"table1/{cnn}-rnn", f"table1/{cnn}-rnn-alt", f"table1/{cnn}-rnn-alt-resi",
                f"table2/{cnn}-s2s", f"table2/{cnn}-s2s-alt"} <= names
    for cnn in ("vgg", "res", "se-res", "cbam-res"):
        for conv in ("linear", "conv", "pool", "pool-L"):
            assert {f"table3/{cnn}-s2s-{conv}", f"table3/{cnn}-s2s-alt-{conv}"} <= names
    assert {"table1/vgg16", "table1/res50", "table2/vgg16", "table2/res50", "table3/vgg16", "table3/res50",
            "table3/se-res50", "table3/cbam-res50"} <= names
    assert len(KOO) == 8 + 6 + 36


def test_guo_configs_cover_every_table_row():
    names = {f"{p.parent.name}/{p.stem}" for p in GUO}
    table2 = {f"table2/{row}{aug}" for row in ("c2f", "f2c", "fandc", "rnn") for aug in ("", "-aug")}
    cnns, rows = ("cnn7", "wrn28-10", "wider-resnet"), ("coarse", "fine", "rnn")
    table4 = {f"table4/{cnn}-{row}" for cnn in cnns for row in rows}
    table6 = {"table6/rnn-s20", "table6/rnn-s40", "table6/rnn-s100", "table6/cnn", "table6/cnn-rnn",
              "table6/cnn-rnn-star"}
    table7 = {f"table7/rnn-fine{f}-{p}" for f in (10, 20, 50) for p in ("pseudo", "sfine", "oracle")}
    assert names == table2 | table4 | table6 | table7
    assert len(GUO) == 8 + 9 + 6 + 9
    for path in GUO:
        assert path.read_text(encoding="utf-8").startswith("# Guo et al. "), path  # names its row
        cfg = load_config(path)
        data, model, tcfg = cfg["data"], cfg["model"], cfg["train"]
        table, row = path.parent.name, path.stem
        if table in ("table2", "table4"):
            assert data["name"] == "cifar100"
            # C100 rows train without augmentation, C100+ rows with pad-4 crops and flips
            plain = table == "table2" and not row.endswith("-aug")
            assert (tcfg["augment"]["pad"], tcfg["augment"]["flip"]) == ((0, False) if plain else (4, True)), path
        else:
            assert data["name"] == "manifest" and data["image_size"] == 224 and model["backbone"] == "vgg16"
            assert "pretrained_path" in model["backbone_kwargs"], path  # the ImageNet weights placeholder
            assert tcfg["precompute_features"] == row.startswith("rnn-"), path
        if table == "table4":
            kind = row.rsplit("-", 1)[1]
            assert model["name"] == {"coarse": "guo_multihead", "fine": "flat", "rnn": "guo_rnn"}[kind], path
            assert model.get("levels") == ([1] if kind == "coarse" else None), path  # coarse-specific: level 1 only
        if table == "table6":
            assert cfg["eval"]["given_level"] == (1 if row == "cnn-rnn-star" else None), path
            assert data.get("fine_fraction") == {"rnn-s20": 0.2, "rnn-s40": 0.4}.get(row), path
        if table == "table7":
            fine, protocol = row.split("-")[1:]
            assert data["fine_fraction"] == int(fine[4:]) / 100 and data["coarse_fraction"] == 0.5, path
            labels = {"pseudo": "coarse", "sfine": "drop", "oracle": "oracle"}[protocol]
            assert data["coarse_labels"] == labels and tcfg["pseudo_labels"] == (protocol == "pseudo"), path


@pytest.mark.parametrize("path", [p for p in GUO if "fine_fraction" in load_config(p)["data"]],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_guo_split_settings_build_data(path):
    """The S_fine/S_coarse keys of Tables 6-7, on a small synthetic stand-in for the ImageNet subset."""
    keys = ("fine_fraction", "coarse_fraction", "coarse_level", "coarse_labels")
    split = {k: v for k, v in load_config(path)["data"].items() if k in keys}
    stand_in = {"name": "synthetic", "n_train": 400, "n_test": 40, "size": 8}
    n = len(build_data(stand_in).train)  # S: the training set after the val split
    data = build_data({**stand_in, **split})
    n_fine, n_coarse = round(split["fine_fraction"] * n), round(split["coarse_fraction"] * n)
    assert len(data.train) == n_fine + (0 if split["coarse_labels"] == "drop" else n_coarse)
    assert int(data.train.coarse_mask.sum()) == (n_coarse if split["coarse_labels"] == "coarse" else 0)


# the "-pool-L" configs build an ImageNet-size CNN under a large decoder: 7-11 s each on a shared 2-core CPU
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem.endswith("-pool-L") else p
                                  for p in [*KOO, *GUO, *HIERNET, *sorted(CONFIGS.glob("*.yaml"))]],
                         ids=lambda p: p.relative_to(CONFIGS).with_suffix("").as_posix())
def test_every_config_builds_its_model(path, fixed_tree, var_tree):
    """Model keys are checked by building the model (ImageNet backbones swapped for a narrow ResNet to stay
    fast; their stage shapes are covered above); data keys by the dataset table."""
    cfg = load_config(path)
    data, model = cfg["data"], dict(cfg["model"])
    assert set(data) - {"name"} <= DATASETS[data["name"]] | COMMON_KEYS, path
    assert model["backbone"] in list_backbones()
    if model["backbone"] in DEPTH_NAMES:  # CIFAR ResNets keep their depth (HierNet's split points need it)
        model["backbone_kwargs"] = {"width": 0.25}
    elif model["backbone"] != "resnet20":  # also drops backbone_kwargs (pretrained_path placeholders)
        model["backbone"], model["backbone_kwargs"] = "resnet20", {"width": 0.25}
    # Guo's CIFAR-100 and ImageNet-2010-subset trees have two levels everywhere (guo_multihead needs that)
    guo = path.parent.parent.name == "guo"
    fixed = guo or path.parent.name == "table1" or data["name"] == "fashion_mnist"
    multi = bool(data.get("multi_label")) or data["name"] == "fashion_mnist_canvas"
    tax = fixed_tree if fixed else var_tree
    create_model(model.pop("name"), tax, in_chans=3, multi_label=multi, image_size=32, **model)
