"""train.log_to: TensorBoard and MLflow get every epoch (per level) and the final metrics; read back with their
own readers. A missing library is one line before any data is read; off rank 0 nothing is written."""

import math

import pytest

from hiervision import tracking
from hiervision.cli import main
from hiervision.config import ConfigError, load_config, merge
from hiervision.training import train


def test_flatten_metrics_per_level_and_safe_names():
    flat = tracking.flatten_metrics({"path_accuracy": 0.5, "level_accuracy": [1.0, 0.75], "hdist@5": 1.2,
                                     "calibration": {"ece": {"before": 0.1}}, "multi_label": False,
                                     "data": "synthetic", "nan": math.nan}, "val")
    assert flat == {"val/path_accuracy": 0.5, "val/level_accuracy/level_1": 1.0, "val/level_accuracy/level_2": 0.75,
                    "val/hdist_5": 1.2, "val/calibration/ece/before": 0.1}


def test_hedged_answers_are_named_by_their_target_and_the_logs_are_located():
    flat = tracking.flatten_metrics({"hedged": [{"target": 0.9, "accuracy": 0.91}, {"target": 0.99, "accuracy": 0.98}]},
                                    "test")
    assert flat == {"test/hedged/target_0.9/target": 0.9, "test/hedged/target_0.9/accuracy": 0.91,
                    "test/hedged/target_0.99/target": 0.99, "test/hedged/target_0.99/accuracy": 0.98}
    cfg = load_config(overrides=["train.log_to=[tensorboard, mlflow]"])
    where = tracking.log_locations(cfg, "runs/x")
    assert where[0].startswith("tensorboard --logdir ") and where[0].endswith("runs/x/tensorboard")
    assert where[1].startswith("mlflow ui")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.log_to\[0\]' must be one of tensorboard, mlflow"):
        load_config(overrides=["train.log_to=[wandb]"])


def test_missing_library_is_one_line_before_any_data(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tracking.BACKENDS, "mlflow", ("hiervision_no_such_module", "mlflow"))
    cfg = merge(tiny_cfg, {"train": {"log_to": ["mlflow"]}})
    with pytest.raises(ConfigError, match=r"'train.log_to' has 'mlflow' but .* pip install 'hiervision\[mlflow\]'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "splits.json").exists()  # the data was never read
    (tmp_path / "c.yaml").write_text("data: {name: synthetic, n_train: 64, n_test: 32, size: 8}\n"
                                     "train: {log_to: [mlflow]}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hiervision[mlflow]" in err


def test_off_rank_zero_nothing_is_written(tmp_path):
    cfg = load_config(overrides=["train.log_to=[tensorboard, mlflow]"])
    tracker = tracking.open_tracker(cfg, tmp_path / "run", is_main=False)
    tracker.log_epoch({"log": {"epoch": 1, "lr": 0.1, "train_loss": 1.0}, "val": {}})
    tracker.finish({"path_accuracy": 1.0})
    assert tracker.backends == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_events_read_back_by_each_tool(tiny_cfg, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = merge(tiny_cfg, {"train": {"epochs": 1, "log_to": ["tensorboard", "mlflow"]}})
    result = train(cfg, out)
    depth = len(result["level_accuracy"])
    per_epoch = ["train/loss", "train/lr", "train/images_per_s", "val/path_accuracy", "val/mistake_severity",
                 "val/ece", *(f"val/level_accuracy/level_{d + 1}" for d in range(depth))]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in per_epoch:
        assert tag in tags, tag
        assert [e.step for e in events.Scalars(tag)] == [1]
    for d in range(depth):  # the test metrics of metrics.json, per level, at the last epoch
        (last,) = events.Scalars(f"test/level_accuracy/level_{d + 1}")
        assert last.step == 1 and last.value == pytest.approx(result["level_accuracy"][d])
    assert "config/text_summary" in events.Tags()["tensors"]  # the config as text

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hiervision").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert run.data.params["model.name"] == "flat"
    for d in range(depth):
        history = client.get_metric_history(run.info.run_id, f"val/level_accuracy/level_{d + 1}")
        assert [m.step for m in history] == [1] and all(0 <= m.value <= 1 for m in history)
    assert run.data.metrics["test/path_accuracy"] == pytest.approx(result["path_accuracy"])
    assert run.data.metrics["test/hdist_5"] == pytest.approx(result["hdist@5"])


def test_a_quote_in_the_run_folder_and_an_unreachable_server_are_one_line(tiny_cfg, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = merge(tiny_cfg, {"train": {"epochs": 1, "log_to": ["mlflow"]}})
    train(cfg, tmp_path / "it's here")  # the folder's quote never reaches MLflow's filter unescaped
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match=r"train.log_to: mlflow cannot start at http://127.0.0.1:\d+ \(") as e:
        train(cfg, tmp_path / "other")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "other" / "splits.json").exists()  # stopped before the data was read


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_run_goes_on(tiny_cfg, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")

    def broken(self, metrics, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking._TensorBoard, "log", broken)
    result = train(merge(tiny_cfg, {"train": {"epochs": 1, "log_to": ["tensorboard"]}}), tmp_path / "run")
    assert "path_accuracy" in result and (tmp_path / "run" / "metrics.json").is_file()
    err = capsys.readouterr().err
    assert err.count("train.log_to: tensorboard stopped logging (OSError: [Errno 28] No space left on device)") == 1
