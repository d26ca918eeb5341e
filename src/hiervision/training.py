"""One training engine for every method, readable top to bottom (in the spirit of torchvision's references).

``train(cfg, out_dir)`` builds data and model from the config, runs the epochs (freeze schedule,
augmentation, mixed precision, progress bar), evaluates on validation after each epoch, writes
``last.pt``/``best.pt`` atomically with ``taxonomy.json`` and ``config.yaml`` beside them, logs
``log.csv`` and finally writes ``metrics.json`` for the test split.

Determinism: data order, augmentation and dropout are seeded from ``(seed, epoch)`` and the
learning rate is a pure function of the step, so resuming from ``last.pt`` after a kill replays
exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hiervision import distributed
from hiervision.checkpoint import load_checkpoint, save_checkpoint
from hiervision.config import ConfigError, check_given_level, dump, merge, validate_config
from hiervision.data import BatchAugment, BatchLoader, DataBundle, FeatureDataset, build_data, iter_batches
from hiervision.data.splits import verify_split_record, write_split_record
from hiervision.decoding import Prediction
from hiervision.distributed import DistEnv, any_flag, barrier, gather_rows, max_over_ranks, shard_indices
from hiervision.evaluation import autocast_dtype, evaluate_split, predict_dataset, select_device
from hiervision.experiment import load_run, run_data, run_model, with_run_statistics
from hiervision.models import HierarchicalClassifier
from hiervision.posthoc import posthoc_report
from hiervision.runfolder import RunFolderError, atomic_write_json, atomic_write_text, claim_run_dir, set_aside
from hiervision.tracking import Tracker, open_tracker

__all__ = ["Preempted", "TrainingError", "train", "train_one_epoch"]

#: each epoch's last training batch is dropped when it holds fewer images than this share of ``train.batch_size``
#: (or than 2): its batch norm statistics would come from a handful of images. Which images it would have held
#: rotates with the shuffle. Seen in a one-off diagnosis (issue 24's note): Fashion-MNIST's seed-2 split left
#: 2 of 128 images, and that one step at lr 0.07 moved BiLT's backbone 12x an ordinary step after the running
#: statistics were taken — val top-1 12 % in eval mode, 86 % with batch statistics; HAFrame collapsed on the
#: same seed (RESULTS.md § comparison)
MIN_LAST_BATCH_FRACTION = 1 / 8


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a finished run asked to resume with other settings, ...)."""


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


# ----------------------------------------------------------------------------- set-up helpers
def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    name, lr, wd = cfg["optimizer"], float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ConfigError(f"train.optimizer must be sgd, adam or adamw, got {name!r}")


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
    groups = model.param_groups()
    frozen_ids = {id(p) for g in frozen for p in groups[g]}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen_ids)


def _freeze_batchnorm_stats(model: nn.Module) -> None:
    # a frozen part must stay frozen: its batch-norm running statistics must not drift either
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


# ----------------------------------------------------------------------------- pre-computed features
class _FeatureHead(nn.Module):
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


@torch.no_grad()
def precompute_features(
    model: HierarchicalClassifier,
    data: DataBundle,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    env: DistEnv | None = None,
) -> DataBundle:
    """Every split's pooled backbone features, computed once (eval mode, no augmentation), so that
    epochs cost only the head — Guo et al.'s RNN trained on extracted CNN features. Under DDP each
    rank computes a shard and every rank gets all of them."""
    if type(model).forward_head is HierarchicalClassifier.forward_head:
        raise ConfigError(f"train.precompute_features: model {type(model).__name__} does not run on one "
                          "backbone's pooled features (it reads stage maps, or runs more than one backbone)")
    model.eval()

    env = env or DistEnv(0, 1, 0, device)

    def run(ds) -> FeatureDataset:
        feats = [torch.zeros(0, model.backbone.num_features)]
        shard = ds.subset(shard_indices(len(ds), env)) if env.enabled else ds
        for images, _ in iter_batches(shard, batch_size):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats.append(model.backbone(data.normalize(images.to(device))).float().cpu())
        return FeatureDataset(gather_rows(torch.cat(feats), len(ds), env).to(device), ds)

    return dataclasses.replace(data, train=run(data.train), val=run(data.val), test=run(data.test), features=True)


