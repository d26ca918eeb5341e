"""Datasets for hierarchical classification, built from one config dict by :func:`build_data`.

Every dataset yields ``(image, target)``: a float32 ``C×H×W`` image in [0, 1] (normalisation and
augmentation happen later, on whole batches) and an ``int`` node id of the taxonomy — or, for
multi-label sets, a bool ``(N+1,)`` tensor marking the labelled path ends.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hiervision.data.base import (
    FeatureDataset,
    FileImageDataset,
    HierDataset,
    TensorImageDataset,
    channel_stats,
    coarsen_labels,
    coarsen_to_ancestors,
    grow_tree,
    hold_out,
    keep_classes,
    move_into,
    move_to_tree,
    shared_data_dir,
    split_fine_coarse,
)
from hiervision.data.imageio import DEFAULT_MAX_PIXELS
from hiervision.data.loader import BatchLoader, iter_batches
from hiervision.data.pipeline import PIPELINE_KEYS, CenterCrop, pipeline_from_cfg
from hiervision.data.splits import RECORD_SPLITS, hash_split, hash_subset, split_record
from hiervision.data.synthetic import SYNTHETIC_VARIANTS, make_synthetic
from hiervision.data.transforms import BatchAugment, hflip, normalize, pad_crop, resize
from hiervision.rollup import check_ranks
from hiervision.taxonomy import Taxonomy

__all__ = [
    "DATASETS",
    "BatchAugment",
    "BatchLoader",
    "DataBundle",
    "FeatureDataset",
    "FileImageDataset",
    "HierDataset",
    "TensorImageDataset",
    "build_data",
    "untrained_classes",
    "hflip",
    "iter_batches",
    "normalize",
    "pad_crop",
    "resize",
    "split_record",
]

_COMMON = {"name", "root", "val_fraction", "split_seed", "limit_train", "limit_test", "image_size",
           "coarse_fraction", "coarse_level", "fine_fraction", "coarse_labels", "tree", "fallback",
           "mean", "std", "keep_classes", "holdout_leaves", "coarsen", "ranks", "grow_from", "tree_unused"}  # fmt: skip
_SYNTH = {"size", "channels", "n_train", "n_test", "seed", "noise"}
_FILES = {"check", "on_bad_image", "max_pixels", "check_cache"}  # file-backed sets: verification and limits
_CANVAS = {"grid", "min_items", "max_items", "n_train", "n_val", "n_test", "seed", "variable_depth"}
#: dataset name → the config keys it accepts besides the common ones
DATASETS: dict[str, set[str]] = {
    "fashion_mnist": set(),
    "fashion_mnist_var": set(),
    "fashion_mnist_canvas": _CANVAS,  # multi-label canvases of real items, see data/canvas.py
    "tiny_imagenet": {"hierarchy_root", "max_depth", "cache_dir", "workers"},
    "folder": {"test_fraction", "channels", *_FILES, *PIPELINE_KEYS},
    "manifest": {"manifest", "taxonomy", "test_fraction", "channels", "multi_label", *_FILES, *PIPELINE_KEYS},
    "shards": {"channels", "shard_order", *PIPELINE_KEYS},  # written by `hiervision data pack`, see data/shards.py
    "cifar100": set(),
    **{v: _SYNTH for v in SYNTHETIC_VARIANTS},
}


@dataclass
class DataBundle:
    """Everything a training run needs to know about its data."""

    train: HierDataset
    val: HierDataset
    test: HierDataset
    taxonomy: Taxonomy
    in_chans: int
    image_size: int | tuple[int, int]  # an int when square
    multi_label: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    note: str = ""
    cfg: dict[str, Any] = field(default_factory=dict)

    features: bool = False  # the datasets hold pre-computed backbone features, not images
    augmented: bool = False  # the training set augments each image in the loader (data.pipeline): no batch augment
    skipped: int = 0  # unreadable images dropped under data.on_bad_image: skip (report it in metrics.json)
    #: data.holdout_leaves: which test images belong to a class held out of training and of the tree (their
    #: label is its nearest ancestor in the tree); None when nothing is held out
    novel: torch.Tensor | None = None
    bad_images: list[str] = field(default_factory=list)  # their one-line reasons, file named first

    def split_record(self) -> dict[str, Any]:
        """Which samples each split holds (count, sha256, sorted ids): write it into the run folder and compare
        it later with :func:`~hiervision.data.splits.compare_split_records` before evaluating or resuming."""
        splits = dict(zip(RECORD_SPLITS, (self.train.ids, self.val.ids, self.test.ids)))
        return split_record(splits, self.name, self.skipped)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation with this data's training statistics (applied on whole batches)."""
        return images if self.features else normalize(images, self.mean, self.std)

    def meta(self) -> dict[str, Any]:
        """What inference needs without the data (stored in checkpoints): channels, size, statistics."""
        size = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size, self.image_size)
        meta = {"in_chans": self.in_chans, "image_size": list(size), "mean": list(self.mean),
                "std": list(self.std), "multi_label": self.multi_label, "data": self.name}
        transform = getattr(self.test, "transform", None)
        if isinstance(transform, CenterCrop):  # data.pipeline: inference resizes and centre-crops the same way
            meta["resize"] = transform.resize
        return meta

    def __repr__(self) -> str:
        return (f"DataBundle({self.name}: train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"{self.in_chans}x{self.image_size}, {self.taxonomy!r}{', multi-label' if self.multi_label else ''})")


