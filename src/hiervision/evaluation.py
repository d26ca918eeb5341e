"""Predicting over a data set and scoring it: the layer every caller that predicts shares.

Training (its validation and test reports), ``evaluate``, ``induce``, post-hoc decisions, export and
the benchmarks predict through :func:`predict_dataset` / :func:`evaluate_split`, with the device and
mixed-precision choice of :mod:`hiervision.distributed` (:func:`~hiervision.distributed.select_device`,
:func:`~hiervision.distributed.autocast_dtype`). It sits below
:mod:`hiervision.training` and :mod:`hiervision.posthoc`, so neither imports the other to predict.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from hiervision import metrics as M
from hiervision.config import ConfigError
from hiervision.data import DataBundle, iter_batches
from hiervision.decoding import Prediction, threshold_paths
from hiervision.distributed import DistEnv, gather_rows, shard_indices
from hiervision.taxonomy import PAD

__all__ = ["evaluate_split", "predict_dataset"]


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    data: DataBundle,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    given_level: int | None = None,
    env: DistEnv | None = None,
    num_workers: int = 0,
) -> tuple[Prediction, torch.Tensor]:
    """Run ``model.predict`` over a dataset; returns the joined prediction and the targets (on the CPU).

    ``given_level``: each image's true ancestor at that depth (its label where the label is
    shallower) is given to ``model.predict_given`` — Guo et al.'s CNN-RNN*. Under DDP (``env``)
    each rank predicts its shard and every rank gets the whole, in dataset order.
    """
    model.eval()
    if given_level is not None and data.multi_label:
        raise ConfigError("eval.given_level: not defined for multi-label data (an image has several paths)")
    env = env or DistEnv(0, 1, 0, device)
    n = len(dataset)
    shard = dataset.subset(shard_indices(n, env)) if env.enabled else dataset
    paths = data.taxonomy.path_matrix
    preds, targets = [], []
    for images, target in iter_batches(shard, batch_size, shuffle=False, num_workers=num_workers, device=device):
        images = data.normalize(images)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if given_level is None:
                preds.append(model.predict(images))
            else:
                given = paths[target, min(given_level, paths.shape[1]) - 1]
                given = torch.where(given == PAD, target, given)
                preds.append(model.predict_given(images, given.to(device)))
        targets.append(target)
    pred = Prediction.cat(preds) if preds else model.predict(torch.zeros(0, *dataset[0][0].shape, device=device))
    target = torch.cat(targets) if targets else dataset.targets[:0]
    parts = [pred.paths, pred.scores.float(), pred.path_prob.float(), target]
    if pred.labels is not None:
        parts.append(pred.labels)
    parts = [gather_rows(t.cpu(), n, env) for t in parts]
    return Prediction(*parts[:3], parts[4] if len(parts) > 4 else None), parts[3]


def evaluate_split(
    model,
    data: DataBundle,
    split: str,
    batch_size: int = 512,
    device=None,
    amp=None,
    tune_threshold: bool = False,
    given_level: int | None = None,
    env: DistEnv | None = None,
    num_workers: int = 0,
    return_prediction: bool = False,
) -> dict | tuple[dict, Prediction, torch.Tensor]:
    """Metrics report (see :func:`hiervision.metrics.evaluate`) of a model on one split
    (``return_prediction``: ``(report, prediction, targets)``, e.g. for plots of the same predictions).

    ``tune_threshold`` (multi-label, validation only): first set the model's decision threshold to
    the one that maximises path F1 on these predictions (Koo et al., Sec. 4.2), then report at it.
    ``given_level``: predict with the true ancestor at that depth given (see :func:`predict_dataset`).
    """
    device = device or next(model.parameters()).device
    dataset = {"train": data.train, "val": data.val, "test": data.test}[split]
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, dataset, batch_size, device, amp, given_level, env, num_workers)
    seconds = time.perf_counter() - t0
    if tune_threshold and data.multi_label:
        threshold, _ = M.select_threshold(pred.scores, targets.bool(), data.taxonomy, metric="path_f1")
        model.threshold.fill_(float(threshold))
        pred.labels = threshold_paths(data.taxonomy, pred.scores, float(threshold))
    report = {**M.evaluate(pred, targets, data.taxonomy), "eval_images_per_s": len(targets) / max(seconds, 1e-9)}
    return (report, pred, targets) if return_prediction else report
