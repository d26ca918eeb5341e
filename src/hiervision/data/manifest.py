"""CSV manifests (``path,label[,split]``) over a taxonomy JSON: any image collection without a folder layout.

A label may be a node name, an external id or an ``A/B`` name path; ``;`` separates several
labels, which makes the set multi-label (targets mark the labelled path ends).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

import torch

from hiervision.data.base import FileImageDataset
from hiervision.data.imageio import DEFAULT_MAX_PIXELS, ImageReader, is_hidden, probe_sample
from hiervision.taxonomy import Taxonomy, TaxonomyError

__all__ = ["SPLITS", "load_manifest"]

SPLITS = ("train", "val", "test")


def load_manifest(
    manifest: str | os.PathLike,
    taxonomy: Taxonomy | str | os.PathLike | None,
    root: str | os.PathLike | None = None,
    multi_label: bool | None = None,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[FileImageDataset, list[str] | None]:
    """Read the manifest into one lazy dataset plus the per-row ``split`` column (``None`` when absent).

    Args:
        manifest: CSV with a header naming ``path`` and ``label`` (optional ``split``: train/val/test).
        taxonomy: a :class:`Taxonomy`, the path of its JSON file, or ``None``: the tree of the labels'
            own ``A/B/C`` name paths (every prefix a node).
        root: base folder of relative image paths (default: the manifest's folder).
        multi_label: force single/multi-label; default multi-label when any row has several labels.
        channels, image_size, max_pixels: as in :func:`hiervision.data.folder.load_folder`.

    Sample ids are the ``path`` column as written (``/``-separated), so splits follow the rows, not
    their order; a path listed twice is an error (its copies could land in train and test).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest CSV not found (cfg manifest)")
    if taxonomy is None:
        tax = _tree_of_labels(manifest)
    else:
        tax = taxonomy if isinstance(taxonomy, Taxonomy) else _load_taxonomy(taxonomy)
    rows = _read_rows(manifest, tax, Path(root) if root is not None else manifest.parent)
    if not rows:
        raise ValueError(f"{manifest}: no rows")
    sources, ids, labels, splits = (list(col) for col in zip(*rows))
    targets = _targets(manifest, tax, labels, multi_label)
    probe_c, probe_hw, found = probe_sample(ImageReader(3, max_pixels=max_pixels), sources)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    reader = ImageReader(channels or probe_c, tuple(size) if size else probe_hw, max_pixels=max_pixels)
    ds = FileImageDataset(sources, targets, tax, reader, ids=ids)
    ds.found = found  # what the probe saw, for the run's note
    return ds, (None if splits[0] is None else splits)


def _read_rows(manifest: Path, tax: Taxonomy, base: Path) -> list[tuple[str, str, list[int], str | None]]:
    """``(image file, sample id, label nodes, split or None)`` per row, each row checked in one line."""
    rows = []
    first_line: dict[str, int] = {}
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if not {"path", "label"} <= fields:
            raise ValueError(f"{manifest}: header must name 'path' and 'label' columns, got {sorted(fields)}")
        for row in reader:
            line = reader.line_num
            path = (row["path"] or "").strip()
            if not path:
                raise ValueError(f"{manifest}: line {line}: empty path")
            nodes = _labels(manifest, line, tax, row["label"] or "")
            if not nodes:
                raise ValueError(f"{manifest}: line {line}: no label for {path!r}")
            key = PurePosixPath(path.replace("\\", "/")).as_posix()
            if key in first_line:
                raise ValueError(f"{manifest}: line {line}: {path!r} already listed on line {first_line[key]}")
            first_line[key] = line
            split = None
            if "split" in fields:
                split = (row["split"] or "").strip().lower()
                if split not in SPLITS:
                    raise ValueError(f"{manifest}: line {line}: split must be train, val or test, got {split!r}")
            full = Path(path) if Path(path).is_absolute() else base / path
            if not full.is_file():
                raise FileNotFoundError(f"{full}: image listed in {manifest} line {line} not found")
            if is_hidden(full.name):
                raise ValueError(f"{manifest}: line {line}: {path!r} is a hidden file")
            rows.append((str(full), key, nodes, split))
    return rows


def _label_paths(text: str) -> list[str]:
    """A row's labels (``;``-separated), each a path whose ``/`` may have spaces around it ("Clothes / Tops" is
    "Clothes/Tops": a spreadsheet's spacing never makes a second class)."""
    return ["/".join(x.strip() for x in part.split("/")) for part in text.split(";") if part.strip()]


def _labels(manifest: Path, line: int, tax: Taxonomy, text: str) -> list[int]:
    nodes = []
    for label in _label_paths(text):
        if label:
            try:
                nodes.append(tax.index(label))
            except TaxonomyError as e:
                raise ValueError(f"{manifest}: line {line}: label {label!r} is not in the taxonomy ({e})") from None
    return nodes


def _targets(manifest: Path, tax: Taxonomy, labels: list[list[int]], multi_label: bool | None) -> torch.Tensor:
    """Node ids (single-label) or ``(rows, N+1)`` path-end marks (multi-label: the deepest labels only)."""
    several = next((i for i, n in enumerate(labels) if len(set(n)) > 1), None)
    if multi_label is None:
        multi_label = several is not None
    if not multi_label and several is not None:
        raise ValueError(f"{manifest}: row {several + 1} has several labels but multi_label is false")
    if not multi_label:
        return torch.tensor([n[0] for n in labels], dtype=torch.long)
    targets = torch.zeros(len(labels), tax.num_nodes, dtype=torch.bool)
    for i, nodes in enumerate(labels):
        for n in nodes:  # a label that is an ancestor of another one is not a path end
            if not any(m != n and n in tax.ancestors(m) for m in nodes):
                targets[i, n] = True
    return targets


def _load_taxonomy(path: str | os.PathLike) -> Taxonomy:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: taxonomy JSON not found (cfg taxonomy; write one with Taxonomy.save)")
    return Taxonomy.load(path)


def _tree_of_labels(manifest: Path) -> Taxonomy:
    """No taxonomy file: every label is a ``/``-separated name path and the tree is made of them."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM
        reader = csv.DictReader(f)
        if "label" not in (reader.fieldnames or ()):
            raise ValueError(f"{manifest}: header must name 'path' and 'label' columns, got {reader.fieldnames}")
        labels = [x for row in reader for x in _label_paths(row["label"] or "")]
    try:
        return Taxonomy.from_paths(labels)
    except TaxonomyError as e:
        raise ValueError(f"{manifest}: no tree from its labels ({e})") from None
