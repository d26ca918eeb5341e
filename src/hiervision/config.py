"""Experiment configuration: YAML files under ``configs/``, overridable with ``key.sub=value``.

A config may name ``base: other.yaml`` (relative to itself) and override only what differs, so the
papers' table rows stay one short file each. Keys of ``seed``, ``train`` and ``eval`` are checked
against :data:`DEFAULTS`; ``data`` and ``model`` keys are checked by the dataset and model that
receive them.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hiervision.taxonomy import Taxonomy

__all__ = [
    "DEFAULTS",
    "SCHEMA",
    "ConfigError",
    "apply_overrides",
    "check_given_level",
    "load_config",
    "merge",
    "parse_duration",
    "validate_config",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used (one line, naming the key or file)."""


DEFAULTS: dict[str, Any] = {
    "name": None,
    "description": "",
    "seed": 0,
    "data": {"name": "synthetic"},
    "model": {"name": "flat", "backbone": "resnet20"},
    "train": {
        "epochs": 10,
        "batch_size": 128,
        "optimizer": "sgd",  # sgd | adam | adamw
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5.0e-4,
        "schedule": "cosine",  # cosine | step | multistep | constant
        "step_size": 30,
        "milestones": [],
        "gamma": 0.1,
        "warmup_epochs": 0,
        "augment": {"pad": 4, "flip": True},
        "channels_last": True,
        "amp": "auto",  # auto (bf16 where the hardware has it) | bf16 | fp16 | none
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "threads": None,
        "num_workers": 0,
        "deterministic": True,
        "grad_clip": None,
        # list of {epochs: [start, end), frozen: [group, ...]}; groups come from model.param_groups()
        "freeze": [],
        # train only the head, on pooled backbone features computed once (backbone frozen, no augmentation)
        "precompute_features": False,
        # Guo et al. Sec. 4.2: train on S_fine first, pseudo-label S_coarse's fine labels, then train on both
        "pseudo_labels": False,
        "progress": True,
        # save last.pt every this many optimizer steps inside an epoch too (0: only at epoch ends)
        "checkpoint_every": 0,
        # the step's batch (train.batch_size, the global batch under DDP) in this many micro-batches
        "accumulate": 1,
        "sync_bn": False,  # DDP on CUDA: batch-norm statistics over the global batch
        "compile": False,  # torch.compile the model's forward
        # stop when a batch's loss exceeds this (null: only NaN/inf stop). Our losses are means of
        # per-level cross-entropies, about ln(classes) per level at chance (< 12 even for 100k
        # classes), so 1e4 never stops a healthy run but stops a diverging one long before inf.
        "max_loss": 1.0e4,
    },
    # select: val metric that picks best.pt; given_level: also report test metrics when each image's
    # true ancestor at that depth is given (Guo et al.'s CNN-RNN*); calibrate: fit a temperature and the
    # hedging multipliers on the val split after training (hiervision.decisions): true (one temperature for
    # the model), per_level (one per tree level) or false; decode: argmax | crm | bayes:METRIC[:inner]
    "eval": {"batch_size": 512, "select": "auto", "given_level": None, "calibrate": True, "decode": "argmax",
             "hedge_targets": [0.9, 0.95, 0.99]},
}


# ----------------------------------------------------------------------------- value rules
# A rule takes (key, value) and returns the value to use (numeric text like "1e-3", which YAML 1.1
# reads as a string, becomes a float) or raises ConfigError naming the key. Values are checked at
# the boundary so that a wrong one fails before any data is read, not as a traceback mid-run.
Rule = Callable[[str, Any], Any]


