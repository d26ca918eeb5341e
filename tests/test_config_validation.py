"""Every seed/train/eval value is checked where it enters, with the key named (issue 13, item 5)."""

from __future__ import annotations

import pytest

from hiervision import Taxonomy
from hiervision.config import DEFAULTS, ConfigError, check_given_level, load_config, validate_config
from hiervision.training import TrainingError, check_loss

BAD = [
    ("train.epochs=2.7", r"'train.epochs' must be a whole number, got 2.7"),
    ("train.epochs=0", r"'train.epochs' must be ≥ 1, got 0"),
    ("train.epochs=true", r"'train.epochs' must be a whole number"),
    ("train.batch_size=0", r"'train.batch_size' must be ≥ 1"),
    ("train.lr=0", r"'train.lr' must be > 0, got 0"),
    ("train.lr=-0.1", r"'train.lr' must be > 0"),
    ("train.lr=.nan", r"'train.lr' must be a finite number"),
    ("train.lr=fast", r"'train.lr' must be a finite number, got 'fast'"),
    ("train.momentum=1", r"'train.momentum' must be < 1, got 1"),
    ("train.momentum=-0.5", r"'train.momentum' must be ≥ 0"),
    ("train.weight_decay=-1", r"'train.weight_decay' must be ≥ 0"),
    ("train.warmup_epochs=-1", r"'train.warmup_epochs' must be ≥ 0"),
    ("train.step_size=0", r"'train.step_size' must be > 0"),
    ("train.gamma=0", r"'train.gamma' must be > 0"),
    ("train.milestones=[10, -1]", r"'train.milestones\[1\]' must be ≥ 0"),
    ("train.milestones=5", r"'train.milestones' must be a list"),
    ("train.optimizer=adagrad", r"'train.optimizer' must be one of sgd, adam, adamw, got 'adagrad'"),
    ("train.schedule=linear", r"'train.schedule' must be one of cosine"),
    ("train.amp=fp8", r"'train.amp' must be one of auto, bf16, fp16, none"),
    ("eval.calibrate=per_head", r"'eval.calibrate' must be true, false or per_level, got 'per_head'"),
    ("train.device=gpu", r"'train.device' must be auto, cpu, mps, cuda or cuda:N"),
    ("train.nesterov=yes please", r"'train.nesterov' must be true or false"),
    ("train.threads=0", r"'train.threads' must be ≥ 1"),
    ("train.num_workers=-1", r"'train.num_workers' must be ≥ 0"),
    ("train.grad_clip=0", r"'train.grad_clip' must be > 0"),
    ("train.augment={pad: -2}", r"'train.augment.pad' must be ≥ 0"),
    ("train.augment={padd: 2}", r"'train.augment.padd' is not known"),
    ("train.augment=3", r"'train.augment' must be a mapping or null"),
    ("train.freeze=[{epochs: [3, 1], frozen: [backbone]}]", r"'train.freeze\[0\].epochs' must be \[start, end\]"),
    ("train.freeze=[backbone]", r"'train.freeze\[0\]' must look like"),
    ("train.checkpoint_every=-1", r"'train.checkpoint_every' must be ≥ 0"),
    ("train.accumulate=0", r"'train.accumulate' must be ≥ 1"),
    ("train.sync_bn=1", r"'train.sync_bn' must be true or false"),
    ("train.compile=maybe", r"'train.compile' must be true or false"),
    ("train.max_loss=0", r"'train.max_loss' must be > 0"),
    ("eval.batch_size=-3", r"'eval.batch_size' must be ≥ 1"),
    ("eval.given_level=0", r"'eval.given_level' must be ≥ 1"),
    ("eval.select=", r"'eval.select' must be a non-empty text"),
    ("eval.decode=crmm", r"'eval.decode' must be argmax, crm, bayes:METRIC or bayes:METRIC:inner .*got 'crmm'"),
    ("eval.decode=bayes:f1", r"'eval.decode' must be argmax, crm, bayes:METRIC"),
    ("eval.hedge_targets=[0.9, 1.5]", r"'eval.hedge_targets\[1\]' must be < 1, got 1.5"),
    ("eval.hedge_targets=0.9", r"'eval.hedge_targets' must be a list"),
    ("seed=-1", r"'seed' must be ≥ 0"),
    ("seed=1.5", r"'seed' must be a whole number"),
    ("data=5", r"'data' must be a mapping"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=[override])
    assert "\n" not in str(e.value)


def test_the_schema_has_a_rule_for_every_key_it_defaults():
    """A key without a rule would pass validation and fail only after training (eval.decode did)."""
    from hiervision.config import OPTIONAL_KEYS, SCHEMA

    for section in ("train", "eval"):
        optional = {k.partition(".")[2] for k in OPTIONAL_KEYS if k.startswith(section + ".")}
        assert set(DEFAULTS[section]) | optional == set(SCHEMA[section]), section


def test_defaults_and_new_keys_are_valid():
    cfg = load_config()
    assert cfg == validate_config(cfg)
    t = cfg["train"]
    assert (t["checkpoint_every"], t["accumulate"], t["sync_bn"], t["compile"], t["max_loss"]) == (0, 1, False, False,
                                                                                                    1e4)
    assert load_config(overrides=["train.max_loss=null"])["train"]["max_loss"] is None


def test_numeric_text_becomes_a_number():
    """YAML 1.1 reads ``1e-3`` as text; it used to work through float() and still does, as a number."""
    cfg = load_config(overrides=["train.lr=1e-3", "train.max_loss=1e6"])
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["max_loss"] == 1e6


def test_validate_config_serves_the_python_api():
    bad = {**DEFAULTS, "train": {**DEFAULTS["train"], "epochs": 2.7}}
    with pytest.raises(ConfigError, match="'train.epochs' must be a whole number"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="'train.epoch' is not known.*did you mean 'train.epochs'"):
        validate_config({"train": {"epoch": 3}})
    assert validate_config({"train": {"epochs": 3}}) == {"train": {"epochs": 3}}


def test_bad_base_and_non_utf8_files(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("base: [x.yaml]\n")
    with pytest.raises(ConfigError, match="'base' must be a file name"):
        load_config(f)
    f.write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="a.yaml: not a UTF-8 text file"):
        load_config(f)


def test_given_level_must_lie_above_the_leaves(koo_tree):
    assert check_given_level(None, koo_tree) is None
    assert check_given_level(1, koo_tree) == 1
    for level in (0, 2, 99, -1):
        with pytest.raises(ConfigError, match=rf"--given-level {level}: must be between 1 and 1 \(the tree is 2"):
            check_given_level(level, koo_tree)
    flat = Taxonomy.from_parent_map({"a": None, "b": None})
    with pytest.raises(ConfigError, match="eval.given_level 1: the tree has one level only"):
        check_given_level(1, flat, "eval.given_level")


def test_check_loss_stops_nan_and_explosions():
    check_loss(3.2, 1, 1, max_loss=1e4)
    check_loss(1e12, 1, 1, max_loss=None)  # null: only NaN/inf stop
    with pytest.raises(TrainingError, match=r"loss 1e\+12 exceeds train.max_loss=10000 at epoch 2, step 7 \(lr 0.1\)"):
        check_loss(1e12, 2, 7, max_loss=1e4, lr=0.1)
    with pytest.raises(TrainingError, match="loss is not finite at epoch 1, step 1"):
        check_loss(float("nan"), 1, 1, max_loss=None)
