"""HAFrame (Liang & Davis, ICCV 2023, "Inducing Neural Collapse to a Fixed Hierarchy-Aware Frame for
Reducing Mistake Severity"): a flat classifier whose last layer is *fixed* to a frame of class vectors
whose pairwise cosines follow the tree, so that features collapse onto a geometry where near classes
are near and a mistake tends to land on a relative.

Three parts (the paper's method section, and its code: ``HAFrame/solve_HAF.py``, ``HAFrame/losses.py``):

* the frame (:func:`hierarchy_aware_frame`): class-to-class distances (the height of their lowest
  common ancestor) become cosines ``s_ij = (1 − s_min)·exp(−γ·d_ij / d_max) + s_min``, with the most
  negative ``s_min`` that keeps the matrix positive semi-definite (the widest separation); its
  eigen-factorisation, randomly rotated, gives C unit vectors in C dimensions with exactly those
  cosines. Fixed: never trained, no bias;
* the transformation head: the backbone's features projected to C dimensions (a 1×1 convolution
  before pooling in the paper, which equals a linear map after it), batch norm, then two residual
  blocks of linear → batch norm → PReLU;
* the loss: ``(1 − α)·CE(logits) + α·Σ_c (cos(w_c, z) − s_yc)²`` — cross-entropy plus pulling each
  feature's cosines to every class vector towards the frame's row of its class; α = 0.4 and γ = 2 are
  the authors' settings (``experiments/*/type-II-haframe.sh``).

The frame is C×C by construction (C end classes), which the method needs; the tree is read through
its paths only. Exports and predicts as the flat head it subclasses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiervision.models.flat import FlatClassifier, single_label_leaves
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy
from hiervision.tree.tables import column_index

__all__ = ["HAFrameClassifier", "ResidualBlock", "check_batch", "hierarchy_aware_frame", "transformation_head"]


def hierarchy_aware_frame(distances: np.ndarray, gamma: float = 2.0, grid: int = 100,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(frame (C, C), cosines (C, C))`` from a ``(C, C)`` class distance matrix (see module docstring).

    ``s_min`` is searched on the authors' grid of ``grid`` values from ``−1/(C−1)`` (a simplex's
    cosine) to ``−1``; the smallest eigenvalue is concave in ``s_min`` (the matrix is affine in it), so
    the positive semi-definite grid points are one run and a bisection finds its most negative end.
    The random rotation is seeded: the same tree always gives the same frame."""
    d = np.asarray(distances, dtype=np.float64)
    c = len(d)
    d_max = max(float(d.max()), 1e-12)
    decay = np.exp(-gamma * d / d_max)

    def cosines(s: float) -> np.ndarray:
        return (1.0 - s) * decay + s

    def psd(s: float) -> bool:
        return bool(np.linalg.eigvalsh(cosines(s)).min() >= -1e-6)

    values = np.linspace(-1.0 / max(c - 1, 1), -1.0, grid)
    lo = next((i for i in range(grid) if psd(values[i])), None)  # in practice the first, the simplex's
    if lo is None:
        raise ValueError("hierarchy-aware frame: no cosine floor keeps the similarity matrix positive semi-definite")
    hi = grid - 1
    if psd(values[hi]):
        lo = hi
    while hi - lo > 1:  # values[lo] is PSD, values[hi] is not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if psd(values[mid]) else (lo, mid)
    sim = cosines(values[lo])
    w, v = np.linalg.eigh(sim)
    w = np.where(np.abs(w) < 1e-6, 0.0, w).clip(min=0)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((c, c)))
    frame = (rotation @ (np.sqrt(w)[:, None] * v.T)).T  # rows: unit class vectors, frame @ frame.T = sim
    return frame, sim


class ResidualBlock(nn.Module):
    """One residual block of the transformation head: linear → BN → PReLU, twice, plus the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.PReLU(width),
                                  nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.PReLU(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def transformation_head(in_features: int, width: int) -> nn.Sequential:
    """The authors' transformation head: a bias-free projection to ``width`` (their 1×1 convolution before
    pooling), batch norm, two :class:`ResidualBlock` — what a fixed frame's features pass through."""
    return nn.Sequential(nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), ResidualBlock(width),
                         ResidualBlock(width))