def _fail(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {what}, got {value!r}")


def _int(lo: int | None = None, hi: int | None = None, null: bool = False) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if v is None and null:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            what = "a whole number" + (" or null" if null else "")
            raise _fail(key, what, v)
        if lo is not None and v < lo:
            raise _fail(key, f"≥ {lo}", v)
        if hi is not None and v > hi:
            raise _fail(key, f"≤ {hi}", v)
        return v

    return rule


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
         null: bool = False) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if v is None and null:
            return v
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(key, "a finite number" + (" or null" if null else ""), v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _fail(key, f"{'>' if lo_open else '≥'} {lo:g}", v)
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise _fail(key, f"{'<' if hi_open else '≤'} {hi:g}", v)
        return v

    return rule


def _bool(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise _fail(key, "true or false", v)
    return v


def _str(null: bool = False, empty: bool = False) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if (v is None and null) or (isinstance(v, str) and (v or empty)):
            return v
        raise _fail(key, "a " + ("" if empty else "non-empty ") + "text" + (" or null" if null else ""), v)

    return rule


def _enum(*choices: str) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if v not in choices:
            raise _fail(key, "one of " + ", ".join(choices), v)
        return v

    return rule


def _calibrate(key: str, v: Any) -> Any:
    if v is True or v is False or v == "per_level":
        return v
    raise _fail(key, "true, false or per_level", v)


def _decode_rule(key: str, v: Any) -> Any:
    from hiervision.bayes import decode_rule  # numpy only: argmax | crm | bayes:METRIC[:inner]

    try:
        decode_rule(v, f"'{key}'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return v


def _count_null_or_auto(key: str, v: Any) -> Any:
    if v is None:
        return v
    try:
        return _count_or_auto(key, v)
    except ConfigError:
        raise _fail(key, "a whole number ≥ 1, null or auto", v) from None


def _count_or_auto(key: str, v: Any) -> Any:
    if v == "auto":
        return v
    try:
        return _int(lo=1)(key, v)
    except ConfigError:
        raise _fail(key, "a whole number ≥ 1 or auto", v) from None


def _match(pattern: str, what: str) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if not isinstance(v, str) or not re.fullmatch(pattern, v):
            raise _fail(key, what, v)
        return v

    return rule


def _list(item: Rule) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if not isinstance(v, list):
            raise _fail(key, "a list", v)
        return [item(f"{key}[{i}]", x) for i, x in enumerate(v)]

    return rule


def _mapping(fields: dict[str, Rule], null: bool = False) -> Rule:
    def rule(key: str, v: Any) -> Any:
        if v is None and null:
            return v
        if not isinstance(v, dict):
            raise _fail(key, "a mapping" + (" or null" if null else ""), v)
        out = {}
        for k, x in v.items():
            if k not in fields:
                raise ConfigError(f"config key '{key}.{k}' is not known (known: {', '.join(fields)})")
            out[k] = fields[k](f"{key}.{k}", x)
        return out

    return rule


def _mapping_of_probabilities(key: str, v: Any) -> Any:
    """``{level: probability}`` (``eval.min_prob_at``): levels ≥ 1 or rank names (``data.ranks``),
    probabilities in [0, 1]."""
    if not isinstance(v, dict):
        raise _fail(key, "a mapping of level to probability such as {3: 0.8, 2: 0.6}", v)
    out = {}
    for level, p in v.items():
        if isinstance(level, bool) or not (isinstance(level, int) and level >= 1 or isinstance(level, str)
                                           and level.strip()):
            raise _fail(key, "levels as whole numbers ≥ 1 (1 = under the root) or rank names (data.ranks)", level)
        out[level] = _num(lo=0, hi=1)(f"{key}.{level}", p)
    return out


def parse_duration(value: str | float | int, where: str = "--time") -> float:
    """``"20m"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a number of seconds → seconds (> 0); one line otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: a duration such as 20m, 1h30m or 90s, got {value!r}")
    text = str(value).strip().lower().replace(" ", "")
    if isinstance(value, (int, float)) or re.fullmatch(r"\d+(\.\d+)?", text):  # a bare number: seconds
        seconds = float(text)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", text)
        if parts is None or not any(parts.groups()):
            raise ValueError(f"{where}: a duration such as 20m, 1h30m or 90s, got {value!r}")
        seconds = sum(float(x) * u for x, u in zip(parts.groups(), (3600.0, 60.0, 1.0)) if x)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{where}: a duration must be longer than 0, got {value!r}")
    return seconds


def _duration(key: str, v: Any) -> Any:
    """A time budget (``train.time_budget``): seconds, or ``20m``, ``1h30m``, ``90s``; stored as seconds."""
    if v is None:
        return None
    try:
        return parse_duration(v, f"config key '{key}'")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _names(key: str, v: Any) -> Any:
    """Node names: a list of strings, or one string with commas (``eval.within``)."""
    if isinstance(v, str):
        v = [n for n in v.split(",") if n.strip()]
    if not isinstance(v, list) or not v or not all(isinstance(n, str) and n.strip() for n in v):
        raise _fail(key, "a non-empty list of node names", v)
    return [n.strip() for n in v]


def _freeze_entry(key: str, v: Any) -> Any:
    if not isinstance(v, dict) or set(v) != {"epochs", "frozen"}:
        raise ConfigError(f"config key '{key}' must look like {{epochs: [start, end], frozen: [group, ...]}}")
    ep = v["epochs"]
    if not isinstance(ep, list) or len(ep) != 2:
        raise _fail(f"{key}.epochs", "a list [start, end]", ep)
    start, end = (_int(lo=0)(f"{key}.epochs", x) for x in ep)
    if end < start:
        raise _fail(f"{key}.epochs", "[start, end] with start ≤ end", ep)
    return {"epochs": [start, end], "frozen": _list(_str())(f"{key}.frozen", v["frozen"])}


# keys that may be given but have no entry in DEFAULTS, so that configs without them resolve (and digest, as
# the comparison's cached cells do) exactly as before; absent means off
OPTIONAL_KEYS = {
    "train.log_to",  # experiment tracking: [tensorboard, mlflow] (hiervision.tracking)
    # a pretrained encoder (model.backbone: hf:...): train the head on its features computed once and cached
    # (absent: false; train.precompute_features is the older name of the same switch)
    "train.freeze_backbone",
    "train.feature_cache",  # where cached features live (absent: $HIERVISION_CACHE or ~/.cache/hiervision)
    "train.backbone_lr_scale",  # fine-tuning: the backbone's learning rate is train.lr times this (absent: 1)
    "train.unfreeze_after",  # fine-tuning: train the head alone for this many epochs, then everything
    "train.time_budget",  # seconds (or 20m, 1h30m): the epochs that fit are planned after the first steps
    "train.init_from",  # hiervision extend: a run folder whose weights start this run (its tree grown: data.grow_from)
    # the answers a run gives by default (hiervision.rollup, hiervision.restrict; export copies them into the
    # sidecar): roll up below these probabilities, answer only these classes
    "eval.min_prob",  # one threshold for every level (absent: no roll-up)
    "eval.min_prob_at",  # {level: threshold}, level 1 = under the root, or {rank: threshold} (data.ranks)
    "eval.within",  # node names: answer only end classes under them
    "eval.classes",  # a file with one end class per line: answer only those
}

# what every key of seed/train/eval may hold (data and model keys are checked by their builders)
SCHEMA: dict[str, Any] = {
    "name": _str(null=True),
    "description": _str(empty=True),
    "seed": _int(lo=0, hi=2**63 - 1),
    "train": {
        "epochs": _int(lo=1),
        "batch_size": _int(lo=1),
        "optimizer": _enum("sgd", "adam", "adamw"),
        "lr": _num(lo=0, lo_open=True),
        "momentum": _num(lo=0, hi=1, hi_open=True),
        "nesterov": _bool,
        "weight_decay": _num(lo=0),
        "schedule": _enum("cosine", "step", "multistep", "constant"),
        "step_size": _num(lo=0, lo_open=True),
        "milestones": _list(_num(lo=0)),
        "gamma": _num(lo=0, lo_open=True),
        "warmup_epochs": _num(lo=0),
        "augment": _mapping({"pad": _int(lo=0), "flip": _bool, "pad_mode": _enum("constant", "reflect")},
                            null=True),
        "channels_last": _bool,
        "amp": _enum("auto", "bf16", "fp16", "none"),
        "device": _match(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:N"),
        "threads": _int(lo=1, null=True),
        "num_workers": _int(lo=0),
        "deterministic": _bool,
        "grad_clip": _num(lo=0, lo_open=True, null=True),
        "freeze": _list(_freeze_entry),
        "precompute_features": _bool,
        "pseudo_labels": _bool,
        "progress": _bool,
        "checkpoint_every": _int(lo=0),
        "accumulate": _int(lo=1),
        "sync_bn": _bool,
        "compile": _bool,
        "max_loss": _num(lo=0, lo_open=True, null=True),
        "log_to": _list(_enum("tensorboard", "mlflow")),
        "freeze_backbone": _bool,
        "feature_cache": _str(null=True),
        "backbone_lr_scale": _num(lo=0, lo_open=True),
        "unfreeze_after": _int(lo=0),
        "init_from": _str(null=True),
        "time_budget": _duration,
    },
    "eval": {
        "batch_size": _int(lo=1),
        "select": _str(),
        "given_level": _int(lo=1, null=True),
        "calibrate": _calibrate,
        "decode": _decode_rule,
        "hedge_targets": _list(_num(lo=0, hi=1, lo_open=True, hi_open=True)),
        "min_prob": _num(lo=0, hi=1),
        "min_prob_at": _mapping_of_probabilities,
        "within": _names,
        "classes": _str(),
    },
    # the model keys with a range (each model takes a subset): checked here, before any data loads
    "model": {
        "beam_width": _int(lo=1),
        "input_size": _count_or_auto,
        "hidden_size": _count_or_auto,
        "embed_size": _count_null_or_auto,
        "num_layers": _int(lo=1),
        "conv_out_size": _int(lo=1, null=True),
        "extra_blocks": _int(lo=0),
        "dropout": _num(lo=0, hi=1, hi_open=True),
        "scheduled_sampling": _num(lo=0, hi=1),
        "step_softmax": _enum("full", "children", "auto"),
        "branch_depth": _count_null_or_auto,
        "coarse_levels": _count_null_or_auto,
        "level_reduction": _enum("sum", "mean"),
        "level_decay": _num(lo=0),
        "rescore_weight": _num(lo=0),
        "smoothing": _num(lo=0, hi=1),
        "cost_temperature": _num(lo=0),
        "end_weight": _num(lo=0),
        "loss_beta": _num(lo=0),
        "loss_alpha": _num(lo=0),
    },
}


def validate_config(cfg: dict) -> dict:
    """Check every ``seed``/``train``/``eval`` value (type, range, choice) and every key's name.

    Returns a copy with numeric text turned into numbers; raises :class:`ConfigError` naming the
    first bad key. :func:`load_config` calls it; call it yourself on a dict built in Python.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(cfg).__name__}")
    _check(cfg, DEFAULTS)
    out = copy.deepcopy(cfg)
    for key in ("data", "model"):
        if key in out and not isinstance(out[key], dict):
            raise ConfigError(f"config key '{key}' must be a mapping")
    for key, rule in SCHEMA.items():
        if key not in out:
            continue
        if isinstance(rule, dict):
            for sub, r in rule.items():
                if sub in out[key]:
                    out[key][sub] = r(f"{key}.{sub}", out[key][sub])
        else:
            out[key] = rule(key, out[key])
    return out


def check_given_level(level: Any, taxonomy: Taxonomy, key: str = "--given-level") -> int | None:
    """The depth whose true ancestor is given must lie strictly above the deepest level: 1..depth−1.

    Level 0 or a level at/below the leaves would give away the answer (path accuracy 1.0).
    """
    if level is None:
        return None
    if isinstance(level, bool) or not isinstance(level, int):
        raise ConfigError(f"{key} must be a whole number, got {level!r}")
    top = taxonomy.max_depth - 1
    if top < 1:
        raise ConfigError(f"{key} {level}: the tree has one level only, so there is no ancestor to give")
    if not 1 <= level <= top:
        raise ConfigError(f"{key} {level}: must be between 1 and {top} (the tree is {taxonomy.max_depth} deep)")
    return level


def merge(base: dict, override: dict) -> dict:
    """Deep merge: dicts merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    import yaml  # here, not at the top: the ONNX runtime imports this module's checks without PyYAML

    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    if base:
        data = merge(_read((path.parent / base).resolve(), (*seen, path)), data)
    return data


def _check(cfg: dict, schema: dict, prefix: str = "") -> None:
    for k, v in cfg.items():
        if k not in schema and f"{prefix}{k}" not in OPTIONAL_KEYS:
            hint = difflib.get_close_matches(k, list(schema), n=1) if isinstance(k, str) else []
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config key '{prefix}{k}' is not known{extra}")
        if isinstance(schema.get(k), dict) and k not in ("data", "model", "augment"):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{prefix}{k}' must be a mapping")
            _check(v, schema[k], f"{prefix}{k}.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults ← YAML file (with its ``base`` chain) ← ``key.sub=value`` overrides; validated."""
    user = _read(Path(path).resolve()) if path is not None else {}
    if path is not None and user.get("name") is None:
        user["name"] = Path(path).stem
    user = apply_overrides(user, overrides or [])
    _check(user, DEFAULTS)
    if isinstance(user.get("data"), dict) and "name" not in user["data"]:
        raise ConfigError("config key 'data.name' is required")
    return validate_config(merge(DEFAULTS, user))


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (numbers, lists, booleans)."""
    import yaml

    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a mapping")
        node[parts[-1]] = value
    return cfg


def dump(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)
