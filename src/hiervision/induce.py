"""A class hierarchy induced from what a trained network confuses (Tempfli & Sándor, HierNet Sec. 4).

Many data sets have no tree, or one drawn from semantics that a CNN does not see (a bird and an
aeroplane both have wings). HierNet groups the classes the network itself mixes up:

1. :func:`confusion_probability_matrix` — row ``i``: the mean predicted distribution of the images
   of true class ``i`` (probabilities accumulated, not argmax counts);
2. :func:`group_classes` — every class its own group, then repeatedly merge the two groups of highest
   proximity (the mean of ``CPM[a][b] + CPM[b][a]`` over their member pairs) while the merged size
   stays ≤ ``g_max`` and the proximity exceeds ``p_min``;
3. :func:`induce_taxonomy` — the groups become the inner nodes of a :class:`~hiervision.taxonomy.Taxonomy`;
   given a list of ``p_min`` (and ``g_max``) values, each group is grouped again with the next
   values, giving deeper trees (the paper's recursive step).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from hiervision.taxonomy import Taxonomy
from hiervision.tree.tables import column_index

__all__ = ["confusion_probability_matrix", "group_classes", "induce_from_run", "induce_taxonomy", "plot_taxonomy"]


#: the most classes :func:`induce_from_run` takes: its (C, C) float64 matrix is 3.2 GB at 20,000
MAX_INDUCE_CLASSES = 20_000


def confusion_probability_matrix(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)``: row ``i`` = mean predicted probability vector over the samples of true class ``i``.

    Args:
        probs: ``(n, C)`` predicted class probabilities (rows sum to 1).
        labels: ``(n,)`` true class indices in ``0..C-1``.
    """
    if probs.dim() != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probs must be (n, {num_classes}), got {tuple(probs.shape)}")
    if len(labels) != len(probs):
        raise ValueError(f"{len(probs)} probability rows but {len(labels)} labels")
    labels = labels.long()
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, labels, probs.double())
    counts = torch.bincount(labels, minlength=num_classes).double()
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise ValueError(f"no validation samples of class {missing[0]} (CPM rows need at least one each)")
    return sums / counts.unsqueeze(1)


def group_classes(cpm: torch.Tensor | np.ndarray, p_min: float, g_max: int,
                  classes: Sequence[int] | None = None) -> list[list[int]]:
    """HierNet's greedy grouping of ``classes`` (default all) by confusion proximity.

    Merges the closest pair of groups while ``|G1| + |G2| ≤ g_max`` and ``proximity > p_min``; ties go
    to the pair that comes first (lowest group indices), so the result is deterministic. Returns the
    groups (sorted member lists) in order of their smallest member.
    """
    cpm = np.asarray(cpm, dtype=np.float64)
    if cpm.ndim != 2 or cpm.shape[0] != cpm.shape[1]:
        raise ValueError(f"the confusion probability matrix must be square, got {cpm.shape}")
    if g_max < 1:
        raise ValueError(f"g_max must be ≥ 1, got {g_max}")
    members = [[int(c)] for c in (range(len(cpm)) if classes is None else classes)]
    idx = [m[0] for m in members]
    prox = cpm + cpm.T
    sums = prox[np.ix_(idx, idx)].copy()  # summed pairwise proximity between groups
    sizes = np.ones(len(members))
    alive = np.ones(len(members), dtype=bool)
    while True:
        mean = sums / np.outer(sizes, sizes)
        ok = np.triu(np.outer(alive, alive), 1) & (np.add.outer(sizes, sizes) <= g_max) & (mean > p_min)
        if not ok.any():
            break
        flat = int(np.argmax(np.where(ok, mean, -np.inf)))
        i, j = divmod(flat, len(members))
        members[i] += members[j]
        sums[i, :] += sums[j, :]
        sums[:, i] += sums[:, j]
        sizes[i] += sizes[j]
        alive[j] = False
    groups = [sorted(m) for m, a in zip(members, alive) if a]
    return sorted(groups, key=lambda g: g[0])


