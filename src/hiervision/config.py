"""Experiment configuration: YAML files under ``configs/``, overridable with ``key.sub=value``.

A config may name ``base: other.yaml`` (relative to itself) and override only what differs, so the
papers' table rows stay one short file each. Keys of ``seed``, ``train`` and ``eval`` are checked
against :data:`DEFAULTS`; ``data`` and ``model`` keys are checked by the dataset and model that
receive them.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULTS", "ConfigError", "apply_overrides", "load_config", "merge"]


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
    },
    # select: val metric that picks best.pt; given_level: also report test metrics when each image's
    # true ancestor at that depth is given (Guo et al.'s CNN-RNN*); calibrate: fit a temperature and the
    # hedging multipliers on the val split after training (hiervision.decisions); decode: argmax | crm
    "eval": {"batch_size": 512, "select": "auto", "given_level": None, "calibrate": True, "decode": "argmax",
             "hedge_targets": [0.9, 0.95, 0.99]},
}


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
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys")
    base = data.pop("base", None)
    if base:
        data = merge(_read((path.parent / base).resolve(), (*seen, path)), data)
    return data


def _check(cfg: dict, schema: dict, prefix: str = "") -> None:
    for k, v in cfg.items():
        if k not in schema:
            hint = difflib.get_close_matches(k, list(schema), n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"config key '{prefix}{k}' is not known{extra}")
        if isinstance(schema[k], dict) and k not in ("data", "model", "augment"):
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
    if "data" in user and "name" not in user["data"]:
        raise ConfigError("config key 'data.name' is required")
    return merge(DEFAULTS, user)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; the value is parsed as YAML (numbers, lists, booleans)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
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
    return yaml.safe_dump(cfg, sort_keys=False)
