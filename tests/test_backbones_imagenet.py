"""Tests for the ImageNet backbones of the DHNN tables: VGG-16, ResNet-50, SE-ResNet-50, CBAM-ResNet-50.

Inputs stay small (64x64 at most): the contract, sizes and weight files do not depend on 224x224.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hiervision.models.backbones import ResNet, create_backbone, list_backbones
from hiervision.models.backbones.resnet import CBAM, Bottleneck, ChannelAttention, SpatialAttention, SqueezeExcite

RESNETS = ["resnet50", "se_resnet50", "cbam_resnet50"]
VGGS = ["vgg16", "vgg16_bn"]
NAMES = VGGS + RESNETS

# ResNet-50 layout, written out independently of the implementation
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_OUT = (256, 512, 1024, 2048)
VGG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

RESNET50 = 23_508_032  # torchvision resnet50 minus its 2048x1000 fc (25,557,032 with it)
VGG16_CONV = 14_714_688  # the 13 convs of VGG-16 (138,357,544 with the three fc layers)
FC_1000 = 2048 * 1000 + 1000


@pytest.fixture(autouse=True)
def _one_thread():
    """Threads gain little on these small inputs, and a busy shared CPU makes spinning OpenMP workers slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _per_block_channels() -> list[int]:
    """Output channels of every bottleneck block in forward order (16 blocks)."""
    return [c for n, c in zip(STAGE_BLOCKS, STAGE_OUT) for _ in range(n)]


def _se_extra(r: int = 16) -> int:
    """Hu et al.: per block, C -> C/r (weights + bias) and C/r -> C (weights + bias)."""
    return sum(2 * c * c // r + c // r + c for c in _per_block_channels())


def _cbam_extra(r: int = 16) -> int:
    """Woo et al.: the same shared MLP as SE, plus a 7x7 conv over 2 maps (no bias) and its 1-channel BN."""
    return _se_extra(r) + len(_per_block_channels()) * (7 * 7 * 2 + 2)


def test_registry_lists_the_imagenet_family() -> None:
    names = list_backbones()
    assert set(NAMES) <= set(names)
    assert "resnet20" in names  # the CIFAR family is untouched


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_features_match_feature_info(name: str, in_chans: int) -> None:
    m = create_backbone(name, in_chans=in_chans).eval()
    assert m.in_chans == in_chans
    x = torch.randn(2, in_chans, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m(x)
    if name in VGGS:
        assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 16, 32]
        assert [f["num_chs"] for f in m.feature_info] == [64, 128, 256, 512, 512]
        assert all(isinstance(m.get_submodule(f["module"]), nn.MaxPool2d) for f in m.feature_info)
    else:
        assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
        assert [f["num_chs"] for f in m.feature_info] == list(STAGE_OUT)
        assert [f["module"] for f in m.feature_info] == ["layer1", "layer2", "layer3", "layer4"]
    assert len(feats) == len(m.feature_info)
    for f, info in zip(feats, m.feature_info, strict=True):
        assert f.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    assert m.num_features == m.feature_info[-1]["num_chs"]
    assert pooled.shape == (2, m.num_features)
    torch.testing.assert_close(pooled, feats[-1].mean(dim=(2, 3)))


def test_vgg_at_32x32_ends_in_a_1x1_map() -> None:
    m = create_backbone("vgg16").eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]
    assert not any(isinstance(x, nn.Linear) for x in m.modules())  # no fc classifier in the backbone


def test_param_counts_match_published_numbers() -> None:
    r50 = _n_params(create_backbone("resnet50"))
    assert r50 == RESNET50
    assert abs(r50 + FC_1000 - 25.56e6) < 0.005e6  # He et al. / Woo et al. Table: 25.56M with the fc
    se = _n_params(create_backbone("se_resnet50"))
    assert se - r50 == _se_extra() == 2_530_992
    cbam = _n_params(create_backbone("cbam_resnet50"))
    assert cbam - r50 == _cbam_extra() == _se_extra() + 1_600
    for n in (se, cbam):  # Woo et al. (CBAM) Table 4: 28.09M for both, with the 1000-way fc
        assert abs(n + FC_1000 - 28.09e6) < 0.005e6
    vgg = _n_params(create_backbone("vgg16"))
    convs = [c for c in VGG_D if c != "M"]
    assert len(convs) == 13
    assert vgg == VGG16_CONV == sum(9 * cin * cout + cout for cin, cout in zip([3, *convs[:-1]], convs))
    assert _n_params(create_backbone("vgg16_bn")) == VGG16_CONV + 2 * sum(convs)
    # in_chans only changes the first conv: 7x7x64 (ResNet) or 3x3x64 (VGG) weights per input channel
    assert _n_params(create_backbone("resnet50", in_chans=1)) == RESNET50 - 2 * 49 * 64
    assert _n_params(create_backbone("vgg16", in_chans=1)) == VGG16_CONV - 2 * 9 * 64