# ---------------------------------------------------------------------------------------------- cfg checks
def _int(cfg: dict, key: str, default: int | None, lo: int = 0) -> int | None:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"data.{key}: must be an integer ≥ {lo}, got {v!r}")
    return v


def _frac(cfg: dict, key: str, default: float, lo: float = 0.0, hi: float = 1.0, hi_open: bool = True) -> float:
    v = cfg.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"data.{key}: must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def _size(cfg: dict) -> int | tuple[int, int] | None:
    v = cfg.get("image_size")
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v):
        return (v[0], v[1])
    raise ValueError(f"data.image_size: must be a positive int or [height, width], got {v!r}")


def _given_stats(cfg: dict, key: str, chans: int | None = None) -> tuple[float, ...] | None:
    """``data.mean``/``data.std``: normalisation given instead of computed (a pretrained encoder's own, see
    :func:`~hiervision.models.backbones.hf.encoder_data_settings`); one finite number per channel, std > 0."""
    v = cfg.get(key)
    if v is None:
        return None
    ok = (isinstance(v, (list, tuple)) and len(v) > 0
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v)
          and (key != "std" or all(a > 0 for a in v)))
    if not ok:
        what = "positive finite numbers" if key == "std" else "finite numbers"
        raise ValueError(f"data.{key}: must be a list of {what}, one per image channel, got {v!r}")
    if chans is not None and len(v) != chans:
        raise ValueError(f"data.{key}: the images have {chans} channel(s), got {len(v)} values {list(v)}")
    return tuple(float(a) for a in v)


def _channels(cfg: dict) -> int | None:
    v = cfg.get("channels")
    if v not in (None, 1, 3) or isinstance(v, bool):
        raise ValueError(f"data.channels: must be 1 or 3, got {v!r}")
    return v


def _path(cfg: dict, key: str, required: bool = False) -> Path | None:
    v = cfg.get(key)
    if v is None:
        if required:
            raise ValueError(f"data.{key}: required for dataset {cfg['name']!r}")
        return None
    if not isinstance(v, (str, os.PathLike)):
        raise ValueError(f"data.{key}: must be a path, got {v!r}")
    return Path(v).expanduser()