# ----------------------------------------------------------------------------- pseudo-labels
def pseudo_label(
    cfg: dict, data: DataBundle, out: Path, resume: bool, env: DistEnv, amp: torch.dtype | None
) -> DataBundle:
    """Guo et al.'s S_fine + S_coarse⁻ (Sec. 4.2): a first run on S_fine alone (in ``out``) predicts the
    full labels of the S_coarse samples, each conditioned on its known coarse label (``predict_given``,
    i.e. CNN-RNN*). Only those samples' labels change; true labels are never overwritten. How many
    pseudo-labels are right (checked against the held-back truth) goes to ``out/pseudo_labels.json``."""
    mask = data.train.coarse_mask
    if data.cfg.get("fine_fraction") is None or not bool(mask.any()):
        raise ConfigError("train.pseudo_labels: needs coarse-only training labels (data.fine_fraction and "
                          "data.coarse_fraction)")
    first = merge(cfg, {"data": {"coarse_labels": "drop"}, "train": {"pseudo_labels": False},
                        "eval": {"given_level": None}})
    train(first, out, resume=resume)
    _, _, model, meta = load_run(out, device=env.device)
    round1 = dataclasses.replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))  # its own statistics
    idx = torch.nonzero(mask).flatten()
    level = int(data.cfg.get("coarse_level", 1))
    pred, _ = predict_dataset(model, round1, data.train.subset(idx), cfg["eval"]["batch_size"], env.device, amp,
                              level, env)
    targets = data.train.targets.clone()
    targets[idx] = pred.nodes.to(targets.device)
    truth = build_data({**data.cfg, "coarse_labels": "oracle"}).train.targets[idx]
    acc = float((targets[idx] == truth).float().mean())
    if env.is_main:
        atomic_write_json(out / "pseudo_labels.json", {"count": len(idx), "level": level, "accuracy": acc})
    note = f"{data.note}; {len(idx)} S_coarse labels pseudo-labelled by {out.name} ({acc:.1%} right)"
    return dataclasses.replace(data, train=data.train.with_targets(targets, mask), note=note)


# ----------------------------------------------------------------------------- preemption
class Preempted(TrainingError):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run stopped; rerunning the command resumes it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """Catches SIGTERM/SIGINT while training, so a cluster's preemption saves a checkpoint instead of losing the epoch.

    The handler only records the signal; the loop looks at :attr:`requested` between steps (all ranks
    together) and stops cleanly. Outside the main thread signals cannot be caught and this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# ----------------------------------------------------------------------------- one epoch
@dataclass
class Progress:
    """Where a run is: ``epoch`` epochs done, ``step`` batches of the next one done (0 at an epoch boundary)."""

    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    history: list[dict] = dataclasses.field(default_factory=list)
    loss_sum: float = 0.0  # of the epoch in progress, for its log row
    seen: int = 0
    seconds: float = 0.0

    def end_epoch(self) -> None:
        self.epoch, self.step, self.loss_sum, self.seen, self.seconds = self.epoch + 1, 0, 0.0, 0, 0.0


@dataclass(kw_only=True)
class Loop:
    """What the steps of every epoch share (built once by :func:`build_loop`)."""

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

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.loader))


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seeds augmentation and dropout per step, so resuming mid-epoch replays exactly (no RNG state to carry)."""
    return (seed * 1_000_003 + epoch * 7919 + step * 104_729 + rank * 15_485_863) % (2**31)


def prepare_epoch(loop: Loop, epoch: int) -> None:
    """Freeze schedule, train mode, and the DDP/compiled wrapper over the parameters that train this epoch."""
    tcfg = loop.tcfg
    frozen = frozen_groups(epoch, tcfg["freeze"], set(loop.model.param_groups()))
    apply_freeze(loop.model, frozen | {"backbone"} if loop.data.features else frozen)
    loop.model.train()
    _freeze_batchnorm_stats(loop.model)
    if loop.forward is None or frozenset(frozen) != loop.frozen:
        fwd: nn.Module = loop.net
        if loop.env.enabled:  # DDP registers the parameters that require grad now
            ids = [loop.device.index] if loop.device.type == "cuda" else None
            fwd = DistributedDataParallel(fwd, device_ids=ids, find_unused_parameters=loop.model.ddp_unused_parameters)
        if tcfg["compile"]:
            fwd = torch.compile(fwd)
        loop.forward, loop.frozen = fwd, frozenset(frozen)


