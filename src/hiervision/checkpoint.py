"""Checkpoints that load without executing pickled code, written atomically.

A checkpoint is a ``torch.save`` of plain containers of tensors and numbers, read back with
``torch.load(weights_only=True)``; it records the taxonomy's fingerprint so weights trained for
another tree are refused with a clear message instead of a shape error deep inside torch.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from hiervision.runfolder import atomic_write_bytes
from hiervision.taxonomy import Taxonomy

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or made for another taxonomy."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise in memory, then write atomically (temp file, fsync, rename): a kill never leaves a
    half file, and a full disk is a one-line error that keeps the previous checkpoint (torch would
    report a failed write to a file as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, taxonomy: Taxonomy | None = None) -> dict[str, Any]:
    """Load safely (``weights_only=True``); refuse a checkpoint of a different taxonomy."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt/unsafe files
        raise CheckpointError(f"{path}: not a readable hiervision checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a hiervision checkpoint (no 'model' entry)")
    if taxonomy is not None and state.get("taxonomy_fingerprint") != taxonomy.fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint was trained on another taxonomy "
            f"(fingerprint {state.get('taxonomy_fingerprint')} != {taxonomy.fingerprint})"
        )
    return state
