"""Sharded tar format (``data.name: shards``) for sets too big for a folder of files or a CSV.

Layout of a packed directory (written by :func:`pack` / ``hiervision data pack``)::

    index.json            counts per split, the class list with per-class counts, the shard files
    taxonomy.json         the tree the labels refer to
    train.npz ...         per sample: shard number, byte offset and size inside it, target (no pickles)
    train-000000.tar ...  WebDataset-style members: ``<key>.<ext>`` (the original image bytes) and
                          ``<key>.cls`` (the node id; ``;``-separated ids for multi-label sets)

Written with the standard library's ``tarfile``: the format needs nothing more, and a plain tar
keeps the shards readable by ``tar``, by the ``webdataset`` package and by anything else. Reading
is random access (a seek and one read per image into shard files each worker process opens once),
so splits, limits, the seeded epoch order and rank slicing all work as on any other data set.
With a shard order (:meth:`ShardDataset.epoch_order`) each rank and each worker reads whole shards
of its own, which keeps the reads sequential.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hiervision.data.base import FileImageDataset, HierDataset, TensorImageDataset
from hiervision.taxonomy import Taxonomy

__all__ = ["FORMAT", "ShardDataset", "load_shards", "pack"]

FORMAT = "hiervision-shards"
_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------- writing
def _raw_image(ds: HierDataset, i: int) -> tuple[bytes, str]:
    """The stored bytes of sample ``i`` and their extension: the original file where there is one, else a PNG."""
    base = getattr(ds, "base", None)
    if base is not None:  # a pipeline view: pack what it reads
        return _raw_image(base, i)
    if isinstance(ds, ShardDataset):
        return ds.raw(i), ds.exts[i]
    if isinstance(ds, FileImageDataset):
        src, archive = ds.sources[i], getattr(ds.read, "archive", None)
        ext = os.path.splitext(src)[1].lower().lstrip(".") or "png"
        if archive is None and hasattr(ds.read, "_open"):
            return Path(src).read_bytes(), ext
        if archive is not None:
            with zipfile.ZipFile(archive) as zf:
                return zf.read(src), ext
        x = ds.read(src)
    elif isinstance(ds, TensorImageDataset):
        x = ds.images[i]
    else:
        x = (ds[i][0] * 255).round().to(torch.uint8)
    arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), "png"


def _sample_ids(ds: HierDataset, split: str) -> list[str]:
    """Each sample's stable name, kept through packing: the data set's own ids, else its file, else its position."""
    ids = getattr(ds, "ids", None)
    if ids is not None:
        return [str(i) for i in ids]
    base = getattr(ds, "base", ds)
    if isinstance(base, FileImageDataset):
        return [str(s) for s in base.sources]
    return [f"{split}/{i}" for i in range(len(ds))]


def _label_text(target: torch.Tensor) -> str:
    if target.dim() == 0:
        return str(int(target))
    return ";".join(str(int(n)) for n in torch.nonzero(target).flatten())


def _write_split(ds: HierDataset, out: Path, split: str, shard_size: int, seed: int) -> dict[str, Any]:
    """Write one split. Samples are placed in the shards in a seeded shuffled order, so a shard mixes classes
    (a folder lists them class by class), while the index keeps the data set's own order."""
    n = len(ds)
    placement = np.random.default_rng(seed).permutation(n)
    shard_no, offsets = np.zeros(n, np.int32), np.zeros(n, np.int64)
    sizes, exts, files = np.zeros(n, np.int64), [""] * n, []
    for s, start in enumerate(range(0, n, shard_size)):
        name = f"{split}-{s:06d}.tar"
        tmp = out / (name + ".tmp")
        members: dict[str, int] = {}
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in placement[start : start + shard_size].tolist():
                data, exts[i] = _raw_image(ds, i)
                members[f"{i:09d}.{exts[i]}"] = i
                label = _label_text(ds.targets[i]).encode()
                for member, payload in ((f"{i:09d}.{exts[i]}", data), (f"{i:09d}.cls", label)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tf.addfile(info, io.BytesIO(payload))
        with tarfile.open(tmp) as tf:  # the offsets tarfile actually wrote
            for m in tf.getmembers():
                if m.name in members:
                    i = members[m.name]
                    shard_no[i], offsets[i], sizes[i] = s, m.offset_data, m.size
        os.replace(tmp, out / name)
        files.append({"file": name, "count": len(members)})
    np.savez(out / f"{split}.npz", shard=shard_no, offset=offsets, size=sizes, target=ds.targets.numpy(),
             ext=np.asarray(exts, dtype="U8"), id=np.asarray(_sample_ids(ds, split), dtype=str))
    return {"count": n, "shards": files}


def pack(splits: dict[str, HierDataset], taxonomy: Taxonomy, out: str | os.PathLike, shard_size: int = 1000,
         channels: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``splits`` (``train``/``val``/``test`` data sets over ``taxonomy``) as tar shards; returns the index.

    ``seed`` places the samples in the shards (shuffled, so each shard mixes classes).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size: must be a positive integer, got {shard_size!r}")
    unknown = sorted(set(splits) - set(_SPLITS))
    if unknown:
        raise ValueError(f"pack: unknown split {unknown[0]!r} (train, val, test)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.json").exists() or any(out.glob("*.tar")):
        raise FileExistsError(f"{out}: already holds shards; pack into a new --out folder")
    if (out / "taxonomy.json").exists():  # a run's own tree (or a user's): never replaced
        raise FileExistsError(f"{out}: already holds a taxonomy.json (a run folder?) that packing would replace; "
                              "pack into a new --out folder")
    taxonomy.save(out / "taxonomy.json")
    index: dict[str, Any] = {"format": FORMAT, "version": 1, "taxonomy": "taxonomy.json", "channels": channels,
                             "multi_label": any(ds.targets.dim() == 2 for ds in splits.values()), "splits": {}}
    per_class: dict[str, dict[str, int]] = {}
    for split, ds in splits.items():
        index["splits"][split] = _write_split(ds, out, split, shard_size, seed)
        if ds.targets.dim() == 1:
            for node, k in zip(*np.unique(ds.targets.numpy(), return_counts=True)):
                per_class.setdefault(taxonomy.path_name(int(node)), {})[split] = int(k)
    index["classes"] = [{"name": k, "counts": v} for k, v in sorted(per_class.items())]
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, out / "index.json")
    return index


# ---------------------------------------------------------------------------------------------- reading
class ShardDataset(HierDataset):
    """One split of a packed directory; images are read by offset from the shards (no per-file index on disk).

    Args:
        root: the packed directory; files: its shard file names; shard/offset/size/exts: per sample.
        targets, taxonomy: as in every data set.
        channels: 1 or 3; image_size: ``(H, W)`` every image is resized to on a plain read.
        ids: stable sample names (splits are drawn from them).
    """

    def __init__(self, root: Path, files: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 exts: Sequence[str], targets: torch.Tensor, taxonomy: Taxonomy, channels: int,
                 image_size: tuple[int, int] | None, ids: Sequence[str] | None = None) -> None:
        self.root, self.files = Path(root), list(files)
        self.ids = [str(i) for i in range(len(targets))] if ids is None else list(ids)
        self.shard, self.offset, self.size, self.exts = shard, offset, size, list(exts)
        self.targets, self.taxonomy, self.channels, self.image_size = targets, taxonomy, channels, image_size
        self.coarse_mask = torch.zeros(len(targets), dtype=torch.bool)
        self.shard_order = False  # data.shard_order: the loader asks epoch_order for each rank's own shards
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_pid": -1}

    def raw(self, i: int) -> bytes:
        """The stored bytes of sample ``i`` (one seek and read in a shard this process keeps open)."""
        if self._pid != os.getpid():  # each worker process opens its own handles
            self._handles, self._pid = {}, os.getpid()
        s = int(self.shard[i])
        f = self._handles.get(s)
        if f is None:
            path = self.root / self.files[s]
            try:
                f = self._handles[s] = open(path, "rb")  # noqa: SIM115 - kept open for the process's lifetime
            except OSError as e:
                raise ValueError(f"{path}: cannot open shard ({e})") from None
        f.seek(int(self.offset[i]))
        data = f.read(int(self.size[i]))
        if len(data) != int(self.size[i]):
            raise ValueError(f"{self.source_name(i)}: shard is truncated")
        return data

    def source_name(self, i: int) -> str:
        return f"{self.root / self.files[int(self.shard[i])]}@{int(self.offset[i])}"

    def open_image(self, i: int) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self.raw(i)))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{self.source_name(i)}: cannot read image ({e})") from None

    def load(self, i: int, seed: int = 0) -> tuple[torch.Tensor, int | torch.Tensor]:
        """uint8 ``(C, H, W)`` at ``image_size`` and the target (what loader workers return)."""
        try:
            with self.open_image(i) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if self.image_size is not None and im.size != (self.image_size[1], self.image_size[0]):
                    im = im.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{self.source_name(i)}: cannot read image ({e})") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)), self._target(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        x, y = self.load(i)
        return x.float().div_(255), y

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ShardDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        k = idx.numpy()
        out = ShardDataset(self.root, self.files, self.shard[k], self.offset[k], self.size[k],
                           [self.exts[j] for j in k.tolist()], self.targets[idx], self.taxonomy, self.channels,
                           self.image_size, [self.ids[j] for j in k.tolist()])
        out.coarse_mask, out.shard_order = self.coarse_mask[idx], self.shard_order
        return out

    def epoch_order(self, seed: int, epoch: int, batch_size: int, world_size: int) -> torch.Tensor:
        """A global order in which each rank reads shards of its own (shards dealt round-robin after a seeded
        shuffle, samples shuffled within each rank's shards); slice ``r`` of every global batch comes from rank
        ``r``'s shards. Ranks read equally many samples, so up to a shard's worth per rank is left out each epoch.
        """
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
        shards = np.unique(self.shard)
        order = shards[torch.randperm(len(shards), generator=g).numpy()]
        shard_of = torch.from_numpy(self.shard.astype(np.int64))
        per_rank = []
        for r in range(world_size):
            mine = torch.nonzero(torch.isin(shard_of, torch.from_numpy(order[r::world_size]).long())).flatten()
            per_rank.append(mine[torch.randperm(len(mine), generator=g)])
        m = min(len(p) for p in per_rank)
        local = batch_size // world_size
        if m == 0 or local == 0:
            raise ValueError(f"shards: {len(shards)} shards cannot give each of {world_size} ranks a batch")
        chunks = [p[:m].split(local) for p in per_rank]
        return torch.cat([c[k] for k in range(len(chunks[0])) for c in chunks])


