"""Hostile inputs, third round (issue 38): data scans, CSV manifests, values checked at the boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision.cli import main
from hiervision.data.manifest import load_manifest
from hiervision.recipe import RECOMMENDED_HEAD
from hiervision.taxonomy import Taxonomy, TaxonomyError


def _png(path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_a_spreadsheets_csv_with_a_bom_and_spaces_around_slashes_gives_one_class_per_label(tmp_path):
    rows = []
    for i, label in enumerate(["Clothes / Bottoms / Trouser", "Clothes/Bottoms/Trouser", "Clothes/ Tops /Shirt",
                               "Clothes/Tops/Shirt"]):
        _png(tmp_path / f"{i}.png", i)
        rows.append(f"{i}.png,{label}")
    (tmp_path / "m.csv").write_text("\ufeffpath,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    ds, _ = load_manifest(tmp_path / "m.csv", None)
    assert sorted(ds.taxonomy.path_name(n) for n in ds.taxonomy.leaves) == ["Clothes/Bottoms/Trouser",
                                                                           "Clothes/Tops/Shirt"]
    assert ds.targets.tolist()[0] == ds.targets.tolist()[1]


@pytest.mark.parametrize(("a", "b"), [("Dogs", "dogs"), ("Caf\u00e9", "Cafe\u0301")])
def test_class_names_that_differ_only_by_case_or_unicode_form_are_refused_with_both(a, b):
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_paths([f"Animals/{a}", f"Animals/{b}", "Plants/Rose"])
    assert repr(f"Animals/{a}") in str(e.value) or repr(f"Animals/{b}") in str(e.value)
    assert "differ only by case or Unicode form" in str(e.value) and "\n" not in str(e.value)


def test_a_folder_with_lookalike_class_folders_is_one_line(tmp_path, capsys):
    for name in ("Dogs", "dogs", "Cats"):
        for i in range(2):
            _png(tmp_path / "data" / name / f"{i}.png", i)
    if len({p.name for p in (tmp_path / "data").iterdir()}) < 3:
        pytest.skip("this file system folds case: the two folders are one")
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "differ only by case or Unicode form" in err and len(err.strip().splitlines()) == 1


def test_a_folder_form_set_of_a_whole_section_and_the_documented_skip_override(tmp_path, capsys):
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    (tmp_path / "data" / "A" / "bad.png").write_bytes(b"not an image")
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--set", "data=5"]) == 1
    err = capsys.readouterr().err
    assert "config key 'data' must be a mapping, got 5" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--set", "data.on_bad_image=skip",
                 "--set", "train.epochs=1", "--quiet"]) == 0  # the documented override works in the folder form


def test_evaluate_of_an_empty_split_is_one_line(tmp_path, capsys):
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--set", "data.val_fraction=0",
                 "--set", "train.epochs=1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val"]) == 1
    err = capsys.readouterr().err
    assert "--split val: " in err and "val split holds no image (data.val_fraction is 0)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_pipe_named_like_an_image_is_named_and_skipped_never_read(tmp_path, capsys):
    import os

    from hiervision.data.folder import load_folder

    for name in ("A", "B"):
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", 40 * i)
    os.mkfifo(tmp_path / "A" / "pipe.png")  # reading it would block for ever
    ds = load_folder(tmp_path)
    assert len(ds) == 4
    err = capsys.readouterr().err
    assert "skipped 1 entries that are no images of a class" in err and "pipe.png" in err


def test_a_zip_member_that_unpacks_past_the_bound_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    import io
    import zipfile

    import hiervision.data.imageio as imageio

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(buf, format="BMP")  # 12 kB unpacked
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("A/big.bmp", buf.getvalue())
    monkeypatch.setattr(imageio, "MAX_MEMBER_BYTES", 4096)
    reader = imageio.ImageReader(3, (64, 64), tmp_path / "d.zip")
    with pytest.raises(ValueError, match=r"A/big.bmp.*unpacks to 12,\d{3} bytes, over the 4,096 an image member"):
        reader("A/big.bmp")


def test_one_class_is_refused_and_classes_without_training_images_are_named_before_training(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "one" / "A" / f"{i}.png", 40 * i)
    assert main(["train", str(tmp_path / "one"), "--out", str(tmp_path / "r1"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "one class (A): nothing to tell apart" in err and len(err.strip().splitlines()) == 1
    import dataclasses

    from hiervision.config import load_config
    from hiervision.data import build_data, untrained_classes

    for name in ("A", "B", "C"):
        for i in range(6):
            _png(tmp_path / "three" / name / f"{i}.png", 20 * i)
    data = build_data(load_config(overrides=[f"data={{name: folder, root: {tmp_path / 'three'}}}"])["data"])
    assert untrained_classes(data) == []
    c = data.taxonomy.index("C")
    without_c = dataclasses.replace(data, train=data.train.subset(torch.nonzero(data.train.targets != c)[:, 0]))
    assert untrained_classes(without_c) == ["C"]


def test_every_start_over_keeps_what_it_replaces(tmp_path):
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    run = tmp_path / "run"
    args = ["train", str(tmp_path / "data"), "--out", str(run), "--set", "train.epochs=1", "--quiet"]
    assert main(args) == 0
    first = (run / "best.pt").read_bytes()
    assert main([*args, "--no-resume"]) == 0
    second = (run / "best.pt").read_bytes()
    assert main([*args, "--no-resume"]) == 0
    assert (run / "previous" / "best.pt").read_bytes() == first  # never overwritten by the second start over
    assert (run / "previous-2" / "best.pt").read_bytes() == second


def test_data_pack_never_replaces_a_runs_tree(tmp_path, capsys):
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "data"), "--out", str(run), "--set", "train.epochs=1", "--quiet"]) == 0
    tree = (run / "taxonomy.json").read_bytes()
    capsys.readouterr()
    assert main(["data", "pack", str(tmp_path / "data"), "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "already holds a taxonomy.json (a run folder?)" in err and len(err.strip().splitlines()) == 1
    assert (run / "taxonomy.json").read_bytes() == tree
    assert main(["evaluate", str(run), "--report", str(run)]) == 1  # nor a report among the run's files
    err = capsys.readouterr().err
    assert f"--report {run}: a run folder; give the report a folder of its own" in err
    assert not (run / "index.html").exists()


def test_channels_and_size_come_from_a_sample_of_the_whole_data_set_not_its_first_file(tmp_path):
    from hiervision.data.folder import load_folder

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(_mk(tmp_path / "A" / "0-grey.png"))  # sorts first
    for name in ("A", "B"):
        for i in range(1, 5):
            _png(tmp_path / name / f"{i}.png", 30 * i)
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(_mk(tmp_path / "B" / "9-odd.png"))
    ds = load_folder(tmp_path)
    assert ds[0][0].shape == (3, 8, 8)  # colour (most images are), the most common size
    assert ds.found == "10 of 10 images sampled: 9 colour, 1 grey; 2 sizes, most common 8x8"


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_run_folder_inside_the_data_never_becomes_a_class(tmp_path, capsys):
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    inside = tmp_path / "data" / "run"
    args = ["--set", "train.epochs=1", "--quiet"]
    assert main(["train", str(tmp_path / "data"), "--out", str(inside), *args]) == 0
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "again"), *args]) == 0  # not blocked
    assert "a hiervision run folder" in capsys.readouterr().err
    from hiervision.experiment import load_run

    assert sorted(load_run(tmp_path / "again")[1].names) == ["A", "B", "root"]


def test_a_model_key_the_head_does_not_take_fails_before_any_data_is_read(tmp_path, capsys):
    from hiervision.models import list_models
    from hiervision.models.registry import model_arguments

    assert all(model_arguments(name) for name in list_models())  # every head's arguments read from signatures
    for name in ("A", "B"):
        for i in range(3):
            _png(tmp_path / "data" / name / f"{i}.png", 40 * i)
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--set", "model.bogus=1"]) == 1
    err = capsys.readouterr().err
    assert f"model.bogus: not an argument of model '{RECOMMENDED_HEAD}'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "splits.json").exists()  # stopped before the data was read


def test_a_class_name_holding_a_slash_is_written_by_its_path_when_the_csv_comes_with_its_tree(tmp_path):
    from hiervision.data.fashion_mnist import fashion_mnist_taxonomy

    tax = fashion_mnist_taxonomy()  # its class "T-shirt/top" holds the path separator
    tax.save(tmp_path / "t.json")
    for i in range(2):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "m.csv").write_text("path,label\n0.png,Clothes/Tops/T-shirt/top\n1.png,T-shirt/top\n",
                                    encoding="utf-8")
    ds, _ = load_manifest(tmp_path / "m.csv", tmp_path / "t.json")
    assert [tax.names[int(t)] for t in ds.targets] == ["T-shirt/top", "T-shirt/top"]
    (tmp_path / "m.csv").write_text("path,label\n0.png,Clothes/Tops/T-shirt\n", encoding="utf-8")
    with pytest.raises(ValueError, match="label 'Clothes/Tops/T-shirt' is not in the taxonomy"):
        load_manifest(tmp_path / "m.csv", tmp_path / "t.json")
