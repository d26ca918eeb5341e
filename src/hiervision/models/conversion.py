"""Koo et al.'s conversion operations (Sec. 3.3, Appendices A/B): CNN stage maps → RNN inputs.

Stage maps differ in depth and size, but every RNN step needs one vector of the same length ``p``.
``g(a_s) → R^p`` comes in three kinds:

* :class:`LinearConversion` — ``vec(a ×₁ U¹ ×₂ U² ×₃ U³)``, n-mode products with trainable
  ``U¹ (m×D)``, ``U² (n×W)``, ``U³ (v×H)`` and ``p = m·n·v``;
* :class:`ConvConversion` — one convolution whose filter size, stride and padding are chosen as
  Appendix A derives so that ``K · W_out · H_out = p`` exactly;
* :class:`PoolConversion` — disjoint pooling sized as Appendix B derives (``D · (W/F)² = p``), no
  trainable weights. Where no such pooling exists for a stage it fails naming the stage and the
  ``p`` values that would work, unless ``fallback="project"``: pool to the nearest feasible grid,
  then the paper's Sec. 3.3 general form ``Pool(a) ×₁ U¹`` (a learned 1×1 channel map) fills ``p``.

:class:`StageSequence` averages the converted stages of each step's subset ``S_t`` into ``u_t``.
Torch maps are ``(B, D, H, W)``: mode 2 of the paper (width) is the last dim, mode 3 (height) the
one before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONVERSIONS",
    "ConvConversion",
    "LinearConversion",
    "PoolConversion",
    "StageSequence",
    "conv_geometry",
    "default_steps",
    "pool_sizes",
]


def _grid(p: int, size: int, min_channels: int = 16) -> int:
    """Side ``s ≤ size`` of the output grid: the largest with ``s² | p`` that still leaves
    ``p / s² ≥ min_channels`` values per cell (or the largest at all when none does)."""
    options = [s for s in range(1, size + 1) if p % (s * s) == 0]
    rich = [s for s in options if p // (s * s) >= min_channels]
    return max(rich or options)


def _square(stage: int, shape: Sequence[int], kind: str) -> int:
    d, h, w = shape
    if h != w:
        raise ValueError(f"stage {stage}: {kind} conversion needs a square map (Koo et al., App. A/B), got {h}x{w}")
    return w


class LinearConversion(nn.Module):
    """``vec(a ×₁ U¹ ×₂ U² ×₃ U³)`` with ``p = m·n·v`` (default: an ``s×s`` grid, ``m = p/s²``)."""

    def __init__(self, shape: Sequence[int], p: int, mnv: Sequence[int] | None = None, stage: int = 0) -> None:
        super().__init__()
        d, h, w = shape
        if mnv is None:
            s = _grid(p, min(h, w))
            mnv = (p // (s * s), s, s)
        m, n, v = (int(x) for x in mnv)
        if m * n * v != p:
            raise ValueError(f"stage {stage}: linear conversion needs m·n·v = p, got {m}·{n}·{v} = {m * n * v} ≠ {p}")
        self.mnv = (m, n, v)
        self.u1 = nn.Parameter(torch.empty(m, d))
        self.u2 = nn.Parameter(torch.empty(n, w))
        self.u3 = nn.Parameter(torch.empty(v, h))
        for u in (self.u1, self.u2, self.u3):  # each product keeps the scale of its input
            nn.init.normal_(u, std=1 / math.sqrt(u.shape[1]))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # n-mode products on different modes commute: the spatial ones first shrink the map (H×W → v×n)
        # before the channel product, instead of widening a full-resolution map to m channels
        x = torch.einsum("bdhw,nw->bdhn", a, self.u2)
        x = torch.einsum("bdhn,vh->bdvn", x, self.u3)
        x = torch.einsum("bdvn,md->bmvn", x, self.u1)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"m·n·v={self.mnv}"


def conv_geometry(shape: Sequence[int], p: int, out_size: int | None = None, stage: int = 0) -> dict[str, int]:
    """Filter size ``F``, stride ``G``, zero padding ``Z`` and filters ``K`` giving exactly ``p`` outputs.

    Appendix A's cases, tried in order for an ``o×o`` output grid (``o² | p``, default as for the
    linear conversion): case 1 (``o = 1``: ``F = W``, ``K = p``); case 2 (disjoint, ``F = G``, the
    smallest ``Z < F`` with ``(W + 2Z) / F = o``); case 3 (``G = 1``, ``Z = 0``, ``F = W − o + 1``).
    """
    w = _square(stage, shape, "convolutional")
    o = _grid(p, w) if out_size is None else int(out_size)
    if o < 1 or o > w or p % (o * o):
        raise ValueError(f"stage {stage}: convolutional conversion cannot give a {o}x{o} grid with p={p} from a "
                         f"{w}x{w} map (needs 1 ≤ o ≤ {w} and o² dividing p)")
    k = p // (o * o)
    if o == 1:
        return {"F": w, "G": 1, "Z": 0, "K": k, "case": 1}
    for z in range(w):
        f, rem = divmod(w + 2 * z, o)
        if rem == 0 and 2 * z <= f and 1 < f < w:  # torch pads at most half a filter
            return {"F": f, "G": f, "Z": z, "K": k, "case": 2}
    return {"F": w - o + 1, "G": 1, "Z": 0, "K": k, "case": 3}


class ConvConversion(nn.Module):
    """``vec(Conv(a))`` with Appendix A's geometry (see :func:`conv_geometry`)."""

    def __init__(self, shape: Sequence[int], p: int, out_size: int | None = None, stage: int = 0) -> None:
        super().__init__()
        g = conv_geometry(shape, p, out_size, stage)
        self.geometry = g
        self.conv = nn.Conv2d(shape[0], g["K"], g["F"], stride=g["G"], padding=g["Z"])

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv(a).flatten(1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.geometry.items())


