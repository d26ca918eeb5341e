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
from hiervision import metrics as M
from hiervision.checkpoint import load_checkpoint, save_checkpoint
from hiervision.config import ConfigError, check_given_level, dump, merge, validate_config
from hiervision.data import BatchAugment, BatchLoader, DataBundle, FeatureDataset, build_data, iter_batches
from hiervision.data.splits import verify_split_record, write_split_record
from hiervision.decoding import Prediction, threshold_paths
from hiervision.distributed import DistEnv, any_flag, barrier, gather_rows, max_over_ranks, shard_indices
from hiervision.experiment import load_run, run_data, run_model, with_run_statistics
from hiervision.models import HierarchicalClassifier
from hiervision.runfolder import RunFolderError, atomic_write_json, atomic_write_text, claim_run_dir, set_aside
from hiervision.taxonomy import PAD

__all__ = ["Preempted", "TrainingError", "evaluate_split", "load_run", "train", "train_one_epoch"]


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
def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware computes it natively (recent CPUs, Ampere+ GPUs), else fp32."""
    if setting == "none":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if setting != "auto":
        raise ConfigError(f"train.amp must be auto, bf16, fp16 or none, got {setting!r}")
    if device.type == "cuda":  # native bf16 from Ampere (sm 8.0) on; emulated bf16 (V100, T4) is slow: fp16 there
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None


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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    data: DataBundle,
    dataset,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    given_level: int | None = None,
    env: DistEnv | None = None,
    num_workers: int = 0,
) -> tuple[Prediction, torch.Tensor]:
    """Run ``model.predict`` over a dataset; returns the joined prediction and the targets (on the CPU).

    ``given_level``: each image's true ancestor at that depth (its label where the label is
    shallower) is given to ``model.predict_given`` — Guo et al.'s CNN-RNN*. Under DDP (``env``)
    each rank predicts its shard and every rank gets the whole, in dataset order.
    """
    model.eval()
    if given_level is not None and data.multi_label:
        raise ConfigError("eval.given_level: not defined for multi-label data (an image has several paths)")
    env = env or DistEnv(0, 1, 0, device)
    n = len(dataset)
    shard = dataset.subset(shard_indices(n, env)) if env.enabled else dataset
    paths = data.taxonomy.path_matrix
    preds, targets = [], []
    for images, target in iter_batches(shard, batch_size, shuffle=False, num_workers=num_workers, device=device):
        images = data.normalize(images)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if given_level is None:
                preds.append(model.predict(images))
            else:
                given = paths[target, min(given_level, paths.shape[1]) - 1]
                given = torch.where(given == PAD, target, given)
                preds.append(model.predict_given(images, given.to(device)))
        targets.append(target)
    pred = Prediction.cat(preds) if preds else model.predict(torch.zeros(0, *dataset[0][0].shape, device=device))
    target = torch.cat(targets) if targets else dataset.targets[:0]
    parts = [pred.paths, pred.scores.float(), pred.path_prob.float(), target]
    if pred.labels is not None:
        parts.append(pred.labels)
    parts = [gather_rows(t.cpu(), n, env) for t in parts]
    return Prediction(*parts[:3], parts[4] if len(parts) > 4 else None), parts[3]


def evaluate_split(
    model,
    data: DataBundle,
    split: str,
    batch_size: int = 512,
    device=None,
    amp=None,
    tune_threshold: bool = False,
    given_level: int | None = None,
    env: DistEnv | None = None,
    num_workers: int = 0,
    return_prediction: bool = False,
) -> dict | tuple[dict, Prediction, torch.Tensor]:
    """Metrics report (see :func:`hiervision.metrics.evaluate`) of a model on one split
    (``return_prediction``: ``(report, prediction, targets)``, e.g. for plots of the same predictions).

    ``tune_threshold`` (multi-label, validation only): first set the model's decision threshold to
    the one that maximises path F1 on these predictions (Koo et al., Sec. 4.2), then report at it.
    ``given_level``: predict with the true ancestor at that depth given (see :func:`predict_dataset`).
    """
    device = device or next(model.parameters()).device
    dataset = {"train": data.train, "val": data.val, "test": data.test}[split]
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, dataset, batch_size, device, amp, given_level, env, num_workers)
    seconds = time.perf_counter() - t0
    if tune_threshold and data.multi_label:
        threshold, _ = M.select_threshold(pred.scores, targets.bool(), data.taxonomy, metric="path_f1")
        model.threshold.fill_(float(threshold))
        pred.labels = threshold_paths(data.taxonomy, pred.scores, float(threshold))
    report = {**M.evaluate(pred, targets, data.taxonomy), "eval_images_per_s": len(targets) / max(seconds, 1e-9)}
    return (report, pred, targets) if return_prediction else report


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
        raise ConfigError(f"train.precompute_features: model {type(model).__name__} reads the backbone's stage "
                          "maps, not its pooled features")
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


@dataclass
class Loop:
    """What the steps of every epoch share (built once by :func:`train`)."""

    model: HierarchicalClassifier
    net: nn.Module  # the model, or its head on pre-computed features
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    data: DataBundle
    loader: BatchLoader
    tcfg: dict
    seed: int
    device: torch.device
    amp: torch.dtype | None
    env: DistEnv
    base_lrs: list[float]
    steps_per_epoch: int
    forward: nn.Module | None = None  # DDP / compiled wrapper of ``net``, rebuilt when the frozen set changes
    frozen: frozenset[str] | None = None


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


def train_one_epoch(
    loop: Loop, epoch: int, progress: Progress, stop: StopSignal, save: Callable[[], None], epochs: int
) -> bool:
    """Run the batches of ``epoch`` from ``progress.step`` on; False when a signal stopped it (checkpoint saved).

    ``train.batch_size`` is the global batch: each rank gets its slice, split again into
    ``train.accumulate`` micro-batches whose gradients add up before one optimizer step.
    """
    tcfg, env, device = loop.tcfg, loop.env, loop.device
    prepare_epoch(loop, epoch)
    loader = loop.loader.set_epoch(epoch, progress.step)
    accumulate, every = int(tcfg["accumulate"]), int(tcfg["checkpoint_every"])
    check_every = 1 if device.type == "cpu" else 25  # loss checks read the device: not every step on a GPU
    max_loss = tcfg["max_loss"]
    loss_sum = torch.zeros((), device=device)
    window = torch.zeros((), device=device)  # worst loss since the last check
    bar = tqdm(total=len(loop.data.train), initial=min(progress.seen * env.world_size, len(loop.data.train)),
               unit="img", unit_scale=True, disable=not (tcfg["progress"] and env.is_main),
               desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter() - progress.seconds
    for step, (images, targets) in enumerate(loader, start=progress.step):
        global_step = epoch * loop.steps_per_epoch + step
        for g, base_lr in zip(loop.optimizer.param_groups, loop.base_lrs):
            g["lr"] = base_lr * lr_factor(global_step, loop.steps_per_epoch, tcfg)
        torch.manual_seed(_step_seed(loop.seed, epoch, step, env.rank))  # dropout and other torch randomness
        gen = torch.Generator().manual_seed(_step_seed(loop.seed, epoch, step, env.rank))  # augmentation
        images = images.to(device, non_blocking=True)  # the loader already put them there
        if not loop.data.features:
            # lazy sets with a per-image pipeline were augmented in the loader's workers
            images = loop.data.normalize(images if loop.data.augmented else loop.augment(images, gen))
            if tcfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        loop.optimizer.zero_grad(set_to_none=True)
        n = len(images)
        chunks = list(zip(images.tensor_split(accumulate), targets.tensor_split(accumulate)))
        chunks = [(x, y) for x, y in chunks if len(x)]
        for i, (x, y) in enumerate(chunks):
            sync = i == len(chunks) - 1 or not env.enabled
            with (contextlib.nullcontext() if sync else loop.forward.no_sync()):
                with torch.autocast(device.type, dtype=loop.amp, enabled=loop.amp is not None):
                    loss = loop.net.loss(loop.forward(x), y)
                loop.scaler.scale(loss * (len(x) / n)).backward()
            loss = loss.detach().float()
            loss_sum += loss * len(x)
            window = torch.maximum(window, torch.where(torch.isfinite(loss), loss, torch.inf))
        if tcfg["grad_clip"]:
            loop.scaler.unscale_(loop.optimizer)
            nn.utils.clip_grad_norm_(loop.model.parameters(), float(tcfg["grad_clip"]))
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        progress.step, progress.seen = step + 1, progress.seen + n
        bar.update(n * env.world_size)
        if (step + 1) % check_every == 0 or progress.step == len(loop.loader):
            worst = max_over_ranks(float(window), env)  # every rank stops together, or none does
            window.zero_()
            if not math.isfinite(worst) or (max_loss is not None and worst > float(max_loss)):
                bar.close()
                check_loss(worst, epoch + 1, step + 1, max_loss, loop.optimizer.param_groups[0]["lr"])
            progress.loss_sum += float(loss_sum)
            loss_sum.zero_()
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.3f}")
            progress.seconds = time.perf_counter() - t0
            stopping = any_flag(stop.requested is not None, env)
            if stopping or (every and progress.step % every == 0 and progress.step < len(loop.loader)):
                save()
            if stopping:
                bar.close()
                return False
    bar.close()
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
    tcfg, seed = cfg["train"], int(cfg["seed"])
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    # set both ways: a later run in the same process must not inherit an earlier run's choice
    torch.backends.cudnn.deterministic = bool(tcfg["deterministic"])
    torch.backends.cudnn.benchmark = not tcfg["deterministic"]
    device = env.device
    amp = autocast_dtype(tcfg["amp"], device)

    # --- data and model
    torch.manual_seed(seed)
    data = run_data(cfg)
    check_given_level(cfg["eval"]["given_level"], data.taxonomy, "eval.given_level")
    if tcfg["pseudo_labels"]:
        data = pseudo_label(cfg, data, out / "round1", resume, env, amp)
        torch.manual_seed(seed)  # the model starts as it would without the first round
    taxonomy = data.taxonomy
    model = run_model(cfg, taxonomy, data.meta())
    if tcfg["sync_bn"] and env.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only (use it with NCCL)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if tcfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), tcfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them with scheduled values
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    select_key = cfg["eval"]["select"]
    if select_key == "auto":
        select_key = "path_f1" if data.multi_label else "path_accuracy"

    # --- resume, or start a fresh run (a previous run's outputs are moved to previous/, never deleted)
    progress = Progress()
    last = out / "last.pt"
    record = data.split_record()
    if resume and last.exists():
        state = load_checkpoint(last, taxonomy)
        if state["config"] != dump(cfg):
            raise TrainingError(f"{out}: holds a run with another config; use a new --out folder or --no-resume")
        change = verify_split_record(out / "splits.json", record, allow_changed_data)
        if change and env.is_main:
            print(f"hiervision: warning: {out / 'splits.json'}: {change}", file=sys.stderr)
        data = with_run_statistics(data, state.get("meta", {}))  # the run's normalisation, even if data changed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        progress = Progress(state["epoch"], state.get("step", 0), state["best"], list(state["history"]),
                            **state.get("partial", {}))
    net: nn.Module = model  # what the epochs run: the model on images, or its head on cached features
    if tcfg["precompute_features"]:
        data = precompute_features(model, data, cfg["eval"]["batch_size"], device, amp, env)
        net = _FeatureHead(model)
    if env.is_main:
        if progress.epoch == 0 and progress.step == 0:
            set_aside(out)
        taxonomy.save(out / "taxonomy.json")
        atomic_write_text(out / "config.yaml", dump(cfg))
        write_split_record(out / "splits.json", record)

    def save_checkpoint_as(*names: str) -> None:
        """Rank 0 writes; every rank waits, so a later read (resume, best.pt for the test) sees the file."""
        if env.is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": progress.epoch,
                "step": progress.step,
                "partial": {"loss_sum": progress.loss_sum, "seen": progress.seen, "seconds": progress.seconds},
                "best": progress.best,
                "history": progress.history,
                "config": dump(cfg),
                "taxonomy_fingerprint": taxonomy.fingerprint,
                "meta": data.meta(),
                "world_size": env.world_size,
            }
            for name in names:
                save_checkpoint(out / name, state)
        barrier(env)

    # --- epochs
    epochs = int(tcfg["epochs"])
    loop = Loop(
        model, net, optimizer, scaler, BatchAugment(**(tcfg["augment"] or {})), data,
        BatchLoader(data.train, tcfg["batch_size"], shuffle=True, seed=seed, num_workers=tcfg["num_workers"],
                    device=device, rank=env.rank, world_size=env.world_size),
        tcfg, seed, device, amp, env, base_lrs, 1,
    )
    loop.steps_per_epoch = max(1, len(loop.loader))
    stop_at = epochs if max_epochs_this_call is None else min(epochs, progress.epoch + max_epochs_this_call)
    with StopSignal() as stop:
        while progress.epoch < stop_at:
            epoch = progress.epoch
            if not train_one_epoch(loop, epoch, progress, stop, lambda: save_checkpoint_as("last.pt"), epochs):
                signum = int(stop.requested or signal.SIGTERM)
                raise Preempted(f"interrupted by {signal.Signals(signum).name} at epoch {epoch + 1}, step "
                                f"{progress.step}; checkpoint saved to {last} — run the same command again to resume",
                                signum)
            row = validate(loop, epoch, progress, select_key, cfg["eval"]["batch_size"])
            names = ["last.pt"]
            if row["score"] > progress.best:
                progress.best = row["score"]
                names.insert(0, "best.pt")
            progress.history.append(row["log"])
            progress.end_epoch()
            save_checkpoint_as(*names)
            if env.is_main:
                _write_log(out / "log.csv", progress.history)
    if stop_at < epochs:
        return {"stopped_at_epoch": stop_at}
    result = test_report(loop, cfg, out, progress, select_key)
    if env.is_main:
        atomic_write_json(out / "metrics.json", result)
    barrier(env)
    return result


def validate(loop: Loop, epoch: int, progress: Progress, select_key: str, batch_size: int) -> dict[str, Any]:
    """Validation metrics after an epoch and the log row (multi-label: at the epoch's own best threshold)."""
    data, env = loop.data, loop.env
    val = (evaluate_split(loop.net, data, "val", batch_size, loop.device, loop.amp, tune_threshold=True, env=env,
                          num_workers=loop.tcfg["num_workers"]) if len(data.val) else {})
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
    return {"score": score, "log": log}


def calibrated_report(loop: Loop, out: Path, ecfg: dict) -> dict[str, Any]:
    """Test metrics after the post-hoc decisions fitted on validation (``eval.calibrate``): the temperature
    (set on the model), the hedging multipliers and conformal thresholds (``decisions.json``), and beside
    the calibrated report the ``hedged``, ``calibration`` and ``crm`` entries (see :mod:`hiervision.posthoc`)."""
    from hiervision.posthoc import posthoc_report  # a layer on top of the core, used here once

    data, env, bs, kw = loop.data, loop.env, ecfg["batch_size"], {"num_workers": loop.tcfg["num_workers"]}
    t0 = time.perf_counter()
    test, test_t = predict_dataset(loop.net, data, data.test, bs, loop.device, loop.amp, env=env, **kw)
    seconds = time.perf_counter() - t0
    val, val_t = predict_dataset(loop.net, data, data.val, bs, loop.device, loop.amp, env=env, **kw)
    post = posthoc_report(loop.model, val, val_t, test, test_t, data.taxonomy, out if env.is_main else None,
                          ecfg["hedge_targets"], ecfg["decode"], ecfg["calibrate"] == "per_level")
    return {**post["test"], "eval_images_per_s": len(test_t) / max(seconds, 1e-9),
            **{k: post[k] for k in ("temperature", "calibration", "hedged", "crm")}}


def test_report(loop: Loop, cfg: dict, out: Path, progress: Progress, select_key: str) -> dict[str, Any]:
    """Test metrics of ``best.pt``: the configured evaluation mode, the others (e.g. HierNet routing), CNN-RNN*."""
    model, data, env, bs = loop.model, loop.data, loop.env, cfg["eval"]["batch_size"]

    def report(**kw) -> dict[str, Any]:
        return evaluate_split(loop.net, data, "test", bs, loop.device, loop.amp, env=env,
                              num_workers=loop.tcfg["num_workers"], **kw)

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


