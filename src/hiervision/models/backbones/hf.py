"""Pretrained Hugging Face image encoders under the backbone contract (``model.backbone: hf:<hub id or folder>``).

``hf:facebook/dinov2-small`` or ``hf:/models/dinov2-small`` (a ``save_pretrained`` folder) wraps
``transformers.AutoModel.from_pretrained(...)``: ViT-like token models (ViT, DeiT, DINOv2, ...) and conv
models (ConvNeXt, ResNet, ...) alike. ``forward(x)`` is the encoder's pooled ``(B, hidden)`` feature
(``pool``), ``forward_features(x)`` up to four of its hidden states (the last one last) as ``(B, C, h, w)`` maps (patch
tokens laid out on their grid; CLS and register tokens dropped), so heads that read stage maps get them.

A local folder loads offline; anything else is a hub id fetched into the Hugging Face cache once (the
one place hiervision downloads, and only when asked to by name). :func:`hf_input_settings` reads the
encoder's own input size and normalisation, and :func:`encoder_data_settings` turns them into the data
config keys a run needs (``data.mean``/``data.std`` and, for photo folders, the ``imagenet`` pipeline's
crop), so that the encoder sees images the way it was trained on them.

``transformers`` is an optional extra (``pip install 'hiervision[hf]'``), imported only when used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiervision.models.backbones.base import Backbone

__all__ = ["HF_PREFIX", "HFBackbone", "POOL_MODES", "encoder_data_settings", "hf_input_settings"]

HF_PREFIX = "hf:"  # model.backbone: hf:<hub id or save_pretrained folder>
#: how :meth:`HFBackbone.forward` pools (see :class:`HFBackbone`)
POOL_MODES = ("auto", "pooler", "cls", "mean")
#: data sets whose images go through ``data.pipeline`` (lazy image files): they take the encoder's crop
PHOTO_DATA = ("folder", "manifest", "shards")
_PROBE = 64  # side of the dry-run image that measures the encoder's output layout (cheap for any size)
_MAX_PREFIX = 16  # CLS + register/distillation tokens a token model may put before its patch tokens


def import_transformers(ref: str) -> Any:
    """Import transformers on demand; a missing install is one line that says how to get it."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ValueError(f"model.backbone hf:{ref} needs the optional transformers package: "
                         "pip install 'hiervision[hf]'") from None


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def _fetch_hint(ref: str, why: str) -> str:
    """The one-line refusal when the hub cannot be reached: how to fetch the encoder elsewhere and pass a folder."""
    code = (f"from transformers import AutoModel, AutoImageProcessor as P; "
            f"AutoModel.from_pretrained('{ref}').save_pretrained('DIR'); "
            f"P.from_pretrained('{ref}').save_pretrained('DIR')")
    return (f"model.backbone hf:{ref}: could not download it ({why}); on a machine with internet run "
            f"`python -c \"{code}\"`, copy DIR here and pass model.backbone: hf:DIR")


def _is_network_error(e: BaseException) -> bool:
    """No network, an unknown repo or a cache miss offline: transformers and huggingface_hub raise OSError
    subclasses, the HTTP clients beneath them their own classes."""
    root = type(e).__module__.split(".")[0]
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or root in ("httpx", "requests", "urllib3")


def _local_folder(ref: str) -> Path | None:
    """The folder ``ref`` names, or ``None`` for a hub id; a path that cannot be a hub id must exist."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model.backbone hf:{ref}: {path} is a file; give a save_pretrained folder or a hub id")
    if ref.startswith(("/", "~", "./", "../", ".\\")) or "\\" in ref or ref.count("/") > 1:
        raise ValueError(f"model.backbone hf:{ref}: no such folder (and not a hub id of the form owner/name)")
    return None


def load_hf_model(ref: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(AutoModel, its loading info)`` from a folder (offline) or a hub id (cache first, then a download)."""
    tf = import_transformers(ref)
    folder = _local_folder(ref)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.backbone hf:{ref}: {folder} is not a Hugging Face model folder "
                             "(no config.json; write one with save_pretrained)")
        was = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()  # a local load is instant: no progress bar on stderr
        try:
            return _from_pretrained(tf, ref, str(folder), hub=False, local_files_only=True)
        finally:
            if was:
                tf.utils.logging.enable_progress_bar()
    try:
        return tf.AutoModel.from_pretrained(ref, local_files_only=True, output_loading_info=True)
    except Exception:  # noqa: BLE001 - not in the cache (or not usable offline): download it below
        pass
    print(f"downloading {ref} into the Hugging Face cache ...", file=sys.stderr)
    return _from_pretrained(tf, ref, ref, hub=True)


