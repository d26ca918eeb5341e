"""Issue 24's comparison rows: post-hoc decision rows reuse the trained run and train nothing; the new
methods' rows are planned (optional until run) with their configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import comparison_plan as P  # noqa: E402  (benchmarks/ is not a package)
import comparison_stats as S  # noqa: E402  (benchmarks/ is not a package)

FLAT = """data: {name: synthetic_var, n_train: 256, n_test: 96, size: 16}
model: {name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}
train: {epochs: 1, batch_size: 64, amp: none}
eval: {batch_size: 256}
"""


def test_a_decision_row_answers_the_trained_run_by_its_rule_and_trains_nothing(tmp_path):
    from hiervision.training import train

    (tmp_path / "flat.yaml").write_text(FLAT)
    methods = (P.Method("flat", "flat", "flat.yaml"),
               P.Method("flat_crm", "flat + CRM", "flat.yaml", reuses="flat", decode="crm"),
               P.Method("flat_bayes", "flat + Bayes hF1", "flat.yaml", reuses="flat", decode="bayes:hf1:inner"))
    data = (P.DataSet("toy", "toy tree", methods, epochs={"cpu": 1}),)
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=data, config_dir=tmp_path)
    flat, crm, bayes = cells
    assert crm.run_dir == bayes.run_dir == flat.run_dir
    trained = []

    def train_fn(cfg, run_dir, resume):
        trained.append(run_dir)
        return train(cfg, run_dir, resume=resume)

    P.run_cells(cells, train_fn=train_fn, log=lambda *_: None)
    assert trained == [flat.run_dir] and crm.done() and bayes.done()
    own, m = flat.metrics(), crm.metrics()
    assert m["decode"] == "crm" and m["train_images_per_s"] == own["train_images_per_s"]
    saved = own["crm"]["crm"]  # the post-hoc step after training scored the same rule on the same scores
    for key in ("leaf_accuracy", "mistake_severity", "hdist@1", "hdist@5"):
        assert m[key] == pytest.approx(saved[key], abs=1e-6), key
    b = bayes.metrics()
    assert b["decode"] == "bayes:hf1:inner"
    assert b["hierarchical_f1_macro"] == pytest.approx(own["crm"]["bayes:hf1:inner"]["hierarchical_f1_macro"])
    summary = S.summarize(cells)
    assert summary["toy"]["rows"]["flat_crm"]["vs_flat"]["hdist@5"]["n"] == 1


def test_issue_24_rows_are_planned_with_their_configs(tmp_path):
    default = {c.method.key for c in P.plan("cpu", [0], tmp_path)}
    assert not default & set(P.MISTAKE_ROWS)  # optional: the default sitting does not start them
    cells = P.plan("cpu", [0], tmp_path, only=list(P.MISTAKE_ROWS))
    assert sorted(c.name for c in cells) == sorted(f"{k}/{d}/s0" for k in P.MISTAKE_ROWS for d in ("fmnist", "tiny32"))
    by = {c.name: c for c in cells}
    assert by["haframe_crm/tiny32/s0"].run_dir == by["haframe/tiny32/s0"].run_dir  # + CRM reuses the run
    assert by["haframe/tiny32/s0"].cfg["model"]["name"] == "haframe"
    assert by["flat_bayes_hf1/fmnist/s0"].method.decode == "bayes:hf1:inner"
    flat = P.plan("cpu", [0], tmp_path, only=["flat/fmnist"])[0]
    assert by["flat_crm/fmnist/s0"].run_dir == flat.run_dir  # post-hoc rows reuse flat's run
    # the same frozen recipe as flat: only the model section differs
    for key in ("haframe", "haf", "soft_max_margin", "bilt", "hiercos"):
        cfg = dict(by[f"{key}/fmnist/s0"].cfg)
        assert cfg["train"] == flat.cfg["train"] and cfg["data"] == flat.cfg["data"]
