from pathlib import Path

import pytest

from hiervision.config import ConfigError, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads():
    files = sorted(f for f in CONFIGS.glob("**/*.yaml") if not f.name.startswith("_"))  # _*: partial bases
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg["data"]["name"] and cfg["model"]["name"], f


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {name: synthetic, size: 16}\ntrain: {epochs: 3, lr: 0.2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 5}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.lr=0.05", "data.size=24"])
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["lr"] == 0.05
    assert cfg["data"] == {"name": "synthetic", "size": 24}
    assert cfg["train"]["batch_size"] == 128  # default filled in
    assert cfg["name"] == "b"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {name: synthetic}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"'train.lrr' is not known \(did you mean 'train.lr'\?\)"):
        load_config(tmp_path / "c.yaml")


def test_bad_yaml_and_loops_are_one_line_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
