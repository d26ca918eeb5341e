"""The Bayes decision rule through evaluate, predict/serve (the numpy runtime) and the export sidecar,
on a tiny trained run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from hiervision.cli import main
from hiervision.decisions import calibrate
from hiervision.experiment import load_run
from hiervision.export import run_predictor, sidecar
from hiervision.runtime import Predictor

RULES = ["crm", "bayes:hf1", "bayes:hf1:inner", "bayes:severity", "bayes:path_accuracy"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bayes-cli")
    cfg = {
        "data": {"name": "synthetic", "n_train": 256, "n_test": 64, "size": 16, "val_fraction": 0.25},
        "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
    }
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "tiny.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    return d / "run"


def test_metrics_json_reports_each_rule_beside_argmax(run_dir):
    rules = json.loads((run_dir / "metrics.json").read_text())["crm"]
    assert set(rules) == {"argmax", "crm", "bayes:hf1", "bayes:hf1:inner"}
    assert {"hdist@5", "hierarchical_f1", "depth_severity"} <= set(rules["bayes:hf1:inner"])


def test_evaluate_decode_bayes(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "test", "--decode", "bayes", "--metric", "hf1",
                 "--allow-inner"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode"] == "bayes:hf1:inner" and 0 <= out["hierarchical_f1_macro"] <= 1
    assert main(["evaluate", str(run_dir), "--split", "test", "--decode", "bayes", "--metric", "severity"]) == 0
    severity = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run_dir), "--split", "test", "--decode", "crm"]) == 0
    crm = json.loads(capsys.readouterr().out)
    assert severity["leaf_accuracy"] == crm["leaf_accuracy"] and severity["decode"] == "bayes:severity"


@pytest.mark.parametrize("argv", [["--metric", "hf1"], ["--decode", "crm", "--allow-inner"]])
def test_a_metric_without_the_bayes_rule_is_one_line(run_dir, capsys, argv):
    assert main(["evaluate", str(run_dir), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hiervision: error: --metric and --allow-inner go with") and err.count("\n") == 1


@pytest.mark.parametrize("rule", RULES)
def test_the_runtime_answers_as_evaluate_does(run_dir, rule):
    """predict and serve (the numpy runtime over a run) give each image evaluate's answer and probability."""
    _, taxonomy, model, meta = load_run(run_dir)
    runtime = run_predictor(run_dir, decode=rule)
    assert runtime.decode == rule == runtime.sidecar["decode"]  # what an export of this run records
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    records = runtime.predict_arrays(x.numpy())
    with torch.no_grad():
        pred = model.predict((x - torch.from_numpy(runtime.mean)) / torch.from_numpy(runtime.std))
    expected = calibrate(pred, taxonomy, runtime.temperature, rule)
    for r, rec in enumerate(records):
        assert rec["path_ids"] == [int(n) for n in expected.paths[r] if n >= 0]
        assert rec["path_probability"] == pytest.approx(float(expected.path_prob[r]), abs=1e-5)


def test_the_sidecar_rule_is_used_unless_replaced(run_dir):
    _, _, model, meta = load_run(run_dir)
    side = sidecar(model, meta, decode="bayes:hf1:inner")
    engine = run_predictor(run_dir).engine
    assert Predictor(sidecar=side, engine=engine).decode == "bayes:hf1:inner"
    assert Predictor(sidecar=side, engine=engine, decode="crm").decode == "crm"
    assert Predictor(sidecar=sidecar(model, meta), engine=engine).decode == "argmax"
    with pytest.raises(ValueError, match="sidecar key 'decode' must be argmax, crm, bayes:METRIC"):
        Predictor(sidecar={**side, "decode": "bayes:wu_palmer"}, engine=engine)
    multi = {**side, "decoder": {"kind": "multi_label", "end_nodes": "leaves", "threshold": 0.5}}
    with pytest.raises(ValueError, match="decision rules apply to single-label models only"):
        Predictor(sidecar=multi, engine=engine)


def test_a_run_answers_by_its_own_eval_decode_unless_told(run_dir, tmp_path):
    """A run trained with ``eval.decode: crm`` (e.g. ``--set eval.decode=crm``) predicts, serves and exports by
    CRM without a flag; ``--decode`` still replaces it."""
    crm_run = tmp_path / "crm-run"
    shutil.copytree(run_dir, crm_run)
    cfg = yaml.safe_load((crm_run / "config.yaml").read_text())
    cfg["eval"]["decode"] = "crm"
    (crm_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert run_predictor(run_dir).decode == "argmax"
    assert run_predictor(crm_run).decode == "crm"
    assert run_predictor(crm_run, decode="argmax").decode == "argmax"
