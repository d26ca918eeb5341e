"""Tests for the CNN backbones of Guo et al.'s CNN-RNN tables: WRN-d-k, their wider-ResNet (Table 3) and CNN-7.

Contract tests run on narrow instances; the two full-size networks are built once each, only to count
and inspect parameters (never run forward), so every test stays well under a second or two on one core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hiervision.models.backbones import CNN7, WideResNet, WiderResNet, create_backbone, list_backbones
from hiervision.models.backbones.cnn7 import CIFAR10_WIDTHS
from hiervision.models.backbones.wide_resnet import PreActBasicBlock, PreActBottleneck

GUO_NAMES = ["cnn7", "wide_resnet", "wider_resnet", "wrn16_4", "wrn28_10", "wrn28_2"]

# small instances of every family (name, kwargs) for the contract tests
SMALL = [
    pytest.param("wide_resnet", {"depth": 10, "widen": 1}, id="wrn10_1"),
    pytest.param("wide_resnet", {"depth": 16, "widen": 0.5, "dropout": 0.3}, id="wrn16_0.5_dropout"),
    pytest.param("wider_resnet", {"width": 1 / 16}, id="wider_w0.0625"),
    pytest.param("cnn7", {"widths": (8,) * 7}, id="cnn7_w8"),
    pytest.param("cnn7", {"widths": (4, 4, 8, 8, 8, 8, 6), "batch_norm": True, "dropout": 0.0}, id="cnn7_bn"),
]

# Table 3 of Guo et al., written out independently of the implementation: (group, output side, 3 conv widths)
TABLE3_STEM = 64
TABLE3 = [("conv2", 32, (256, 256, 256)), ("conv3", 16, (512, 512, 512)), ("conv4", 8, (1024, 1024, 1024))]

# Zagoruyko & Komodakis quote 36.5M for WRN-28-10 (CIFAR, with its classifier)
WRN28_10_BACKBONE = 36_472_784
WRN28_10_FC100 = 36_536_884  # + 640 * 100 + 100
WRN28_10_FC100_CONV_BIAS = 36_546_980  # ports that keep conv biases (e.g. the popular wide-resnet.pytorch)
WIDER_BACKBONE = 45_417_792
CNN7_BACKBONE = 1_702_272


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs gain nothing from threads, and a busy shared CPU makes spinning OpenMP workers very slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def wrn28_10() -> nn.Module:
    """The full WRN-28-10, built once (about 0.4 s on one core; the meta device would cost more to warm up)."""
    return create_backbone("wrn28_10")


@pytest.fixture(scope="module")
def wider() -> nn.Module:
    """The full-width wider-ResNet of Table 3, built once."""
    return create_backbone("wider_resnet")


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _wrn_params(depth: int, k: float, in_chans: int = 3, conv_bias: bool = False) -> int:
    """WRN-d-k parameter count from the layer formula: stem conv, N pre-act blocks per stage, final BN."""
    n = (depth - 4) // 6
    widths = [max(1, round(c * k)) for c in (16, 32, 64)]
    total = in_chans * 9 * 16 + (16 if conv_bias else 0)
    prev = 16
    for i, c in enumerate(widths):
        for j in range(n):
            ci = prev if j == 0 else c
            stride = 2 if i > 0 and j == 0 else 1
            total += 2 * ci + 9 * ci * c + 2 * c + 9 * c * c  # bn1, conv1, bn2, conv2
            total += 2 * c if conv_bias else 0
            if ci != c or stride != 1:  # 1x1 projection where the shape changes
                total += ci * c + (c if conv_bias else 0)
        prev = c
    return total + 2 * widths[-1]


def _wider_params(width: float = 1.0, in_chans: int = 3) -> int:
    """Wider-ResNet count from Table 3: equal-width pre-act bottlenecks, a projection opening each stage."""
    s = lambda c: max(1, round(c * width))
    prev = s(TABLE3_STEM)
    total = in_chans * 9 * prev
    for _, _, (c, _, _) in TABLE3:
        c = s(c)
        for j in range(3):
            ci = prev if j == 0 else c
            total += 2 * ci + ci * c + 2 * c + 9 * c * c + 2 * c + c * c  # bn1, 1x1, bn2, 3x3, bn3, 1x1
            total += ci * c if j == 0 else 0
        prev = c
    return total + 2 * prev


def _cnn7_params(widths: tuple[int, ...], in_chans: int = 3, batch_norm: bool = False) -> int:
    kernels = (3, 3, 3, 3, 3, 3, 1)
    total, prev = 0, in_chans
    for w, k in zip(widths, kernels, strict=True):
        total += prev * w * k * k + (2 * w if batch_norm else w)  # BN weight + bias, or the conv bias
        prev = w
    return total


def _first_conv(m: nn.Module) -> nn.Conv2d:
    return next(c for c in m.modules() if isinstance(c, nn.Conv2d))


def test_registry_lists_the_guo_backbones() -> None:
    assert set(GUO_NAMES) <= set(list_backbones())
    assert isinstance(create_backbone("wide_resnet", depth=10, widen=1), WideResNet)
    assert isinstance(create_backbone("wider_resnet", width=0.05), WiderResNet)
    assert isinstance(create_backbone("cnn7", widths=(2,) * 7), CNN7)


@pytest.mark.parametrize(("name", "kwargs"), SMALL)
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [32, 28])
def test_forward_features_match_feature_info(name: str, kwargs: dict[str, Any], in_chans: int, size: int) -> None:
    m = create_backbone(name, in_chans=in_chans, **kwargs).eval()
    assert m.in_chans == in_chans
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m(x)
    assert len(feats) == len(m.feature_info) == 3
    assert [f["reduction"] for f in m.feature_info] == [1, 2, 4]
    for f, info in zip(feats, m.feature_info, strict=True):
        side = -(-size // info["reduction"])  # ceil: 28 -> 28, 14, 7
        assert f.shape == (2, info["num_chs"], side, side)
        assert isinstance(m.get_submodule(info["module"]), nn.Module)
    assert m.num_features == m.feature_info[-1]["num_chs"]
    assert pooled.shape == (2, m.num_features)
    torch.testing.assert_close(pooled, feats[-1].mean(dim=(2, 3)))


def test_wrn28_10_parameter_count(wrn28_10: nn.Module) -> None:
    n = _n_params(wrn28_10)
    assert n == _wrn_params(28, 10) == WRN28_10_BACKBONE
    with_fc = n + 640 * 100 + 100
    assert with_fc == WRN28_10_FC100
    assert abs(with_fc - 36.5e6) / 36.5e6 < 0.002
    # the 36,546,980 of bias-keeping ports is exactly ours plus one bias per conv output channel
    assert _wrn_params(28, 10, conv_bias=True) + 64_100 == WRN28_10_FC100_CONV_BIAS
    convs = [c for c in wrn28_10.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert n + sum(c.out_channels for c in convs) + 64_100 == WRN28_10_FC100_CONV_BIAS


def test_wrn28_10_layout_and_dropout_default(wrn28_10: nn.Module) -> None:
    assert [len(s) for s in wrn28_10.stages] == [4, 4, 4]
    assert [f["num_chs"] for f in wrn28_10.feature_info] == [160, 320, 640] and wrn28_10.num_features == 640
    assert wrn28_10.stem.out_channels == 16
    drops = [m for m in wrn28_10.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 12 and all(d.p == 0.3 for d in drops)  # Guo et al.'s "version with dropout"
    # projections exactly where the shape changes: the first block of each stage (16 -> 160 included)
    assert [b.shortcut is not None for b in wrn28_10.blocks] == [True, False, False, False] * 3
    # 6N = 24 convs in the blocks + the stem conv; plus 3 projections
    convs = [c for c in wrn28_10.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 24 + 1 + 3


def test_other_wrn_counts() -> None:
    for name, depth, k in (("wrn16_4", 16, 4), ("wrn28_2", 28, 2)):
        m = create_backbone(name)
        assert _n_params(m) == _wrn_params(depth, k)
        assert not any(isinstance(x, nn.Dropout) for x in m.modules())  # no dropout by default
    assert abs(_wrn_params(16, 4) + 64 * 4 * 10 + 10 - 2.7e6) / 2.7e6 < 0.02  # the paper's 2.7M (CIFAR-10)
    tiny = create_backbone("wide_resnet", depth=10, widen=1, in_chans=1)
    assert _n_params(tiny) == _wrn_params(10, 1, in_chans=1)
    # widen=1: stage 1 keeps 16 channels, so its first block has no projection
    assert tiny.stages[0][0].shortcut is None and tiny.stages[1][0].shortcut is not None


def test_wrn_depth_validation_and_fixed_names() -> None:
    for depth in (12, 27, 4):
        with pytest.raises(ValueError, match=rf"depth must be 6N\+4 with N >= 1 .*got {depth}$"):
            create_backbone("wide_resnet", depth=depth, widen=1)
    with pytest.raises(ValueError, match="dropout"):
        create_backbone("wide_resnet", depth=10, widen=1, dropout=1.0)
    with pytest.raises(ValueError, match="fixes widen=10"):
        create_backbone("wrn28_10", widen=2)
    with pytest.raises(ValueError, match="fixes depth=16"):
        create_backbone("wrn16_4", depth=28)
    assert create_backbone("wrn16_4", widen=4, depth=16, in_chans=1).in_chans == 1  # agreeing values are fine


def test_wider_resnet_follows_table3(wider: nn.Module) -> None:
    assert wider.stem.out_channels == TABLE3_STEM and wider.stem.kernel_size == (3, 3)
    assert len(wider.stages) == len(TABLE3)
    prev_side = 32  # conv1 output
    for stage, info, (_, out_side, widths) in zip(wider.stages, wider.feature_info, TABLE3, strict=True):
        assert len(stage) == 3
        assert 32 // info["reduction"] == out_side
        for j, block in enumerate(stage):
            assert isinstance(block, PreActBottleneck)
            convs = (block.conv1, block.conv2, block.conv3)
            assert tuple(c.out_channels for c in convs) == widths  # same width in all three: no 4x expansion
            assert tuple(c.kernel_size[0] for c in convs) == (1, 3, 1)
            down = j == 0 and out_side < prev_side
            assert tuple(c.stride[0] for c in convs) == (1, 2 if down else 1, 1)  # stride on the 3x3
            assert (block.shortcut is not None) == (j == 0)  # 64 -> 256, 256 -> 512, 512 -> 1024
            if block.shortcut is not None:
                assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride[0] == (2 if down else 1)
        prev_side = out_side
    assert [f["num_chs"] for f in wider.feature_info] == [256, 512, 1024] and wider.num_features == 1024


def test_wider_resnet_depth_and_count(wider: nn.Module) -> None:
    convs = [(name, c) for name, c in wider.named_modules() if isinstance(c, nn.Conv2d)]
    main = [name for name, _ in convs if not name.endswith("shortcut")]
    assert len(main) == 28  # 1 + 9 * 3; with the fc, the paper's 29 layers
    assert len(convs) - len(main) == 3
    assert _n_params(wider) == _wider_params() == WIDER_BACKBONE
    small = create_backbone("wider_resnet", width=0.25, in_chans=1)
    assert [f["num_chs"] for f in small.feature_info] == [64, 128, 256] and small.stem.out_channels == 16
    assert _n_params(small) == _wider_params(0.25, in_chans=1)
    with pytest.raises(ValueError, match="width"):
        create_backbone("wider_resnet", width=0)


def test_cnn7_layout_and_count() -> None:
    m = create_backbone("cnn7")
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [3, 3, 3, 3, 3, 3, 1]
    assert [c.out_channels for c in convs] == [192] * 7 and all(c.bias is not None for c in convs)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert _n_params(m) == _cnn7_params((192,) * 7) == CNN7_BACKBONE
    pools = [x for x in m.modules() if isinstance(x, (nn.MaxPool2d, nn.AvgPool2d))]
    assert [type(p) for p in pools] == [nn.MaxPool2d, nn.AvgPool2d] and all(p.ceil_mode for p in pools)
    drops = [x for x in m.modules() if isinstance(x, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    c10 = create_backbone("cnn7", widths=CIFAR10_WIDTHS, in_chans=1)
    assert _n_params(c10) == _cnn7_params(CIFAR10_WIDTHS, in_chans=1)
    bn = create_backbone("cnn7", widths=(4,) * 7, batch_norm=True)
    assert _n_params(bn) == _cnn7_params((4,) * 7, batch_norm=True)
    assert all(c.bias is None for c in bn.modules() if isinstance(c, nn.Conv2d))
    for bad in ((8,) * 6, (8,) * 6 + (0,)):
        with pytest.raises(ValueError, match="7 positive ints"):
            create_backbone("cnn7", widths=bad)


def test_cnn7_average_pool_divides_by_in_image_pixels() -> None:
    """Caffe's pooled size rounds up and its border windows average only the pixels inside the image."""
    pool = create_backbone("cnn7", widths=(2,) * 7).stages[2].pool2
    out = pool(torch.ones(1, 1, 16, 16))
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize(
    "build",
    [
        lambda d: create_backbone("wide_resnet", depth=10, widen=1, dropout=d),
        lambda d: create_backbone("cnn7", widths=(4,) * 7, dropout=d),
    ],
    ids=["wrn", "cnn7"],
)
def test_dropout_only_in_train_mode(build: Callable[[float], nn.Module]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    m = build(0.3)
    assert any(isinstance(d, nn.Dropout) and d.p == 0.3 for d in m.modules())
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.equal(m(x), m(x))
    plain = build(0.0).train()
    assert not any(isinstance(d, nn.Dropout) for d in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


@pytest.mark.parametrize(("name", "kwargs"), SMALL)
def test_gradients_reach_the_stem(name: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    m = create_backbone(name, in_chans=1, **kwargs).train()
    m(torch.randn(4, 1, 28, 28)).pow(2).sum().backward()
    g = _first_conv(m).weight.grad
    assert g is not None and g.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_preactivation_maps_and_blocks() -> None:
    torch.manual_seed(0)
    for m in (create_backbone("wide_resnet", depth=10, widen=1), create_backbone("wider_resnet", width=1 / 16)):
        m.eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            feats = m.forward_features(x)
            # the intermediate maps are raw residual sums, the last one leaves the final BN-ReLU
            assert feats[0].min() < 0 and feats[1].min() < 0 and feats[2].min() >= 0
            h = m.stem(x)
            for b in m.blocks:
                h = b(h)
            torch.testing.assert_close(m.act(m.norm(h)), feats[-1])
        assert len(m.blocks) == 3 * len(m.stages[0])


def test_projection_sees_the_preactivated_input() -> None:
    """Where the shape changes the 1x1 projection takes BN-ReLU(x), as in the WRN Torch code."""
    torch.manual_seed(0)
    block = PreActBasicBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        o = torch.relu(block.bn1(x))
        expected = block.conv2(torch.relu(block.bn2(block.conv1(o)))) + block.shortcut(o)
        torch.testing.assert_close(block(x), expected)


def test_kaiming_init_fan_out() -> None:
    torch.manual_seed(0)
    m = create_backbone("wrn16_4")
    w = m.stages[2][1].conv2.weight  # 256 -> 256, fan_out = 256 * 9
    expected = (2.0 / (256 * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.05
    bn = m.stages[0][0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
