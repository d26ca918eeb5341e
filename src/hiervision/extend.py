"""New classes without retraining: a trained run's weights start a run whose tree has grown (``hiervision extend``).

The new run's data names classes the parent run never had; ``data.grow_from`` (the parent's ``taxonomy.json``)
grows the parent's tree by them, keeping every known node's id (:func:`hiervision.data.base.grow_tree`), so
every learned weight still fits: :func:`init_from_run` (``train.init_from``) copies them all, row by row for
the output layer, and starts each new class's row from its training images' mean feature — weight imprinting
(Qi, Brown & Lowe, CVPR 2018: the normalised mean embedding, scaled to the known rows' norm) — before a short
fine-tune, of the head alone by default (``train.freeze_backbone``: features computed once and cached).

Heads whose output layer is one row per class can grow (``extendable``: flat, hnd, soft-max-margin); the
others are refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from hiervision.data import DataBundle
from hiervision.experiment import load_run

__all__ = ["IMPRINT_IMAGES", "check_extendable", "init_from_run"]

#: training images per new class whose features start its row (their mean direction)
IMPRINT_IMAGES = 64


def init_from_run(model: torch.nn.Module, run_dir: str | os.PathLike, data: DataBundle,
                  device: torch.device | None = None) -> dict:
    """Copy the weights of the run in ``run_dir`` into ``model`` (built on a tree grown from that run's) and
    imprint the new classes' rows from ``data.train``; returns ``{"parent", "known_classes", "new_classes"}``
    for the record. One line when the parent's tree does not start this tree or its head cannot grow."""
    where = f"train.init_from: {run_dir}"
    _, known, parent, _ = load_run(run_dir, "best")
    tree = data.taxonomy
    n = known.num_nodes
    if tuple(tree.names[:n]) != tuple(known.names) or tuple(tree.parents[:n]) != tuple(known.parents):
        raise ValueError(f"{where}: its tree is not where this run's tree starts (set data.grow_from: "
                         f"{Path(run_dir) / 'taxonomy.json'})")
    check_extendable(parent, where)
    if type(parent) is not type(model):
        raise ValueError(f"{where}: its model is a {type(parent).__name__}, this run's a {type(model).__name__}")
    rows = {int(c): i for i, c in enumerate(model.classes)}
    known_rows = torch.tensor([rows[int(c)] for c in parent.classes])
    own = model.state_dict()
    with torch.no_grad():
        for key, value in parent.state_dict().items():
            target = own[key]
            if target.shape == value.shape:
                target.copy_(value)
            elif value.shape[0] == len(parent.classes) and target.shape[1:] == value.shape[1:]:
                target[known_rows.to(target.device)] = value.to(target)  # the class rows of the output layer
            else:
                raise ValueError(f"{where}: weight {key} {tuple(value.shape)} does not fit {tuple(target.shape)}")
    new = sorted(set(range(len(model.classes))) - set(known_rows.tolist()))
    _imprint(model, data, new, device or next(model.parameters()).device)
    return {"parent": str(run_dir), "known_classes": len(parent.classes), "new_classes": len(new)}


def check_extendable(model: torch.nn.Module, where: str) -> None:
    """One line unless ``model``'s head can grow new classes (``extendable``: one output row per class)."""
    if not getattr(model, "extendable", False):
        raise ValueError(f"{where}: model {type(model).__name__} cannot grow new classes (its output layer is not "
                         "one row per class: use flat, hnd or soft_max_margin)")


@torch.no_grad()
def _imprint(model: torch.nn.Module, data: DataBundle, new_rows: list[int], device: torch.device) -> None:
    """Each new class row of ``model.fc``: the normalised mean backbone feature of up to :data:`IMPRINT_IMAGES`
    training images at or under the class, scaled to the known rows' mean norm; its bias the known rows' mean.
    A class with no training image keeps its fresh initialisation."""
    fc, classes, train = model.fc, model.classes, data.train
    known = torch.ones(len(classes), dtype=torch.bool)
    known[new_rows] = False
    norm, bias = fc.weight[known.to(fc.weight.device)].norm(dim=1).mean(), None
    if fc.bias is not None:
        bias = fc.bias[known.to(fc.bias.device)].mean()
    was_training = model.training
    model.eval()
    tables = data.taxonomy.view
    for row in new_rows:
        node = int(classes[row])
        under = tables.is_ancestor(node, train.targets.numpy())
        idx = torch.from_numpy(under.nonzero()[0][:IMPRINT_IMAGES])
        if not len(idx):
            continue
        images = torch.stack([train[int(i)][0] for i in idx]).to(device)
        features = F.normalize(model.backbone(data.normalize(images)).float(), dim=1).mean(0)
        fc.weight[row] = F.normalize(features, dim=0) * norm
        if bias is not None:
            fc.bias[row] = bias
    model.train(was_training)
