import json

import pytest
import torch

from hiervision.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hiervision.config import load_config, merge
from hiervision.experiment import load_run
from hiervision.training import TrainingError, frozen_groups, lr_factor, train


def test_resume_after_stop_gives_the_same_final_metrics(tiny_cfg, tmp_path):
    full = train(tiny_cfg, tmp_path / "full")
    first = train(tiny_cfg, tmp_path / "split", max_epochs_this_call=1)
    assert first == {"stopped_at_epoch": 1}
    assert not (tmp_path / "split" / "metrics.json").exists()
    resumed = train(tiny_cfg, tmp_path / "split")
    drop = {"train_images_per_s", "eval_images_per_s"}  # timings
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_contents(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg, tmp_path)
    for f in ("config.yaml", "taxonomy.json", "best.pt", "last.pt", "log.csv", "metrics.json"):
        assert (tmp_path / f).is_file(), f
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("path_accuracy", "node_accuracy", "level_accuracy", "hierarchical_f1", "mistake_severity",
                "valid_path_rate"):
        assert key in on_disk
    assert on_disk["path_accuracy"] == metrics["path_accuracy"]
    assert len((tmp_path / "log.csv").read_text().strip().splitlines()) == 1 + tiny_cfg["train"]["epochs"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    cfg, tax, model, meta = load_run(tmp_path)
    assert meta["in_chans"] == 3 and tax.fingerprint == load_checkpoint(tmp_path / "best.pt")["taxonomy_fingerprint"]


def test_other_config_in_same_folder_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg, tmp_path, max_epochs_this_call=1)
    other = merge(tiny_cfg, {"train": {"lr": 0.01}})
    with pytest.raises(TrainingError, match="another config"):
        train(other, tmp_path)


def test_nan_loss_stops_with_a_clear_message(tiny_cfg, tmp_path):
    cfg = merge(tiny_cfg, {"train": {"lr": 1e30, "weight_decay": 0, "warmup_epochs": 0}})
    with pytest.raises(TrainingError, match=r"loss is not finite.*lower train.lr"):
        train(cfg, tmp_path)


def test_freeze_schedule_keeps_frozen_part_unchanged(tiny_cfg, tmp_path):
    cfg = merge(tiny_cfg, {"train": {"epochs": 1, "freeze": [{"epochs": [0, 1], "frozen": ["backbone"]}]}})
    torch.manual_seed(cfg["seed"])
    train(cfg, tmp_path)
    # rebuild the initial model exactly as train() did: same seed, same construction order
    from hiervision.data import build_data
    from hiervision.models import create_model

    torch.manual_seed(cfg["seed"])
    data = build_data({**cfg["data"], "split_seed": cfg["seed"]})
    init = create_model("flat", data.taxonomy, in_chans=data.in_chans, backbone="resnet20",
                        backbone_kwargs={"width": 0.5}).state_dict()
    after = load_checkpoint(tmp_path / "last.pt")["model"]
    backbone = [k for k in after if k.startswith("backbone.")]
    assert backbone and all(torch.equal(init[k], after[k]) for k in backbone)  # BN running stats included
    assert not torch.equal(init["fc.weight"], after["fc.weight"])


def test_frozen_groups_and_schedules():
    sched = [{"epochs": [0, 2], "frozen": ["cnn"]}, {"epochs": [2, 4], "frozen": ["rnn"]}]
    known = {"cnn", "rnn", "backbone", "head"}
    assert [frozen_groups(e, sched, known) for e in range(5)] == [{"cnn"}, {"cnn"}, {"rnn"}, {"rnn"}, set()]
    with pytest.raises(Exception, match="unknown group 'x'"):
        frozen_groups(0, [{"epochs": [0, 1], "frozen": ["x"]}], known)
    cfg = load_config()["train"] | {"epochs": 10, "warmup_epochs": 1}
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(10, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 10, cfg) == pytest.approx(0.0, abs=1e-9)


def test_checkpoint_atomic_and_safe(tmp_path, koo_tree):
    from hiervision import Taxonomy

    p = tmp_path / "c.pt"
    save_checkpoint(p, {"model": {"w": torch.ones(2)}, "taxonomy_fingerprint": koo_tree.fingerprint})
    assert load_checkpoint(p, koo_tree)["model"]["w"].sum() == 2
    other = Taxonomy.from_parent_map({"x": None, "y": None})
    with pytest.raises(CheckpointError, match="another taxonomy"):
        load_checkpoint(p, other)
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(p)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)  # weights_only refuses arbitrary objects


@pytest.mark.slow
def test_short_real_training_run_learns(tmp_path):
    from conftest import FMNIST

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    cfg = load_config(
        overrides=["data={name: fashion_mnist, limit_train: 3000, limit_test: 1000}", "train.epochs=3",
                   "model.backbone_kwargs={width: 0.5}", "train.warmup_epochs=0.3", "train.progress=false"]
    )
    m = train(cfg, tmp_path)
    log = (tmp_path / "log.csv").read_text().splitlines()
    losses = [float(r.split(",")[2]) for r in log[1:]]
    assert losses[-1] < losses[0]
    assert m["leaf_accuracy"] > 0.6  # chance is 0.1
    assert m["level_accuracy"][0] > 0.85  # Clothes vs Goods; chance 0.6
    assert m["valid_path_rate"] == 1.0


def test_multilabel_run_tunes_and_stores_threshold(tmp_path):
    cfg = load_config(overrides=[
        "data={name: synthetic_multilabel, n_train: 320, n_test: 128, size: 16}",
        "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
        "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.amp=none",
    ])
    m = train(cfg, tmp_path)
    assert {"path_f1", "node_f1", "threshold"} <= set(m)
    stored = float(load_checkpoint(tmp_path / "best.pt")["model"]["threshold"])
    assert stored == pytest.approx(m["threshold"]) and 0 < stored < 1
    _, _, model, _ = load_run(tmp_path)
    assert float(model.threshold) == pytest.approx(stored)


def test_no_validation_split_keeps_the_last_epoch(tiny_cfg, tmp_path):
    """data.val_fraction 0 (a paper's full training set): training runs, best.pt is the last epoch."""
    cfg = load_config(overrides=["data={name: synthetic, n_train: 320, n_test: 128, size: 16, val_fraction: 0}",
                                 "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
                                 "train.epochs=2", "train.progress=false", "train.amp=none"])
    train(cfg, tmp_path)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 2


def test_training_never_steps_on_a_last_batch_of_a_handful_of_images(tiny_cfg, tmp_path, monkeypatch):
    """Fashion-MNIST's seed-2 split left 2 of 128 images in the last batch, and that step wrecked batch norm's
    running statistics (training.MIN_LAST_BATCH_FRACTION): such a batch is dropped, a bigger one kept."""
    import hiervision.training.engine as engine
    from hiervision.experiment import run_data

    n = len(run_data(tiny_cfg).train)
    seen: list[int] = []
    accumulate = engine.accumulate
    monkeypatch.setattr(engine, "accumulate", lambda loop, x, y: (seen.append(len(x)), accumulate(loop, x, y))[1])
    for rest, kept in ((2, False), (n // 3, True)):
        seen.clear()
        cfg = merge(tiny_cfg, {"train": {"batch_size": n - rest, "epochs": 1}})
        train(cfg, tmp_path / str(rest))
        assert seen == ([n - rest, rest] if kept else [n - rest])
