"""evaluate --report: the numbers behind the plots are right and every file is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from hiervision import metrics
from hiervision.cli import main
from hiervision.decoding import Prediction
from hiervision.report import _level_confusion, metric_sentences, node_accuracy_per_node, write_report
from hiervision.taxonomy import PAD


def _prediction(tree, ends):
    paths = tree.encode_paths(torch.tensor(ends))
    return Prediction(paths, torch.zeros(len(ends), tree.num_nodes), torch.ones(len(ends)))


def test_node_accuracy_by_hand(koo_tree):
    t = koo_tree.index
    true = [t("C"), t("C"), t("E"), t("F")]
    pred = [t("C"), t("D"), t("F"), t("C")]  # right; sibling; sibling; other branch
    acc = node_accuracy_per_node(_prediction(koo_tree, pred).paths.numpy(),
                                 koo_tree.encode_paths(torch.tensor(true)).numpy(), koo_tree.num_nodes)
    assert acc[t("A")] == 1.0 and acc[t("C")] == 0.5 and acc[t("B")] == 0.5
    assert acc[t("E")] == 0.0 and acc[t("F")] == 0.0 and np.isnan(acc[t("G")]) and np.isnan(acc[t("D")])


def test_write_report_files_and_numbers(koo_tree, tmp_path):
    t = koo_tree.index
    true = torch.tensor([t("C"), t("C"), t("E"), t("F"), t("G")])
    pred = _prediction(koo_tree, [t("C"), t("D"), t("F"), t("C"), t("G")])
    pred.paths[4] = PAD  # an empty path counts as wrong everywhere and shares only the root
    out = write_report(pred, true, koo_tree, tmp_path / "r")
    for f in out["files"]:
        assert (tmp_path / "r" / f).stat().st_size > 0
    assert {"level_accuracy.png", "confusion_level1.png", "confusion_level2.png", "tree_accuracy.png",
            "mistake_severity.png"} <= set(out["files"])
    assert out["summary"]["level_accuracy"] == pytest.approx([3 / 5, 1 / 5])
    # heights of the common ancestors over the 4 mistakes: A (1), B (1), root (2), root (2)
    assert out["mistake_lca_heights"] == [0, 2, 2]
    sev = metrics.mistake_severity(pred.nodes, true, koo_tree)
    assert sev == pytest.approx(np.average(range(3), weights=out["mistake_lca_heights"]))
    page = (tmp_path / "r" / "index.html").read_text()
    assert all(f'src="{f}"' in page for f in out["files"] if f.endswith(".png"))
    assert json.loads((tmp_path / "r" / "report.json").read_text())["node_accuracy"]["C"] == 0.5
    # in words first, then the numbers, then pictures whose captions say what to look at
    assert "20.0% of the images got their whole path right" in page and "mistake severity" in page
    assert {"reliability.png", "operating_curve.png"} <= set(out["files"])
    assert "on the dashed diagonal the probabilities can be read as chances" in page
    assert 'alt="level_accuracy.png"' not in page


def test_metric_sentences_say_each_number_once():
    said = metric_sentences({"path_accuracy": 0.5, "leaf_accuracy": 0.625, "mistake_severity": 1.25,
                             "valid_path_rate": 0.9, "num_samples": 1200, "ece": None})
    assert said == ["50.0% of the images got their whole path right, from the top level to the end class.",
                    "The end class was right for 62.5% (top-1).",
                    "When the end class was wrong, answer and truth met on average 1.25 levels up (1 = a sibling "
                    "class: the mildest mistake).",
                    "10.0% of the predicted paths were not paths of the tree.", "1,200 images."]


def test_a_wide_level_shows_its_most_confused_nodes():
    # level 1 holds nodes 1..5; node 3's images are all wrong (3), node 5's half (1), node 1 all right
    true = np.array([[1], [1], [3], [3], [3], [5], [5], [2]])
    pred = np.array([[1], [1], [4], [4], [2], [5], [2], [2]])
    conf, shown = _level_confusion(pred, true, (1, 2, 3, 4, 5), 0, most=2)
    assert shown == [3, 5]  # most mistakes first
    assert conf.tolist() == [[3 - 3, 0, 3], [0, 1, 1]]  # node 3: all to others; node 5: one right, one to 2
    conf, shown = _level_confusion(pred, true, (1, 2, 3, 4, 5), 0)
    assert shown == [1, 2, 3, 4, 5] and conf.sum() == len(true)


def test_a_tree_too_big_to_draw_is_left_out_and_said(tmp_path, monkeypatch):
    import hiervision.report as R
    from hiervision import Taxonomy

    tree = Taxonomy.from_paths([f"g{i}/c{j}" for i in range(4) for j in range(5)])
    ends = torch.tensor(tree.leaves[:10])
    monkeypatch.setattr(R, "MAX_TREE_LEAVES", 19)
    out = write_report(_prediction(tree, ends.tolist()), ends, tree, tmp_path / "r", max_confusion_classes=3)
    assert "tree_accuracy.png" not in out["files"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "too many end classes to draw" in page and "the 3 nodes with the most mistakes of 20" in page


def test_multi_label_refused(koo_tree, tmp_path):
    pred = _prediction(koo_tree, [koo_tree.index("C")])
    with pytest.raises(ValueError, match="multi-label"):
        write_report(pred, torch.zeros(1, koo_tree.num_nodes, dtype=torch.bool), koo_tree, tmp_path)


def test_evaluate_report_flag(tmp_path, capsys):
    cfg = {"data": {"name": "synthetic", "n_train": 128, "n_test": 48, "size": 16},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
           "train": {"epochs": 1, "batch_size": 64, "amp": "none"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--report", str(tmp_path / "rep")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["report"].endswith("index.html") and (tmp_path / "rep" / "index.html").is_file()
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["summary"]["path_accuracy"] == pytest.approx(result["path_accuracy"])