def check_batch(name: str, training: bool, features: torch.Tensor) -> None:
    """A head that batch-normalises its features cannot train on a batch of one image: one line saying so."""
    if training and len(features) < 2:
        raise ValueError(f"model {name}: its head batch-normalises features, which a training batch of one image "
                         "cannot be (train.batch_size must be at least 2)")


#: the most classes a frame is built for (five eigen-decompositions of a C x C matrix: seconds at 1,000)
MAX_FRAME_CLASSES = 5_000


class HAFrameClassifier(FlatClassifier):
    """Flat softmax over the leaves through the transformation head and the fixed hierarchy-aware frame
    (module docstring). ``frame_gamma``: γ of the distance-to-cosine decay; ``cosine_weight``: α, the
    share of the cosine loss. A coarse target trains the cross-entropy by its marginal (as the flat head
    does) and skips the cosine term (its frame row is undefined)."""

    extendable = False  # its output is not one fc row per class: no class can join it

    def __init__(self, taxonomy: Taxonomy, frame_gamma: float = 2.0, cosine_weight: float = 0.4, **kwargs) -> None:
        single_label_leaves("haframe", "a softmax over a fixed frame", kwargs)
        if not 0 <= cosine_weight <= 1:
            raise ValueError(f"model.cosine_weight must lie in [0, 1], got {cosine_weight}")
        super().__init__(taxonomy, **kwargs)
        self.cosine_weight = float(cosine_weight)
        c = len(self.classes)
        if c > MAX_FRAME_CLASSES:
            raise ValueError(f"model haframe: {c:,} classes; its frame is a dense C x C matrix found by "
                             f"eigen-decompositions (O(C³)), so it takes up to {MAX_FRAME_CLASSES:,} classes — "
                             "on a bigger tree use soft_max_margin, haf or flat with a decision rule")
        # the flat head's classifier slot holds the transformation head; the fixed frame replaces its weights
        self.fc = transformation_head(self.backbone.num_features, c)
        lca = self.tables.lca(self.classes.unsqueeze(1), self.classes.unsqueeze(0))  # (C, C): the frame's own size
        dist = self.tables.height[lca].double().numpy()
        frame, sim = hierarchy_aware_frame(dist, frame_gamma)
        # the tree gives both again (the rotation is seeded): checkpoints carry no table the tree recomputes
        self.register_buffer("frame", torch.from_numpy(frame).float(), persistent=False)
        self.register_buffer("frame_cosines", torch.from_numpy(sim).float(), persistent=False)
        self.register_buffer("class_index", column_index(self.classes, taxonomy.num_nodes), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # runs saved before the transformation head took the flat head's ``fc`` slot kept it as ``transform``
        for key in [k for k in state_dict if k.startswith(prefix + "transform.")]:
            state_dict[prefix + "fc." + key.removeprefix(prefix + "transform.")] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        check_batch("haframe", self.training, features)
        z = self.fc(self.dropout(features))
        return {"logits": z @ self.frame.T.to(z.dtype), "features": z}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        ce = super().loss({"logits": outputs["logits"]}, targets)
        idx = self.class_index[targets]
        leaf = idx >= 0
        if self.cosine_weight == 0 or not leaf.any():
            return (1 - self.cosine_weight) * ce
        z = outputs["features"].float()[leaf]
        cos = F.normalize(z, dim=1) @ F.normalize(self.frame, dim=1).T  # (b, C)
        aux = (cos - self.frame_cosines[idx[leaf]]).square().sum(1).sum() / len(targets)
        return (1 - self.cosine_weight) * ce + self.cosine_weight * aux


@register_model("haframe", multi_label=False)
def haframe(taxonomy: Taxonomy, **kwargs) -> HAFrameClassifier:
    """HAFrame: a fixed hierarchy-aware frame behind a transformation head (Liang & Davis, ICCV 2023)."""
    return HAFrameClassifier(taxonomy, **kwargs)
