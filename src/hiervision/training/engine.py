"""One training engine for every method, readable top to bottom (in the spirit of torchvision's references).

``train(cfg, out_dir)`` builds data and model from the config, runs the epochs (freeze schedule,
augmentation, mixed precision, progress bar), evaluates on validation after each epoch, writes
``last.pt``/``best.pt`` atomically with ``taxonomy.json`` and ``config.yaml`` beside them, logs
``log.csv`` and finally writes ``metrics.json`` for the test split. A frozen backbone
(``train.freeze_backbone``/``train.precompute_features``) trains the head on cached features and records
which in ``features.json``; ``train.backbone_lr_scale`` and ``train.unfreeze_after`` fine-tune it instead.

Determinism: data order, augmentation and dropout are seeded from ``(seed, epoch)`` and the
learning rate is a pure function of the step, so resuming from ``last.pt`` after a kill replays
exactly what an uninterrupted run would have done.

The engine trains one run. Protocols made of several runs (Guo et al.'s pseudo-labels) live above it in
:mod:`hiervision.training.protocols` and hand it their data through :func:`run_training`.
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
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from hiervision import distributed
from hiervision.checkpoint import load_checkpoint, save_checkpoint
from hiervision.config import ConfigError, check_given_level, dump, validate_config
from hiervision.data import BatchAugment, BatchLoader, DataBundle, untrained_classes
from hiervision.data.splits import verify_split_record, write_split_record
from hiervision.distributed import DistEnv, any_flag, autocast_dtype, barrier, select_device
from hiervision.evaluation import evaluate_split, predict_dataset
from hiervision.experiment import run_data, run_model, with_run_statistics
from hiervision.models import HierarchicalClassifier
from hiervision.models.registry import check_model_keys
from hiervision.posthoc import posthoc_report
from hiervision.runfolder import RunFolderError, atomic_write_json, atomic_write_text, claim_run_dir, set_aside
from hiervision.tracking import Tracker, open_tracker
from hiervision.training.budget import Planner
from hiervision.training.features import FeatureHead, cached_features, feature_cache_root
from hiervision.training.signals import Preempted, StopSignal
from hiervision.training.steps import (
    Loop,
    TrainingError,
    accumulate,
    build_optimizer,
    check_backbone_options,
    check_window,
    device_batch,
    frozen_backbone_key,
    optimizer_params,
    optimizer_step,
    prepare_epoch,
    set_lr,
    step_seed,
)

__all__ = [
    "MIN_LAST_BATCH_FRACTION",
    "Progress",
    "build_loop",
    "build_run_data",
    "build_run_model",
    "calibrated_report",
    "claimed_run_dir",
    "configure_backends",
    "report_on_test",
    "resume_progress",
    "run_epochs",
    "run_training",
    "save_run_checkpoint",
    "train",
    "train_one_epoch",
    "validate",
]

#: each epoch's last training batch is dropped when it holds fewer images than this share of ``train.batch_size``
#: (or than 2): its batch norm statistics would come from a handful of images. Which images it would have held
#: rotates with the shuffle. Seen in a one-off diagnosis (issue 24's note): Fashion-MNIST's seed-2 split left
#: 2 of 128 images, and that one step at lr 0.07 moved BiLT's backbone 12x an ordinary step after the running
#: statistics were taken — val top-1 12 % in eval mode, 86 % with batch statistics; HAFrame collapsed on the
#: same seed (RESULTS.md § comparison)
MIN_LAST_BATCH_FRACTION = 1 / 8


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
    checkpoint and raise :class:`~hiervision.training.signals.Preempted`.
    """
    cfg = validate_config(cfg)
    env = distributed.setup(select_device(cfg["train"]["device"]))
    with claimed_run_dir(out_dir, force, env):
        return run_training(cfg, Path(out_dir), env, resume, max_epochs_this_call, allow_changed_data)