def _set_lr(loop: Loop, global_step: int) -> None:
    for g, base_lr in zip(loop.optimizer.param_groups, loop.base_lrs):
        g["lr"] = base_lr * lr_factor(global_step, loop.steps_per_epoch, loop.tcfg)


def _batch(loop: Loop, images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as the network sees it: augmented (unless the loader's workers did it), normalised, on the device."""
    images = images.to(loop.device, non_blocking=True)  # the loader already put them there
    if not loop.data.features:
        images = loop.data.normalize(images if loop.data.augmented else loop.augment(images, gen))
        if loop.tcfg["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(loop.device, non_blocking=True)


def _accumulate(loop: Loop, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _optimizer_step(loop: Loop) -> None:
    if loop.tcfg["grad_clip"]:
        loop.scaler.unscale_(loop.optimizer)
        nn.utils.clip_grad_norm_(loop.model.parameters(), float(loop.tcfg["grad_clip"]))
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()


def _check_window(loop: Loop, window: torch.Tensor, epoch: int, step: int) -> None:
    """Stop a diverging run on every rank together: the worst loss since the last check, over all ranks."""
    worst, max_loss = max_over_ranks(float(window), loop.env), loop.tcfg["max_loss"]
    window.zero_()
    if not math.isfinite(worst) or (max_loss is not None and worst > float(max_loss)):
        check_loss(worst, epoch + 1, step + 1, max_loss, loop.optimizer.param_groups[0]["lr"])


def _epoch_bar(loop: Loop, progress: Progress, epoch: int, epochs: int) -> tqdm:
    n, env = len(loop.data.train), loop.env
    return tqdm(total=n, initial=min(progress.seen * env.world_size, n), unit="img", unit_scale=True,
                disable=not (loop.tcfg["progress"] and env.is_main), desc=f"epoch {epoch + 1}/{epochs}",
                leave=False, dynamic_ncols=True)


def train_one_epoch(
    loop: Loop, epoch: int, progress: Progress, stop: StopSignal, save: Callable[[], None], epochs: int
) -> bool:
    """Run the batches of ``epoch`` from ``progress.step`` on; False when a signal stopped it (checkpoint saved).

    ``train.batch_size`` is the global batch: each rank gets its slice, split again into
    ``train.accumulate`` micro-batches whose gradients add up before one optimizer step.
    """
    env, every = loop.env, int(loop.tcfg["checkpoint_every"])
    check_every = 1 if loop.device.type == "cpu" else 25  # loss checks read the device: not every step on a GPU
    prepare_epoch(loop, epoch)
    loss_sum = torch.zeros((), device=loop.device)
    window = torch.zeros((), device=loop.device)  # worst loss since the last check
    t0 = time.perf_counter() - progress.seconds
    with _epoch_bar(loop, progress, epoch, epochs) as bar:
        for step, (images, targets) in enumerate(loop.loader.set_epoch(epoch, progress.step), start=progress.step):
            _set_lr(loop, epoch * loop.steps_per_epoch + step)
            torch.manual_seed(_step_seed(loop.seed, epoch, step, env.rank))  # dropout and other torch randomness
            gen = torch.Generator().manual_seed(_step_seed(loop.seed, epoch, step, env.rank))  # augmentation
            images, targets = _batch(loop, images, targets, gen)
            loop.optimizer.zero_grad(set_to_none=True)
            total, worst = _accumulate(loop, images, targets)
            loss_sum += total
            torch.maximum(window, worst, out=window)
            _optimizer_step(loop)
            progress.step, progress.seen = step + 1, progress.seen + len(images)
            bar.update(len(images) * env.world_size)
            if (step + 1) % check_every and progress.step != len(loop.loader):
                continue
            _check_window(loop, window, epoch, step)
            progress.loss_sum += float(loss_sum)
            loss_sum.zero_()
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.3f}")
            progress.seconds = time.perf_counter() - t0
            stopping = any_flag(stop.requested is not None, env)
            if stopping or (every and progress.step % every == 0 and progress.step < len(loop.loader)):
                save()
            if stopping:
                return False
    progress.loss_sum += float(loss_sum)
    progress.seconds = time.perf_counter() - t0
    return True


# ----------------------------------------------------------------------------- the run
def train(
    cfg: dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    max_epochs_this_call: int | None = None,
    force: bool = False,
    allow_changed_data: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one config; returns the test metrics (also written to ``metrics.json``).

    Under ``torchrun`` every rank calls this; rank 0 alone writes the run folder, which it owns
    (:func:`~hiervision.runfolder.claim_run_dir`: absent, empty or a hiervision run unless ``force``;
    locked against a second process). ``max_epochs_this_call`` stops after that many epochs (as a kill
    would, but cleanly): calling again with ``resume=True`` continues from ``last.pt``, refusing when
    the data's splits changed (``allow_changed_data`` to go on). SIGTERM/SIGINT save a mid-epoch
    checkpoint and raise :class:`Preempted`.
    """
    cfg = validate_config(cfg)
    env = distributed.setup(select_device(cfg["train"]["device"]))
    with contextlib.ExitStack() as stack:
        failed: Exception | None = None
        if env.is_main:
            try:
                stack.enter_context(claim_run_dir(out_dir, force))
            except RunFolderError as e:
                failed = e
        if any_flag(failed is not None, env):
            raise failed or TrainingError(f"{out_dir}: rank 0 could not claim the run folder")
        return _train(cfg, Path(out_dir), env, resume, max_epochs_this_call, allow_changed_data)


def _train(cfg: dict, out: Path, env: DistEnv, resume: bool, max_epochs_this_call: int | None,
           allow_changed_data: bool) -> dict[str, Any]:
    tcfg = cfg["train"]
    _configure_backends(tcfg)
    amp = autocast_dtype(tcfg["amp"], env.device)
    tracker = open_tracker(cfg, out, env.is_main)  # train.log_to; a missing library stops here, before any data
    data = build_run_data(cfg, out, resume, env, amp)
    model = build_run_model(cfg, data, env)
    optimizer = build_optimizer(model.parameters(), tcfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them with scheduled values
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp is torch.float16)
    record = data.split_record()
    progress, data = (resume_progress(out, cfg, data, model, optimizer, scaler, allow_changed_data, env) if resume
                      else (Progress(), data))
    loop = build_loop(cfg, model, data, optimizer, scaler, base_lrs, env, amp)
    if env.is_main:
        if progress.epoch == 0 and progress.step == 0:
            set_aside(out)  # a previous run's outputs are moved to previous/, never deleted
        data.taxonomy.save(out / "taxonomy.json")
        atomic_write_text(out / "config.yaml", dump(cfg))
        write_split_record(out / "splits.json", record)
    save = functools.partial(save_run_checkpoint, loop, progress, cfg, out)
    select_key = cfg["eval"]["select"]
    if select_key == "auto":
        select_key = "path_f1" if data.multi_label else "path_accuracy"
    epochs = int(tcfg["epochs"])
    stop_at = epochs if max_epochs_this_call is None else min(epochs, progress.epoch + max_epochs_this_call)
    run_epochs(loop, progress, stop_at, save, select_key, out, tracker)
    if stop_at < epochs:
        return {"stopped_at_epoch": stop_at}
    result = report_on_test(loop, cfg, out, progress, select_key)
    if env.is_main:
        atomic_write_json(out / "metrics.json", result)
    tracker.finish(result)
    barrier(env)
    return result


def _configure_backends(tcfg: dict) -> None:
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    # set both ways: a later run in the same process must not inherit an earlier run's choice
    torch.backends.cudnn.deterministic = bool(tcfg["deterministic"])
    torch.backends.cudnn.benchmark = not tcfg["deterministic"]


def build_run_data(cfg: dict, out: Path, resume: bool, env: DistEnv, amp: torch.dtype | None) -> DataBundle:
    """The run's data (:func:`~hiervision.experiment.run_data`), pseudo-labelled first where the config asks."""
    torch.manual_seed(int(cfg["seed"]))
    data = run_data(cfg)
    check_given_level(cfg["eval"]["given_level"], data.taxonomy, "eval.given_level")
    if cfg["train"]["pseudo_labels"]:
        data = pseudo_label(cfg, data, out / "round1", resume, env, amp)
        torch.manual_seed(int(cfg["seed"]))  # the model starts as it would without the first round
    return data


def build_run_model(cfg: dict, data: DataBundle, env: DistEnv) -> HierarchicalClassifier:
    """The run's model (:func:`~hiervision.experiment.run_model`) on its device, in its memory format."""
    model = run_model(cfg, data.taxonomy, data.meta())
    if cfg["train"]["sync_bn"] and env.enabled:
        if env.device.type != "cuda":
            raise ConfigError("train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only (use it with NCCL)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device)
    return model.to(memory_format=torch.channels_last) if cfg["train"]["channels_last"] else model


def resume_progress(out: Path, cfg: dict, data: DataBundle, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, allow_changed_data: bool, env: DistEnv
                    ) -> tuple[Progress, DataBundle]:
    """Load ``last.pt`` into the model, optimizer and scaler where the run has one; where it stopped, and the
    data with the run's own normalisation (never recomputed, even from changed data)."""
    last = out / "last.pt"
    if not last.exists():
        return Progress(), data
    state = load_checkpoint(last, data.taxonomy)
    if state["config"] != dump(cfg):
        raise TrainingError(f"{out}: holds a run with another config; use a new --out folder or --no-resume")
    change = verify_split_record(out / "splits.json", data.split_record(), allow_changed_data)
    if change and env.is_main:
        print(f"hiervision: warning: {out / 'splits.json'}: {change}", file=sys.stderr)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    progress = Progress(state["epoch"], state.get("step", 0), state["best"], list(state["history"]),
                        **state.get("partial", {}))
    return progress, with_run_statistics(data, state.get("meta", {}))


def build_loop(cfg: dict, model: HierarchicalClassifier, data: DataBundle, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, base_lrs: list[float], env: DistEnv, amp: torch.dtype | None) -> Loop:
    """The epochs' shared state; ``train.precompute_features`` swaps the images for the backbone's features."""
    tcfg, seed, net = cfg["train"], int(cfg["seed"]), model
    if tcfg["precompute_features"]:
        data = precompute_features(model, data, cfg["eval"]["batch_size"], env.device, amp, env)
        net = _FeatureHead(model)
    loader = BatchLoader(data.train, tcfg["batch_size"], shuffle=True, seed=seed, num_workers=tcfg["num_workers"],
                         min_last=max(2, math.ceil(tcfg["batch_size"] * MIN_LAST_BATCH_FRACTION)),
                         device=env.device, rank=env.rank, world_size=env.world_size)
    augment = BatchAugment(**(tcfg["augment"] or {}))
    return Loop(model=model, net=net, optimizer=optimizer, scaler=scaler, augment=augment, data=data, loader=loader,
                tcfg=tcfg, seed=seed, env=env, amp=amp, base_lrs=base_lrs,
                eval_batch_size=int(cfg["eval"]["batch_size"]))


def save_run_checkpoint(loop: Loop, progress: Progress, cfg: dict, out: Path, *names: str) -> None:
    """Rank 0 writes (atomically); every rank waits, so a later read (resume, best.pt for the test) sees the file."""
    if loop.env.is_main:
        state = {
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scaler": loop.scaler.state_dict(),
            "epoch": progress.epoch,
            "step": progress.step,
            "partial": {"loss_sum": progress.loss_sum, "seen": progress.seen, "seconds": progress.seconds},
            "best": progress.best,
            "history": progress.history,
            "config": dump(cfg),
            "taxonomy_fingerprint": loop.data.taxonomy.fingerprint,
            "meta": loop.data.meta(),
            "world_size": loop.env.world_size,
        }
        for name in names:
            save_checkpoint(out / name, state)
    barrier(loop.env)


def run_epochs(loop: Loop, progress: Progress, stop_at: int, save: Callable[..., None], select_key: str,
               out: Path, tracker: Tracker) -> None:
    """Train, validate and checkpoint epoch after epoch up to ``stop_at``; a signal saves and raises Preempted."""
    epochs = int(loop.tcfg["epochs"])
    with StopSignal() as stop:
        while progress.epoch < stop_at:
            epoch = progress.epoch
            if not train_one_epoch(loop, epoch, progress, stop, lambda: save("last.pt"), epochs):
                signum = int(stop.requested or signal.SIGTERM)
                raise Preempted(f"interrupted by {signal.Signals(signum).name} at epoch {epoch + 1}, step "
                                f"{progress.step}; checkpoint saved to {out / 'last.pt'} — run the same command "
                                "again to resume", signum)
            row = validate(loop, epoch, progress, select_key)
            names = ["last.pt"]
            if row["score"] > progress.best:
                progress.best = row["score"]
                names.insert(0, "best.pt")
            progress.history.append(row["log"])
            tracker.log_epoch(row)
            progress.end_epoch()
            save(*names)
            if loop.env.is_main:
                _write_log(out / "log.csv", progress.history)


def _evaluate(loop: Loop, split: str, **kwargs: Any) -> dict[str, Any]:
    return evaluate_split(loop.net, loop.data, split, loop.eval_batch_size, loop.device, loop.amp, env=loop.env,
                          num_workers=loop.tcfg["num_workers"], **kwargs)


def validate(loop: Loop, epoch: int, progress: Progress, select_key: str) -> dict[str, Any]:
    """Validation metrics after an epoch and the log row (multi-label: at the epoch's own best threshold)."""
    env = loop.env
    val = _evaluate(loop, "val", tune_threshold=True) if len(loop.data.val) else {}
    score = val.get(select_key, float(epoch))  # no val split (val_fraction 0): the last epoch is kept
    seen = progress.seen * env.world_size
    log = {
        "epoch": epoch + 1,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "train_loss": progress.loss_sum / max(progress.seen, 1),
        "train_images_per_s": seen / max(progress.seconds, 1e-9),
        **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
    }
    if loop.tcfg["progress"] and env.is_main:
        tqdm.write(f"epoch {epoch + 1}/{loop.tcfg['epochs']}  loss {log['train_loss']:.4f}  "
                   f"val {select_key} {score:.4f}  {log['train_images_per_s']:.0f} img/s")
    return {"score": score, "log": log, "val": val}


def calibrated_report(loop: Loop, out: Path, ecfg: dict) -> dict[str, Any]:
    """Test metrics after the post-hoc decisions fitted on validation (``eval.calibrate``): the temperature
    (set on the model), the hedging multipliers and conformal thresholds (``decisions.json``), and beside
    the calibrated report the ``hedged``, ``calibration`` and ``crm`` entries (see :mod:`hiervision.posthoc`)."""
    data, env, bs, kw = loop.data, loop.env, ecfg["batch_size"], {"num_workers": loop.tcfg["num_workers"]}
    t0 = time.perf_counter()
    test, test_t = predict_dataset(loop.net, data, data.test, bs, loop.device, loop.amp, env=env, **kw)
    seconds = time.perf_counter() - t0
    val, val_t = predict_dataset(loop.net, data, data.val, bs, loop.device, loop.amp, env=env, **kw)
    post = posthoc_report(loop.model, val, val_t, test, test_t, data.taxonomy, out if env.is_main else None,
                          ecfg["hedge_targets"], ecfg["decode"], ecfg["calibrate"] == "per_level")
    return {**post["test"], "eval_images_per_s": len(test_t) / max(seconds, 1e-9),
            **{k: post[k] for k in ("temperature", "calibration", "hedged", "crm")}}


def report_on_test(loop: Loop, cfg: dict, out: Path, progress: Progress, select_key: str) -> dict[str, Any]:
    """Test metrics of ``best.pt``: the configured evaluation mode, the others (e.g. HierNet routing), CNN-RNN*."""
    model, data, env = loop.model, loop.data, loop.env
    report = functools.partial(_evaluate, loop, "test")

    best = load_checkpoint(out / "best.pt", data.taxonomy)
    model.load_state_dict(best["model"])
    ecfg = cfg["eval"]
    if ecfg["calibrate"] and not data.multi_label and len(data.val):
        result = calibrated_report(loop, out, ecfg)
        if env.is_main:  # best.pt carries the fitted temperature, so predict, serve and export apply it
            save_checkpoint(out / "best.pt", {**best, "model": model.state_dict()})
        barrier(env)
    else:
        result = report()
    if data.multi_label:
        result["threshold"] = float(model.threshold)
    mode = getattr(model, "eval_mode", None)
    for other in model.eval_modes:  # e.g. HierNet: routing beside conditional
        if other != mode:
            model.set_eval_mode(other)
            result[other] = report()
    if mode is not None:
        model.set_eval_mode(mode)
    given_level = cfg["eval"]["given_level"]
    if given_level is not None:
        result["given"] = {"level": given_level, **report(given_level=given_level)}
    history = progress.history
    result.update(
        split="test",
        train_images_per_s=sum(r["train_images_per_s"] for r in history) / max(len(history), 1),
        epochs=int(loop.tcfg["epochs"]),
        best_val=progress.best,
        select=select_key,
        device=str(loop.device),
        world_size=env.world_size,
        amp=str(loop.amp).replace("torch.", "") if loop.amp else "none",
        data=data.name,
        data_note=data.note,
        skipped_images=data.skipped,
    )
    return result

def _write_log(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())


