"""New classes without retraining (hiervision extend): the grown tree, the kept and imprinted weights, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from hiervision.cli import main
from hiervision.config import load_config
from hiervision.data.base import grow_tree
from hiervision.experiment import load_run
from hiervision.taxonomy import Taxonomy
from hiervision.training import train

KNOWN = Taxonomy.from_paths(["Animals/Dogs/Beagle", "Animals/Dogs/Pug", "Animals/Cats/Siamese", "Plants/Rose"])


def test_a_grown_tree_keeps_every_known_id_and_appends_the_new_nodes():
    data = Taxonomy.from_paths(["Animals/Dogs/Husky", "Animals/Birds/Robin", "Plants/Rose", "Animals/Dogs/Beagle"])
    grown = grow_tree(KNOWN, data)
    assert grown.names[:KNOWN.num_nodes] == KNOWN.names and grown.parents[:KNOWN.num_nodes] == KNOWN.parents
    assert sorted(grown.path_name(n) for n in range(KNOWN.num_nodes, grown.num_nodes)) == [
        "Animals/Birds", "Animals/Birds/Robin", "Animals/Dogs/Husky"]


@pytest.mark.parametrize(("paths", "message"), [
    (["Animals/Dogs/Beagle", "Plants/Rose"], "the data has no class the run lacks (its 2 classes are all known)"),
    (["Plants/Rose/Red", "Plants/Tulip"], "Plants/Rose is a class of the run and would become a group here"),
    (["Animals/Cats/Pug", "Plants/Tulip"],
     "class 'Pug' is at Animals/Cats/Pug here but at Animals/Dogs/Pug in the run"),
])
def test_a_tree_change_that_is_no_extension_is_one_line(paths, message):
    with pytest.raises(ValueError, match="data.grow_from: ") as e:
        grow_tree(KNOWN, Taxonomy.from_paths(paths))
    assert message in str(e.value) and "\n" not in str(e.value)


def _parent(tmp_path, model: str = "flat"):
    cfg = load_config(overrides=["data={name: synthetic, n_train: 320, n_test: 256, size: 16, holdout_leaves: 0.3}",
                                 f"model={{name: {model}, backbone: resnet20, backbone_kwargs: {{width: 0.5}}}}",
                                 "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.amp=none"])
    train(cfg, tmp_path / "parent")
    return tmp_path / "parent"


def test_extend_adds_the_held_out_classes_keeps_the_weights_and_imprints_the_new_rows(tmp_path, capsys):
    parent = _parent(tmp_path)
    new = tmp_path / "new"
    assert main(["extend", str(parent), "--out", str(new), "--epochs", "1", "--set", "data.holdout_leaves=null",
                 "--quiet"]) == 0
    assert "started from" in capsys.readouterr().out
    _, known, old, _ = load_run(parent)
    cfg, grown, model, _ = load_run(new)
    assert cfg["train"]["init_from"] == str(parent.resolve()) and cfg["data"]["grow_from"].endswith("taxonomy.json")
    assert grown.num_nodes > known.num_nodes and grown.names[:known.num_nodes] == known.names
    for key, value in old.backbone.state_dict().items():  # the head alone was fine-tuned: the backbone is the parent's
        assert torch.equal(model.backbone.state_dict()[key], value), key
    rows = [i for i, c in enumerate(model.classes.tolist()) if c >= known.num_nodes]
    assert rows and all(model.fc.weight[r].norm() > 0 for r in rows)
    metrics = json.loads((new / "metrics.json").read_text())
    assert "started from" in metrics["data_note"] and "imprinted" in metrics["data_note"]
    assert main(["evaluate", str(new), "--device", "cpu"]) == 0  # evaluates like any run (its tree rebuilt)
    assert main(["export", str(new), "--out", str(tmp_path / "m.onnx")]) == 0


def test_extend_refuses_a_run_without_new_classes_and_a_head_that_cannot_grow(tmp_path, capsys):
    parent = _parent(tmp_path)
    assert main(["extend", str(parent), "--out", str(tmp_path / "same"), "--quiet"]) == 1  # its own data again
    assert "the data has no class the run lacks" in capsys.readouterr().err
    other = _parent(tmp_path / "h", "haframe")
    assert main(["extend", str(other), "--out", str(tmp_path / "new"), "--set", "data.holdout_leaves=null",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot grow new classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()  # refused before the new run's folder is made
    assert main(["extend", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "not a trained hiervision run folder" in capsys.readouterr().err