def induce_taxonomy(
    cpm: torch.Tensor | np.ndarray,
    names: Sequence[str],
    p_min: float | Sequence[float],
    g_max: int | Sequence[int] = 50,
    external_ids: Sequence[str | None] | None = None,
) -> Taxonomy:
    """A tree over ``names`` (the CPM's classes) from :func:`group_classes`, applied recursively.

    ``p_min``/``g_max`` given as lists set the grouping of each depth (the last value repeats for
    ``g_max``); ``len(p_min)`` is the number of grouping rounds. Groups of one class stay a leaf of
    their parent, and a round that splits nothing adds no level. Inner nodes are named ``group1``,
    ``group1.2``, ... (by their position), leaves keep their class names (and external ids).
    """
    p_mins = [float(p_min)] if isinstance(p_min, (int, float)) else [float(p) for p in p_min]
    g_maxes = [int(g_max)] if isinstance(g_max, int) else [int(g) for g in g_max]
    if not p_mins or not g_maxes:
        raise ValueError("p_min and g_max need at least one value each")
    bad = [p for p in p_mins if not 0 < p < 1] or [g for g in g_maxes if g < 1]
    if bad:  # a proximity is a mean of probabilities: outside (0, 1) every or no pair would merge
        raise ValueError(f"p_min must lie in (0, 1) and g_max be ≥ 1, got {bad[0]}")
    if len(names) != len(cpm):
        raise ValueError(f"{len(names)} class names for a {len(cpm)}-class confusion matrix")
    node_names, parents, ext = ["root"], [-1], [None]

    def grow(classes: list[int], parent: int, depth: int, label: str) -> None:
        k = 0
        groups = [classes]
        if depth < len(p_mins):
            groups = group_classes(cpm, p_mins[depth], g_maxes[min(depth, len(g_maxes) - 1)], classes)
        if len(groups) == 1 and depth < len(p_mins) and depth + 1 < len(p_mins):
            grow(classes, parent, depth + 1, label)  # nothing split here: try the next round's values
            return
        for group in groups:
            if len(group) == 1 or len(groups) == 1:
                for c in group:
                    node_names.append(names[c])
                    parents.append(parent)
                    ext.append(None if external_ids is None else external_ids[c])
                continue
            k += 1
            name = f"{label}{'.' if label != 'group' else ''}{k}"
            node_names.append(name)
            parents.append(parent)
            ext.append(None)
            grow(group, len(node_names) - 1, depth + 1, name)

    grow(list(range(len(names))), 0, 0, "group")
    # parents before children, leaves of a group next to each other: Taxonomy keeps this order
    return Taxonomy(node_names, parents, ext)


def induce_from_run(run_dir: str | os.PathLike, p_min: float | Sequence[float],
                    g_max: int | Sequence[int] = 50, device: str = "auto") -> Taxonomy:
    """The induced tree of a trained run: its model's class probabilities on its own validation split
    (a flat model's softmax; other models' leaf scores, renormalised) → CPM → :func:`induce_taxonomy`."""
    from hiervision.distributed import autocast_dtype, select_device
    from hiervision.evaluation import predict_dataset
    from hiervision.experiment import load_run, run_data

    dev = select_device(device)
    cfg, taxonomy, model, meta = load_run(run_dir, device=dev)
    if len(taxonomy.leaves) > MAX_INDUCE_CLASSES:  # HierNet's grouping reads a dense C x C matrix
        raise ValueError(f"{run_dir}: {len(taxonomy.leaves)} classes; inducing a tree reads a dense confusion "
                         f"matrix (C² floats), so it is for up to {MAX_INDUCE_CLASSES:,} classes — give the tree")
    data = run_data(cfg, run_dir, meta=meta)
    if data.multi_label or not len(data.val):
        raise ValueError(f"{run_dir}: inducing a tree needs single-label data with a validation split")
    amp = autocast_dtype(cfg["train"]["amp"], dev)
    pred, targets = predict_dataset(model, data, data.val, cfg["eval"]["batch_size"], dev, amp)
    leaves = list(taxonomy.leaves)
    index = column_index(leaves, taxonomy.num_nodes)
    if bool((index[targets] < 0).any()):
        raise ValueError(f"{run_dir}: validation labels above the leaves; the CPM needs class labels")
    probs = pred.scores[:, leaves]
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
    cpm = confusion_probability_matrix(probs, index[targets], len(leaves))
    names = [taxonomy.names[n] for n in leaves]
    ext = [taxonomy.external_ids[n] for n in leaves]
    repeated = {n for n, k in Counter(names).items() if k > 1}  # WordNet names repeat; groups need unique ones
    names = [f"{n} ({e})" if n in repeated and e else n for n, e in zip(names, ext)]
    return induce_taxonomy(cpm, names, p_min, g_max, ext)


def plot_taxonomy(taxonomy: Taxonomy, path: str, title: str = "") -> None:
    """Draw the tree (root at the top, leaves along the bottom) to an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x: dict[int, float] = {}
    order = iter(range(len(taxonomy.leaves)))

    def place(n: int) -> float:
        kids = taxonomy.children[n]
        x[n] = next(order) if not kids else float(np.mean([place(c) for c in kids]))
        return x[n]

    place(0)
    depth = taxonomy.max_depth
    width = max(6.0, 0.35 * len(taxonomy.leaves))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 1.3 * depth))
    for n in range(1, taxonomy.num_nodes):
        p = taxonomy.parents[n]
        ax.plot([x[p], x[n]], [-taxonomy.depth(p), -taxonomy.depth(n)], color="0.6", lw=0.8, zorder=1)
    for n in range(taxonomy.num_nodes):
        leaf = not taxonomy.children[n]
        ax.scatter(x[n], -taxonomy.depth(n), s=18, color="tab:blue" if leaf else "tab:orange", zorder=2)
        ax.text(x[n], -taxonomy.depth(n) - (0.12 if leaf else -0.12), taxonomy.names[n], fontsize=7,
                rotation=90 if leaf else 0, ha="center", va="top" if leaf else "bottom")
    ax.set_ylim(-depth - 1.6, 0.5)
    ax.axis("off")
    ax.set_title(title or f"{len(taxonomy.leaves)} classes, {taxonomy.num_nodes - 1 - len(taxonomy.leaves)} groups")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
