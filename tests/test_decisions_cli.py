"""The decision rules through the CLI: ``evaluate --accuracy`` / ``--decode crm`` on a tiny trained run."""

import json

import pytest
import torch
import yaml

from hiervision.cli import main
from hiervision.decisions import load_decisions, set_temperature
from hiervision.experiment import load_run
from hiervision.marginals import as_temperature
from hiervision.serve.predictor import load_predictor
from hiervision.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("decisions-cli")
    cfg = {
        "data": {"name": "synthetic", "n_train": 256, "n_test": 64, "size": 16, "val_fraction": 0.25},
        "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5},
                  "loss_type": "hxe", "loss_alpha": 0.2},
        "train": {"epochs": 1, "batch_size": 64, "amp": "none"},
        "eval": {"calibrate": False},  # a run from before post-hoc calibration: temperature 1 in the checkpoint
    }
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "tiny.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    return d / "run"


def test_evaluate_reports_hedged_and_calibration(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "test", "--accuracy", "0.9"]) == 0
    out = json.loads(capsys.readouterr().out)
    hedged = out["hedged"]
    assert hedged["target"] == 0.9 and 0 <= hedged["accuracy"] <= 1 and hedged["lambda"] >= 0
    assert set(hedged) >= {"information_gain", "specificity", "depths", "baseline", "conformal"}
    assert {"ece", "ece_per_level", "hdist@1", "hdist@5", "hdist@20"} <= set(out)
    assert out["decode"] == "argmax"
    assert load_decisions(run_dir)["hedge"]["0.9"] == hedged["lambda"]  # stored for predict --accuracy
    with pytest.raises(ValueError, match="no hedging λ for accuracy 0.97"):
        load_predictor(run_dir).runtime.hedger(0.97)
    (run_dir / "decisions.json").unlink()


def test_evaluate_crm_decode(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--split", "test", "--decode", "crm"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode"] == "crm" and 0 <= out["leaf_accuracy"] <= 1


def test_evaluate_bad_accuracy_is_one_line(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse: usage, then one line naming the flag
        main(["evaluate", str(run_dir), "--accuracy", "1.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[-1].endswith("argument --accuracy: must lie in (0, 1), got 1.5")


def test_calibrated_run_uses_its_temperature(run_dir, capsys):
    # a checkpoint calibrated after the fact: decisions.json supplies T
    (run_dir / "decisions.json").write_text(json.dumps({"temperature": 2.0}))
    try:
        _, _, model, _ = load_run(run_dir)
        assert float(model.temperature) == 2.0
        assert main(["evaluate", str(run_dir), "--split", "val"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["temperature"] == 2.0
        assert load_decisions(run_dir) == {"temperature": 2.0}
    finally:
        (run_dir / "decisions.json").unlink()


@pytest.mark.parametrize("per_level", [False, True])
def test_predict_serve_and_export_apply_the_temperature(run_dir, per_level):
    """The runtime's records (predict, serve, an exported .onnx: one decoding path) carry the same
    calibrated probabilities as evaluate's, and hedging them needs no second temperature."""
    from hiervision.decisions import calibrate, hedge_records

    t = tuple(1.5 + d for d in range(Taxonomy.load(run_dir / "taxonomy.json").max_depth)) if per_level else 2.0
    (run_dir / "decisions.json").write_text(json.dumps({"temperature": t, "hedge": {"0.9": 0.5}}))
    try:
        _, taxonomy, model, _ = load_run(run_dir)
        runtime = load_predictor(run_dir).runtime
        assert as_temperature(runtime.sidecar["temperature"]) == t == runtime.temperature  # what export writes
        x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        records = runtime.predict_arrays(x.numpy(), node_scores=True)
        with torch.no_grad():
            pred = model.predict((x - torch.from_numpy(runtime.mean)) / torch.from_numpy(runtime.std))
        hot, cool = calibrate(pred, taxonomy, t), pred.path_prob
        for r, rec in enumerate(records):
            assert rec["path_ids"] == [int(n) for n in pred.paths[r] if n >= 0]  # paths never change
            assert rec["path_probability"] == pytest.approx(float(hot.path_prob[r]), rel=1e-4)
            assert rec["path_probability"] != pytest.approx(float(cool[r]), rel=1e-3)
            assert rec["top_k"][0]["probability"] == pytest.approx(rec["path_probability"], rel=1e-4)
            assert rec["node_scores"] == pytest.approx(hot.scores[r].tolist(), abs=1e-5)
        hedged = [runtime.hedger(0.9)(rec) for rec in records]
        expected = hedge_records(pred, taxonomy, 0.5, temperature=t)
        assert [h["node"] for h in hedged] == [e["node"] for e in expected]
        assert [h["probability"] for h in hedged] == pytest.approx([e["probability"] for e in expected], abs=1e-5)
    finally:
        (run_dir / "decisions.json").unlink()


def test_old_checkpoint_without_temperature_loads(run_dir, tmp_path):
    state = torch.load(run_dir / "best.pt", weights_only=True)
    state["model"].pop("temperature")
    _, _, model, _ = load_run(run_dir)
    model.temperature.fill_(3.0)
    model.load_state_dict(state["model"])
    assert float(model.temperature) == 1.0
    # a per-level temperature round-trips through a state dict into a model built with one
    set_temperature(model, (1.5, 0.5, 2.0))
    fresh = load_run(run_dir)[2]
    fresh.load_state_dict(model.state_dict())
    assert as_temperature(fresh.temperature) == (1.5, 0.5, 2.0)


def test_training_fits_a_temperature_per_level(tmp_path, capsys):
    """``eval.calibrate: per_level``: best.pt, decisions.json, metrics.json and evaluate carry one T per level."""
    cfg = {"data": {"name": "synthetic", "n_train": 128, "n_test": 32, "size": 16, "val_fraction": 0.25},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.25}},
           "train": {"epochs": 1, "batch_size": 64, "amp": "none"}, "eval": {"calibrate": "per_level"}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    _, taxonomy, model, _ = load_run(tmp_path / "run")
    t = as_temperature(model.temperature)
    assert isinstance(t, tuple) and len(t) == taxonomy.max_depth
    assert load_decisions(tmp_path / "run")["temperature"] == pytest.approx(t, rel=1e-6)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["temperature"] == pytest.approx(t)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["temperature"] == pytest.approx(t, rel=1e-6)


def test_unknown_loss_type_is_one_line(tmp_path, capsys):
    cfg = {"data": {"name": "synthetic", "n_train": 64, "n_test": 32, "size": 16},
           "model": {"name": "flat", "backbone": "resnet20", "loss_type": "focal"},
           "train": {"epochs": 1, "amp": "none"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model.loss_type 'focal'" in err and err.count("\n") == 1
