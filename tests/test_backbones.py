"""Tests for the backbone registry and the CIFAR ResNet family (contract, sizes, init, weight files)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hiervision.models.backbones import (
    Backbone,
    CifarResNet,
    create_backbone,
    list_backbones,
    load_backbone_weights,
    register_backbone,
)
from hiervision.models.backbones.timm_adapter import INSTALL_HINT, TimmBackbone

CIFAR_NAMES = [f"resnet{d}{s}" for d in (20, 32, 44, 56, 110) for s in ("", "_elu")]

# exact counts without a classifier; He et al. (Table 6) quote 0.27M / 0.85M / 1.7M (option A, with a 10-way fc)
PARAMS_A = {"resnet20": 269_072, "resnet32": 463_504, "resnet44": 657_936, "resnet56": 852_368, "resnet110": 1_727_312}
PAPER = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet110": 1.7e6}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs gain nothing from threads, and a busy shared CPU makes spinning OpenMP workers very slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_cifar_family() -> None:
    names = list_backbones()
    assert names == sorted(names)
    assert set(CIFAR_NAMES) <= set(names)


@pytest.mark.parametrize("name", CIFAR_NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [32, 28])
def test_forward_features_match_feature_info(name: str, in_chans: int, size: int) -> None:
    m = create_backbone(name, in_chans=in_chans).eval()
    assert m.in_chans == in_chans
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m(x)
    assert len(feats) == len(m.feature_info) == 3
    assert [f["reduction"] for f in m.feature_info] == [1, 2, 4]
    assert [f["module"] for f in m.feature_info] == ["stages.0", "stages.1", "stages.2"]
    for f, info in zip(feats, m.feature_info, strict=True):
        side = -(-size // info["reduction"])  # ceil: 28 -> 28, 14, 7
        assert f.shape == (2, info["num_chs"], side, side)
    assert m.num_features == m.feature_info[-1]["num_chs"] == 64
    assert pooled.shape == (2, m.num_features)
    torch.testing.assert_close(pooled, feats[-1].mean(dim=(2, 3)))


# narrow versions where a name takes size arguments; names that fix their size are built as registered
NARROW: dict[str, dict] = {
    "vgg16": {"cfg": (8, "M", 8, 16, "M")},
    "vgg16_bn": {"cfg": (8, "M", 8, 16, "M")},
    "wide_resnet": {"depth": 10, "widen": 1},
    "wider_resnet": {"width": 1 / 16},
    "cnn7": {"widths": (4,) * 7},
}


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_keeps_the_base_contract(name: str) -> None:
    """Every family inherits forward and num_features from Backbone and returns what feature_info says."""
    m = create_backbone(name, in_chans=1, **NARROW.get(name, {})).eval()
    assert isinstance(m, Backbone) and m.in_chans == 1
    assert type(m).forward is Backbone.forward and type(m).num_features is Backbone.num_features
    assert all(set(info) == {"num_chs", "reduction", "module"} for info in m.feature_info)
    reductions = [info["reduction"] for info in m.feature_info]
    assert reductions == sorted(reductions)
    # each map is the output of the module its feature_info names (get_submodule raises for a wrong name)
    tapped: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
            tapped[i] = out.clone()  # later in-place ops must not change what was seen
        return hook

    hooks = [m.get_submodule(info["module"]).register_forward_hook(keep(i)) for i, info in enumerate(m.feature_info)]
    size = 2 * reductions[-1]  # the smallest input that keeps every map at least 2x2
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m(x)
    for h in hooks:
        h.remove()
    assert all(torch.equal(tapped[i], f) for i, f in enumerate(feats))
    assert [tuple(f.shape) for f in feats] == [(1, i["num_chs"], size // i["reduction"], size // i["reduction"])
                                               for i in m.feature_info]
    assert m.num_features == m.feature_info[-1]["num_chs"] and pooled.shape == (1, m.num_features)
    torch.testing.assert_close(pooled, feats[-1].mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet110"])
def test_param_counts_match_paper(name: str) -> None:
    n = _n_params(create_backbone(name))
    assert n == PARAMS_A[name]
    assert abs(n - PAPER[name]) / PAPER[name] < 0.02


def test_param_counts_all_depths_and_option_b() -> None:
    for name, n in PARAMS_A.items():
        assert _n_params(create_backbone(name)) == n
        assert _n_params(create_backbone(f"{name}_elu")) == n  # activation has no parameters
        # option B adds two 1x1 conv + BN projections (16->32 and 32->64)
        assert _n_params(create_backbone(name, shortcut="B")) == n + (16 * 32 + 64) + (32 * 64 + 128)
    # stem only changes with in_chans: 3x3 conv over 1 channel instead of 3
    assert _n_params(create_backbone("resnet20", in_chans=1)) == PARAMS_A["resnet20"] - 2 * 9 * 16


def test_depth_and_addressable_blocks() -> None:
    for depth, n in ((20, 3), (32, 5), (44, 7), (56, 9), (110, 18)):
        m = create_backbone(f"resnet{depth}")
        assert isinstance(m.stages, nn.ModuleList) and len(m.stages) == 3
        assert all(isinstance(s, nn.Sequential) and len(s) == n for s in m.stages)
        assert len(m.blocks) == 3 * n and m.blocks[n] is m.stages[1][0]
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        assert len(convs) + 1 == depth  # 6n + 1 convs plus the classifier layer of the paper
    m = create_backbone("resnet20")
    x = torch.randn(2, 3, 32, 32)
    # running stem + blocks by hand equals forward_features: a trunk/branch cut is just slicing `blocks`
    with torch.no_grad():
        m.eval()
        h = m.stem(x)
        for b in m.blocks:
            h = b(h)
        torch.testing.assert_close(h, m.forward_features(x)[-1])


def test_width_and_shortcut_b_shapes() -> None:
    m = create_backbone("resnet20", width=2, shortcut="B")
    assert [f["num_chs"] for f in m.feature_info] == [32, 64, 128] and m.num_features == 128
    out = m(torch.randn(2, 3, 28, 28))
    assert out.shape == (2, 128)
    assert any(isinstance(s, nn.Sequential) for s in (b.shortcut for b in m.blocks))
    a = create_backbone("resnet20", width=0.5)
    assert [f["num_chs"] for f in a.feature_info] == [8, 16, 32]


def test_bad_kwargs_rejected() -> None:
    with pytest.raises(ValueError, match="shortcut"):
        create_backbone("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="act"):
        create_backbone("resnet20", act="gelu")
    with pytest.raises(ValueError, match="act"):
        create_backbone("resnet20_elu", act="relu")
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("resnet20", in_chans=0)


def test_elu_variant_has_no_relu() -> None:
    elu = create_backbone("resnet20_elu")
    kinds = {type(m) for m in elu.modules()}
    assert nn.ELU in kinds and nn.ReLU not in kinds
    relu = create_backbone("resnet20")
    kinds = {type(m) for m in relu.modules()}
    assert nn.ReLU in kinds and nn.ELU not in kinds
    assert {type(m) for m in create_backbone("resnet20", act="elu").modules()} == {type(m) for m in elu.modules()}
    # same weights, different activation -> different (and partly negative) features
    torch.manual_seed(0)
    relu = create_backbone("resnet20").eval()
    elu.load_state_dict(relu.state_dict())
    elu.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fe, fr = elu.forward_features(x)[-1], relu.forward_features(x)[-1]
    assert fr.min() >= 0 and fe.min() < 0


def test_deterministic_init_with_seed() -> None:
    torch.manual_seed(123)
    a = create_backbone("resnet32")
    torch.manual_seed(123)
    b = create_backbone("resnet32")
    torch.manual_seed(124)
    c = create_backbone("resnet32")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    m = create_backbone("resnet56")
    w = m.stages[2][0].conv2.weight  # fan_out = 64 * 9
    expected = (2.0 / (64 * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05
    bn = m.stages[0][0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_channels_last_forward_and_backward() -> None:
    torch.manual_seed(0)
    m = create_backbone("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)
    mc = m.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = mc.forward_features(xc)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    mc.train()
    mc(xc).sum().backward()
    assert all(p.grad is not None for p in mc.parameters())


def test_safetensors_round_trip_restores_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_backbone("resnet20_elu", in_chans=1, shortcut="B")
    src.train()
    src(torch.randn(8, 1, 28, 28))  # move BN running stats away from their init
    src.eval()
    f = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(f))
    torch.manual_seed(2)
    dst = create_backbone("resnet20_elu", in_chans=1, shortcut="B", pretrained_path=f).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_torch_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_backbone("resnet20").eval()
    f = tmp_path / "w.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, f)
    dst = create_backbone("resnet20", pretrained_path=f).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_bad_key_set_gives_clear_error(tmp_path: Path) -> None:
    state = create_backbone("resnet20").state_dict()
    state.pop("stages.2.2.bn2.weight")
    state["head.weight"] = torch.zeros(10, 64)
    f = tmp_path / "bad.safetensors"
    save_file(state, str(f))
    with pytest.raises(ValueError) as e:
        create_backbone("resnet20", pretrained_path=f)
    msg = str(e.value)
    assert "bad.safetensors" in msg
    assert "missing keys: stages.2.2.bn2.weight" in msg
    assert "unexpected keys: head.weight" in msg
    # a deeper network's weights: many unexpected keys, summarised
    f2 = tmp_path / "deeper.safetensors"
    save_file(create_backbone("resnet32").state_dict(), str(f2))
    with pytest.raises(ValueError, match=r"unexpected keys: stages\.0\.3\..*more\)"):
        create_backbone("resnet20", pretrained_path=f2)
    # same keys, other shapes
    f3 = tmp_path / "wide.safetensors"
    save_file(create_backbone("resnet20", width=2).state_dict(), str(f3))
    with pytest.raises(ValueError, match=r"shape mismatch: stem\.0\.weight \(32, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
        create_backbone("resnet20", pretrained_path=f3)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        create_backbone("resnet20", pretrained_path=tmp_path / "absent.safetensors")


def test_load_backbone_weights_is_strict_and_leaves_model_untouched_on_error(tmp_path: Path) -> None:
    m = create_backbone("resnet20")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = create_backbone("resnet20").state_dict()
    state.pop("stem.0.weight")
    f = tmp_path / "partial.safetensors"
    save_file(state, str(f))
    with pytest.raises(ValueError, match="missing keys: stem.0.weight"):
        load_backbone_weights(m, f)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError) as e:
        create_backbone("resnet18")
    msg = str(e.value)
    assert "'resnet18'" in msg and "resnet20" in msg and "resnet110_elu" in msg and "timm/" in msg


def test_register_backbone_custom_and_duplicates() -> None:
    name = "test_tiny_cnn"

    @register_backbone(name)
    def tiny(in_chans: int = 3) -> CifarResNet:
        return CifarResNet(1, in_chans=in_chans, width=0.25)

    from hiervision.models.backbones import registry

    try:
        assert name in list_backbones()
        assert create_backbone(name, in_chans=1).num_features == 16
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(name)(tiny)
    finally:
        registry._REGISTRY.pop(name, None)
    with pytest.raises(ValueError, match="reserved"):
        register_backbone("timm/x")


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    assert create_backbone("resnet20").num_features == 64  # the core never needs timm
    with pytest.raises(ImportError, match=r"pip install hiervision\[timm\]"):
        create_backbone("timm/resnet50")
    with pytest.raises(ImportError) as e:
        TimmBackbone("resnet18")
    assert INSTALL_HINT in str(e.value)


def test_timm_adapter_contract() -> None:
    pytest.importorskip("timm")
    m = create_backbone("timm/resnet18", in_chans=1, out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m(x)
    assert len(feats) == len(m.feature_info) == 4
    for f, info in zip(feats, m.feature_info, strict=True):
        assert f.shape[1] == info["num_chs"] and f.shape[-1] == 64 // info["reduction"]
    assert pooled.shape == (2, m.num_features)


def test_pretrained_path_that_is_not_weights_is_one_line(tmp_path: Path) -> None:
    """Folders, junk, non-tensor pickles and code-carrying pickles are all one line naming the file."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"stem.0.weight": Payload()}))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not weights at all")
    fake_st = tmp_path / "junk.safetensors"
    fake_st.write_bytes(b"{not json")
    numbers = tmp_path / "numbers.pt"
    torch.save({"stem.0.weight": 3}, numbers)
    cases = [(tmp_path, "not a file"), (evil, "not a readable weights file"), (junk, "not a readable weights file"),
             (fake_st, "not a readable weights file"), (numbers, "not a state dict of tensors"),
             (7, "pretrained_path: must be a weights file path")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            create_backbone("resnet20", pretrained_path=path)
        assert "\n" not in str(err.value) and (path == 7 or str(path) in str(err.value))
    assert not marker.exists()
