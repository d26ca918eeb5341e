"""Step mechanics: what one optimizer step needs, apart from the loop that runs the steps.

The optimizer and its learning-rate schedule (``train.backbone_lr_scale``: the backbone's group at a share of
the rate), the freeze schedule (``train.freeze``, ``train.unfreeze_after``), the loss checks that stop a diverging
run, and the forward/backward/step helpers of :func:`~hiervision.training.engine.train_one_epoch`. Every
one of them is a function of the config and the step alone, so a resumed run replays what an uninterrupted
one would have done.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hiervision.config import ConfigError
from hiervision.data import BatchAugment, BatchLoader, DataBundle
from hiervision.distributed import DistEnv, max_over_ranks
from hiervision.models import HierarchicalClassifier

__all__ = [
    "Loop",
    "TrainingError",
    "accumulate",
    "apply_freeze",
    "build_optimizer",
    "check_backbone_options",
    "check_loss",
    "check_window",
    "device_batch",
    "freeze_batchnorm_stats",
    "freeze_schedule",
    "frozen_backbone_key",
    "frozen_groups",
    "lr_factor",
    "optimizer_params",
    "optimizer_step",
    "prepare_epoch",
    "set_lr",
    "step_seed",
]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a finished run asked to resume with other settings, ...)."""


# ----------------------------------------------------------------------------- loss checks
def check_loss(loss: float, epoch: int, step: int, max_loss: float | None = None, lr: float | None = None) -> None:
    """Stop when a step's loss is NaN/inf or above ``train.max_loss`` (a diverging run), in one line.

    Our losses are means of per-level cross-entropies (about ln(classes) per level at chance), so the
    default limit of 1e4 never stops a healthy run. ``epoch`` and ``step`` are 1-based, as shown to the user.
    """
    finite = math.isfinite(loss)
    if finite and (max_loss is None or loss <= max_loss):
        return
    at = f"at epoch {epoch}, step {step}" + (f" (lr {lr:.3g})" if lr is not None else "")
    what = "loss is not finite" if not finite else f"loss {loss:.4g} exceeds train.max_loss={max_loss:g}"
    raise TrainingError(f"{what} {at}: the run diverged; lower train.lr, set train.grad_clip or train.amp=none")


# ----------------------------------------------------------------------------- optimizer and schedule
def build_optimizer(params: Iterable[nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names, at the base learning rate (the schedule scales it per step)."""
    name, lr, wd = cfg["optimizer"], float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ConfigError(f"train.optimizer must be sgd, adam or adamw, got {name!r}")


def optimizer_params(model: HierarchicalClassifier, tcfg: dict) -> Iterable[nn.Parameter] | list[dict]:
    """What :func:`build_optimizer` gets: every parameter at ``train.lr``, or with ``train.backbone_lr_scale``
    two groups, the head (first: the rate the log shows) at ``lr`` and the backbone at ``lr × scale``, so a
    pretrained encoder moves less than the new head. The schedule multiplies both groups' base rates."""
    scale = tcfg.get("backbone_lr_scale")
    if scale is None:
        return model.parameters()
    backbone = model.param_groups()["backbone"]
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in ids]
    lr = float(tcfg["lr"])
    return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * float(scale)}]