def _from_pretrained(tf: Any, ref: str, source: str, hub: bool, **kw: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``AutoModel.from_pretrained`` with every failure as one line: no network, or no model AutoModel builds."""
    try:
        return tf.AutoModel.from_pretrained(source, output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 - anything a foreign loader raises becomes one line naming the source
        if hub and _is_network_error(e):
            raise ValueError(_fetch_hint(ref, _short(e))) from None
        raise ValueError(f"model.backbone hf:{ref}: {source} holds no model transformers.AutoModel can build "
                         f"({_short(e)})") from None


def _patch_size(config: Any) -> int | None:
    p = getattr(config, "patch_size", None)
    p = p[0] if isinstance(p, (list, tuple)) and p else p
    return int(p) if isinstance(p, int) and p > 0 else None


def _token_grid(ref: str, n_tokens: int, side: int, patch: int | None) -> tuple[int, int]:
    """``(reduction, prefix tokens)`` of a token model's output for a ``side``² probe: the first stride (the
    patch, or the patch times a power of two for models that merge patches) whose grid leaves only a few
    tokens over (CLS, registers)."""
    for k in range(7):
        r = (patch or 1) * 2**k
        extra = n_tokens - (side // r) ** 2
        if 0 <= extra <= _MAX_PREFIX and side // r > 0:
            return r, extra
    raise ValueError(f"model.backbone hf:{ref}: cannot lay {n_tokens} output tokens of a {side}x{side} image "
                     "out on a patch grid")


class HFBackbone(Backbone):
    """A ``transformers.AutoModel`` image encoder keeping the hiervision backbone contract.

    Grey images (``in_chans=1``) are repeated to the encoder's 3 channels inside :meth:`forward`, so
    grey data sets use RGB encoders as they are; other channel counts must equal the encoder's own.

    Parameters the chosen output never reaches (DINOv2's mask token, ViT's pooler under ``pool: cls``,
    ConvNeXt's last norm under ``pool: mean``) are touched with weight zero while gradients are recorded:
    they get zero gradients instead of none, so DDP's default reducer and "every parameter has a gradient"
    checks hold without ``find_unused_parameters``.

    Args:
        ref: a hub id (``facebook/dinov2-small``) or a ``save_pretrained`` folder.
        in_chans: image channels (1, or the encoder's ``num_channels``).
        pool: ``auto`` (the model's pooled output where it has one with trained weights, else the CLS token
            of a token model, else ``mean``), ``pooler``, ``cls`` or ``mean`` (mean of the patch tokens /
            of the last feature map).
    """

    def __init__(self, ref: str, in_chans: int = 3, pool: str = "auto", **kwargs: Any) -> None:
        super().__init__(in_chans)
        if kwargs:
            raise ValueError(f"backbone_kwargs.{sorted(kwargs)[0]}: not a setting of model.backbone hf:... "
                             f"(it takes pool: {' | '.join(POOL_MODES)})")
        if pool not in POOL_MODES:
            raise ValueError(f"backbone_kwargs.pool: must be one of {', '.join(POOL_MODES)}, got {pool!r}")
        self.ref = ref
        model, info = load_hf_model(ref)
        self.model = model.float()  # transformers 5 loads in the checkpoint's dtype: training wants fp32 weights
        self.model_channels = int(getattr(model.config, "num_channels", 3))
        if in_chans not in (1, self.model_channels):
            raise ValueError(f"model.backbone hf:{ref}: the encoder takes {self.model_channels}-channel images "
                             f"(grey ones are repeated), got in_chans={in_chans}")
        params = inspect.signature(model.forward).parameters
        # ViT-like models interpolate their position embeddings only when asked (DINOv2 always does)
        self._call_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
        with torch.enable_grad():  # the probe's backward finds unused parameters, even if built under no_grad
            self._probe(ref, pool, {str(k) for k in info.get("missing_keys", ())})

    # -- layout: measured once on a small dry-run image -------------------------------------------------
    def _probe(self, ref: str, pool: str, missing: set[str]) -> None:
        """Output kind, width, stride, prefix tokens, pool mode and the parameters each output leaves unused."""
        patch = _patch_size(self.model.config)
        side = patch * max(2, math.ceil(_PROBE / patch)) if patch else _PROBE
        was = self.model.training
        self.model.eval()
        out = self.model(pixel_values=torch.zeros(1, self.model_channels, side, side), output_hidden_states=True,
                         **self._call_kwargs)
        hidden = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        self.tokens = hidden.dim() == 3
        if hidden.dim() not in (3, 4):
            raise ValueError(f"model.backbone hf:{ref}: its last hidden state has shape {tuple(hidden.shape)}, "
                             "neither tokens (B, N, C) nor a map (B, C, H, W)")
        self.reduction, self.prefix = self._layout(ref, hidden, side, patch)
        self.pool = self._pool_mode(ref, pool, pooled is not None, any("pooler" in k for k in missing))
        # the maps forward_features returns: up to 4 hidden states evenly spaced through the encoder (the
        # stages of a conv model, layers of a token model), the last being last_hidden_state
        states = tuple(getattr(out, "hidden_states", None) or ())
        picked = sorted({round(len(states[1:]) * k / 4) for k in range(1, 4)} - {0, len(states) - 1})
        self._stages = [(i, *self._layout(ref, states[i], side, patch)) for i in picked
                        if states[i].dim() == hidden.dim()] + [(-1, self.reduction, self.prefix)]
        for i, reduction, _ in self._stages:
            h = hidden if i < 0 else states[i]
            self.add_feature(int(h.shape[1 if h.dim() == 4 else 2]), int(reduction),
                             "model" if i < 0 else f"model.hidden_states[{i}]")
        self._width = int(self._pooled(out).shape[1])
        self._unused_pooled = self._unused(self._pooled(out))
        self._unused_map = self._unused(sum(m.mean() for m in self._maps(out, side, side)))
        self.model.train(was)

    def _layout(self, ref: str, hidden: torch.Tensor, side: int, patch: int | None) -> tuple[int, int]:
        """``(reduction, prefix tokens)`` of one hidden state of the ``side``² probe."""
        if hidden.dim() == 3:
            return _token_grid(ref, hidden.shape[1], side, patch)
        return side // hidden.shape[-1], 0

    def _pool_mode(self, ref: str, pool: str, has_pooler: bool, pooler_missing: bool) -> str:
        """The pool mode ``auto`` stands for, or a one-line refusal of one the encoder cannot give."""
        if pool == "pooler" and not has_pooler:
            raise ValueError(f"model.backbone hf:{ref}: backbone_kwargs.pool: the encoder has no pooled output; "
                             "use cls (token models) or mean")
        if pool == "pooler" and pooler_missing:
            raise ValueError(f"model.backbone hf:{ref}: backbone_kwargs.pool: the checkpoint holds no pooler "
                             "weights (they would be random); use cls or mean")
        if pool == "cls" and (not self.tokens or self.prefix < 1):
            raise ValueError(f"model.backbone hf:{ref}: backbone_kwargs.pool: cls needs a class token, and this "
                             "encoder has none; use mean" + (" or pooler" if has_pooler else ""))
        if pool != "auto":
            return pool
        if has_pooler and not pooler_missing:
            return "pooler"
        return "cls" if self.tokens and self.prefix >= 1 else "mean"

    def _unused(self, output: torch.Tensor) -> list[str]:
        """Names of the trainable parameters ``output`` does not depend on (from one dry-run backward)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(output.sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
        return [n for (n, _), g in zip(named, grads, strict=True) if g is None]

    @property
    def num_features(self) -> int:
        """Width of :meth:`forward`'s pooled features (the pooler's, which may differ from the map's)."""
        return self._width

    # -- the contract -----------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, hidden_states: bool = False) -> Any:
        if x.shape[1] != self.model_channels:
            if x.shape[1] != 1:
                raise ValueError(f"model.backbone hf:{self.ref}: got {x.shape[1]}-channel images, the encoder "
                                 f"takes {self.model_channels} (or grey ones)")
            x = x.expand(-1, self.model_channels, -1, -1)
        return self.model(pixel_values=x, output_hidden_states=hidden_states, **self._call_kwargs)

    def _pooled(self, out: Any) -> torch.Tensor:
        if self.pool == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        return hidden[:, self.prefix:].mean(1) if self.tokens else hidden.mean(dim=(2, 3))

    def _map(self, hidden: torch.Tensor, height: int, width: int, reduction: int, prefix: int) -> torch.Tensor:
        """A hidden state as a ``(B, C, h, w)`` map: patch tokens on their grid, or the conv map."""
        if hidden.dim() == 4:
            return hidden
        patches = hidden[:, prefix:]
        h, w = height // reduction, width // reduction
        if h * w != patches.shape[1]:
            h, w = -(-height // reduction), -(-width // reduction)  # encoders that pad the last patch
        if h * w != patches.shape[1]:
            raise ValueError(f"model.backbone hf:{self.ref}: {patches.shape[1]} patch tokens do not fit a "
                             f"{height}x{width} image at stride {reduction}")
        return patches.transpose(1, 2).reshape(len(hidden), hidden.shape[2], h, w)

    def _maps(self, out: Any, height: int, width: int) -> list[torch.Tensor]:
        """Every stage's map, shallow to deep (:attr:`feature_info` order)."""
        return [self._map(out.last_hidden_state if i < 0 else out.hidden_states[i], height, width, r, p)
                for i, r, p in self._stages]

    def _touch(self, out: torch.Tensor, unused: list[str]) -> torch.Tensor:
        """``out`` plus zero times each unused parameter, so that they get (zero) gradients too."""
        if not unused or not torch.is_grad_enabled():
            return out
        params = [self.model.get_parameter(n) for n in unused]
        zero = sum(p.flatten()[0] for p in params if p.requires_grad)
        return out if isinstance(zero, int) else out + zero.to(out.dtype) * 0

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, num_chs, H / reduction, W / reduction)`` map per :attr:`feature_info` entry: up to four hidden
        states evenly spaced through the encoder, the last hidden state last."""
        maps = self._maps(self._encode(x, hidden_states=len(self._stages) > 1), x.shape[-2], x.shape[-1])
        maps[-1] = self._touch(maps[-1], self._unused_map)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features ``(B, num_features)`` (``pool``)."""
        return self._touch(self._pooled(self._encode(x)), self._unused_pooled)

    def extra_repr(self) -> str:
        return f"ref={self.ref!r}, pool={self.pool!r}, in_chans={self.in_chans}"


# ---------------------------------------------------------------------------------------------- input settings
def _preprocessor_file(ref: str) -> Path:
    """The encoder's ``preprocessor_config.json``: in its folder, or from the hub cache (downloaded once)."""
    folder = _local_folder(ref)
    if folder is not None:
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            raise ValueError(f"model.backbone hf:{ref}: {folder} has no preprocessor_config.json (save the image "
                             "processor there too, or give data.mean/data.std yourself)")
        return path
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        raise ValueError(f"model.backbone hf:{ref} needs the optional transformers package: "
                         "pip install 'hiervision[hf]'") from None
    cached = hub.try_to_load_from_cache(ref, "preprocessor_config.json")
    if isinstance(cached, str):
        return Path(cached)
    print(f"downloading {ref}'s preprocessor_config.json into the Hugging Face cache ...", file=sys.stderr)
    try:
        return Path(hub.hf_hub_download(ref, "preprocessor_config.json"))
    except Exception as e:  # noqa: BLE001 - no network, no such repo, no such file: one line either way
        if _is_network_error(e):
            raise ValueError(_fetch_hint(ref, _short(e))) from None
        raise ValueError(f"model.backbone hf:{ref}: cannot read its preprocessor_config.json ({_short(e)})") from None


def _side(v: Any) -> int | tuple[int, int] | None:
    """A processor size entry (``224``, ``{"height", "width"}``, ``{"shortest_edge"}``) → an int or (h, w)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, dict) and isinstance(v.get("height"), int) and isinstance(v.get("width"), int):
        return v["height"] if v["height"] == v["width"] else (v["height"], v["width"])
    if isinstance(v, dict) and isinstance(v.get("shortest_edge"), int):
        return v["shortest_edge"]
    return None


def _numbers(v: Any) -> list[float] | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)] * 3
    if isinstance(v, list) and v and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
        return [float(a) for a in v]
    return None


def hf_input_settings(name_or_folder: str) -> dict[str, Any]:
    """The encoder's input settings from its ``preprocessor_config.json``, read as JSON (no processor class
    is built, so neither torchvision nor the processor's own dependencies are needed).

    Returns ``{"image_size", "resize", "mean", "std"}``: ``image_size`` the crop size (else the resize target's
    height/width, else its shortest edge), ``resize`` the shorter side before a centre crop (``None`` without
    one), ``mean``/``std`` the per-channel normalisation in [0, 1] units (``None`` where the file has none;
    ``[0]*3``/``[1]*3`` when it does not normalise). ``name_or_folder`` may carry the ``hf:`` prefix.
    """
    ref = name_or_folder.removeprefix(HF_PREFIX)
    path = _preprocessor_file(ref)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model.backbone hf:{ref}: {path} is not readable JSON ({_short(e)})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model.backbone hf:{ref}: {path} does not hold a JSON object")
    size, crop = _side(cfg.get("size")), _side(cfg.get("crop_size"))
    shortest = cfg.get("size", {}).get("shortest_edge") if isinstance(cfg.get("size"), dict) else None
    resize = None
    if crop is not None and cfg.get("do_center_crop", True) is not False:
        image_size = crop
        resize = shortest if isinstance(shortest, int) else None
    elif isinstance(shortest, int) and isinstance(cfg.get("crop_pct"), (int, float)) and shortest < 384:
        image_size, resize = shortest, round(shortest / cfg["crop_pct"])  # ConvNeXt: resize, then crop shortest
    else:
        image_size = size
    mean, std = _numbers(cfg.get("image_mean")), _numbers(cfg.get("image_std"))
    if cfg.get("do_normalize") is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return {"image_size": image_size, "resize": resize, "mean": mean, "std": std}


def encoder_data_settings(backbone: str, data_name: str = "folder", channels: int = 3) -> dict[str, Any]:
    """The data config overrides that feed ``backbone`` (``hf:...``) images the way it was trained on them.

    Always ``mean``/``std`` (averaged to one value for grey data, which the encoder sees repeated to RGB);
    for photo data sets (``folder``, ``manifest``, ``shards``) also ``pipeline: imagenet`` with ``crop`` =
    the encoder's input size and ``resize`` = its shorter side before the crop. In-memory sets (CIFAR,
    Fashion-MNIST, synthetic) keep their size: resizing them all up front would hold every image at the
    encoder's size in memory. Keys the processor file lacks are left out (the data's own statistics apply).
    """
    if not backbone.startswith(HF_PREFIX):
        raise ValueError(f"model.backbone: encoder data settings need an hf:<hub id or folder> backbone, "
                         f"got {backbone!r}")
    s = hf_input_settings(backbone)
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if s[key] is not None:
            out[key] = [sum(s[key]) / len(s[key])] if channels == 1 else list(s[key])
    size = s["image_size"]
    if data_name in PHOTO_DATA and size is not None:
        crop = size if isinstance(size, int) else min(size)  # the imagenet pipeline crops squares
        out.update(pipeline="imagenet", crop=crop, resize=max(crop, s["resize"] or crop))
    return out
