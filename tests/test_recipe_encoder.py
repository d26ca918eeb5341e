"""``hiervision train FOLDER --encoder hf:...``: the frozen-feature recipe on a pretrained encoder, end to end
(train, export, the runtime and the server agree with the run). A tiny randomly initialised DINOv2 saved into
a temporary folder stands in for a hub model: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hiervision.cli import main  # noqa: E402
from hiervision.cli.train import closing_screen  # noqa: E402
from hiervision.recipe import RECOMMENDED_HEAD, auto_config, describe  # noqa: E402
from test_backbones_hf import PROCESSORS, _config  # noqa: E402
from test_recipe import TINY, _folder  # noqa: E402


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    transformers.AutoModel.from_config(_config("dinov2")).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSORS["dinov2"]))
    return folder


def test_the_encoder_recipe_takes_the_encoders_input_settings_and_trains_the_head_on_its_features(tmp_path, dino):
    photos = _folder(tmp_path / "photos", size=(40, 30), mode="RGB", per_class=4)
    cfg = auto_config(photos, encoder=str(dino))  # a bare folder means hf:FOLDER
    assert cfg["model"]["backbone"] == f"hf:{dino}" and cfg["model"]["name"] == RECOMMENDED_HEAD
    d = cfg["data"]
    assert d["mean"] == PROCESSORS["dinov2"]["image_mean"] and d["std"] == PROCESSORS["dinov2"]["image_std"]
    assert d["pipeline"] == "imagenet" and d["crop"] == 32 and "crop_scale" not in d
    assert cfg["train"]["freeze_backbone"] is True and cfg["train"]["augment"] is None
    assert f"{RECOMMENDED_HEAD} on hf:" in describe(cfg) and "frozen" in describe(cfg)


def test_encoder_with_a_config_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: {name: synthetic}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--encoder", "hf:x", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--encoder applies to a folder or CSV" in err and "model.backbone=hf:NAME" in err


def test_a_run_from_scratch_ends_by_naming_the_encoder_route():
    result = {"path_accuracy": 0.3, "leaf_accuracy": 0.3}
    assert "--encoder hf:facebook/dinov2-small" in closing_screen(result, "runs/x", from_scratch=True)
    assert "--encoder" not in closing_screen(result, "runs/x", from_scratch=False)


@pytest.mark.slow  # trains, exports and serves
@pytest.mark.timeout(600)
def test_train_folder_with_an_encoder_exports_and_the_runtime_and_server_agree_with_the_run(tmp_path, dino, capsys):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from hiervision.export import run_predictor
    from hiervision.runtime import Predictor
    from hiervision.serve import create_app
    from hiervision.serve.predictor import RuntimePredictor

    photos, run = _folder(tmp_path / "photos", size=(40, 30), mode="RGB", per_class=6), tmp_path / "run"
    sets = [a for s in [*TINY, "train.epochs=2", "model.backbone_kwargs={}"] for a in ("--set", s)]
    assert main(["train", str(photos), "--encoder", f"hf:{dino}", "--out", str(run), "--quiet", *sets]) == 0
    assert "--encoder hf:facebook" not in capsys.readouterr().out  # it started from an encoder
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    images = sorted(photos.rglob("*.png"))[:6]
    by_run = run_predictor(run, 2, 8, "cpu").predict(images)
    by_onnx = Predictor(tmp_path / "m.onnx", top_k=2).predict(images)
    assert [r["path"] for r in by_run] == [r["path"] for r in by_onnx]
    for a, b in zip(by_run, by_onnx):
        assert abs(a["path_probability"] - b["path_probability"]) < 1e-3
    with TestClient(create_app(RuntimePredictor(Predictor(tmp_path / "m.onnx", top_k=2)))) as client:
        answer = client.post("/predict", files=[("file", (images[0].name, images[0].read_bytes(), "image/png"))])
    assert answer.status_code == 200 and answer.json()["results"][0]["path"] == by_run[0]["path"]