@contextlib.contextmanager
def claimed_run_dir(out_dir: str | os.PathLike, force: bool, env: DistEnv) -> Iterator[None]:
    """Rank 0 owns ``out_dir`` for the block; when it cannot, every rank stops together (no rank waits forever)."""
    with contextlib.ExitStack() as stack:
        failed: Exception | None = None
        if env.is_main:
            try:
                stack.enter_context(claim_run_dir(out_dir, force))
            except RunFolderError as e:
                failed = e
        if any_flag(failed is not None, env):
            raise failed or TrainingError(f"{out_dir}: rank 0 could not claim the run folder")
        yield


def run_training(cfg: dict, out: Path, env: DistEnv, resume: bool, max_epochs_this_call: int | None,
                 allow_changed_data: bool, data: DataBundle | None = None) -> dict[str, Any]:
    """Train in a run folder already claimed; ``data`` is what a protocol prepared (else the config's own)."""
    tcfg = cfg["train"]
    if tcfg["pseudo_labels"] and data is None:
        raise ConfigError("train.pseudo_labels: a protocol of two runs; train it with hiervision.training.train")
    check_backbone_options(tcfg)
    check_model_keys(cfg["model"])  # a key the head does not take fails now, not after the data is read
    configure_backends(tcfg)
    amp = autocast_dtype(tcfg["amp"], env.device)
    tracker = open_tracker(cfg, out, env.is_main)  # train.log_to; a missing library stops here, before any data
    data = build_run_data(cfg, data)
    untrained = untrained_classes(data)
    if untrained and env.is_main:
        shown = ", ".join(untrained[:5]) + (f" and {len(untrained) - 5} more" if len(untrained) > 5 else "")
        print(f"hiervision: warning: {len(untrained)} of {len(data.taxonomy.leaves)} classes have no training image "
              f"after the split, so the model cannot learn them: {shown}", file=sys.stderr)
    model = build_run_model(cfg, data, env)
    optimizer = build_optimizer(optimizer_params(model, tcfg), tcfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them with scheduled values
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp is torch.float16)
    record = data.split_record()
    progress, data = (resume_progress(out, cfg, data, model, optimizer, scaler, allow_changed_data, env) if resume
                      else (Progress(), data))
    if tcfg.get("init_from") and progress.epoch == 0 and progress.step == 0:  # hiervision extend; a resume has its own
        from hiervision.extend import init_from_run

        grown = init_from_run(model, tcfg["init_from"], data, env.device)
        data = dataclasses.replace(data, note=data.note + f"; started from {grown['parent']} "
                                   f"({grown['known_classes']} known classes, {grown['new_classes']} imprinted)")
    loop = build_loop(cfg, model, data, optimizer, scaler, base_lrs, env, amp)
    if env.is_main:
        if progress.epoch == 0 and progress.step == 0:
            set_aside(out)  # a previous run's outputs are moved to previous/, never deleted
        data.taxonomy.save(out / "taxonomy.json")
        atomic_write_text(out / "config.yaml", dump(cfg))
        write_split_record(out / "splits.json", record)
        _record_features(out, loop.features)
    save = functools.partial(save_run_checkpoint, loop, progress, cfg, out)
    select_key = cfg["eval"]["select"]
    if select_key == "auto":
        select_key = "path_f1" if data.multi_label else "path_accuracy"
    epochs = int(tcfg["epochs"])
    stop_at = epochs if max_epochs_this_call is None else min(epochs, progress.epoch + max_epochs_this_call)
    planner = Planner(tcfg, len(data.train), len(data.val), progress.epoch)  # may plan fewer epochs (--time)
    run_epochs(loop, progress, stop_at, save, select_key, out, tracker, planner)
    if min(stop_at, int(tcfg["epochs"])) < int(tcfg["epochs"]):
        return {"stopped_at_epoch": stop_at}
    result = report_on_test(loop, cfg, out, progress, select_key)
    if env.is_main:
        atomic_write_json(out / "metrics.json", result)
    tracker.finish(result)
    barrier(env)
    return result


