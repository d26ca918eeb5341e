"""Training: ``train(cfg, out_dir)`` turns a config into a run folder (checkpoints, ``log.csv``, ``metrics.json``).

Read it top down, as pytorch/examples' ``imagenet/main.py``:

* :mod:`~hiervision.training.engine` — one run: set-up, the epochs, validation, checkpoints, the test report;
* :mod:`~hiervision.training.steps` — what one step needs: optimizer, learning-rate schedule, freezing, loss checks;
* :mod:`~hiervision.training.signals` — preemption: SIGTERM/SIGINT save a checkpoint and raise ``Preempted``;
* :mod:`~hiervision.training.features` — a frozen backbone's features, computed once and cached on disk
  (``train.freeze_backbone``, or its older name ``train.precompute_features``);
* :mod:`~hiervision.training.protocols` — runs of more than one engine run (Guo et al.'s pseudo-labels).

:func:`train` here is the entry point: it sends a config to the protocol it asks for, else to the engine.
"""

from __future__ import annotations

import os
from typing import Any

from hiervision.config import validate_config
from hiervision.training import engine
from hiervision.training.engine import MIN_LAST_BATCH_FRACTION, train_one_epoch
from hiervision.training.features import cached_features
from hiervision.training.protocols import pseudo_label, train_with_pseudo_labels
from hiervision.training.signals import Preempted
from hiervision.training.steps import TrainingError, build_optimizer, check_loss, frozen_groups, lr_factor

__all__ = [
    "MIN_LAST_BATCH_FRACTION",
    "Preempted",
    "TrainingError",
    "build_optimizer",
    "cached_features",
    "check_loss",
    "frozen_groups",
    "lr_factor",
    "pseudo_label",
    "train",
    "train_one_epoch",
]


def train(
    cfg: dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    max_epochs_this_call: int | None = None,
    force: bool = False,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one config; returns the test metrics (also written to ``metrics.json``).

    ``train.pseudo_labels`` runs Guo et al.'s two-round protocol
    (:func:`~hiervision.training.protocols.train_with_pseudo_labels`); every other config is one engine run
    (:func:`~hiervision.training.engine.train`, which documents the arguments: resuming, stopping after
    ``max_epochs_this_call`` epochs, ``force``, ``allow_changed_data``, preemption and ``torchrun``).
    """
    protocol = train_with_pseudo_labels if validate_config(cfg)["train"]["pseudo_labels"] else engine.train
    return protocol(cfg, out_dir, resume, max_epochs_this_call, force, allow_changed_data)
