import json

import numpy as np
import pytest
import yaml
from PIL import Image

from hiervision.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = {
        "data": {"name": "synthetic", "n_train": 256, "n_test": 64, "size": 16},
        "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
    }
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "tiny.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    return d / "run"


def test_train_writes_metrics(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= m["path_accuracy"] <= 1 and len(m["level_accuracy"]) == 3


def test_evaluate(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "val" and "node_accuracy" in out


def test_predict_json_lines(run_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    assert main(["predict", str(run_dir), str(tmp_path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [line["file"].endswith(f"im{i}.png") for i, line in enumerate(lines)] == [True] * 3
    assert all(len(line["path"]) == 3 and 0 < line["path_probability"] <= 1 for line in lines)


def test_user_errors_are_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(run_dir), str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.png: not a readable image" in err

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic}\ntrain: {epohcs: 1}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.epohcs" in err

    assert main(["evaluate", str(tmp_path / "missing")]) == 1
    assert "not a hiervision run folder" in capsys.readouterr().err


def test_checkpoint_of_another_taxonomy_is_refused(run_dir, tmp_path, capsys):
    import shutil

    from hiervision import Taxonomy

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    Taxonomy.from_parent_map({"a": None, "b": None}).save(other / "taxonomy.json")
    assert main(["predict", str(other), str(tmp_path)]) == 1
    assert "another taxonomy" in capsys.readouterr().err


def test_taxonomy_show_and_validate(run_dir, tmp_path, capsys):
    assert main(["taxonomy", "show", str(run_dir / "taxonomy.json")]) == 0
    assert "classes" in capsys.readouterr().out
    assert main(["taxonomy", "validate", str(run_dir)]) == 0
    assert "valid tree" in capsys.readouterr().out
    cyc = tmp_path / "cyc.csv"
    cyc.write_text("parent,child\na,b\nb,c\nc,a\n")
    assert main(["taxonomy", "validate", str(cyc)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cycle" in err


def test_demo_falls_back_to_synthetic_and_says_how_to_get_real_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HIERVISION_FASHION_MNIST", str(tmp_path / "nothing-here"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--limit-train", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "synthetic images (fallback)" in out and "apt-get install dataset-fashion-mnist" in out
    table = out[out.index("method"):].splitlines()
    assert table[1].startswith("flat (leaf softmax)") and len(table[1].split()) >= 6


def test_taxonomy_build_from_wordnet_and_csv(tmp_path, capsys):
    from conftest import SHARED
    from hiervision import Taxonomy

    csv = tmp_path / "t.csv"
    csv.write_text("parent,child\nvehicle,car\ncar,taxi\nvehicle,bus\n")
    assert main(["taxonomy", "build", str(csv), "--out", str(tmp_path / "t.json")]) == 0
    assert Taxonomy.load(tmp_path / "t.json") == Taxonomy.from_csv(csv)
    wn = SHARED / "imagenet" / "breeds" / "wordnet"
    if not wn.is_dir():
        pytest.skip("shared WordNet hierarchy not present")
    (tmp_path / "classes.txt").write_text("n02123045\nn02123159\nn02085620\n")  # two cats, a dog
    assert main(["taxonomy", "build", str(wn / "class_hierarchy.txt"), "--from", "wordnet", "--names",
                 str(wn / "node_names.txt"), "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path / "wn.json")]) == 0
    tax = Taxonomy.load(tmp_path / "wn.json")
    assert sorted(tax.external_ids[n] for n in tax.leaves) == ["n02085620", "n02123045", "n02123159"]
    assert len(tax.children[0]) >= 2 or len(tax.leaves) == 1
    assert main(["taxonomy", "build", str(csv)]) == 1
    assert "--out" in capsys.readouterr().err
