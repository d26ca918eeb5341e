"""New classes without retraining (hiervision extend): the grown tree, the kept and imprinted weights, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hiervision.cli import main
from hiervision.cli.extend import extend_config
from hiervision.config import load_config
from hiervision.data.base import grow_tree
from hiervision.experiment import load_run, run_data, run_model
from hiervision.extend import IMPRINT_IMAGES, init_from_run
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


def test_extend_adds_the_held_out_classes_keeps_the_backbone_and_evaluates_and_exports(tmp_path, capsys):
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
    metrics = json.loads((new / "metrics.json").read_text())
    assert "started from" in metrics["data_note"] and "imprinted" in metrics["data_note"]
    assert main(["evaluate", str(new), "--device", "cpu"]) == 0  # evaluates like any run (its tree rebuilt)
    assert main(["export", str(new), "--out", str(tmp_path / "m.onnx")]) == 0


def test_a_new_row_is_its_images_mean_feature_direction_at_the_known_rows_norm(tmp_path):
    parent = _parent(tmp_path)
    with torch.no_grad():  # features and weights compared, nothing trained
        cfg = extend_config(parent, None, 1, False, 0.1, ["data.holdout_leaves=null"])
        data = run_data(cfg)
        model = run_model(cfg, data.taxonomy, data.meta()).eval()
        record = init_from_run(model, parent, data)
        old = load_run(parent)[2]
        known, fc = record["known_classes"], model.fc
        assert record["new_classes"] == len(model.classes) - known > 1
        assert torch.equal(fc.weight[:known], old.fc.weight) and torch.equal(fc.bias[:known], old.fc.bias)
        norm = old.fc.weight.norm(dim=1).mean()
        targets = data.train.targets
        means = []
        for c in model.classes[known:].tolist():
            idx = (targets == c).nonzero().flatten()[:IMPRINT_IMAGES]
            images = torch.stack([data.train[int(i)][0] for i in idx])
            means.append(F.normalize(model.backbone(data.normalize(images)), dim=1).mean(0))
        cos = F.normalize(fc.weight[known:], dim=1) @ F.normalize(torch.stack(means), dim=1).T
        own = cos.diagonal().clone()
        assert torch.allclose(own, torch.ones(len(means)), atol=1e-5)  # its own images' direction ...
        assert (own > cos.fill_diagonal_(-1).amax(1)).all()  # ... and no other new class's
        assert torch.allclose(fc.weight[known:].norm(dim=1), norm.expand(len(means)), rtol=1e-4)  # the known rows' norm
        assert torch.allclose(fc.bias[known:], old.fc.bias.mean().expand(len(means)))


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