def lr_factor(step: int, steps_per_epoch: int, cfg: dict) -> float:
    """Learning-rate multiplier as a pure function of the global step (linear warm-up, then the schedule)."""
    epoch = step / steps_per_epoch
    warm = cfg["warmup_epochs"]
    if warm and epoch < warm:
        return (step + 1) / (warm * steps_per_epoch)
    schedule = cfg["schedule"]
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        total = max(cfg["epochs"] - warm, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - warm) / total, 1.0)))
    if schedule == "step":
        return cfg["gamma"] ** int(epoch // cfg["step_size"])
    if schedule == "multistep":
        return cfg["gamma"] ** sum(epoch >= m for m in cfg["milestones"])
    raise ConfigError(f"train.schedule must be cosine, step, multistep or constant, got {schedule!r}")


# ----------------------------------------------------------------------------- freezing
def frozen_backbone_key(tcfg: dict) -> str | None:
    """The key that asks for a frozen backbone trained on its cached features (one switch, two names)."""
    if tcfg.get("freeze_backbone"):
        return "train.freeze_backbone"
    return "train.precompute_features" if tcfg["precompute_features"] else None


def check_backbone_options(tcfg: dict) -> None:
    """Refuse, in one line, the backbone settings that contradict each other (before any data is read)."""
    key = frozen_backbone_key(tcfg)
    if tcfg.get("freeze_backbone") is False and tcfg["precompute_features"]:
        raise ConfigError("train.freeze_backbone: false contradicts train.precompute_features: true (the same "
                          "switch under its older name); drop one of them")
    for name in ("backbone_lr_scale", "unfreeze_after"):
        if key and tcfg.get(name) is not None:
            raise ConfigError(f"train.{name}: applies to a backbone that trains, but {key} is true (it stays "
                              "frozen and trains on cached features); drop one of them")
    after = tcfg.get("unfreeze_after")
    if after is not None and after >= tcfg["epochs"]:
        raise ConfigError(f"train.unfreeze_after: {after} ≥ train.epochs ({tcfg['epochs']}), so the backbone "
                          "would never train; set train.freeze_backbone: true instead")


def freeze_schedule(tcfg: dict) -> list[dict]:
    """``train.freeze`` with ``train.unfreeze_after: K`` added as one more entry: the backbone frozen in
    epochs [0, K), the head alone learning on top of the pretrained encoder before everything trains."""
    after = tcfg.get("unfreeze_after")
    return [*tcfg["freeze"], {"epochs": [0, after], "frozen": ["backbone"]}] if after else list(tcfg["freeze"])


def frozen_groups(epoch: int, schedule: list[dict], known: set[str]) -> set[str]:
    """Parameter groups frozen in this epoch: the union of every entry whose [start, end) holds it."""
    frozen: set[str] = set()
    for i, entry in enumerate(schedule):
        try:
            start, end = entry["epochs"]
            groups = entry["frozen"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"train.freeze[{i}] must look like {{epochs: [start, end], frozen: [group]}}") from None
        unknown = set(groups) - known
        if unknown:
            raise ConfigError(f"train.freeze[{i}]: unknown group {sorted(unknown)[0]!r} (known: {sorted(known)})")
        if start <= epoch < end:
            frozen.update(groups)
    return frozen


def apply_freeze(model: nn.Module, frozen: set[str]) -> None:
    """Only the parameters outside the frozen groups get gradients (and so optimizer updates)."""
    groups = model.param_groups()
    frozen_ids = {id(p) for g in frozen for p in groups[g]}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen_ids)


def freeze_batchnorm_stats(model: nn.Module, frozen: set[str] | frozenset[str] = frozenset()) -> None:
    """Batch norms whose parameters are all frozen go to eval mode: a frozen part's running statistics
    must not drift either. Those of a frozen backbone (``frozen`` names ``backbone`` or ``cnn``) do too,
    affine or not. Layer norms keep no statistics and need nothing."""
    frozen_backbones = bool(frozen & {"backbone", "cnn"}) and hasattr(model, "backbones")
    inside = {id(m) for b in model.backbones() for m in b.modules()} if frozen_backbones else set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if id(m) in inside or (params and not any(p.requires_grad for p in params)):
                m.eval()


