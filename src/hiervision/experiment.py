"""One way to turn a config into a run's data and model, and a run folder back into them.

Training, ``evaluate``, ``predict``, ``induce``, export, serving and the benchmarks all go through
these functions, so none of them can re-derive a split or build a model differently from the run
that trained it (the split seed defaults to the run's seed in exactly one place: :func:`run_data`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiervision.checkpoint import CheckpointError, load_checkpoint
from hiervision.config import load_config
from hiervision.data import DataBundle, build_data
from hiervision.data.splits import verify_split_record
from hiervision.decisions import load_decisions, set_temperature
from hiervision.marginals import is_identity
from hiervision.models import create_model
from hiervision.taxonomy import Taxonomy

__all__ = ["RunError", "data_config", "load_run", "run_data", "run_model", "with_run_statistics"]


class RunError(RuntimeError):
    """A run folder that cannot be used (not a run, weights that do not fit its config)."""


def data_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run's ``data`` section with the one split-seed rule applied: ``data.split_seed`` defaults to
    the run's ``seed`` (for callers that change a data key first, e.g. ``limit_test``)."""
    return {**cfg["data"], "split_seed": cfg["data"].get("split_seed", cfg["seed"])}


def run_data(cfg: dict[str, Any], run_dir: str | os.PathLike | None = None, allow_changed: bool = False,
             meta: dict[str, Any] | None = None) -> DataBundle:
    """The data of a run (:func:`data_config`).

    With ``run_dir``, the splits are checked against the ones the run recorded (``splits.json``):
    a change (images added, removed or moved) is refused in one line unless ``allow_changed``, when
    it is printed as a warning instead, so a test set can never silently contain training images.
    ``meta`` (a checkpoint's, :func:`load_run`): the statistics the model was trained with (input
    normalisation) replace the ones just computed from the data, which differ once the data changed.
    """
    data = build_data(data_config(cfg))
    if run_dir is not None:
        change = verify_split_record(Path(run_dir) / "splits.json", data.split_record(), allow_changed)
        if change:
            print(f"hiervision: warning: {Path(run_dir) / 'splits.json'}: {change}", file=sys.stderr)
    return with_run_statistics(data, meta) if meta else data


def with_run_statistics(data: DataBundle, meta: dict[str, Any]) -> DataBundle:
    """``data`` normalised with the mean/std a run was trained with (its checkpoint's ``meta``), never
    with statistics recomputed from data that may have changed since."""
    if "mean" not in meta or "std" not in meta:
        return data
    mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    if len(mean) != data.in_chans or len(std) != data.in_chans:
        raise RunError(f"checkpoint meta: mean/std hold {len(mean)}/{len(std)} values for {data.in_chans} channels")
    return dataclasses.replace(data, mean=mean, std=std)


def run_model(cfg: dict[str, Any], taxonomy: Taxonomy, meta: dict[str, Any], from_checkpoint: bool = False
              ) -> nn.Module:
    """The model of a run, from its config and its data's ``meta()`` (channels, image size, multi-label).

    ``from_checkpoint``: the weights come from a checkpoint next, so a ``pretrained_path`` the run
    started from is not read (it may not exist any more).
    """
    model_cfg = dict(cfg["model"])
    if from_checkpoint and model_cfg.get("backbone_kwargs"):
        model_cfg["backbone_kwargs"] = {k: v for k, v in model_cfg["backbone_kwargs"].items() if k != "pretrained_path"}
    return create_model(model_cfg.pop("name"), taxonomy, in_chans=meta.get("in_chans", 3),
                        multi_label=meta.get("multi_label", False), image_size=meta.get("image_size", 32),
                        **model_cfg)


def load_run(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"):
    """``(cfg, taxonomy, model, meta)`` of a run folder written by :func:`hiervision.training.train`.

    The model's ``temperature`` is the checkpoint's, or for a checkpoint written before calibration
    existed, the one ``decisions.json`` holds (fitted on it afterwards); evaluate, predict, serve and
    export all read it from the model."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise RunError(f"{run}: not a hiervision run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    state = load_checkpoint(run / f"{which}.pt", taxonomy)
    meta = state.get("meta", {})
    model = run_model(cfg, taxonomy, meta, from_checkpoint=True)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise CheckpointError(f"{run / (which + '.pt')}: weights do not fit the configured model ({first})") from None
    if is_identity(model.temperature):
        set_temperature(model, load_decisions(run).get("temperature", 1.0))  # validated there
    return cfg, taxonomy, model.to(device).eval(), meta
