"""Frozen-backbone features (``train.freeze_backbone``, or its older name ``train.precompute_features``):
the backbone runs once per split, the epochs train the head alone.

Guo et al. trained their RNN on features extracted by a CNN; with a frozen backbone this saves every
epoch's backbone pass. :func:`cached_features` turns each split into its pooled features (eval mode, the
evaluation transform, no augmentation) and keeps them on disk, so that other heads, other seeds and later
runs over the same backbone and data read them instead of recomputing; :class:`FeatureHead` lets the engine
train and evaluate the model on them as if it were the whole network.

The cache: one folder per fingerprint under ``train.feature_cache`` (else ``$HIERVISION_CACHE/features``,
else ``~/.cache/hiervision/features``), holding ``train.npy``, ``val.npy``, ``test.npy`` (float32
``(rows, num_features)``, opened memory-mapped) and ``meta.json`` (what they were computed from, their
shapes and sizes), written last. The fingerprint is a sha256 of the backbone (name, keyword arguments,
a hash of its weights and buffers), the data (its config without the label-only keys, each split's
sample ids in order, channels, image size, mean, std, the evaluation transform) and the autocast dtype.

Float32 rather than float16: the head then sees exactly the numbers an in-memory extraction gives, so
a run on cached features reports what a run without the cache would (float16 halves the disk and
rounds every feature to ~3 significant digits).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hiervision.config import ConfigError
from hiervision.data import DataBundle, FeatureDataset, HierDataset, iter_batches
from hiervision.data.tiny_imagenet import default_cache_dir
from hiervision.decoding import Prediction
from hiervision.distributed import DistEnv, any_flag, barrier, gather_rows, shard_indices
from hiervision.models import HierarchicalClassifier
from hiervision.runfolder import RunFolderError, atomic_write, atomic_write_json

__all__ = ["FeatureHead", "cached_features", "feature_cache_root", "feature_identity"]

#: bump when what a cache folder holds changes meaning: older folders are then simply not found
CACHE_FORMAT = 1
SPLITS = ("train", "val", "test")
#: data keys that change labels or bookkeeping only, never an image's pixels: features are shared across them
_NOT_CONTENT = frozenset({"coarse_fraction", "coarse_level", "fine_fraction", "coarse_labels", "tree", "check",
                          "check_cache", "workers", "cache_dir"})


class FeatureHead(nn.Module):
    """A model that reads only pooled backbone features, driven by pre-computed ones: its head alone."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    @property
    def threshold(self) -> torch.Tensor:  # multi-label: the threshold tuned on validation lives in the model
        return self.model.threshold

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_head(features)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(outputs, targets)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> Prediction:
        return self.model.decode(self(features))

    @torch.no_grad()
    def predict_given(self, features: torch.Tensor, given: torch.Tensor) -> Prediction:
        return self.model.decode_given(self(features), given)


# ----------------------------------------------------------------------------- where and under which name
def feature_cache_root(tcfg: Mapping[str, Any]) -> Path:
    """``train.feature_cache``, else ``features/`` under the cache folder every hiervision cache shares."""
    given = tcfg.get("feature_cache")
    return Path(given).expanduser() if given else default_cache_dir() / "features"