def load_shards(root: str | os.PathLike, channels: int | None = None,
                image_size: int | tuple[int, int] | None = None) -> tuple[dict[str, ShardDataset], Taxonomy]:
    """The splits of a packed directory; ``channels``/``image_size`` default to the index's and the first image's."""
    root = Path(root)
    index_path = root / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: not found (data.root must be a folder written by hiervision data pack)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: not a {FORMAT} index")
    tax = Taxonomy.load(root / index.get("taxonomy", "taxonomy.json"))
    out: dict[str, ShardDataset] = {}
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    for split, info in index["splits"].items():
        npz_path = root / f"{split}.npz"
        try:
            with np.load(npz_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("shard", "offset", "size", "target", "ext", "id")}
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{npz_path}: cannot read the split's index ({e})") from None
        target = torch.from_numpy(arrays["target"])
        target = target.bool() if target.dim() == 2 else target.long()
        if len(target) != info["count"]:
            raise ValueError(f"{npz_path}: {len(target)} samples but index.json says {info['count']}")
        out[split] = ShardDataset(root, [s["file"] for s in info["shards"]], arrays["shard"], arrays["offset"],
                                  arrays["size"], arrays["ext"].tolist(), target, tax, 3, None, arrays["id"].tolist())
    first = next((ds for ds in out.values() if len(ds)), None)
    if first is None:
        raise ValueError(f"{index_path}: the packed set is empty")
    with first.open_image(0) as im:
        probe_c = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        probe_hw = (im.size[1], im.size[0])
    chans = channels or index.get("channels") or probe_c
    for ds in out.values():
        ds.channels, ds.image_size = chans, tuple(size) if size else probe_hw
    return out, tax
