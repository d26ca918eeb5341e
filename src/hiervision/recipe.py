"""A config for a user's own images: ``hiervision train FOLDER|CSV --out DIR`` with no YAML.

The recipe is the one the method comparison froze (``configs/comparison/*-flat.yaml``; benchmarks/RESULTS.md
§ comparison): ResNet-20, SGD with Nesterov momentum at lr 0.1, weight decay 5e-4, a cosine schedule with a
0.2-epoch warm-up, pad-and-flip augmentation — with the head the comparison's declared rule picks
(:data:`RECOMMENDED_HEAD`; README "Which method?"). Where that head cannot go (multi-label data, more classes than
HAFrame's dense frame takes) the head is flat.
The decision layer (temperature, hedged answers, conformal sets) is fitted on validation after
training, as for every run (``eval.calibrate``). Only what depends on the data is chosen here: channels and
image size from the images, and the budget from the number of training images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hiervision.config import DEFAULTS, ConfigError, apply_overrides, merge, validate_config

__all__ = ["RECIPE_WORDS", "STEPS", "auto_config", "data_section", "describe", "is_data_source", "method_options",
           "RECOMMENDED_HEAD", "recommended_method", "with_encoder"]

#: the recipe in words: the one source of the README's command table, ``train --help`` and the docs (a test keeps
#: them equal), so the recipe is never described three ways
RECIPE_WORDS = ("a flat softmax on a ResNet-20 (no other head met the comparison's rule on both data sets), "
                "calibration and hedged answers fitted on validation, about 3,400 optimizer steps (8–30 epochs)")
#: the recipe's head: the row the comparison's declared rule picks (``recipe_choice`` in benchmarks/
#: comparison_report.py: keeps flat's top-1 within 0.5 pt and makes milder mistakes on every data set), flat when
#: none does; tests/test_comparison.py keeps it equal to the pick on benchmarks/results/comparison.json
RECOMMENDED_HEAD = "flat"
#: where the recipe's description says what the images were found to be (channels, sizes: how mixed)
FOUND = "images found: "
#: optimizer steps the recipe aims at: the comparison's Fashion-MNIST budget (54,000 images × 8 epochs / 128)
STEPS = 3400
#: images whose longer side is at most this train at their own size; larger ones are cropped to it
SMALL_SIDE = 64
def method_options() -> dict[str, dict[str, Any]]:
    """``--method NAME`` → the config sections it merges into the recipe, for every registered head (each
    declares its own: :class:`~hiervision.models.registry.ModelInfo`)."""
    from hiervision.models import list_models, model_info

    return {name: model_info(name).recipe_options() for name in list_models()}


def is_data_source(path: str | Path) -> bool:
    """A folder of class folders, a zip of one, or a CSV manifest; a YAML file is a config. A path that does not
    exist counts as a folder unless it ends in .yaml/.yml, so ``train my-photos`` says the folder is missing."""
    p = Path(path)
    suffix = p.suffix.lower()
    return p.is_dir() or suffix in (".csv", ".zip") or (not p.exists() and suffix not in (".yaml", ".yml"))


def data_section(source: Path) -> dict[str, Any]:
    """Absolute, so that ``evaluate``/``serve`` of the run work from any folder (split ids stay relative)."""
    if source.suffix.lower() == ".csv":  # labels are A/B/C paths: the tree is built from them
        return {"name": "manifest", "manifest": str(source.resolve())}
    return {"name": "folder", "root": str(source.resolve())}


def recommended_method(n_classes: int, multi_label: bool, head: str | None = None) -> tuple[str, str]:
    """``(method, why)``: the recommended ``head`` (:data:`RECOMMENDED_HEAD`) where it applies, else flat with the
    reason (kept in the run's description)."""
    from hiervision.models import model_info
    from hiervision.models.haframe import MAX_FRAME_CLASSES

    head = head or RECOMMENDED_HEAD
    if multi_label and not model_info(head).multi_label:
        return "flat", f"flat: the labels are multi-label and {head} is a single softmax"
    if head == "haframe" and n_classes > MAX_FRAME_CLASSES:
        return "flat", f"flat: {n_classes:,} classes, more than HAFrame's dense frame takes ({MAX_FRAME_CLASSES:,})"
    return head, ""


def _epochs(n_train: int, batch: int) -> int:
    """Epochs for about :data:`STEPS` steps, 8 at least (the comparison's) and 30 at most (a first hour)."""
    return max(8, min(30, math.ceil(STEPS * batch / max(n_train, 1))))


def auto_config(source: str | Path, method: str | None = None, overrides: list[str] | None = None,
                encoder: str | None = None) -> dict:
    """The validated config for ``source`` (folder, zip or CSV), ``--method`` and ``--set`` applied last.

    The data is opened once here (without the image check training does) to read the number of training
    images, their channels and size; ``--set data.*`` overrides apply to that look too. ``encoder``
    (``hf:<hub id or folder>``) starts from a pretrained image encoder: :func:`with_encoder`.
    """
    from hiervision.data import build_data

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or CSV file")
    options = method_options()
    if method is not None and method not in options:
        raise ConfigError(f"--method {method}: not a method (one of {', '.join(options)})")
    overrides = list(overrides or [])
    data_cfg = apply_overrides({"data": data_section(source)}, overrides)["data"]
    if not isinstance(data_cfg, dict):
        raise ConfigError(f"config key 'data' must be a mapping, got {data_cfg!r} (set one key: --set data.KEY=VALUE)")
    # the look skips the image check (training runs it), and with it what only the check acts on
    probe = build_data({**{k: v for k, v in data_cfg.items() if k != "on_bad_image"}, "check": False})
    h, w = (probe.image_size, probe.image_size) if isinstance(probe.image_size, int) else probe.image_size
    n = len(probe.train)
    batch = 128 if n >= 4096 else 64 if n >= 1024 else 32
    data: dict[str, Any] = {**data_section(source), "channels": probe.in_chans}
    train: dict[str, Any] = {"batch_size": batch, "lr": 0.1 * batch / 128, "optimizer": "sgd", "nesterov": True,
                             "weight_decay": 5.0e-4, "schedule": "cosine", "warmup_epochs": 0.2,
                             "epochs": _epochs(n, batch)}
    if max(h, w) <= SMALL_SIDE:  # small images (Fashion-MNIST, CIFAR, thumbnails): as the comparison trained
        data["image_size"] = h if h == w else [h, w]
        train["augment"] = {"pad": 2 if max(h, w) <= 28 else 4, "flip": True}
    else:  # photos: random crops of the shorter side at SMALL_SIDE px, centre crops for evaluation
        data.update(pipeline="imagenet", crop=SMALL_SIDE, crop_scale=[0.25, 1.0])
    backbone = "resnet20" if encoder is None else with_encoder(encoder, data, train)
    why = ""
    if method is None:
        method, why = recommended_method(len(probe.taxonomy.leaves), probe.multi_label)
    found = probe.note.split("; channels and size from ")[-1] if "; channels and size from " in probe.note else ""
    recipe = merge({"name": source.stem or source.name,
                    "description": f"hiervision train {source} (auto recipe{'; ' + why if why else ''})"
                    + (f"; {FOUND}{found}" if found else ""),
                    "data": data, "model": {"name": "flat", "backbone": backbone}, "train": train},
                   options[method])
    return validate_config(merge(DEFAULTS, apply_overrides(recipe, overrides)))


def with_encoder(encoder: str, data: dict[str, Any], train: dict[str, Any]) -> str:
    """Point the recipe at a pretrained encoder: its own input settings (size, resize and crop, mean, std) replace
    the ones read from the images, and the head trains on its features computed once (``train.freeze_backbone``:
    no augmentation, seconds per epoch). Returns the ``model.backbone`` value."""
    from hiervision.models.backbones import HF_PREFIX, encoder_data_settings

    backbone = encoder if encoder.startswith(HF_PREFIX) else HF_PREFIX + encoder
    for key in ("image_size", "pipeline", "crop", "crop_scale"):
        data.pop(key, None)
    data.update(encoder_data_settings(backbone, data["name"], data["channels"]))
    train.update(freeze_backbone=True, augment=None)
    return backbone


def describe(cfg: dict) -> str:
    """One line saying what the recipe chose and why (printed before training)."""
    d, t, m = cfg["data"], cfg["train"], cfg["model"]
    size = d.get("image_size") or f"crops of {d.get('crop')}"
    size = "x".join(map(str, size)) if isinstance(size, list) else size
    frozen = " (frozen: its features computed once, the head trains on them)" if t.get("freeze_backbone") else ""
    found = str(cfg.get("description") or "").partition(FOUND)[2]
    return (f"recipe: {m['name']} on {m['backbone']}{frozen}, {d.get('channels')} channel(s), {size} px, "
            f"{t['epochs']} epochs of batch {t['batch_size']}, then calibration and hedged answers fitted on val "
            "(the comparison's recommendation: benchmarks/RESULTS.md § comparison; change it with --method or --set)"
            + (f"\nimages: {found}" if found else ""))