# ----------------------------------------------------------------------------- one step
@dataclass(kw_only=True)
class Loop:
    """What the steps of every epoch share (built once by :func:`~hiervision.training.engine.build_loop`)."""

    model: HierarchicalClassifier
    net: nn.Module  # the model, or its head on pre-computed features
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    data: DataBundle
    loader: BatchLoader
    tcfg: dict
    seed: int
    env: DistEnv
    amp: torch.dtype | None
    base_lrs: list[float]
    eval_batch_size: int
    forward: nn.Module | None = None  # DDP / compiled wrapper of ``net``, rebuilt when the frozen set changes
    frozen: frozenset[str] | None = None
    features: dict | None = None  # frozen backbone: where its cached features came from (run's features.json)

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.loader))


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seeds augmentation and dropout per step, so resuming mid-epoch replays exactly (no RNG state to carry)."""
    return (seed * 1_000_003 + epoch * 7919 + step * 104_729 + rank * 15_485_863) % (2**31)


def prepare_epoch(loop: Loop, epoch: int) -> None:
    """Freeze schedule, train mode, and the DDP/compiled wrapper over the parameters that train this epoch."""
    tcfg = loop.tcfg
    frozen = frozen_groups(epoch, freeze_schedule(tcfg), set(loop.model.param_groups()))
    apply_freeze(loop.model, frozen | {"backbone"} if loop.data.features else frozen)
    loop.model.train()
    freeze_batchnorm_stats(loop.model, frozen)
    if loop.forward is None or frozenset(frozen) != loop.frozen:
        fwd: nn.Module = loop.net
        if loop.env.enabled:  # DDP registers the parameters that require grad now
            ids = [loop.device.index] if loop.device.type == "cuda" else None
            fwd = DistributedDataParallel(fwd, device_ids=ids, find_unused_parameters=loop.model.ddp_unused_parameters)
        if tcfg["compile"]:
            fwd = torch.compile(fwd)
        loop.forward, loop.frozen = fwd, frozenset(frozen)


def set_lr(loop: Loop, global_step: int) -> None:
    """Each group's learning rate for this step: its base rate times the schedule's factor."""
    for g, base_lr in zip(loop.optimizer.param_groups, loop.base_lrs):
        g["lr"] = base_lr * lr_factor(global_step, loop.steps_per_epoch, loop.tcfg)


def device_batch(loop: Loop, images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as the network sees it: augmented (unless the loader's workers did it), normalised, on the device."""
    images = images.to(loop.device, non_blocking=True)  # the loader already put them there
    if not loop.data.features:
        images = loop.data.normalize(images if loop.data.augmented else loop.augment(images, gen))
        if loop.tcfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(loop.device, non_blocking=True)


def accumulate(loop: Loop, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over ``train.accumulate`` micro-batches (DDP syncs gradients on the last only);
    returns the batch's summed loss and its worst micro-batch loss (inf where one is not finite)."""
    n, parts = len(images), int(loop.tcfg["accumulate"])
    chunks = [(x, y) for x, y in zip(images.tensor_split(parts), targets.tensor_split(parts)) if len(x)]
    total = torch.zeros((), device=loop.device)
    worst = torch.zeros((), device=loop.device)
    for i, (x, y) in enumerate(chunks):
        sync = i == len(chunks) - 1 or not loop.env.enabled
        with contextlib.nullcontext() if sync else loop.forward.no_sync():
            with torch.autocast(loop.device.type, dtype=loop.amp, enabled=loop.amp is not None):
                loss = loop.net.loss(loop.forward(x), y)
            loop.scaler.scale(loss * (len(x) / n)).backward()
        loss = loss.detach().float()
        total += loss * len(x)
        worst = torch.maximum(worst, torch.where(torch.isfinite(loss), loss, torch.inf))
    return total, worst


def optimizer_step(loop: Loop) -> None:
    """One optimizer step through the grad scaler, the gradients clipped first where ``train.grad_clip`` asks."""
    if loop.tcfg["grad_clip"]:
        loop.scaler.unscale_(loop.optimizer)
        nn.utils.clip_grad_norm_(loop.model.parameters(), float(loop.tcfg["grad_clip"]))
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()


def check_window(loop: Loop, window: torch.Tensor, epoch: int, step: int) -> None:
    """Stop a diverging run on every rank together: the worst loss since the last check, over all ranks."""
    worst, max_loss = max_over_ranks(float(window), loop.env), loop.tcfg["max_loss"]
    window.zero_()
    if not math.isfinite(worst) or (max_loss is not None and worst > float(max_loss)):
        check_loss(worst, epoch + 1, step + 1, max_loss, loop.optimizer.param_groups[0]["lr"])