def _record_features(out: Path, features: dict | None) -> None:
    """``features.json``: which cached features this call trained on and whether it computed them; none in a
    folder reused by a run that trains its backbone (no record of features it did not use)."""
    if features is not None:
        atomic_write_json(out / "features.json", features)
    else:
        (out / "features.json").unlink(missing_ok=True)


def configure_backends(tcfg: dict) -> None:
    """Threads and cuDNN as ``train`` says, set both ways: a later run in the same process must not inherit
    an earlier run's choice."""
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    torch.backends.cudnn.deterministic = bool(tcfg["deterministic"])
    torch.backends.cudnn.benchmark = not tcfg["deterministic"]


# ----------------------------------------------------------------------------- set-up
def build_run_data(cfg: dict, data: DataBundle | None = None) -> DataBundle:
    """The run's data (:func:`~hiervision.experiment.run_data`) unless given; either way the global seed is
    set here, so the model starts the same whatever ran before (e.g. a protocol's first round)."""
    torch.manual_seed(int(cfg["seed"]))
    data = run_data(cfg) if data is None else data
    check_given_level(cfg["eval"]["given_level"], data.taxonomy, "eval.given_level")
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


def resume_progress(out: Path, cfg: dict, data: DataBundle, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, allow_changed_data: bool, env: DistEnv
                    ) -> tuple[Progress, DataBundle]:
    """Load ``last.pt`` into the model, optimizer and scaler where the run has one; where it stopped, and the
    data with the run's own normalisation (never recomputed, even from changed data)."""
    last = out / "last.pt"
    if not last.exists():
        return Progress(), data
    state = load_checkpoint(last, data.taxonomy)
    if _unscheduled(yaml.safe_load(state["config"])) != _unscheduled(cfg):  # epochs and budget may change
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


def _unscheduled(cfg: dict) -> str:
    """The config without what only plans the schedule (``train.epochs``, ``train.time_budget``): a resumed run
    may change those — the learning rate is a function of the step and the epochs, so the rest of the run is
    re-planned and the work done is kept."""
    return dump({**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in ("epochs", "time_budget")}})


def build_loop(cfg: dict, model: HierarchicalClassifier, data: DataBundle, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, base_lrs: list[float], env: DistEnv, amp: torch.dtype | None) -> Loop:
    """The epochs' shared state; a frozen backbone (``train.freeze_backbone`` or ``train.precompute_features``)
    swaps the images for its cached features (:func:`~hiervision.training.features.cached_features`)."""
    tcfg, seed, net, record = cfg["train"], int(cfg["seed"]), model, None
    key = frozen_backbone_key(tcfg)
    if key is not None:
        data, record = cached_features(model, data, cfg["eval"]["batch_size"], env.device, amp, env,
                                       cache=feature_cache_root(tcfg), model_cfg=cfg["model"], key=key,
                                       progress=tcfg["progress"])
        net = FeatureHead(model)
    loader = BatchLoader(data.train, tcfg["batch_size"], shuffle=True, seed=seed, num_workers=tcfg["num_workers"],
                         min_last=max(2, math.ceil(tcfg["batch_size"] * MIN_LAST_BATCH_FRACTION)),
                         device=env.device, rank=env.rank, world_size=env.world_size)
    augment = BatchAugment(**(tcfg["augment"] or {}))
    return Loop(model=model, net=net, optimizer=optimizer, scaler=scaler, augment=augment, data=data, loader=loader,
                tcfg=tcfg, seed=seed, env=env, amp=amp, base_lrs=base_lrs,
                eval_batch_size=int(cfg["eval"]["batch_size"]), features=record)