def _check_cfg(cfg: dict) -> str:
    if not isinstance(cfg, dict):
        raise ValueError(f"data cfg must be a dict, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    unknown = sorted(set(cfg) - _COMMON - DATASETS[name])
    if unknown:
        raise ValueError(f"data.{unknown[0]}: not a setting of dataset {name!r}")
    fb = cfg.get("fallback")
    if fb is not None and fb not in SYNTHETIC_VARIANTS:
        raise ValueError(f"data.fallback: must be one of {', '.join(SYNTHETIC_VARIANTS)} or null, got {fb!r}")
    for key in ("mean", "std"):  # checked before the (maybe slow) loading; their length once channels are known
        _given_stats(cfg, key)
    return name


# ---------------------------------------------------------------------------------------------- loaders
def _resized(ds: HierDataset, size: int | tuple[int, int] | None) -> HierDataset:
    """Resize in-memory images once (lazy datasets resize per item in their reader)."""
    if size is None or not isinstance(ds, TensorImageDataset):
        return ds
    out = TensorImageDataset(torch.cat([resize(c, size) for c in ds.images.split(4096)]), ds.targets, ds.taxonomy,
                             ds.ids)
    out.coarse_mask = ds.coarse_mask
    return out


def _limit(ds: HierDataset, k: int | None, seed: int) -> HierDataset:
    return ds if k is None or k >= len(ds) else ds.subset(hash_subset(ds.ids, ds.targets, k, seed))


def _tag(ds: HierDataset, split: str) -> HierDataset:
    """Name the samples of a built-in split by their official index (``train/123``), its stable identity."""
    ds.ids = [f"{split}/{i}" for i in ds.ids]
    return ds


def _load_synthetic(cfg: dict, name: str) -> tuple[HierDataset, HierDataset, str]:
    size, seed = _int(cfg, "size", 32, 8), _int(cfg, "seed", 0)
    chans = _channels(cfg) or 3
    noise = _frac(cfg, "noise", 0.08, hi=1.0, hi_open=False)
    n_train, n_test = _int(cfg, "n_train", 5000, 1), _int(cfg, "n_test", 1000, 1)
    train = _tag(make_synthetic(name, n_train, size, chans, seed, noise, stream=0), "train")
    test = _tag(make_synthetic(name, n_test, size, chans, seed, noise, stream=1), "test")
    return train, test, f"synthetic data ({name}, seed {seed}), generated in memory"


def _load_canvas(
    cfg: dict, seed: int, lim_tr: int | None, lim_te: int | None
) -> tuple[HierDataset, HierDataset, HierDataset, str]:
    """Multi-label canvases of real Fashion-MNIST items; their val canvases come from held-out items."""
    from hiervision.data.canvas import load_fashion_mnist_canvas
    from hiervision.data.fashion_mnist import default_root

    grid = _int(cfg, "grid", 2, 1)
    lo, hi = _int(cfg, "min_items", 1, 1), _int(cfg, "max_items", grid * grid, 1)
    if hi > grid * grid:
        raise ValueError(f"data.max_items: at most grid² = {grid * grid} items fit, got {hi}")
    if lo > hi:
        raise ValueError(f"data.min_items: must be ≤ max_items ({hi}), got {lo}")
    var = cfg.get("variable_depth", True)
    if not isinstance(var, bool):
        raise ValueError(f"data.variable_depth: must be true or false, got {var!r}")
    val_fraction = _frac(cfg, "val_fraction", 0.1)
    n_val = _int(cfg, "n_val", None, 0)
    if n_val and val_fraction == 0:
        raise ValueError(f"data.n_val: {n_val} val canvases need val items, but data.val_fraction is 0")
    root, canvas_seed = _path(cfg, "root") or default_root(), _int(cfg, "seed", 0)
    s = load_fashion_mnist_canvas(
        root, variable_depth=var, grid=grid, min_items=lo, max_items=hi, n_train=_int(cfg, "n_train", None, 1),
        n_val=n_val, n_test=_int(cfg, "n_test", None, 1), limit_train=lim_tr, limit_test=lim_te,
        val_fraction=val_fraction, split_seed=seed, seed=canvas_seed,
    )  # fmt: skip
    note = (f"Fashion-MNIST {grid}x{grid} canvases of {lo}-{hi} items from {root} (seed {canvas_seed}; "
            f"train/val/test canvases from disjoint item pools)")  # fmt: skip
    return _tag(s.train, "train"), _tag(s.test, "test"), _tag(s.val, "val"), note


def _load(cfg: dict, name: str, seed: int) -> tuple[HierDataset, HierDataset, HierDataset | None, str, list[str]]:
    """``(train pool, test, predefined val or None, note, skipped bad images)`` for one dataset, limits applied."""
    lim_tr, lim_te = _int(cfg, "limit_train", None, 1), _int(cfg, "limit_test", None, 1)
    size = _size(cfg)
    val = None
    bad: list[str] = []
    if name == "fashion_mnist_canvas":
        train, test, val, note = _load_canvas(cfg, seed, lim_tr, lim_te)
    elif name.startswith("fashion_mnist"):
        from hiervision.data.fashion_mnist import default_root, load_fashion_mnist

        root = _path(cfg, "root") or default_root()
        var = name == "fashion_mnist_var"
        train = _tag(load_fashion_mnist(root, "train", var), "train")
        test = _tag(load_fashion_mnist(root, "test", var), "test")
        note = f"Fashion-MNIST from {root}"
    elif name == "tiny_imagenet":
        from hiervision.data.tiny_imagenet import default_cache_dir, load_tiny_imagenet, tiny_imagenet_taxonomy

        root = _path(cfg, "root")
        tax = tiny_imagenet_taxonomy(root, _path(cfg, "hierarchy_root"), _int(cfg, "max_depth", None, 1))
        cache = cfg.get("cache_dir", default_cache_dir())
        if isinstance(size, tuple):
            raise ValueError("data.image_size: Tiny-ImageNet is square, give one int")
        kw = dict(taxonomy=tax, image_size=size, cache_dir=cache, seed=seed, workers=_int(cfg, "workers", None, 1))
        train = load_tiny_imagenet(root, "train", limit=lim_tr, **kw)
        test = load_tiny_imagenet(root, "val", limit=lim_te, **kw)
        note = "Tiny-ImageNet-200 (test split = the labelled val set)"
        size = None  # already resized before caching
    elif name in ("folder", "manifest"):
        train, test, val, note, bad = _load_files(cfg, name, seed, size)
        size = None  # the reader resizes
    elif name == "shards":
        train, test, val, note = _load_shards(cfg, size)
        size = None  # the shards' reader resizes
    elif name == "cifar100":
        from hiervision.data.cifar100 import load_cifar100

        default = Path(os.environ.get("HIERVISION_CIFAR100", shared_data_dir() / "cifar-100-python"))
        root = _path(cfg, "root") or default
        train, test = load_cifar100(root)
        train, test = _tag(train, "train"), _tag(test, "test")
        note = f"CIFAR-100 from {root}"
    else:
        train, test, note = _load_synthetic(cfg, name)
    train, test = _limit(train, lim_tr, seed), _limit(test, lim_te, seed)
    if val is not None:
        val = _resized(val, size)
    return _resized(train, size), _resized(test, size), val, note, bad


def _load_files(cfg: dict, name: str, seed: int, size: int | tuple[int, int] | None
                ) -> tuple[HierDataset, HierDataset, HierDataset | None, str, list[str]]:
    """A folder of class folders or a manifest CSV: ``(train, test, val or None, note, skipped bad images)``;
    the test split is the manifest's own column or a hash split by path (``data.test_fraction``)."""
    val = None
    test_fraction = _frac(cfg, "test_fraction", 0.2)
    max_pixels = _max_pixels(cfg)
    if name == "folder":
        from hiervision.data.folder import load_folder

        pool = load_folder(_path(cfg, "root", required=True), _channels(cfg), size, max_pixels)
        splits = None
    else:
        from hiervision.data.manifest import load_manifest

        ml = cfg.get("multi_label")
        if ml not in (None, True, False):
            raise ValueError(f"data.multi_label: must be true, false or null, got {ml!r}")
        pool, splits = load_manifest(_path(cfg, "manifest", required=True), _path(cfg, "taxonomy"),
                                     _path(cfg, "root"), ml, _channels(cfg), size, max_pixels)
    pool, keep, bad = _checked(cfg, name, pool)
    if splits is not None:
        splits = [splits[i] for i in keep]
        col = torch.tensor([("train", "val", "test").index(s) for s in splits])
        train, val, test = (pool.subset(torch.nonzero(col == k).flatten()) for k in range(3))
        note = f"{name} with the manifest's own split column"
    else:
        rest, held = hash_split(pool.ids, test_fraction, seed, "test")
        if test_fraction > 0 and len(held) == 0:
            raise ValueError(f"data.test_fraction: a {test_fraction:g} split of {len(pool)} images by path hash "
                             "holds none of them; add images, raise the fraction or change data.split_seed")
        train, test = pool.subset(rest), pool.subset(held)
        note = f"{name} {cfg.get('root') or cfg.get('manifest')} (test = {test_fraction:g} split by path hash)"
    if bad:
        note += f"; {len(bad)} unreadable images skipped"
    if getattr(pool, "found", None):
        note += f"; channels and size from {pool.found}"
    return train, test, val, note, bad


def _load_shards(cfg: dict, size: int | tuple[int, int] | None
                 ) -> tuple[HierDataset, HierDataset, HierDataset | None, str]:
    """Packed tar shards (``hiervision data pack``) with their own train/val/test splits."""
    from hiervision.data.shards import load_shards

    splits, _ = load_shards(_path(cfg, "root", required=True), _channels(cfg), size)
    order = cfg.get("shard_order", False)
    if not isinstance(order, bool):
        raise ValueError(f"data.shard_order: must be true or false, got {order!r}")
    for ds in splits.values():
        ds.shard_order = order
    if "train" not in splits or "test" not in splits:
        raise ValueError(f"data.root: {cfg['root']} has no {'train' if 'train' not in splits else 'test'} split")
    train, test = splits["train"], splits["test"]
    val = splits["val"] if len(splits.get("val", ())) else None
    note = f"shards {cfg['root']} (the packed train/val/test splits)"
    return train, test, val, note


def _max_pixels(cfg: dict) -> int | None:
    v = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 64e6 in YAML is a float
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"data.max_pixels: must be a positive integer or null (no limit), got {v!r}")
    return v


