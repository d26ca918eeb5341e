"""``model.backbone: hf:<hub id or folder>``: Hugging Face encoders under the backbone contract, their input
settings, and every one-line refusal. Tiny randomly initialised encoders are saved into a temporary folder:
nothing is downloaded (the hub path is exercised with a patched ``from_pretrained``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hiervision.data import build_data  # noqa: E402
from hiervision.data.pipeline import pipeline_from_cfg  # noqa: E402
from hiervision.models import create_model  # noqa: E402
from hiervision.models.backbones import (  # noqa: E402
    HFBackbone,
    create_backbone,
    encoder_data_settings,
    hf_input_settings,
)
from hiervision.taxonomy import PAD, Taxonomy  # noqa: E402

TAX = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f", "b/g"])
SIZE, BATCH = 32, 4
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": SIZE, "patch_size": 8}
# the processors' own settings, written as their save_pretrained would (no processor class, so no torchvision)
PROCESSORS = {
    "dinov2": {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
               "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE}, "do_normalize": True,
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "vit": {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "convnext": {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
                 "crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
}


def _config(kind: str):
    if kind == "dinov2":
        return transformers.Dinov2Config(**TINY_VIT)
    if kind == "vit":
        return transformers.ViTConfig(**TINY_VIT)
    return transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_stages=4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny saved encoder (safetensors weights + config + processor settings) per kind."""
    out = {}
    for kind, processor in PROCESSORS.items():
        folder = tmp_path_factory.mktemp(kind)
        torch.manual_seed(0)
        transformers.AutoModel.from_config(_config(kind)).save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
        assert (folder / "model.safetensors").is_file()
        out[kind] = folder
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("kind", list(PROCESSORS))
@pytest.mark.parametrize("pool", ["auto", "pooler", "cls", "mean"])
def test_every_pool_mode_gives_pooled_features_and_a_map_per_stage(folders: dict[str, Path], kind: str,
                                                                   pool: str) -> None:
    name = f"hf:{folders[kind]}"
    if kind == "convnext" and pool == "cls":  # a conv encoder has no class token
        with pytest.raises(ValueError, match="class token") as e:
            create_backbone(name, pool=pool)
        one_line(e)
        return
    net = create_backbone(name, pool=pool)
    assert isinstance(net, HFBackbone) and net.in_chans == 3
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    feats = net(x)
    assert feats.shape == (BATCH, net.num_features) and torch.isfinite(feats).all()
    maps = net.forward_features(x)
    assert len(maps) == len(net.feature_info) == (4 if kind == "convnext" else 2)  # stages; 2 layers: both
    for fmap, info in zip(maps, net.feature_info):
        side = SIZE // info["reduction"]
        assert fmap.shape == (BATCH, info["num_chs"], side, side)
    assert [i["reduction"] for i in net.feature_info] == ([4, 8, 16, 32] if kind == "convnext" else [8, 8])
    fmap = maps[-1]
    assert net.pool == ("pooler" if pool == "auto" else pool)  # all three have a pooled output with weights
    if kind != "convnext" and pool == "mean":  # the mean of the patch tokens is the mean of the map
        torch.testing.assert_close(feats, fmap.mean(dim=(2, 3)))


def test_patch_tokens_lie_on_their_grid_at_any_size_and_cls_is_dropped(folders: dict[str, Path]) -> None:
    net = create_backbone(f"hf:{folders['vit']}", pool="cls").eval()
    x = torch.randn(2, 3, 48, 40)  # not the encoder's own size: position embeddings are interpolated
    fmap = net.forward_features(x)[-1]
    assert fmap.shape == (2, 32, 6, 5)
    hidden = net.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), hidden[:, 1:])
    torch.testing.assert_close(net(x), hidden[:, 0])


def test_grey_images_are_repeated_to_rgb_and_other_channel_counts_refused(folders: dict[str, Path]) -> None:
    name = f"hf:{folders['dinov2']}"
    grey, rgb = create_backbone(name, in_chans=1).eval(), create_backbone(name).eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    assert grey.in_chans == 1
    torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="3-channel images") as e:
        create_backbone(name, in_chans=2)
    one_line(e)
    with pytest.raises(ValueError, match="got 2-channel images") as e:
        rgb(torch.rand(2, 2, SIZE, SIZE))
    one_line(e)