# ----------------------------------------------------------------------------- the epochs
def run_epochs(loop: Loop, progress: Progress, stop_at: int, save: Callable[..., None], select_key: str,
               out: Path, tracker: Tracker, planner: Planner) -> None:
    """Train, validate and checkpoint epoch after epoch up to ``stop_at`` (or the epochs ``planner`` found to
    fit the time budget); a signal saves and raises Preempted."""
    with StopSignal() as stop:
        while progress.epoch < min(stop_at, int(loop.tcfg["epochs"])):
            epoch, started = progress.epoch, time.monotonic()
            if not train_one_epoch(loop, epoch, progress, stop, lambda: save("last.pt"), planner):
                signum = int(stop.requested or signal.SIGTERM)
                raise Preempted(f"interrupted by {signal.Signals(signum).name} at epoch {epoch + 1}, step "
                                f"{progress.step}; checkpoint saved to {out / 'last.pt'} — run the same command "
                                "again to resume", signum)
            row = validate(loop, epoch, progress, select_key)
            said = planner.after_epoch(time.monotonic() - started)
            if said and loop.env.is_main and (loop.tcfg["progress"] or loop.tcfg.get("time_budget")):
                tqdm.write(said)
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


def train_one_epoch(
    loop: Loop, epoch: int, progress: Progress, stop: StopSignal, save: Callable[[], None], planner: Planner
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
    with _epoch_bar(loop, progress, epoch, int(loop.tcfg["epochs"])) as bar:
        for step, (images, targets) in enumerate(loop.loader.set_epoch(epoch, progress.step), start=progress.step):
            set_lr(loop, epoch * loop.steps_per_epoch + step)
            torch.manual_seed(step_seed(loop.seed, epoch, step, env.rank))  # dropout and other torch randomness
            gen = torch.Generator().manual_seed(step_seed(loop.seed, epoch, step, env.rank))  # augmentation
            images, targets = device_batch(loop, images, targets, gen)
            loop.optimizer.zero_grad(set_to_none=True)
            total, worst = accumulate(loop, images, targets)
            loss_sum += total
            torch.maximum(window, worst, out=window)
            optimizer_step(loop)
            progress.step, progress.seen = step + 1, progress.seen + len(images)
            bar.update(len(images) * env.world_size)
            said = planner.after_step(len(images) * env.world_size)
            if said and env.is_main and (loop.tcfg["progress"] or loop.tcfg.get("time_budget")):
                tqdm.write(said)
            if (step + 1) % check_every and progress.step != len(loop.loader):
                continue
            check_window(loop, window, epoch, step)
            progress.loss_sum += float(loss_sum)
            loss_sum.zero_()
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.3f}",
                            run_left=planner.left(epoch, progress.step / loop.steps_per_epoch) or "…")
            progress.seconds = time.perf_counter() - t0
            stopping = any_flag(stop.requested is not None, env)
            if stopping or (every and progress.step % every == 0 and progress.step < len(loop.loader)):
                save()
            if stopping:
                return False
    progress.loss_sum += float(loss_sum)
    progress.seconds = time.perf_counter() - t0
    return True


def _epoch_bar(loop: Loop, progress: Progress, epoch: int, epochs: int) -> tqdm:
    n, env = len(loop.data.train), loop.env
    return tqdm(total=n, initial=min(progress.seen * env.world_size, n), unit="img", unit_scale=True,
                disable=not (loop.tcfg["progress"] and env.is_main), desc=f"epoch {epoch + 1}/{epochs}",
                leave=False, dynamic_ncols=True)


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


def _evaluate(loop: Loop, split: str, **kwargs: Any) -> dict[str, Any]:
    return evaluate_split(loop.net, loop.data, split, loop.eval_batch_size, loop.device, loop.amp, env=loop.env,
                          num_workers=loop.tcfg["num_workers"], **kwargs)


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


def _write_log(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, text.getvalue())


# ----------------------------------------------------------------------------- the test report
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
        # the median epoch: one epoch slowed by a suspended process or a busy neighbour does not move it
        train_images_per_s=statistics.median(r["train_images_per_s"] for r in history) if history else 0.0,
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
                          ecfg["hedge_targets"], ecfg["decode"], ecfg["calibrate"] == "per_level", data.novel,
                          progress=bool(loop.tcfg["progress"]) and env.is_main)
    return {**post["test"], "eval_images_per_s": len(test_t) / max(seconds, 1e-9),
            **{k: post[k] for k in ("temperature", "calibration", "hedged", "crm", "selective", "open_world")
               if k in post}}
