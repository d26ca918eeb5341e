import csv
import io
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
    assert err.count("\n") == 0 and "bad.png: cannot read image" in err

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


@pytest.mark.slow
def test_demo_falls_back_to_synthetic_and_says_how_to_get_real_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HIERVISION_FASHION_MNIST", str(tmp_path / "nothing-here"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--limit-train", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "synthetic images (fallback)" in out and "apt-get install dataset-fashion-mnist" in out
    table = out[out.index("method"):].splitlines()
    assert table[1].startswith("flat (recommended)") and len(table[1].split()) >= 6
    assert table[2].startswith("flat + CRM") and table[2].split()[-3:] == ["-", "-", "0.0"]  # post-hoc: no training
    assert table[3].startswith("HAFrame ") and any(row.startswith("HierNet routing") for row in table)
    assert table[-1].startswith("at a credible budget") and "benchmarks/RESULTS.md" in table[-1]  # the comparison


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


# ----------------------------------------------------------------------------- predict / export / list
def _folder(tmp_path):
    """Three good images (one in a subfolder), one unreadable, one hidden, one non-image file."""
    rng = np.random.default_rng(1)
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["a.png", "sub/b.png", "c.jpg", ".hidden/h.png", ".x.png"]:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_predict_folder_records_errors_and_top_k(run_dir, tmp_path, capsys):
    folder = _folder(tmp_path)
    assert main(["predict", str(run_dir), str(folder), "--top-k", "2", "--batch-size", "2"]) == 1
    out, err = capsys.readouterr()
    recs = {r["file"].split("/")[-1]: r for r in map(json.loads, out.splitlines())}
    assert sorted(recs) == ["a.png", "b.png", "broken.png", "c.jpg"]  # recursive; hidden and .txt skipped
    assert "cannot read image" in recs["broken.png"]["error"] and set(recs["broken.png"]) == {"file", "error"}
    good = recs["a.png"]
    assert len(good["path"]) == len(good["path_ids"]) == len(good["node_probabilities"]) == 3
    # flat: the leaf marginal; both are rounded to 6 places
    assert good["node_probabilities"][-1] == pytest.approx(good["path_probability"], abs=2e-6)
    assert [a["path"] for a in good["top_k"]][0] == good["path"] and len(good["top_k"]) == 2
    assert err.strip().endswith(")") and "1 of 4 images could not be predicted" in err and err.count("\n") == 1


def test_predict_csv_and_argument_checks(run_dir, tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / "broken.png").unlink()
    assert main(["predict", str(run_dir), str(folder / "a.png"), "--format", "csv", "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "file,path,path_ids,path_probability,node_probabilities,top1_path,top1_probability,error"
    assert len(lines) == 2 and lines[1].count(" > ") >= 2  # --path-sep's default
    for flag in (["--top-k", "0"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_:  # argparse: status 2 and one line naming the flag
            main(["predict", str(run_dir), str(folder), *flag])
        assert exit_.value.code == 2 and f"argument {flag[0]}: must be ≥ 1" in capsys.readouterr().err


def test_export_then_predict_with_onnx_gives_the_same_records(run_dir, tmp_path, capsys):
    for extra in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(extra, reason="the [export] extra is not installed")
    folder = _folder(tmp_path)
    (folder / "broken.png").unlink()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "m.onnx"), str(tmp_path / "m.json")]
    assert main(["predict", str(run_dir), str(folder)]) == 0
    eager = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(tmp_path / "m.onnx"), str(folder)]) == 0
    onnx_recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in onnx_recs] == [r["path"] for r in eager] and len(eager) == 3
    for a, b in zip(onnx_recs, eager):
        assert a["path_probability"] == pytest.approx(b["path_probability"], abs=1e-4)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.bin")]) == 1
    assert ".onnx" in capsys.readouterr().err


def test_list_and_print_config(tmp_path, capsys):
    assert main(["list", "models"]) == 0
    families = {"flat", "dhnn_rnn", "dhnn_s2s", "guo_rnn", "guo_multihead", "hiernet"}
    assert families <= set(capsys.readouterr().out.split())
    assert main(["list", "backbones"]) == 0
    assert "resnet20" in capsys.readouterr().out.split()
    assert main(["list", "datasets"]) == 0
    assert "fashion_mnist" in capsys.readouterr().out.split()
    assert main(["list", "configs"]) == 0
    assert "configs/fmnist-flat.yaml" in capsys.readouterr().out
    base = tmp_path / "base.yaml"
    base.write_text("data: {name: synthetic}\ntrain: {epochs: 7, lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 3}\n")
    assert main(["train", str(tmp_path / "child.yaml"), "--set", "train.lr=0.01", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.01 and cfg["data"]["name"] == "synthetic"
    assert not (tmp_path / "child").exists()
    assert main(["train", str(tmp_path / "child.yaml")]) == 1
    assert "--out" in capsys.readouterr().err


def test_predict_hedged_answers_stop_higher_for_a_stricter_target(run_dir, tmp_path, capsys):
    """train fits λ for 0.9/0.95/0.99 on val (decisions.json); predict --accuracy attaches the DARTS answer."""
    folder = _folder(tmp_path)
    (folder / "broken.png").unlink()
    depths = {}
    for target in ("0.9", "0.99"):
        assert main(["predict", str(run_dir), str(folder), "--accuracy", target]) == 0
        recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        for r in recs:
            assert "node_scores" not in r
            hedged = r["hedged"]  # the root (an empty path) is a valid answer when nothing is sure enough
            assert hedged["path"][-1:] in ([hedged["node"]], []) and 0 <= hedged["probability"] <= 1
        depths[target] = [len(r["hedged"]["path"]) for r in recs]
    assert all(a >= b for a, b in zip(depths["0.9"], depths["0.99"]))  # a stricter target never goes deeper
    assert main(["predict", str(run_dir), str(folder), "--accuracy", "0.99", "--format", "csv", "--top-k", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [len(r["hedged_path"].split(" > ")) if r["hedged_path"] else 0 for r in rows] == depths["0.99"]
    assert all(0 <= float(r["hedged_probability"]) <= 1 and r["error"] == "" for r in rows)
    with pytest.raises(ValueError, match="no hedging λ for accuracy 0.5"):
        from hiervision.serve.predictor import load_predictor

        load_predictor(run_dir).runtime.hedger(0.5)