def test_reduction_ratio_changes_the_gate_size() -> None:
    r50 = _n_params(create_backbone("resnet50"))
    assert _n_params(create_backbone("se_resnet50", attn_reduction=8)) - r50 == _se_extra(8)


def _torchvision_vgg_keys(batch_norm: bool) -> set[str]:
    """Keys of torchvision's ``features`` for configuration D: conv (+ BN), ReLU per entry, one slot per pool."""
    keys, i = set(), 0
    for v in VGG_D:
        if v == "M":
            i += 1
            continue
        keys |= {f"features.{i}.weight", f"features.{i}.bias"}
        if batch_norm:
            keys |= {f"features.{i + 1}.{s}" for s in ("weight", "bias", "running_mean", "running_var")}
            keys.add(f"features.{i + 1}.num_batches_tracked")
        i += 3 if batch_norm else 2
    return keys


def _bn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def _torchvision_resnet50_keys() -> set[str]:
    """Keys of torchvision's ``resnet50`` without ``fc``: stem, 3 conv/BN pairs per block, a projection per stage."""
    keys = {"conv1.weight"} | _bn_keys("bn1")
    for s, n in enumerate(STAGE_BLOCKS, start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            for j in (1, 2, 3):
                keys |= {f"{p}.conv{j}.weight"} | _bn_keys(f"{p}.bn{j}")
            if b == 0:
                keys |= {f"{p}.downsample.0.weight"} | _bn_keys(f"{p}.downsample.1")
    return keys


def test_state_dict_keys_follow_torchvision() -> None:
    assert set(create_backbone("vgg16").state_dict()) == _torchvision_vgg_keys(False)
    assert set(create_backbone("vgg16_bn").state_dict()) == _torchvision_vgg_keys(True)
    tv = _torchvision_resnet50_keys()
    assert set(create_backbone("resnet50").state_dict()) == tv
    se = set(create_backbone("se_resnet50").state_dict()) - tv
    assert se and all(".se." in k for k in se)
    assert "layer4.2.se.fc2.bias" in se
    cbam = set(create_backbone("cbam_resnet50").state_dict()) - tv
    assert cbam and all(".cbam." in k for k in cbam)
    assert {"layer1.0.cbam.channel.fc1.weight", "layer1.0.cbam.spatial.conv.weight"} <= cbam


def _shift_bn_stats(m: nn.Module, in_chans: int) -> None:
    """One training-mode pass so BN running stats differ from their init and the round trip is meaningful."""
    m.train()
    with torch.no_grad():
        m(torch.randn(4, in_chans, 64, 64))
    m.eval()


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_round_trip_ignores_classifier(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_backbone(name, in_chans=1)
    _shift_bn_stats(src, 1)
    state = dict(src.state_dict())
    state["fc.weight"] = torch.zeros(10, src.num_features)  # a full-model checkpoint's head
    state["classifier.6.bias"] = torch.zeros(10)
    f = tmp_path / "w.safetensors"
    save_file(state, str(f))
    torch.manual_seed(2)
    dst = create_backbone(name, in_chans=1, pretrained_path=f).eval()
    assert not any(k.startswith(("fc.", "classifier.")) for k in dst.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_torch_checkpoint_with_torchvision_head_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = create_backbone("vgg16").eval()
    state = dict(src.state_dict())
    state |= {f"classifier.{i}.weight": torch.zeros(4, 4) for i in (0, 3, 6)}  # shapes of ignored keys don't matter
    f = tmp_path / "vgg16.pth"
    torch.save(state, f)
    dst = create_backbone("vgg16", pretrained_path=f).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_mis_shaped_and_foreign_keys_give_clear_errors(tmp_path: Path) -> None:
    f = tmp_path / "grey.safetensors"
    save_file(create_backbone("resnet50", in_chans=1).state_dict(), str(f))
    shape_msg = r"grey\.safetensors.*shape mismatch: conv1\.weight \(64, 1, 7, 7\) vs \(64, 3, 7, 7\)"
    with pytest.raises(ValueError, match=shape_msg):
        create_backbone("resnet50", pretrained_path=f)
    g = tmp_path / "vgg_grey.safetensors"
    save_file(create_backbone("vgg16", in_chans=1).state_dict(), str(g))
    with pytest.raises(ValueError, match=r"shape mismatch: features\.0\.weight \(64, 1, 3, 3\) vs \(64, 3, 3, 3\)"):
        create_backbone("vgg16", pretrained_path=g)
    # only classifier prefixes are forgiven: other extras and missing gate keys stay errors
    state = dict(create_backbone("resnet50").state_dict())
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.se\.fc1\.weight"):
        create_backbone("se_resnet50", pretrained_path=plain)
    state["head.weight"] = torch.zeros(3)
    extra = tmp_path / "extra.safetensors"
    save_file(state, str(extra))
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        create_backbone("resnet50", pretrained_path=extra)


def test_models_without_pretrained_ignore_stay_strict(tmp_path: Path) -> None:
    state = dict(create_backbone("resnet20").state_dict())
    state["fc.weight"] = torch.zeros(10, 64)
    f = tmp_path / "cifar.safetensors"
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"unexpected keys: fc\.weight"):
        create_backbone("resnet20", pretrained_path=f)


def test_downsampling_on_the_3x3_conv() -> None:
    m = create_backbone("resnet50")
    for stage, stride in zip(m.stages, (1, 2, 2, 2)):
        first = stage[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (stride, stride)
        assert first.downsample is not None and first.downsample[0].stride == (stride, stride)
        assert all(b.downsample is None for b in stage[1:])
    assert (m.conv1.kernel_size, m.conv1.stride) == ((7, 7), (2, 2))
    assert (m.maxpool.kernel_size, m.maxpool.stride) == (3, 2)


def test_stem_and_blocks_reproduce_forward_features() -> None:
    m = create_backbone("se_resnet50").eval()
    assert len(m.blocks) == sum(STAGE_BLOCKS) and m.blocks[3] is m.layer2[0]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = m.stem(x)
        assert h.shape == (1, 64, 8, 8)
        for b in m.blocks:
            h = b(h)
        torch.testing.assert_close(h, m.forward_features(x)[-1])


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_gate_sits_on_the_residual_branch(attention: str) -> None:
    """A closed gate leaves ReLU(shortcut); a fully open one gives the plain bottleneck's output."""
    torch.manual_seed(0)
    gated = Bottleneck(256, 64, attention=attention).eval()
    plain = Bottleneck(256, 64).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if f".{attention}." not in f".{k}"})
    fc2 = gated.se.fc2 if attention == "se" else gated.cbam.channel.fc2
    if attention == "cbam":  # open the spatial gate wide so only the channel gate decides
        gated.cbam.spatial.bn.bias.data.fill_(1e4)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        fc2.weight.zero_()
        fc2.bias.fill_(-1e4)
        torch.testing.assert_close(gated(x), torch.relu(x))
        fc2.bias.fill_(1e4)
        torch.testing.assert_close(gated(x), plain(x))


def test_squeeze_excite_matches_its_formula() -> None:
    torch.manual_seed(0)
    se = SqueezeExcite(32)
    x = torch.randn(2, 32, 5, 5)
    s = x.mean(dim=(2, 3))
    w1, b1 = se.fc1.weight.flatten(1), se.fc1.bias
    w2, b2 = se.fc2.weight.flatten(1), se.fc2.bias
    gate = torch.sigmoid(torch.relu(s @ w1.T + b1) @ w2.T + b2)
    assert w1.shape == (2, 32)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_cbam_channel_and_spatial_gates_match_their_formulas() -> None:
    torch.manual_seed(0)
    ca = ChannelAttention(32)
    x = torch.randn(2, 32, 5, 5)
    mlp = lambda v: ca.fc2(torch.relu(ca.fc1(v)))
    gate = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    torch.testing.assert_close(ca(x), x * gate[:, :, None, None])
    sa = SpatialAttention().eval()
    assert sa.conv.kernel_size == (7, 7) and sa.conv.bias is None
    with torch.no_grad():
        sa.bn.weight.fill_(1.0)
        for ch, reduce in ((0, lambda t: t.amax(dim=1, keepdim=True)), (1, lambda t: t.mean(dim=1, keepdim=True))):
            sa.conv.weight.zero_()
            sa.conv.weight[0, ch, 3, 3] = 1.0  # centre tap of one input map: (max, mean) in that order
            torch.testing.assert_close(sa(x), x * torch.sigmoid(reduce(x)))
    assert isinstance(CBAM(32).channel, ChannelAttention)


def test_init_zero_residual_and_cbam_spatial_bn() -> None:
    m = create_backbone("resnet50", zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in m.blocks)
    assert all(torch.all(b.bn3.weight == 1) for b in create_backbone("resnet50").blocks)
    c = create_backbone("cbam_resnet50")
    assert all(torch.all(b.cbam.spatial.bn.weight == 0) for b in c.blocks)
    # a zero-initialised residual block is the identity on post-ReLU inputs
    blk = m.layer1[1].eval()
    x = torch.relu(torch.randn(1, 256, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x)


def test_bad_kwargs_rejected() -> None:
    with pytest.raises(ValueError, match="attention"):
        create_backbone("resnet50", attention="eca")
    with pytest.raises(ValueError, match="attention"):
        create_backbone("se_resnet50", attention="cbam")
    with pytest.raises(ValueError, match="batch_norm"):
        create_backbone("vgg16", batch_norm=True)
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("resnet50", in_chans=0)
    with pytest.raises(ValueError, match="in_chans"):
        ResNet(in_chans=0)
    with pytest.raises(ValueError, match="layers"):
        ResNet(layers=(3, 4, 6))
    assert create_backbone("resnet50", attention=None).attention is None
