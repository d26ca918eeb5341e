"""Protocols above the engine: runs made of more than one engine run.

Guo et al.'s S_fine + S_coarse⁻ (Sec. 4.2, ``train.pseudo_labels``) trains twice in one run folder: a first
round on the fully labelled samples alone (``out/round1``), which then predicts the fine labels of the
coarse-only samples, and a second round on all of them (``out``). Each round is an ordinary engine run; the
engine knows nothing of the protocol.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from hiervision import distributed
from hiervision.config import ConfigError, merge, validate_config
from hiervision.data import DataBundle, build_data
from hiervision.distributed import DistEnv, autocast_dtype, select_device
from hiervision.evaluation import predict_dataset
from hiervision.experiment import load_run
from hiervision.runfolder import atomic_write_json
from hiervision.tracking import check_backends
from hiervision.training import engine

__all__ = ["pseudo_label", "train_with_pseudo_labels"]


def train_with_pseudo_labels(
    cfg: dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    max_epochs_this_call: int | None = None,
    force: bool = False,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """Guo et al.'s pseudo-label protocol as one run: round 1 in ``out_dir/round1``, then the run itself.

    ``out_dir`` is claimed first and held through both rounds, so round 1's folder sits inside a run
    folder that no other process writes; a bad config, a missing tracking library or data without
    coarse-only labels stops before round 1 trains. The arguments are :func:`hiervision.training.train`'s;
    round 1 always runs to its end (``max_epochs_this_call`` and ``allow_changed_data`` are the second's).
    """
    cfg = validate_config(cfg)
    env = distributed.setup(select_device(cfg["train"]["device"]))
    with engine.claimed_run_dir(out_dir, force, env):
        out = Path(out_dir)
        engine.configure_backends(cfg["train"])
        amp = autocast_dtype(cfg["train"]["amp"], env.device)
        check_backends(cfg["train"].get("log_to") or [])
        data = pseudo_label(cfg, engine.build_run_data(cfg), out / "round1", resume, env, amp)
        return engine.run_training(cfg, out, env, resume, max_epochs_this_call, allow_changed_data, data=data)


def pseudo_label(
    cfg: dict, data: DataBundle, out: Path, resume: bool, env: DistEnv, amp: torch.dtype | None
) -> DataBundle:
    """Guo et al.'s S_fine + S_coarse⁻ (Sec. 4.2): a first run on S_fine alone (in ``out``) predicts the
    full labels of the S_coarse samples, each conditioned on its known coarse label (``predict_given``,
    i.e. CNN-RNN*). Only those samples' labels change; true labels are never overwritten. How many
    pseudo-labels are right (checked against the held-back truth) goes to ``out/pseudo_labels.json``."""
    mask = data.train.coarse_mask
    if data.cfg.get("fine_fraction") is None or not bool(mask.any()):
        raise ConfigError("train.pseudo_labels: needs coarse-only training labels (data.fine_fraction and "
                          "data.coarse_fraction)")
    first = merge(cfg, {"data": {"coarse_labels": "drop"}, "train": {"pseudo_labels": False},
                        "eval": {"given_level": None}})
    engine.train(first, out, resume=resume)
    _, _, model, meta = load_run(out, device=env.device)
    round1 = dataclasses.replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))  # its own statistics
    idx = torch.nonzero(mask).flatten()
    level = int(data.cfg.get("coarse_level", 1))
    pred, _ = predict_dataset(model, round1, data.train.subset(idx), cfg["eval"]["batch_size"], env.device, amp,
                              level, env)
    targets = data.train.targets.clone()
    targets[idx] = pred.nodes.to(targets.device)
    truth = build_data({**data.cfg, "coarse_labels": "oracle"}).train.targets[idx]
    acc = float((targets[idx] == truth).float().mean())
    if env.is_main:
        atomic_write_json(out / "pseudo_labels.json", {"count": len(idx), "level": level, "accuracy": acc})
    note = f"{data.note}; {len(idx)} S_coarse labels pseudo-labelled by {out.name} ({acc:.1%} right)"
    return dataclasses.replace(data, train=data.train.with_targets(targets, mask), note=note)