def pool_sizes(shape: Sequence[int]) -> dict[int, int]:
    """Every ``p`` a disjoint pooling of this ``(D, W, W)`` map reaches → its window ``F = G`` (App. B)."""
    d, _, w = shape
    return {d * (w // f) ** 2: f for f in range(w, 0, -1) if w % f == 0}


class PoolConversion(nn.Module):
    """``vec(Pool(a))``: disjoint ``F×F`` pooling with ``D · (W/F)² = p`` (Appendix B, case 1).

    ``fallback="project"`` handles stages where no such ``F`` exists: pool to the finest grid
    ``o×o`` (``o | W``, ``o² | p``) that leaves at least 16 values per cell, then a learned 1×1
    channel map ``U¹ (p/o² × D)`` — Sec. 3.3's ``Pool(a) ×₁ U¹``, with trainable weights.
    """

    def __init__(self, shape: Sequence[int], p: int, mode: str = "max", fallback: str = "error",
                 stage: int = 0) -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pool conversion mode must be 'max' or 'avg', got {mode!r}")
        if fallback not in ("error", "project"):
            raise ValueError(f"pool conversion fallback must be 'error' or 'project', got {fallback!r}")
        w = _square(stage, shape, "pooling")
        self.mode = mode
        sizes = pool_sizes(shape)
        self.project: nn.Module | None = None
        if p in sizes:
            self.window = sizes[p]
        elif fallback == "project":
            grids = [o for o in range(1, w + 1) if w % o == 0 and p % (o * o) == 0]
            o = max([g for g in grids if p // (g * g) >= 16] or grids)
            self.window = w // o
            self.project = nn.Conv2d(shape[0], p // (o * o), 1, bias=False)
        else:
            ok = ", ".join(str(q) for q in sorted(sizes))
            raise ValueError(f"stage {stage}: no disjoint pooling of its {shape[0]}x{w}x{w} map gives p={p} "
                             f"(Koo et al. App. B); p values that work for this stage: {ok} — or set "
                             f"model.pool_fallback=project")

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool2d if self.mode == "max" else F.avg_pool2d
        x = pool(a, self.window) if self.window > 1 else a
        if self.project is not None:
            x = self.project(x)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"{self.mode}, F=G={self.window}" + (", +U¹ projection" if self.project is not None else "")


CONVERSIONS = ("linear", "conv", "pool")


def default_steps(num_stages: int, num_steps: int) -> list[list[int]]:
    """``S_1..S_T``: consecutive, increasing groups of stage indices, the deepest stages alone first.

    ``T == L`` gives one stage per step; ``T < L`` merges the *early* stages into ``S_1`` (coarse
    levels get the low-level features, the last steps the most semantic stages).
    """
    if num_steps > num_stages:
        raise ValueError(f"model.steps: {num_steps} steps need at least {num_steps} backbone stages, the backbone "
                         f"has {num_stages} (Koo et al.'s S_t are increasing); set model.steps explicitly")
    extra = num_stages - num_steps
    return [list(range(extra + 1))] + [[extra + t] for t in range(1, num_steps)]


class StageSequence(nn.Module):
    """Backbone stage maps → ``u`` of shape ``(B, T, p)``: ``u_t = mean_{s ∈ S_t} g(a_s)``.

    Args:
        shapes: ``(D, H, W)`` of each backbone stage map (from a dry run at the training size).
        steps: ``S_1..S_T`` as lists of stage indices; must be increasing (every index of ``S_t``
            below every index of ``S_{t+1}``, as the paper requires).
        kind: ``linear`` | ``conv`` | ``pool``.
        norm: layer-normalise each ``u_t`` (no parameters). Our addition: the paper leaves the scale
            of ``u_t`` to the CNN; with SGD at CIFAR-style learning rates the residual arc (a linear
            classifier straight on ``u_t``) then feeds back into ever larger features and diverged
            within 6 steps on Fashion-MNIST. ``norm=False`` is the literal form.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], steps: Sequence[Sequence[int]], p: int, kind: str = "pool",
                 linear_shape: Sequence[int] | None = None, conv_out_size: int | None = None,
                 pool_mode: str = "max", pool_fallback: str = "error", norm: bool = True) -> None:
        super().__init__()
        if kind not in CONVERSIONS:
            raise ValueError(f"model.conversion must be one of {', '.join(CONVERSIONS)}, got {kind!r}")
        steps = [[int(s) for s in step] for step in steps]
        for t, step in enumerate(steps):
            if not step:
                raise ValueError(f"model.steps[{t}] is empty")
            bad = [s for s in step if not 0 <= s < len(shapes)]
            if bad:
                raise ValueError(f"model.steps[{t}]: stage {bad[0]} does not exist (backbone has {len(shapes)})")
            if t and min(step) <= max(steps[t - 1]):
                raise ValueError(f"model.steps[{t}]: stages must increase from step to step (got {steps})")
        self.steps = steps
        self.p = p
        self.norm = norm
        used = sorted({s for step in steps for s in step})
        convs = {}
        for s in used:
            if kind == "linear":
                convs[str(s)] = LinearConversion(shapes[s], p, linear_shape, stage=s)
            elif kind == "conv":
                convs[str(s)] = ConvConversion(shapes[s], p, conv_out_size, stage=s)
            else:
                convs[str(s)] = PoolConversion(shapes[s], p, pool_mode, pool_fallback, stage=s)
        self.convert = nn.ModuleDict(convs)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        g = {s: conv(maps[int(s)]) for s, conv in self.convert.items()}
        u = torch.stack([torch.stack([g[str(s)] for s in step]).mean(0) for step in self.steps], dim=1)
        return F.layer_norm(u, (self.p,)) if self.norm else u
