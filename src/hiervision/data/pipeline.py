"""The ImageNet-style input pipeline for lazy data sets (``data.pipeline: imagenet``), in PIL.

Training: random resized crop (area ``crop_scale``, aspect ``crop_ratio``) + horizontal flip;
evaluation: resize the shorter side to ``resize`` + centre crop ``crop``. Each image is decoded and
transformed in a DataLoader worker, from its own seed (:func:`~hiervision.data.loader.sample_seed`),
so the result does not depend on the worker count.

Hand-written on PIL rather than a library: torchvision is a CUDA build on this registry, and the two
operations are a crop box and one ``Image.resize(box=...)`` call each. Two things make it fast:
the crop and the resize are one resampling pass, and JPEGs are decoded with ``Image.draft`` at the
smallest power-of-two reduction that still covers the crop at full output resolution (a 4000 px
photo cropped to 224 px decodes at 1/8 the pixels).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hiervision.data.base import FileImageDataset, HierDataset
from hiervision.imagefile import center_box, crop_resize, upright

__all__ = ["PIPELINE_KEYS", "CenterCrop", "ImagePipeline", "PipelineDataset", "RandomResizedCrop", "pipeline_from_cfg"]

#: the data config keys of the pipeline (valid for the lazy data sets: folder, manifest, shards)
PIPELINE_KEYS = {"pipeline", "crop", "resize", "crop_scale", "crop_ratio", "flip"}

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def _to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class RandomResizedCrop:
    """Training transform: a random box of ``scale`` × the area and aspect in ``ratio``, resized to ``size``; flip."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def box(self, w: int, h: int, rng: random.Random) -> Box:
        """The crop box (ten tries at the drawn area and aspect, then the centre box of the nearest allowed aspect)."""
        area = w * h
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(lo, hi))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return (x0, y0, x0 + cw, y0 + ch)
        aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
        cw, ch = (w, round(w / aspect)) if w / h <= aspect else (round(h * aspect), h)
        cw, ch = min(cw, w), min(ch, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return (x0, y0, x0 + cw, y0 + ch)

    def __call__(self, im: Image.Image, channels: int, rng: random.Random) -> torch.Tensor:
        im = upright(im)
        out = crop_resize(im, self.box(*im.size, rng), self.size, channels)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out)


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation transform: the shorter side scaled to ``resize``, then the centre ``size``×``size`` square."""

    size: int = 224
    resize: int = 256

    def box(self, w: int, h: int) -> Box:
        return center_box(w, h, self.size, self.resize)

    def __call__(self, im: Image.Image, channels: int, rng: random.Random | None = None) -> torch.Tensor:
        im = upright(im)
        return _to_tensor(crop_resize(im, self.box(*im.size), self.size, channels))


def _open(ds: HierDataset, i: int) -> tuple[Image.Image, str]:
    """The PIL image of sample ``i`` (not yet decoded) and its name for error messages."""
    if hasattr(ds, "open_image"):
        return ds.open_image(i), ds.source_name(i)
    if isinstance(ds, FileImageDataset):
        reader, src = ds.read, ds.sources[i]
        if hasattr(reader, "_open"):  # ImageReader: open without its fixed-size resize
            name = reader.name(src) if hasattr(reader, "name") else src
            try:
                return reader._open(src), name
            except (OSError, UnidentifiedImageError, KeyError) as e:
                raise ValueError(f"{name}: cannot read image ({e})") from None
        x = reader(src)
        return Image.fromarray(x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()), src
    raise ValueError(f"data.pipeline: needs a lazy data set of image files, not {type(ds).__name__}")


def _channels(ds: HierDataset) -> int:
    if hasattr(ds, "channels"):
        return int(ds.channels)
    return int(getattr(getattr(ds, "read", None), "channels", 3))


class PipelineDataset(HierDataset):
    """A lazy data set seen through one per-image transform; ``load(i, seed)`` gives uint8 for the loader.

    ``ds[i]`` (float in [0, 1], like every data set) uses the seed ``i``, so it is reproducible too.
    """

    def __init__(self, base: HierDataset, transform: RandomResizedCrop | CenterCrop) -> None:
        self.base, self.transform = base, transform
        self.targets, self.taxonomy, self.coarse_mask = base.targets, base.taxonomy, base.coarse_mask
        self.channels = _channels(base)
        self.ids = getattr(base, "ids", None)  # stable sample names, where the data set has them

    def load(self, i: int, seed: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Decode and transform sample ``i`` with its own seed (runs in a DataLoader worker)."""
        im, name = _open(self.base, i)
        limit = getattr(getattr(self.base, "read", None), "max_pixels", None)  # the reader's pixel limit, if any
        if limit is not None and im.size[0] * im.size[1] > limit:
            im.close()
            raise ValueError(f"{name}: image is {im.size[0]}x{im.size[1]} pixels, over the limit {limit}")
        try:
            with im:
                x = self.transform(im, self.channels, random.Random(seed))
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"{name}: cannot read image ({e})") from None
        return x, self._target(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        x, y = self.load(i, i)
        return x.float().div_(255), y

    def subset(self, indices: Sequence[int] | torch.Tensor) -> PipelineDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = copy.copy(self)
        out.base = self.base.subset(idx)
        out.targets, out.coarse_mask = self.targets[idx], self.coarse_mask[idx]
        out.ids = getattr(out.base, "ids", None)
        return out


@dataclass(frozen=True)
class ImagePipeline:
    """The train and evaluation transforms of one config."""

    train: RandomResizedCrop
    eval: CenterCrop

    def wrap(self, ds: HierDataset, training: bool) -> PipelineDataset:
        return PipelineDataset(ds, self.train if training else self.eval)


def _pair(cfg: dict, key: str, default: tuple[float, float], lo: float) -> tuple[float, float]:
    v = cfg.get(key, default)
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v) and lo < v[0] <= v[1])
    if not ok:
        raise ValueError(f"data.{key}: must be [low, high] with {lo} < low ≤ high, got {v!r}")
    return (float(v[0]), float(v[1]))


