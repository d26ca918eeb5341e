"""Identity-keyed splits and the record of what a run was trained and tested on.

A sample's split is decided by a seeded hash of its id (its relative path, or ``train/123`` for
an official index), never by its position in a file list: adding, removing or renaming one image
moves only that image, so a resumed or re-evaluated run still tests on images it never trained on.
The price is that split sizes are binomial, not exact: a 0.2 split of 100 images holds about 20.

The record (:func:`split_record`) keeps per split a count, a sha256 digest and the sorted ids, so a
later ``evaluate`` or resume can say exactly what changed (:func:`compare_split_records`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "RECORD_SPLITS",
    "compare_split_records",
    "hash_split",
    "hash_subset",
    "hash_unit",
    "read_split_record",
    "split_record",
    "verify_split_record",
    "write_split_record",
]

RECORD_SPLITS = ("train", "val", "test")
_VERSION = 1


def hash_unit(ids: Sequence[str], seed: int, salt: str) -> np.ndarray:
    """A float in [0, 1) per id: a seeded sha256 of the id alone, so it never depends on the other samples."""
    out = np.empty(len(ids), dtype=np.float64)
    prefix = f"{seed}\x00{salt}\x00".encode()
    for i, s in enumerate(ids):
        out[i] = int.from_bytes(hashlib.sha256(prefix + s.encode()).digest()[:8], "big") / 2.0**64
    return out


def hash_split(ids: Sequence[str], fraction: float, seed: int, salt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, held_out)`` sorted index tensors: a sample is held out when its hash is below ``fraction``.

    Every class is held out at the same rate in expectation (stratified in spirit); exact per-class
    counts would make one sample's membership depend on the others, which is what this avoids.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    held = hash_unit(ids, seed, salt) < fraction
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))


def hash_subset(ids: Sequence[str], targets: torch.Tensor, k: int, seed: int, salt: str = "limit") -> torch.Tensor:
    """Sorted indices of a class-balanced subset of exactly ``min(k, n)`` samples, chosen by hash rank.

    Within each class samples are ranked by their hash; the subset takes the lowest relative ranks
    across classes, so every class keeps its share and a sample's membership changes only when the
    samples ranked near it in its own class change.
    """
    n = len(ids)
    if k >= n:
        return torch.arange(n)
    u = hash_unit(ids, seed, salt)
    strata = np.zeros(n, dtype=np.int64) if targets.dim() == 2 else targets.numpy().astype(np.int64)
    key = np.empty(n, dtype=np.float64)
    for c in np.unique(strata):
        members = np.flatnonzero(strata == c)
        ranked = members[np.argsort(u[members], kind="stable")]
        key[ranked] = (np.arange(len(ranked)) + 0.5) / len(ranked)
    chosen = np.lexsort((u, key))[:k]
    return torch.from_numpy(np.sort(chosen))


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def split_record(splits: Mapping[str, Sequence[str]], name: str = "", skipped: int = 0) -> dict[str, Any]:
    """A JSON-able record of which samples each split holds: count, sha256 of the sorted ids, the ids."""
    return {
        "version": _VERSION,
        "data": name,
        "skipped": skipped,
        "splits": {s: {"count": len(ids), "sha256": _digest(ids), "ids": sorted(ids)} for s, ids in splits.items()},
    }


def compare_split_records(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """``None`` when both records hold the same samples per split, else one line naming what changed.

    The line names each changed split with its added/removed counts and, most important for honest
    numbers, how many of the new test images were in the old training split.
    """
    try:
        o, n = old["splits"], new["splits"]
    except (KeyError, TypeError):
        return "data changed: a split record is unreadable (no 'splits')"
    changes = []
    for s in dict.fromkeys([*o, *n]):
        a, b = o.get(s), n.get(s)
        if a is None or b is None:
            changes.append(f"{s} {'added' if a is None else 'removed'}")
            continue
        if a.get("sha256") == b.get("sha256"):
            continue
        if "ids" in a and "ids" in b:
            sa, sb = set(a["ids"]), set(b["ids"])
            changes.append(f"{s} +{len(sb - sa)}/-{len(sa - sb)} ({len(sa)} -> {len(sb)})")
        else:
            changes.append(f"{s} {a.get('count')} -> {b.get('count')} samples, different digest")
    if not changes:
        return None
    line = "data changed since the run was recorded: " + ", ".join(changes)
    old_train, new_test = o.get("train", {}).get("ids"), n.get("test", {}).get("ids")
    if old_train is not None and new_test is not None:
        leak = len(set(new_test) & set(old_train))
        line += f"; {leak} of the {len(new_test)} test samples were in the old train split"
    return line


def write_split_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write the record as JSON atomically (temporary file, then rename), so a crash never leaves half a record."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write the split record ({e.strerror or e})") from None


def read_split_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a record written by :func:`write_split_record`; a damaged file is a one-line ``ValueError``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no split record") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable split record ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("splits"), dict):
        raise ValueError(f"{path}: not a split record (no 'splits' object)")
    return rec


def verify_split_record(
    path: str | os.PathLike, record: Mapping[str, Any], allow_changed: bool = False
) -> str | None:
    """Compare the run folder's record at ``path`` with the data as it is now (``record``).

    Returns ``None`` when they match or ``path`` does not exist (a run from before records), the
    change line when ``allow_changed`` (print it as a warning), and otherwise raises ``ValueError``
    with that line and the override to use.
    """
    if not Path(path).is_file():
        return None
    change = compare_split_records(read_split_record(path), record)
    if change is None or allow_changed:
        return change
    raise ValueError(f"{path}: {change} (--allow-changed-data to go on anyway)")
