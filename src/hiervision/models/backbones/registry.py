"""The backbone registry: names → factories, and loading local weights into what they build.

Kept apart from the package's ``__init__`` so that each family module can register itself without
importing the package that imports it (no import cycle).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from hiervision.models.backbones.hf import HF_PREFIX, HFBackbone  # transformers itself is imported when used

__all__ = ["HF_PREFIX", "TIMM_PREFIX", "create_backbone", "list_backbones", "load_backbone_weights",
           "register_backbone"]

TIMM_PREFIX = "timm/"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_backbone(name: str) -> Callable[[F], F]:
    """Decorator adding a factory ``fn(in_chans=..., **kwargs) -> nn.Module`` under ``name``.

    Names are unique so that a config string always means one network; re-registering raises.
    """
    for prefix, what in ((TIMM_PREFIX, "the timm adapter"), (HF_PREFIX, "Hugging Face encoders")):
        if name.startswith(prefix):
            raise ValueError(f"backbone names starting with {prefix!r} are reserved for {what}")

    def deco(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered names, sorted (``timm/<model>`` and ``hf:<hub id or folder>`` are accepted too but not listed)."""
    return sorted(_REGISTRY)


def create_backbone(
    name: str,
    in_chans: int = 3,
    pretrained_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered backbone and optionally load local weights into it.

    Args:
        name: a name from :func:`list_backbones`, ``"timm/<model>"`` (needs ``pip install hiervision[timm]``) or
            ``"hf:<hub id or save_pretrained folder>"`` (needs ``pip install 'hiervision[hf]'``; its weights come
            with it, so ``pretrained_path`` is refused).
        in_chans: input channels (1 or 3).
        pretrained_path: a ``.safetensors`` file or a ``torch.save`` state dict; keys must match exactly
            (classifier keys the model lists in ``pretrained_ignore`` excepted, see :func:`load_backbone_weights`).
        **kwargs: forwarded to the family's constructor (e.g. ``shortcut``, ``width``, ``act``).
    """
    if name.startswith(HF_PREFIX):
        if pretrained_path is not None:
            raise ValueError(f"backbone_kwargs.pretrained_path: not used with model.backbone {name} (its weights "
                             "come from the folder or hub id); leave it out")
        return HFBackbone(name[len(HF_PREFIX) :], in_chans=in_chans, **kwargs)
    if name.startswith(TIMM_PREFIX):
        from hiervision.models.backbones.timm_adapter import TimmBackbone

        model: nn.Module = TimmBackbone(name[len(TIMM_PREFIX) :], in_chans=in_chans, **kwargs)
    else:
        if name not in _REGISTRY:
            known = ", ".join(list_backbones())
            raise ValueError(f"unknown backbone {name!r}; known: {known} (or '{TIMM_PREFIX}<model>' with timm, "
                             f"'{HF_PREFIX}<hub id or folder>' with transformers)")
        model = _REGISTRY[name](in_chans=in_chans, **kwargs)
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path)
    return model


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Read a safetensors or torch state dict; torch files are loaded with ``weights_only`` (no pickled code).

    Whatever is wrong with the file (not there, a folder, unreadable, not weights, a pickle that asks
    for code) is one line naming it, not a loader's multi-line traceback.
    """
    what = "backbone_kwargs.pretrained_path"
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found ({what})")
    if not path.is_file():
        raise ValueError(f"{path}: not a file ({what} must name a .safetensors or torch.save weights file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of an untrusted file is "not a weights file"
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise ValueError(f"{path}: not a readable weights file ({what}: .safetensors or a torch.save state dict; "
                         f"{why})") from None
    # common checkpoint wrappers: {"state_dict": ...} / {"model": ...}
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ValueError(f"{path}: not a state dict of tensors (entry {odd!r} is a {type(state[odd]).__name__})")
    return state


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file strictly, naming missing, unexpected and mis-shaped keys in one error.

    Strict on purpose: a silently half-loaded backbone trains fine but is not the network the file describes.
    The one exception is a classifier the backbone does not have: file keys starting with a prefix in the
    model's ``pretrained_ignore`` class attribute (e.g. ``("fc.", "classifier.")``), and not the model's own,
    are dropped, so full-model checkpoints (torchvision's ``resnet50``, ``vgg16``) load without surgery.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"backbone_kwargs.pretrained_path: must be a weights file path, got {path!r}")
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    if not any(k in state for k in own) and any(k.startswith("backbone.") for k in state):
        # a hiervision model checkpoint (e.g. a flat run's best.pt): take its backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    ignore = tuple(getattr(model, "pretrained_ignore", ()))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(ignore)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise ValueError(f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