def _sha256(parts: list[str] | str) -> str:
    return hashlib.sha256(("\n".join(parts) if isinstance(parts, list) else parts).encode()).hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): batch-norm statistics change
    eval-mode features as much as weights do."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def feature_identity(model: HierarchicalClassifier, data: DataBundle, model_cfg: Mapping[str, Any] | None,
                     amp: torch.dtype | None) -> dict[str, Any]:
    """Everything the cached features depend on; its sha256 names the cache folder. The weights are hashed,
    so ``pretrained_path`` itself (where they were read from) is left out of the keyword arguments."""
    net, model_cfg = model.backbone, model_cfg or {}
    kwargs = {k: v for k, v in (model_cfg.get("backbone_kwargs") or {}).items() if k != "pretrained_path"}
    meta = data.meta()
    transform = getattr(data.test, "transform", None)
    identity = {
        "format": CACHE_FORMAT,
        "dtype": "float32",
        "amp": str(amp).replace("torch.", "") if amp else "none",
        "backbone": {"name": str(model_cfg.get("backbone") or type(net).__name__),
                     "class": f"{type(net).__module__}.{type(net).__qualname__}", "kwargs": kwargs,
                     "num_features": int(net.num_features), "weights_sha256": weights_digest(net)},
        "data": {"name": data.name, "config": {k: v for k, v in data.cfg.items() if k not in _NOT_CONTENT},
                 "in_chans": meta["in_chans"], "image_size": meta["image_size"], "mean": meta["mean"],
                 "std": meta["std"], "transform": repr(transform) if transform is not None else None,
                 "splits": {s: {"count": len(ds), "ids_sha256": _sha256(_ids(ds))}
                            for s, ds in zip(SPLITS, (data.train, data.val, data.test))}},
    }
    return json.loads(json.dumps(identity, default=str))  # as meta.json will hold it (paths as text)


def _ids(ds: HierDataset) -> list[str]:
    ids = getattr(ds, "ids", None)
    return [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(ds))]


def fingerprint(identity: Mapping[str, Any]) -> str:
    return _sha256(json.dumps(identity, sort_keys=True, default=str))


def _folder(root: Path, identity: Mapping[str, Any], digest: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity["backbone"]["name"]).strip("_.") or "backbone"
    return root / f"{slug}-{digest[:16]}"