def _checked(cfg: dict, name: str, pool: FileImageDataset) -> tuple[FileImageDataset, list[int], list[str]]:
    """``data.check``/``data.on_bad_image``: verify every image now; ``(kept pool, kept indices, bad messages)``."""
    check = cfg.get("check", True)
    if not isinstance(check, bool):
        raise ValueError(f"data.check: must be true or false, got {check!r}")
    mode = cfg.get("on_bad_image", "error")
    if mode not in ("error", "skip"):
        raise ValueError(f"data.on_bad_image: must be 'error' or 'skip', got {mode!r}")
    if mode == "skip" and not check:
        raise ValueError("data.on_bad_image: 'skip' needs data.check: true (bad images are found by the check)")
    everything = list(range(len(pool)))
    if not check:
        return pool, everything, []
    from hiervision.data.check import check_images, default_check_cache

    where = str(cfg.get("root") if name == "folder" else cfg.get("manifest"))
    cache = cfg.get("check_cache", "auto")
    if cache == "auto":
        cache = default_check_cache(where)
    elif cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise ValueError(f"data.check_cache: must be a file path, 'auto' or null, got {cache!r}")
    bad = check_images(pool, cache)
    if not bad:
        return pool, everything, []
    messages = [m for _, m in bad]
    if mode == "error":
        raise ValueError(f"data.check: {len(bad)} of {len(pool)} images cannot be used (data.on_bad_image: skip "
                         f"drops them): {'; '.join(messages)}")
    drop = {i for i, _ in bad}
    keep = [i for i in everything if i not in drop]
    if not keep:
        raise ValueError(f"data.check: none of the {len(pool)} images can be read: {messages[0]}")
    return pool.subset(keep), keep, messages


