"""Synthetic images whose content is shaped by the class tree — a fast, download-free stand-in for real data.

Each depth of a path controls one visual factor, so hierarchical models have real structure to use:

* depth 1 — background texture: horizontal or vertical stripes (random colour, frequency and phase);
* depth 2 — the shape in front: square, disk or cross (random colour, size and vertical position);
* depth 3 — where the shape sits: left or right half (paths ending at depth 2 put it anywhere).

Pixel noise and the random nuisance factors keep it from being trivial. Everything is vectorised
numpy, deterministic given the seed.
"""

from __future__ import annotations

import numpy as np
import torch

from hiervision.data.base import TensorImageDataset
from hiervision.taxonomy import Taxonomy

__all__ = ["SYNTHETIC_VARIANTS", "make_synthetic", "synthetic_taxonomy"]

SYNTHETIC_VARIANTS = ("synthetic", "synthetic_var", "synthetic_multilabel")
TEXTURES = ("horizontal", "vertical")
SHAPES = ("square", "disk", "cross")
POSITIONS = ("left", "right")
# variable depth: these (texture, shape) paths stop at depth 2
_SHORT = {("horizontal", "cross"), ("vertical", "square")}


def synthetic_taxonomy(variable_depth: bool = False) -> Taxonomy:
    """2 textures × 3 shapes × 2 positions (12 leaves, depth 3); the variable version has 10 leaves, 2 at depth 2."""
    paths = set()
    for t in TEXTURES:
        for s in SHAPES:
            if variable_depth and (t, s) in _SHORT:
                paths.add(f"{t}/{s}")
            else:
                paths.update(f"{t}/{s}/{p}" for p in POSITIONS)
    return Taxonomy.from_paths(paths)


def _factors(tax: Taxonomy) -> np.ndarray:
    """``(N+1, 3)`` per node: texture, shape, position index along its path (-1 = not fixed)."""
    out = np.full((tax.num_nodes, 3), -1, dtype=np.int64)
    for n in range(1, tax.num_nodes):
        for d, m in enumerate(tax.path(n)):
            out[n, d] = (TEXTURES, SHAPES, POSITIONS)[d].index(tax.names[m])
    return out


def _uniform(rng: np.random.Generator, lo: float, hi: float, shape: tuple[int, ...]) -> np.ndarray:
    return (lo + (hi - lo) * rng.random(shape, dtype=np.float32)).astype(np.float32)


def _render(
    factors: np.ndarray, size: int, channels: int, noise: float, rng: np.random.Generator, small: bool = False
) -> np.ndarray:
    """Float32 images ``(n, C, size, size)`` in [0, 1] for per-sample ``(texture, shape, position)`` rows.

    ``small`` (multi-label cells) uses bigger shapes and wider stripes so they stay recognisable at 16 px.
    """
    n = len(factors)
    tex, shape, pos = factors[:, 0], factors[:, 1], factors[:, 2]
    c = ((np.arange(size) + 0.5) / size).astype(np.float32)
    v, u = c[None, :, None], c[None, None, :]  # rows, columns
    freq = _uniform(rng, *((1.5, 2.5) if small else (2.5, 4.5)), (n, 1, 1))
    phase = _uniform(rng, 0, 2 * np.pi, (n, 1, 1))
    coord = np.where(tex[:, None, None] == 0, v, u)
    stripes = np.sin(2 * np.pi * freq * coord + phase)  # (n, S, S)
    bg = _uniform(rng, 0.15, 0.5, (n, channels, 1, 1)) + (0.15 * stripes)[:, None]
    fg_col = _uniform(rng, 0.7, 0.95, (n, channels, 1, 1))  # backgrounds stay ≤ 0.65
    lo, hi = (0.28, 0.36) if small else (0.22, 0.36)
    cx = np.where(pos == 0, _uniform(rng, lo, hi, (n,)),
                  np.where(pos == 1, _uniform(rng, 1 - hi, 1 - lo, (n,)), _uniform(rng, 0.25, 0.75, (n,))))
    cy = _uniform(rng, 0.3, 0.7, (n,))
    r = _uniform(rng, *((0.2, 0.25) if small else (0.14, 0.2)), (n, 1, 1))
    dx, dy = np.abs(u - cx[:, None, None]), np.abs(v - cy[:, None, None])
    sq = shape[:, None, None]
    mask = np.where(sq == 0, np.maximum(dx, dy) < r * 0.85, dx * dx + dy * dy < r * r)
    arm = r * 0.38
    mask = np.where(sq == 2, ((dx < arm) & (dy < r)) | ((dy < arm) & (dx < r)), mask)
    img = np.where(mask[:, None], fg_col, bg)
    img += noise * rng.standard_normal((n, 1, size, size), dtype=np.float32)  # luminance noise: cheap
    return np.clip(img, 0, 1, out=img)


def _to_uint8(x: np.ndarray) -> torch.Tensor:
    x *= 255
    x += 0.5
    return torch.from_numpy(x.astype(np.uint8))  # x is in [0.5, 255.5]: truncation rounds


def make_synthetic(
    variant: str = "synthetic",
    n: int = 1000,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.08,
    stream: int = 0,
) -> TensorImageDataset:
    """``n`` images of one variant (see :data:`SYNTHETIC_VARIANTS`), classes uniform over the leaves.

    ``synthetic_multilabel`` tiles a 2×2 canvas with 1–4 items (from the variable-depth tree; empty
    cells are flat noise) and marks each item's path end in a bool ``(N+1,)`` target. ``stream``
    separates independent sets drawn with one seed (0 = train, 1 = test).
    """
    if variant not in SYNTHETIC_VARIANTS:
        raise ValueError(f"name: unknown synthetic variant {variant!r} (one of {', '.join(SYNTHETIC_VARIANTS)})")
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    if size < 8 or (variant == "synthetic_multilabel" and size % 2):
        raise ValueError(f"size: must be ≥ 8 (and even for multi-label), got {size}")
    tax = synthetic_taxonomy(variable_depth=variant != "synthetic")
    fac = _factors(tax)
    leaves = np.array(tax.leaves)
    rng = np.random.default_rng([seed, stream])
    if variant != "synthetic_multilabel":
        labels = leaves[rng.integers(0, len(leaves), n)]
        images = _render(fac[labels], size, channels, noise, rng)
        return TensorImageDataset(_to_uint8(images), torch.from_numpy(labels.astype(np.int64)), tax)
    half = size // 2
    present = rng.random((n, 4)) < 0.5
    present[np.arange(n), rng.integers(0, 4, n)] = True  # at least one item
    labels = leaves[rng.integers(0, len(leaves), (n, 4))]
    cells = _render(fac[labels.reshape(-1)], half, channels, noise, rng, small=True).reshape(n, 4, channels, half, half)
    empty = _uniform(rng, 0.15, 0.5, (n, 4, channels, 1, 1)) + noise * rng.standard_normal(
        (n, 4, 1, half, half), dtype=np.float32)
    cells = np.where(present[:, :, None, None, None], cells, np.clip(empty, 0, 1))
    top = np.concatenate([cells[:, 0], cells[:, 1]], axis=-1)
    bottom = np.concatenate([cells[:, 2], cells[:, 3]], axis=-1)
    images = np.concatenate([top, bottom], axis=-2)
    targets = torch.zeros(n, tax.num_nodes, dtype=torch.bool)
    rows = np.repeat(np.arange(n), 4)[present.reshape(-1)]
    targets[torch.from_numpy(rows), torch.from_numpy(labels.reshape(-1)[present.reshape(-1)])] = True
    return TensorImageDataset(_to_uint8(images), targets, tax)
