"""A frozen backbone's features, computed once and cached (train.freeze_backbone / train.precompute_features),
and fine-tuning that keeps the encoder (train.backbone_lr_scale, train.unfreeze_after)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hiervision.training.features as features_module
from hiervision.config import ConfigError, load_config, merge, validate_config
from hiervision.experiment import run_data, run_model
from hiervision.models.backbones import create_backbone
from hiervision.training import build_optimizer, cached_features, train
from hiervision.training.steps import (
    check_backbone_options,
    freeze_batchnorm_stats,
    lr_factor,
    optimizer_params,
    set_lr,
)

BASE = ["data={name: synthetic, n_train: 128, n_test: 64, size: 16}",
        "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}",
        "train.epochs=1", "train.batch_size=32", "train.progress=false", "train.amp=none", "eval.batch_size=256"]
TIMINGS = ("train_images_per_s", "eval_images_per_s")


def config(*overrides: str) -> dict:
    return load_config(overrides=[*BASE, *overrides])


@pytest.fixture
def weights(tmp_path) -> Path:
    """A backbone state dict on disk, as a pretrained encoder would be (the same weights whatever the seed)."""
    torch.manual_seed(123)
    path = tmp_path / "encoder.pt"
    torch.save(create_backbone("resnet20", in_chans=3, width=0.25).state_dict(), path)
    return path


@pytest.fixture
def extractions(monkeypatch) -> list[int]:
    """How many times the backbone ran over the data (one entry per extraction)."""
    calls: list[int] = []
    real = features_module.extract

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract", counting)
    return calls


def frozen(weights: Path, cache: Path, *overrides: str) -> dict:
    return config(f"model.backbone_kwargs.pretrained_path={weights}", "train.freeze_backbone=true",
                  f"train.feature_cache={cache}", *overrides)


def record(run: Path) -> dict:
    return json.loads((run / "features.json").read_text())


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


# ----------------------------------------------------------------------------- computed once, reused
def test_the_cache_is_written_once_and_reused_by_another_head_and_seed(tmp_path, weights, extractions):
    cache = tmp_path / "cache"
    train(frozen(weights, cache), tmp_path / "flat")
    train(frozen(weights, cache, "model.name=guo_multihead", "model.strategy=parallel"), tmp_path / "multihead")
    # another seed over the same split (the split, and so the normalisation statistics, follow data.split_seed)
    train(frozen(weights, cache, "seed=1", "data.split_seed=0"), tmp_path / "seed1")
    assert len(extractions) == 1
    first, *others = (record(tmp_path / r) for r in ("flat", "multihead", "seed1"))
    assert not first["reused"] and all(r["reused"] for r in others)
    assert {r["fingerprint"] for r in others} == {first["fingerprint"]}
    folder = Path(first["folder"])
    assert [p.name for p in cache.iterdir()] == [folder.name]
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test.npy", "train.npy", "val.npy"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "float32" and meta["splits"]["train"]["shape"][1] == first["num_features"]
    assert meta["identity"]["backbone"]["name"] == "resnet20"
    assert "pretrained_path" not in meta["identity"]["backbone"]["kwargs"]  # the weights' hash stands for it


def _setup(cfg: dict):
    cfg = validate_config(cfg)
    torch.manual_seed(0)
    data = run_data(cfg)
    return cfg, data, run_model(cfg, data.taxonomy, data.meta())


def _features(cfg: dict, data, model, cache: Path):
    return cached_features(model, data, 256, torch.device("cpu"), None, cache=cache, model_cfg=cfg["model"])


def test_a_change_of_weights_width_or_data_recomputes(tmp_path, weights, extractions):
    cache = tmp_path / "cache"
    cfg, data, model = _setup(frozen(weights, cache))
    _, a = _features(cfg, data, model, cache)
    _, again = _features(cfg, data, model, cache)
    assert again["reused"] and again["fingerprint"] == a["fingerprint"]
    moved = tmp_path / "moved.pt"  # the same weights from another file: reused
    moved.write_bytes(weights.read_bytes())
    cfg2, data2, model2 = _setup(frozen(moved, cache))
    assert _features(cfg2, data2, model2, cache)[1]["reused"]
    assert len(extractions) == 1
    other = tmp_path / "other.pt"  # other weights (another pretrained_path): recomputed
    state = torch.load(weights, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    changes = [frozen(other, cache),
               config("model.backbone_kwargs.width=0.5", "train.freeze_backbone=true"),
               frozen(weights, cache, "data.limit_train=96")]
    prints = {a["fingerprint"]}
    for changed in changes:
        c, d, m = _setup(changed)
        _, r = _features(c, d, m, cache)
        assert not r["reused"]
        prints.add(r["fingerprint"])
    assert len(prints) == 4 and len(extractions) == 4


def test_a_truncated_cache_file_is_recomputed_with_a_note(tmp_path, weights, extractions, capsys):
    cache = tmp_path / "cache"
    cfg, data, model = _setup(frozen(weights, cache))
    bundle, rec = _features(cfg, data, model, cache)
    want = bundle.train.features.clone()
    path = Path(rec["folder"]) / "train.npy"
    path.write_bytes(path.read_bytes()[:-100])
    capsys.readouterr()
    bundle, rec = _features(cfg, data, model, cache)
    err = capsys.readouterr().err
    assert not rec["reused"] and len(extractions) == 2
    assert err.count("\n") == 1 and "hiervision: note:" in err and "train.npy" in err and "recomputing" in err
    assert torch.equal(bundle.train.features, want)
    (Path(rec["folder"]) / "meta.json").write_text("{not json")  # a damaged meta.json: the same
    assert not _features(cfg, data, model, cache)[1]["reused"]
    assert _features(cfg, data, model, cache)[1]["reused"] and len(extractions) == 3


def test_precompute_features_is_the_same_cached_mechanism(tmp_path, weights, extractions):
    cache = tmp_path / "cache"
    base = config(f"model.backbone_kwargs.pretrained_path={weights}", f"train.feature_cache={cache}",
                  "train.epochs=2")
    old = train(merge(base, {"train": {"precompute_features": True}}), tmp_path / "precompute")
    new = train(merge(base, {"train": {"freeze_backbone": True}}), tmp_path / "freeze")
    assert len(extractions) == 1
    assert record(tmp_path / "precompute")["key"] == "train.precompute_features"
    assert record(tmp_path / "freeze")["reused"] and record(tmp_path / "freeze")["key"] == "train.freeze_backbone"
    assert without_timings(old) == without_timings(new)  # computed or read back: the same float32 numbers
    a = torch.load(tmp_path / "precompute" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "freeze" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_head_without_forward_head_is_refused_in_one_line(tmp_path):
    cfg = config("model={name: hie, backbone: resnet20, backbone_kwargs: {width: 0.25}}",
                 "train.freeze_backbone=true", f"train.feature_cache={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"^train.freeze_backbone: model HiEClassifier does not run on one ") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("sets", "match"), [
    ({"freeze_backbone": True, "unfreeze_after": 1}, r"^train.unfreeze_after: .* train.freeze_backbone is true"),
    ({"freeze_backbone": True, "backbone_lr_scale": 0.1}, r"^train.backbone_lr_scale: .* train.freeze_backbone"),
    ({"precompute_features": True, "backbone_lr_scale": 0.1}, r"^train.backbone_lr_scale: .*precompute_features is"),
    ({"freeze_backbone": False, "precompute_features": True}, r"^train.freeze_backbone: false contradicts"),
    ({"unfreeze_after": 3, "epochs": 3}, r"^train.unfreeze_after: 3 ≥ train.epochs \(3\)"),
])
def test_contradicting_backbone_settings_are_refused_in_one_line(sets, match):
    tcfg = validate_config(merge(config(), {"train": sets}))["train"]
    with pytest.raises(ConfigError, match=match) as e:
        check_backbone_options(tcfg)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fine-tuning the encoder
def test_backbone_lr_scale_gives_two_groups_that_the_schedule_scales_together():
    cfg, data, model = _setup(config("train.backbone_lr_scale=0.1", "train.warmup_epochs=1", "train.epochs=3"))
    tcfg = cfg["train"]
    opt = build_optimizer(optimizer_params(model, tcfg), tcfg)
    head, backbone = opt.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(head["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    loop = SimpleNamespace(optimizer=opt, base_lrs=[g["lr"] for g in opt.param_groups], steps_per_epoch=4,
                           tcfg=tcfg)
    for step in (0, 2, 5, 11):  # in the warm-up, then on the cosine
        set_lr(loop, step)
        factor = lr_factor(step, 4, tcfg)
        assert head["lr"] == pytest.approx(0.1 * factor) and backbone["lr"] == pytest.approx(0.01 * factor)
    plain = build_optimizer(optimizer_params(model, validate_config(config())["train"]), tcfg)
    assert len(plain.param_groups) == 1  # absent: one group, as before


def test_backbone_lr_scale_survives_a_resume(tmp_path):
    cfg = config("train.backbone_lr_scale=0.25", "train.epochs=2")
    train(cfg, tmp_path, max_epochs_this_call=1)
    train(cfg, tmp_path)
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.25 * groups[0]["lr"])


def test_unfreeze_after_trains_the_head_alone_first_then_everything(tmp_path, weights):
    start = torch.load(weights, weights_only=True)
    cfg = config(f"model.backbone_kwargs.pretrained_path={weights}", "train.unfreeze_after=1", "train.epochs=2")
    initial = _setup(cfg)[2].state_dict()  # the engine's model: the same seed, then the data, then the model
    train(cfg, tmp_path / "run", max_epochs_this_call=1)
    after1 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for k, v in start.items():  # weights and batch-norm running statistics as loaded
        assert torch.equal(after1[f"backbone.{k}"], v), k
    assert not torch.equal(after1["fc.weight"], initial["fc.weight"])  # the head learned meanwhile
    train(cfg, tmp_path / "run")
    after2 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    moved = [k for k, v in start.items() if not torch.equal(after2[f"backbone.{k}"], v)]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)


def test_batch_norms_of_a_frozen_backbone_stay_in_eval_mode_affine_or_not():
    cfg, _, model = _setup(config())
    model.backbone.extra = torch.nn.BatchNorm1d(4, affine=False)  # no parameters to tell it is frozen
    model.train()
    freeze_batchnorm_stats(model, {"backbone"})
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    model.train()
    freeze_batchnorm_stats(model, set())
    assert all(m.training for m in norms)