# ----------------------------------------------------------------------------- reading and writing the cache
def load_cache(folder: Path, digest: str, rows: Mapping[str, int], width: int
               ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The cached splits, memory-mapped, or ``(None, why)`` when the folder is absent (why ``None``) or
    unusable: another fingerprint, a missing, truncated or resized file."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != digest:
            return None, f"{meta_path}: written for another fingerprint"
        out = {}
        for s in SPLITS:
            path = folder / f"{s}.npy"
            if path.stat().st_size != meta["splits"][s]["bytes"]:
                return None, f"{path}: {path.stat().st_size} bytes, meta.json says {meta['splits'][s]['bytes']}"
            arr = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: torch gets a writable view
            if arr.dtype != np.float32 or arr.shape != (rows[s], width):
                return None, f"{path}: {arr.dtype} {arr.shape}, expected float32 {(rows[s], width)}"
            out[s] = torch.from_numpy(arr)
        return out, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{folder}: unreadable feature cache ({type(e).__name__}: {e})"


def write_cache(folder: Path, feats: Mapping[str, torch.Tensor], identity: Mapping[str, Any], digest: str,
                computed: Mapping[str, Any]) -> None:
    """Each split atomically, then ``meta.json``, which makes the folder valid: an interrupted write leaves
    no file a later run trusts."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for s in SPLITS:
        arr = np.ascontiguousarray(feats[s].numpy(), dtype=np.float32)
        path = folder / f"{s}.npy"
        atomic_write(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        splits[s] = {"shape": list(arr.shape), "bytes": path.stat().st_size}
    atomic_write_json(folder / "meta.json", {"format": CACHE_FORMAT, "fingerprint": digest, "dtype": "float32",
                                             "splits": splits, "identity": identity, "computed": dict(computed)})


def _note(text: str) -> None:
    print(f"hiervision: note: {text}", file=sys.stderr)


# ----------------------------------------------------------------------------- computing
def _eval_view(ds: HierDataset, data: DataBundle) -> HierDataset:
    """The split as evaluation sees it: a training set that augments per image (``data.pipeline``) is read
    through the evaluation transform instead."""
    transform = getattr(data.test, "transform", None)
    if not data.augmented or transform is None or not hasattr(ds, "transform"):
        return ds
    view = copy.copy(ds)
    view.transform = transform
    return view


@torch.no_grad()
def extract(model: HierarchicalClassifier, data: DataBundle, batch_size: int, device: torch.device,
            amp: torch.dtype | None, env: DistEnv, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every split's pooled features on the CPU (float32, sample order); under DDP each rank computes a
    shard and every rank gets all of them."""
    model.eval()
    splits = {s: getattr(data, s) for s in SPLITS}
    with tqdm(total=sum(map(len, splits.values())), unit="img", unit_scale=True, desc="features", leave=False,
              disable=not (progress and env.is_main), dynamic_ncols=True) as bar:
        out = {}
        for s, ds in splits.items():
            feats = [torch.zeros(0, model.backbone.num_features)]
            shard = _eval_view(ds, data)
            shard = shard.subset(shard_indices(len(ds), env)) if env.enabled else shard
            for images, _ in iter_batches(shard, batch_size):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    feats.append(model.backbone(data.normalize(images.to(device))).float().cpu())
                bar.update(len(images) * env.world_size)
            out[s] = gather_rows(torch.cat(feats), len(ds), env)
    return out


def _check_head(model: HierarchicalClassifier, key: str) -> None:
    if type(model).forward_head is HierarchicalClassifier.forward_head:
        raise ConfigError(f"{key}: model {type(model).__name__} does not run on one backbone's pooled features "
                          "(it reads stage maps, or runs more than one backbone)")


def cached_features(
    model: HierarchicalClassifier,
    data: DataBundle,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    env: DistEnv | None = None,
    *,
    cache: Path | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    key: str = "train.precompute_features",
    progress: bool = False,
) -> tuple[DataBundle, dict[str, Any]]:
    """The data with every split replaced by its pooled backbone features, and a record of where they came
    from (``fingerprint``, ``folder``, ``reused``). ``cache`` (a root folder; ``None``: memory only) is read
    when it holds this fingerprint, else written by rank 0 while the other ranks wait at a barrier. A head
    that does not run on pooled features is refused in one line naming ``key``, before any data is read."""
    _check_head(model, key)
    model.eval()
    env = env or DistEnv(0, 1, 0, device)
    identity = feature_identity(model, data, model_cfg, amp)
    digest = fingerprint(identity)
    folder = _folder(cache, identity, digest) if cache is not None else None
    rows, width = {s: len(getattr(data, s)) for s in SPLITS}, int(model.backbone.num_features)
    feats, why = load_cache(folder, digest, rows, width) if folder is not None else (None, None)
    reused = not any_flag(feats is None, env)  # one rank without a usable cache: every rank computes
    if not reused:
        if why and env.is_main:
            _note(f"{why}; recomputing the features")
        t0 = time.perf_counter()
        feats = extract(model, data, batch_size, device, amp, env, progress)
        if folder is not None:
            computed = {"device": str(device), "world_size": env.world_size, "seconds": time.perf_counter() - t0,
                        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            feats = _store(folder, feats, identity, digest, computed, env)
    record = {"key": key, "fingerprint": digest, "folder": None if folder is None else str(folder),
              "reused": reused, "dtype": "float32", "num_features": width, "rows": rows}
    splits = {s: FeatureDataset(feats[s].to(device), getattr(data, s)) for s in SPLITS}
    return dataclasses.replace(data, **splits, features=True), record


def _store(folder: Path, feats: dict[str, torch.Tensor], identity: Mapping[str, Any], digest: str,
           computed: Mapping[str, Any], env: DistEnv) -> dict[str, torch.Tensor]:
    """Rank 0 writes the cache; after the barrier every rank reads it back memory-mapped where it can see it
    (a node-local cache elsewhere, or a failed write: the rows in memory serve, they are the same)."""
    written = False
    if env.is_main:
        try:
            write_cache(folder, feats, identity, digest, computed)
            written = True
        except (OSError, RunFolderError) as e:
            _note(f"feature cache not written ({e}); the features stay in memory for this run")
    barrier(env)
    if env.is_main and not written:
        return feats
    mapped, _ = load_cache(folder, digest, {s: len(t) for s, t in feats.items()}, feats["train"].shape[1])
    return feats if mapped is None else mapped