def _stats(ds: HierDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(ds, TensorImageDataset):
        return channel_stats(ds.images)
    idx = torch.linspace(0, len(ds) - 1, min(len(ds), 256)).long().unique()
    sample = []
    for i in idx:  # an unreadable image is the check's to name (or skip); it has no say in the statistics
        try:
            sample.append((ds[int(i)][0] * 255).round().to(torch.uint8))
        except ValueError:
            continue
    if not sample:
        raise ValueError(f"none of the {len(idx)} images sampled for the normalisation statistics can be read")
    return channel_stats(torch.stack(sample))


def _normalisation(cfg: dict, ds: HierDataset, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``data.mean``/``data.std`` where given, else the statistics of ``ds``'s images."""
    mean, std = _given_stats(cfg, "mean", chans), _given_stats(cfg, "std", chans)
    if mean is None or std is None:
        computed = _stats(ds)
        mean, std = mean or computed[0], std or computed[1]
    return mean, std


def untrained_classes(data: DataBundle) -> list[str]:
    """The end classes no training image is labelled with (after the split and any coarsening): a model cannot
    learn them, so training names them before it starts."""
    if data.multi_label or data.features:
        return []
    seen = set(data.train.targets.unique().tolist())
    return [data.taxonomy.path_name(n) for n in data.taxonomy.leaves if n not in seen]


def _relabelled(cfg: dict, splits: list[HierDataset], note: str
                ) -> tuple[list[HierDataset], str, torch.Tensor | None]:
    """``data.tree`` (another tree over the same classes), ``data.keep_classes`` (part of the label set, the
    tree pruned to it) and ``data.holdout_leaves`` (classes the model never sees, their test images labelled
    with their nearest ancestor: :func:`~hiervision.data.base.hold_out`), applied after splitting so that the
    splits match a run on the data's own tree. Returns the novel-image mask of the test split too."""
    if cfg.get("tree") is not None:
        tree = Taxonomy.load(cfg["tree"])
        splits = [move_to_tree(ds, tree, unused=cfg.get("tree_unused", "prune")) for ds in splits]
        note += (f"; relabelled into the tree {cfg['tree']} ({splits[0].taxonomy.num_nodes - 1} of its "
                 f"{tree.num_nodes - 1} nodes)")
    spec = cfg.get("keep_classes")
    if spec is not None:
        if not isinstance(spec, (list, tuple)) or not all(isinstance(k, str) for k in spec):
            raise ValueError("data.keep_classes: must be a list of class names, A/B/C paths or ids")
        splits = keep_classes(splits, spec)
        note += f"; {len(splits[0].taxonomy.leaves)} classes kept (data.keep_classes)"
    novel = None
    if cfg.get("holdout_leaves") is not None:
        before = len(splits[-1].taxonomy.leaves)
        splits, novel = hold_out(splits, cfg["holdout_leaves"], int(cfg.get("split_seed", 0)))
        note += (f"; {before - len(splits[-1].taxonomy.leaves)} of {before} classes held out (data.holdout_leaves: "
                 f"{int(novel.sum())} novel test images, labelled with their nearest ancestor)")
    if cfg.get("grow_from") is not None:  # hiervision extend: a trained run's tree, grown by the data's new classes
        known = Taxonomy.load(cfg["grow_from"])
        tree = grow_tree(known, splits[0].taxonomy)
        splits = [move_into(ds, tree) for ds in splits]
        note += f"; {tree.num_nodes - known.num_nodes} nodes added to the tree {cfg['grow_from']} (data.grow_from)"
    return splits, note, novel


def _coarse_spec(cfg: dict) -> tuple[float | None, float, int, str]:
    """``(fine_fraction, coarse_fraction, coarse_level, coarse_labels)``, each checked."""
    coarse_fraction = _frac(cfg, "coarse_fraction", 0.0, hi_open=False)
    coarse_level = _int(cfg, "coarse_level", 1, 1)
    fine_fraction = None if cfg.get("fine_fraction") is None else _frac(cfg, "fine_fraction", 1.0, hi_open=False)
    coarse_labels = cfg.get("coarse_labels", "coarse")
    if fine_fraction is None and coarse_labels != "coarse":
        raise ValueError("data.coarse_labels: applies only with data.fine_fraction (the S_fine/S_coarse split)")
    if cfg.get("coarsen") and (fine_fraction is not None or coarse_fraction > 0):
        raise ValueError("data.coarsen: coarsens labels on its own; leave data.fine_fraction and "
                         "data.coarse_fraction out")
    return fine_fraction, coarse_fraction, coarse_level, coarse_labels


def _coarse_labels(cfg: dict, coarse: tuple, train: HierDataset, note: str, seed: int) -> tuple[HierDataset, str]:
    """Training labels made coarse on purpose (:func:`_coarse_spec`): Guo et al.'s S_fine/S_coarse split
    (``fine_fraction``), a fraction cut to one depth (``coarse_fraction``/``coarse_level``) or to random proper
    ancestors (``coarsen``)."""
    fine_fraction, coarse_fraction, coarse_level, coarse_labels = coarse
    if fine_fraction is not None:
        keep, new, mask = split_fine_coarse(train.targets, train.taxonomy, fine_fraction, coarse_fraction,
                                            coarse_level, seed + 2, coarse_labels, ids=train.ids)
        n_fine = round(fine_fraction * len(train))
        return train.subset(keep).with_targets(new, mask), note + (
            f"; S_fine {n_fine} ({fine_fraction:g}) + S_coarse {len(keep) - n_fine} "
            f"({coarse_fraction:g}, labels: {coarse_labels}, depth {coarse_level})")
    if cfg.get("coarsen"):
        new, mask = coarsen_to_ancestors(train.targets, train.taxonomy, float(cfg["coarsen"]), seed + 3,
                                         ids=train.ids)
        return train.with_targets(new, mask), note + (
            f"; {int(mask.sum())} train labels ({cfg['coarsen']:g}) cut to a random proper ancestor (data.coarsen)")
    if coarse_fraction > 0:
        new, mask = coarsen_labels(train.targets, train.taxonomy, coarse_fraction, coarse_level, seed + 2,
                                   ids=train.ids)
        return train.with_targets(new, mask), note + (
            f"; {int(mask.sum())} train labels ({coarse_fraction:g}) cut to depth {coarse_level}")
    return train, note


def build_data(cfg: dict[str, Any]) -> DataBundle:
    """Build train/val/test datasets and their metadata from a config dict (see :data:`DATASETS` for keys).

    Common keys: ``name``, ``root``, ``val_fraction`` (0.1, carved from train by a seeded hash of each
    sample's id, so about that fraction of every class), ``split_seed`` (0), ``limit_train``/``limit_test``
    (class-balanced caps on the train pool before the val split, and on test, chosen by id hash),
    ``image_size``, ``coarse_fraction`` (0) and
    ``coarse_level`` (1), ``fine_fraction``/``coarse_labels`` (Guo et al.'s S_fine/S_coarse split, see
    :func:`~hiervision.data.base.split_fine_coarse`), ``tree`` (a taxonomy JSON over the same classes to
    relabel into, e.g. an induced one), ``keep_classes`` (train on these end classes only: names, ``A/B/C``
    paths or ids; the tree pruned to them), ``holdout_leaves`` (end classes the model never sees, names or a
    seeded fraction; their test images labelled with their nearest ancestor, :attr:`DataBundle.novel`),
    ``coarsen`` (a seeded fraction of training labels cut to a random proper ancestor), ``fallback`` (a
    synthetic variant to use when the data files are missing),
    ``mean``/``std`` (per-channel normalisation in [0, 1] units used instead of the training images' statistics,
    e.g. a pretrained encoder's; they reach the checkpoint's meta and the export sidecar like computed ones).

    Folder and manifest sets also take ``test_fraction`` (0.2, by path hash), ``check`` (true: decode every
    image once before training, cached in ``check_cache``, default ``"auto"`` = under ``$HIERVISION_CACHE``,
    ``null`` = no cache), ``on_bad_image`` (``error``: one error listing every bad file; ``skip``: drop them,
    counted in :attr:`DataBundle.skipped`) and ``max_pixels`` (64e6 per image; ``null``: Pillow's own guard only).
    Splits depend only on sample ids (see :mod:`hiervision.data.splits`); :meth:`DataBundle.split_record`
    records them for a run folder.
    """
    name = _check_cfg(cfg)
    seed = _int(cfg, "split_seed", 0)
    val_fraction = _frac(cfg, "val_fraction", 0.1)
    coarse = _coarse_spec(cfg)  # checked before any data loads
    pipe = pipeline_from_cfg(cfg, _size(cfg))
    try:
        pool, test, val, note, bad = _load(cfg, name, seed)
    except FileNotFoundError as e:
        if cfg.get("fallback") is None:
            raise
        fb = cfg["fallback"]
        pool, test, note = _load_synthetic({k: v for k, v in cfg.items() if k in _SYNTH}, fb)
        pool, test = _limit(pool, cfg.get("limit_train"), seed), _limit(test, cfg.get("limit_test"), seed)
        pool, test = _resized(pool, _size(cfg)), _resized(test, _size(cfg))
        val, note, name, bad = None, f"{name} unavailable ({e}); used the {fb!r} synthetic fallback", fb, []
        pipe = None  # in-memory synthetic images keep the batch augmentation
    if val is not None:
        train = pool
    elif val_fraction > 0:
        rest, held = hash_split(pool.ids, val_fraction, seed, "val")
        train, val = pool.subset(rest), pool.subset(held)
    else:
        train, val = pool, pool.subset(torch.zeros(0, dtype=torch.long))
    (train, val, test), note, novel = _relabelled(cfg, [train, val, test], note)  # after splitting: same splits
    check_ranks(cfg.get("ranks"), test.taxonomy.view)  # the names of its levels, for --min-prob-at
    if len(test.taxonomy.leaves) < 2:
        only = test.taxonomy.path_name(test.taxonomy.leaves[0]) if test.taxonomy.leaves else "none"
        raise ValueError(f"{name}: one class ({only}): nothing to tell apart; a classifier needs at least two")
    train, note = _coarse_labels(cfg, coarse, train, note, seed)
    if pipe is not None:
        lazy = [type(ds).__name__ for ds in (train, val, test) if isinstance(ds, (TensorImageDataset, FeatureDataset))]
        if lazy:
            raise ValueError(f"data.pipeline: needs a lazy data set of image files (folder, manifest, shards), "
                             f"not {name} ({lazy[0]})")
        train, val, test = pipe.wrap(train, True), pipe.wrap(val, False), pipe.wrap(test, False)
    x0 = train[0][0] if len(train) else test[0][0]
    h, w = x0.shape[-2:]
    mean, std = _normalisation(cfg, train if len(train) else test, x0.shape[0])
    return DataBundle(
        train=train, val=val, test=test, taxonomy=train.taxonomy, in_chans=x0.shape[0],
        image_size=h if h == w else (h, w), multi_label=train.multi_label, mean=mean, std=std,
        name=name, note=note, cfg=dict(cfg), augmented=pipe is not None, skipped=len(bad), bad_images=list(bad),
        novel=novel,
    )  # fmt: skip