def test_input_settings_are_read_from_the_processor_file(folders: dict[str, Path]) -> None:
    dino = hf_input_settings(f"hf:{folders['dinov2']}")
    assert dino == {"image_size": SIZE, "resize": 36, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    vit = hf_input_settings(str(folders["vit"]))  # the prefix is optional
    assert vit == {"image_size": SIZE, "resize": None, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert hf_input_settings(str(folders["convnext"]))["image_size"] == 224
    assert hf_input_settings(str(folders["convnext"]))["resize"] == 256  # 224 / crop_pct


def test_encoder_data_settings_are_valid_data_config(folders: dict[str, Path]) -> None:
    photos = encoder_data_settings(f"hf:{folders['dinov2']}", "folder")
    assert photos == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "pipeline": "imagenet",
                      "crop": SIZE, "resize": 36}
    pipe = pipeline_from_cfg(photos, None)  # the existing imagenet pipeline takes them as they are
    assert pipe is not None and (pipe.eval.size, pipe.eval.resize) == (SIZE, 36)
    vit = encoder_data_settings(f"hf:{folders['vit']}", "manifest")
    assert (vit["crop"], vit["resize"]) == (SIZE, SIZE)  # a plain resize: the shorter side to the crop
    grey = encoder_data_settings(f"hf:{folders['vit']}", "synthetic", channels=1)
    assert grey == {"mean": [0.5], "std": [0.5]}  # in-memory sets keep their size
    with pytest.raises(ValueError, match="hf:") as e:
        encoder_data_settings("resnet20")
    one_line(e)


def test_build_data_uses_given_mean_and_std(folders: dict[str, Path]) -> None:
    base = {"name": "synthetic", "n_train": 40, "n_test": 16, "size": 16}
    computed = build_data(base)
    given = build_data({**base, **encoder_data_settings(f"hf:{folders['dinov2']}", "synthetic")})
    assert given.mean == (0.485, 0.456, 0.406) and given.std == (0.229, 0.224, 0.225)
    assert given.meta()["mean"] == [0.485, 0.456, 0.406] and given.meta()["std"] == [0.229, 0.224, 0.225]
    assert computed.mean != given.mean and given.train.ids == computed.train.ids
    only_mean = build_data({**base, "mean": [0.5, 0.5, 0.5]})
    assert only_mean.mean == (0.5, 0.5, 0.5) and only_mean.std == computed.std
    bad = [({"std": [0.2, 0.0, 0.2]}, "positive"), ({"mean": [0.5, float("nan"), 0.5]}, "finite"),
           ({"mean": "0.5"}, "list of"), ({"std": [0.2, 0.2]}, "3 channel"), ({"mean": [True, 0, 0]}, "finite")]
    for extra, why in bad:
        with pytest.raises(ValueError, match=why) as e:
            build_data({**base, **extra})
        assert one_line(e).startswith("data.")


def test_a_hub_id_without_network_says_how_to_fetch_it_elsewhere(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nand more lines")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    with pytest.raises(ValueError, match="could not download it") as e:
        create_backbone("hf:nobody/no-such-encoder")
    msg = one_line(e)
    assert "model.backbone hf:nobody/no-such-encoder" in msg and "save_pretrained('DIR')" in msg
    assert "hf:DIR" in msg and "couldn't connect" in msg
    assert "downloading nobody/no-such-encoder into the Hugging Face cache" in capsys.readouterr().err


def test_the_processor_file_of_a_hub_id_without_network_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match="could not download it .*hf:DIR") as e:
        hf_input_settings("hf:nobody/no-such-encoder")
    one_line(e)


def test_folders_that_hold_no_model_are_refused_in_one_line(tmp_path: Path, folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no config.json") as e:
        create_backbone(f"hf:{tmp_path}")
    assert str(tmp_path) in one_line(e)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match="holds no model transformers.AutoModel can build") as e:
        create_backbone(f"hf:{tmp_path}")
    one_line(e)
    transformers.ViTConfig(**TINY_VIT).save_pretrained(tmp_path)  # a config without weights is no model either
    with pytest.raises(ValueError, match="holds no model transformers.AutoModel can build") as e:
        create_backbone(f"hf:{tmp_path}")
    assert "could not download" not in one_line(e)
    with pytest.raises(ValueError, match="no such folder") as e:
        create_backbone(f"hf:{tmp_path / 'missing'}")
    one_line(e)
    with pytest.raises(ValueError, match="no preprocessor_config.json") as e:
        hf_input_settings(f"hf:{tmp_path}")
    one_line(e)


def test_missing_transformers_and_wrong_settings_are_one_line(
        monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path], tmp_path: Path) -> None:
    name = f"hf:{folders['dinov2']}"
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    for kwargs, why in (({"pretrained_path": str(weights)}, "pretrained_path: not used"),
                        ({"pool": "max"}, "pool: must be one of"), ({"width": 2}, "width: not a setting")):
        with pytest.raises(ValueError, match=why) as e:
            create_backbone(name, **kwargs)
        one_line(e)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"pip install 'hiervision\[hf\]'") as e:
        create_backbone(name)
    one_line(e)


def test_a_model_on_an_hf_encoder_trains_predicts_and_round_trips(folders: dict[str, Path]) -> None:
    name = f"hf:{folders['dinov2']}"
    torch.manual_seed(0)
    model = create_model("flat", TAX, backbone=name, in_chans=3, image_size=SIZE)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([TAX.leaves[i % len(TAX.leaves)] for i in range(BATCH)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.backbone.model.embeddings.patch_embeddings.projection.weight.detach().clone()
    for _ in range(2):
        loss = model.train().loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.backbone.model.embeddings.patch_embeddings.projection.weight)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.isfinite(model.train().loss(model(x), y))
    pred = model.predict(x)
    for row in pred.paths.tolist():
        assert TAX.is_valid_path([n for n in row if n != PAD])
    torch.manual_seed(1)
    other = create_model("flat", TAX, backbone=name, in_chans=3, image_size=SIZE)
    other.load_state_dict(model.state_dict())  # the fine-tuned encoder travels in the model's own state dict
    again = other.predict(x)
    assert torch.equal(pred.paths, again.paths)
    torch.testing.assert_close(pred.scores, again.scores)


def test_auto_skips_a_pooler_the_checkpoint_does_not_hold(tmp_path: Path) -> None:
    """A classification checkpoint (ViTForImageClassification) has no pooler weights: ``auto`` reads the CLS
    token rather than a randomly initialised pooler, and ``pooler`` is refused."""
    transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT)).save_pretrained(tmp_path)
    assert create_backbone(f"hf:{tmp_path}").pool == "cls"
    with pytest.raises(ValueError, match="no pooler weights") as e:
        create_backbone(f"hf:{tmp_path}", pool="pooler")
    one_line(e)