def pipeline_from_cfg(cfg: dict[str, Any], image_size: int | tuple[int, int] | None) -> ImagePipeline | None:
    """The pipeline the data config asks for (``None`` without ``data.pipeline``); checks every key."""
    name = cfg.get("pipeline")
    used = sorted(k for k in PIPELINE_KEYS - {"pipeline"} if k in cfg)
    if name is None:
        if used:
            raise ValueError(f"data.{used[0]}: applies only with data.pipeline: imagenet")
        return None
    if name != "imagenet":
        raise ValueError(f"data.pipeline: must be 'imagenet' or null, got {name!r}")
    if isinstance(image_size, tuple) and image_size[0] != image_size[1]:
        raise ValueError(f"data.image_size: the imagenet pipeline crops squares, got {list(image_size)}")
    size = image_size[0] if isinstance(image_size, tuple) else image_size
    crop = cfg.get("crop", size or 224)
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise ValueError(f"data.crop: must be a positive int, got {crop!r}")
    if size is not None and size != crop:
        raise ValueError(f"data.image_size: {size} differs from data.crop {crop} (give one of them)")
    resize = cfg.get("resize", round(crop / 0.875))
    if isinstance(resize, bool) or not isinstance(resize, int) or resize < crop:
        raise ValueError(f"data.resize: must be an int ≥ data.crop ({crop}), got {resize!r}")
    flip = cfg.get("flip", True)
    if not isinstance(flip, bool):
        raise ValueError(f"data.flip: must be true or false, got {flip!r}")
    scale = _pair(cfg, "crop_scale", (0.08, 1.0), 0.0)
    if scale[1] > 1:
        raise ValueError(f"data.crop_scale: the area fraction cannot exceed 1, got {list(scale)}")
    ratio = _pair(cfg, "crop_ratio", (3 / 4, 4 / 3), 0.0)
    return ImagePipeline(RandomResizedCrop(crop, scale, ratio, flip), CenterCrop(crop, resize))
