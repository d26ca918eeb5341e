"""``hiervision train FOLDER|CSV``: the recipe read from the images, the CSV's tree, the closing screen."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from hiervision.cli import main
from hiervision.config import ConfigError
from hiervision.data import build_data
from hiervision.recipe import RECOMMENDED_HEAD, auto_config, recommended_method

LEAVES = ["Animals/Dogs/Beagle", "Animals/Dogs/Pug", "Animals/Cats", "Plants/Trees/Oak"]
TINY = ["model.backbone_kwargs={width: 0.25}", "train.amp=none", "eval.batch_size=64"]


def _folder(root, size=(12, 12), mode="L", per_class=16):
    rng = np.random.default_rng(0)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    for k, leaf in enumerate(LEAVES):
        d = root.joinpath(*leaf.split("/"))
        d.mkdir(parents=True)
        for i in range(per_class):  # a class-dependent brightness, so there is something to learn
            img = np.clip(rng.normal(40 + 50 * k, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode).save(d / f"{i}.png")
    return root


def test_folder_recipe_reads_channels_size_and_sizes_the_budget(tmp_path):
    cfg = auto_config(_folder(tmp_path / "photos"))
    assert cfg["data"] == {"name": "folder", "root": str((tmp_path / "photos").resolve()), "channels": 1,
                           "image_size": 12}
    assert cfg["model"]["name"] == RECOMMENDED_HEAD and cfg["model"]["backbone"] == "resnet20"
    t = cfg["train"]
    assert (t["batch_size"], t["epochs"], t["lr"]) == (32, 30, 0.025)  # few images: the longest budget, batch 32
    assert t["augment"] == {"pad": 2, "flip": True} and cfg["eval"]["calibrate"] is True  # the decision layer


def test_the_recipe_is_flat_where_its_head_cannot_go():
    from hiervision.models.haframe import MAX_FRAME_CLASSES

    assert recommended_method(MAX_FRAME_CLASSES, False, "haframe") == ("haframe", "")
    method, why = recommended_method(MAX_FRAME_CLASSES + 1, False, "haframe")
    assert method == "flat" and f"{MAX_FRAME_CLASSES + 1:,} classes" in why
    method, why = recommended_method(4, True, "haframe")
    assert method == "flat" and "multi-label" in why
    assert recommended_method(4, True, "flat") == ("flat", "")  # flat's sigmoid takes several paths


def test_overrides_and_method_win_over_the_recipe(tmp_path):
    cfg = auto_config(_folder(tmp_path / "p"), "guo_rnn", ["train.epochs=2", "data.test_fraction=0.3"])
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["test_fraction"] == 0.3
    assert cfg["model"]["name"] == "guo_rnn" and cfg["train"]["grad_clip"] == 5.0
    with pytest.raises(ConfigError, match="--method nope: not a method"):
        auto_config(tmp_path / "p", "nope")


def test_large_rgb_images_get_the_crop_pipeline(tmp_path):
    cfg = auto_config(_folder(tmp_path / "big", size=(120, 90), mode="RGB", per_class=2))
    d = cfg["data"]
    assert (d["channels"], d["pipeline"], d["crop"]) == (3, "imagenet", 64) and "image_size" not in d


def test_csv_labels_give_the_tree(tmp_path):
    _folder(tmp_path / "imgs", per_class=4)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted((tmp_path / "imgs").rglob("*.png")):
            w.writerow([p.relative_to(tmp_path).as_posix(), p.parent.relative_to(tmp_path / "imgs").as_posix()])
    cfg = auto_config(tmp_path / "labels.csv")
    assert cfg["data"]["name"] == "manifest" and "taxonomy" not in cfg["data"]
    tree = build_data(cfg["data"]).taxonomy
    assert sorted(tree.path_name(n) for n in tree.leaves) == sorted(LEAVES)


@pytest.mark.slow
def test_train_folder_end_screen(tmp_path, capsys):
    photos = _folder(tmp_path / "photos", size=(8, 8), per_class=8)
    out = tmp_path / "run"
    assert main(["train", str(photos), "--out", str(out), "--quiet", "--set", "train.epochs=1", *sum(
        (["--set", s] for s in TINY), [])]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"recipe: {RECOMMENDED_HEAD} on resnet20, 1 channel(s), 8 px, 1 epochs")
    assert f"run: {out}" in text and "path accuracy" in text and "per level" in text
    for cmd in (f"hiervision evaluate {out} --report {out / 'report'}", f"hiervision export {out} --out "
                f"{out / 'model.onnx'}", f"hiervision serve {out / 'model.onnx'}"):
        assert cmd in text
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["data"]["name"] == "folder" and written["train"]["epochs"] == 1
    assert json.loads((out / "metrics.json").read_text())["data"] == "folder"


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "my-photos"), "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == f"hiervision: error: {tmp_path / 'my-photos'}: no such folder or CSV file\n"


def test_method_with_a_config_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: {name: synthetic}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--method", "guo_rnn", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--method applies to a folder or CSV" in err


def test_every_registered_model_is_a_method() -> None:
    """``--method NAME`` reaches every head a user can name in a config, with the options the head declares."""
    from hiervision.models import list_models
    from hiervision.recipe import method_options

    options = method_options()
    assert set(options) == set(list_models())
    assert all(opts["model"]["name"] == name for name, opts in options.items())
    assert options["dhnn_s2s"] == {"model": {"name": "dhnn_s2s", "conversion": "pool", "pool_fallback": "project",
                                             "input_size": 128, "hidden_size": 256, "beam_width": 3},
                                   "train": {"grad_clip": 5.0}}


def test_the_demo_starts_with_the_recipes_head_and_trains_each_head_with_its_declared_options() -> None:
    from hiervision.cli.demo import DEMO_METHODS
    from hiervision.models import list_models

    assert DEMO_METHODS[0][1] == recommended_method(10, False)[0]
    assert {head for _, head, _ in DEMO_METHODS} <= set(list_models())
