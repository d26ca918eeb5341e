"""A run's length said early, and a time budget it fits (issue 39): train --time, train.time_budget."""

from __future__ import annotations

import pytest

from hiervision.config import ConfigError, load_config, parse_duration
from hiervision.training import budget, train
from hiervision.training.budget import Planner, format_duration


@pytest.mark.parametrize(("text", "seconds"), [("20m", 1200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400),
                                               ("90", 90), ("2h 5min", 7500)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1h30", "0", "-5m", "nan"])
def test_a_bad_duration_is_one_line(text):
    with pytest.raises(ValueError, match=r"--time: a duration (such as 20m|must be longer)"):
        parse_duration(text)
    with pytest.raises(ConfigError, match="config key 'train.time_budget'"):
        load_config(overrides=[f"train.time_budget={text or 'x'}"])


def test_the_planner_fits_the_epochs_to_the_budget_and_replans_on_the_first_epoch(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: clock[0])
    tcfg = {"epochs": 30, "time_budget": 20.0}
    planner = Planner(tcfg, train_images=1000, val_images=100, first_epoch=0)
    said = None
    for _ in range(budget.ESTIMATE_STEPS + 1):  # 50 images per step, 0.1 s each: 0.002 s per image
        said = planner.after_step(50) or said
        clock[0] += 0.1
    each = 0.002 * (1000 + budget.VALIDATION_COST * 100)
    assert planner.epoch_seconds() == pytest.approx(each)
    assert tcfg["epochs"] == int((20.0 - 2.1) // each) == 8
    assert said == f"time budget 20 s: 8 of 30 epoch(s) fit, {format_duration(each)} each; the learning-rate " \
                   "schedule spans 8 epochs"
    assert planner.after_epoch(each * 1.1) is None  # within 25 %: the plan stands
    late = Planner({"epochs": 30, "time_budget": 20.0}, 1000, 100, 0)
    assert "fit" in late.after_epoch(3.0) and late.tcfg["epochs"] == int((20 - 3) // 3) + 1
    assert planner.left(2, 0.5) == format_duration((8 - 2.5) * planner.epoch_seconds())  # the whole run's


def test_a_run_without_a_budget_says_how_long_it_takes_and_a_resume_may_change_its_epochs(tmp_path, capsys):
    cfg = load_config(overrides=["data={name: synthetic, n_train: 64, n_test: 32, size: 8}",
                                 "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}",
                                 "train.epochs=3", "train.batch_size=16", "train.amp=none"])
    assert train(cfg, tmp_path / "run", max_epochs_this_call=1) == {"stopped_at_epoch": 1}
    out = capsys.readouterr()
    assert "time: about " in out.out + out.err and "for 3 epoch(s)" in out.out + out.err  # timed on the first epoch
    cfg["train"]["epochs"] = 2  # fewer epochs than planned: the work so far is kept, the rest re-planned
    result = train(cfg, tmp_path / "run")
    assert result["epochs"] == 2
    cfg["train"]["lr"] = 0.5  # anything else is another run
    with pytest.raises(Exception, match="holds a run with another config"):
        train(cfg, tmp_path / "run")
