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

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hiervision import metrics as M
from hiervision.checkpoint import load_checkpoint, save_checkpoint
from hiervision.config import ConfigError, dump, load_config, merge
from hiervision.data import BatchAugment, BatchLoader, DataBundle, FeatureDataset, build_data, iter_batches
from hiervision.decoding import Prediction, threshold_paths
from hiervision.models import HierarchicalClassifier, create_model
from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["TrainingError", "evaluate_split", "load_run", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a finished run asked to resume with other settings, ...)."""


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
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


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
) -> tuple[Prediction, torch.Tensor]:
    """Run ``model.predict`` over a dataset; returns the joined prediction and the targets.

    ``given_level``: each image's true ancestor at that depth (its label where the label is
    shallower) is given to ``model.predict_given`` — Guo et al.'s CNN-RNN*.
    """
    model.eval()
    if given_level is not None and data.multi_label:
        raise ConfigError("eval.given_level: not defined for multi-label data (an image has several paths)")
    paths = data.taxonomy.path_matrix
    preds, targets = [], []
    for images, target in iter_batches(dataset, batch_size, shuffle=False):
        images = data.normalize(images.to(device))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if given_level is None:
                preds.append(model.predict(images))
            else:
                given = paths[target, min(given_level, paths.shape[1]) - 1]
                given = torch.where(given == PAD, target, given)
                preds.append(model.predict_given(images, given.to(device)))
        targets.append(target)
    pred = Prediction.cat(preds)
    pred = Prediction(pred.paths.cpu(), pred.scores.float().cpu(), pred.path_prob.float().cpu(),
                      None if pred.labels is None else pred.labels.cpu())
    return pred, torch.cat(targets)


def evaluate_split(
    model,
    data: DataBundle,
    split: str,
    batch_size: int = 512,
    device=None,
    amp=None,
    tune_threshold: bool = False,
    given_level: int | None = None,
) -> dict:
    """Metrics report (see :func:`hiervision.metrics.evaluate`) of a model on one split.

    ``tune_threshold`` (multi-label, validation only): first set the model's decision threshold to
    the one that maximises path F1 on these predictions (Koo et al., Sec. 4.2), then report at it.
    ``given_level``: predict with the true ancestor at that depth given (see :func:`predict_dataset`).
    """
    device = device or next(model.parameters()).device
    dataset = {"train": data.train, "val": data.val, "test": data.test}[split]
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, dataset, batch_size, device, amp, given_level)
    seconds = time.perf_counter() - t0
    if tune_threshold and data.multi_label:
        threshold, _ = M.select_threshold(pred.scores, targets.bool(), data.taxonomy, metric="path_f1")
        model.threshold.fill_(float(threshold))
        pred.labels = threshold_paths(data.taxonomy, pred.scores, float(threshold))
    return {**M.evaluate(pred, targets, data.taxonomy), "eval_images_per_s": len(targets) / max(seconds, 1e-9)}


# ----------------------------------------------------------------------------- pre-computed features
class _FeatureHead(nn.Module):
    """A model that reads only pooled backbone features, driven by pre-computed ones: its head alone."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

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
    model: HierarchicalClassifier, data: DataBundle, batch_size: int, device: torch.device, amp: torch.dtype | None
) -> DataBundle:
    """Every split's pooled backbone features, computed once (eval mode, no augmentation), so that
    epochs cost only the head — Guo et al.'s RNN trained on extracted CNN features."""
    if type(model).forward_head is HierarchicalClassifier.forward_head:
        raise ConfigError(f"train.precompute_features: model {type(model).__name__} reads the backbone's stage "
                          "maps, not its pooled features")
    model.eval()

    def run(ds) -> FeatureDataset:
        feats = [torch.zeros(0, model.backbone.num_features)]
        for images, _ in iter_batches(ds, batch_size):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats.append(model.backbone(data.normalize(images.to(device))).float().cpu())
        return FeatureDataset(torch.cat(feats).to(device), ds)

    return dataclasses.replace(data, train=run(data.train), val=run(data.val), test=run(data.test), features=True)


# ----------------------------------------------------------------------------- pseudo-labels
def pseudo_label(
    cfg: dict, data: DataBundle, out: Path, resume: bool, device: torch.device, amp: torch.dtype | None
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
    _, _, model, meta = load_run(out, device=str(device))
    round1 = dataclasses.replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))  # its own statistics
    idx = torch.nonzero(mask).flatten()
    level = int(data.cfg.get("coarse_level", 1))
    pred, _ = predict_dataset(model, round1, data.train.subset(idx), cfg["eval"]["batch_size"], device, amp, level)
    targets = data.train.targets.clone()
    targets[idx] = pred.nodes.to(targets.device)
    truth = build_data({**data.cfg, "coarse_labels": "oracle"}).train.targets[idx]
    acc = float((targets[idx] == truth).float().mean())
    (out / "pseudo_labels.json").write_text(json.dumps({"count": len(idx), "level": level, "accuracy": acc}),
                                            encoding="utf-8")
    note = f"{data.note}; {len(idx)} S_coarse labels pseudo-labelled by {out.name} ({acc:.1%} right)"
    return dataclasses.replace(data, train=data.train.with_targets(targets, mask), note=note)


# ----------------------------------------------------------------------------- the run
def train(
    cfg: dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    max_epochs_this_call: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one config; returns the test metrics (also written to ``metrics.json``).

    ``max_epochs_this_call`` stops after that many epochs (as a kill would, but cleanly): calling
    again with ``resume=True`` continues from ``last.pt``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg, seed = cfg["train"], int(cfg["seed"])
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    if tcfg["deterministic"]:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    device = select_device(tcfg["device"])
    amp = autocast_dtype(tcfg["amp"], device)

    # --- data and model
    torch.manual_seed(seed)
    data = build_data({**cfg["data"], "split_seed": cfg["data"].get("split_seed", seed)})
    if tcfg["pseudo_labels"]:
        data = pseudo_label(cfg, data, out / "round1", resume, device, amp)
        torch.manual_seed(seed)  # the model starts as it would without the first round
    taxonomy = data.taxonomy
    model_cfg = dict(cfg["model"])
    model = create_model(model_cfg.pop("name"), taxonomy, in_chans=data.in_chans, multi_label=data.multi_label,
                         image_size=data.image_size, **model_cfg).to(device)
    if tcfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), tcfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them with scheduled values
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    augment = BatchAugment(**(tcfg["augment"] or {}))
    groups = set(model.param_groups())
    select_key = cfg["eval"]["select"]
    if select_key == "auto":
        select_key = "path_f1" if data.multi_label else "path_accuracy"

    # --- resume, or start a fresh run folder
    start_epoch, best, history = 0, -math.inf, []
    last = out / "last.pt"
    if resume and last.exists():
        state = load_checkpoint(last, taxonomy)
        if state["config"] != dump(cfg):
            raise TrainingError(f"{out}: holds a run with another config; use a new --out folder or --no-resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, history = state["epoch"], state["best"], list(state["history"])
    else:
        for f in ("last.pt", "best.pt", "log.csv", "metrics.json"):
            (out / f).unlink(missing_ok=True)
    net: nn.Module = model  # what the epochs run: the model on images, or its head on cached features
    if tcfg["precompute_features"]:
        data = precompute_features(model, data, cfg["eval"]["batch_size"], device, amp)
        net = _FeatureHead(model)
    taxonomy.save(out / "taxonomy.json")
    (out / "config.yaml").write_text(dump(cfg), encoding="utf-8")

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best": best,
            "history": history,
            "config": dump(cfg),
            "taxonomy_fingerprint": taxonomy.fingerprint,
            "meta": data.meta(),
        }

    # --- epochs
    epochs = int(tcfg["epochs"])
    loader = BatchLoader(data.train, tcfg["batch_size"], shuffle=True, seed=seed, num_workers=tcfg["num_workers"])
    steps_per_epoch = max(1, math.ceil(len(data.train) / tcfg["batch_size"]))
    stop_at = epochs if max_epochs_this_call is None else min(epochs, start_epoch + max_epochs_this_call)
    for epoch in range(start_epoch, stop_at):
        frozen = frozen_groups(epoch, tcfg["freeze"], groups)
        apply_freeze(model, frozen | {"backbone"} if data.features else frozen)
        model.train()
        _freeze_batchnorm_stats(model)
        torch.manual_seed(_epoch_seed(seed, epoch))  # dropout and any other torch randomness
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))  # augmentation
        total_loss, seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(total=len(data.train), unit="img", unit_scale=True, disable=not tcfg["progress"],
                   desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for step, (images, targets) in enumerate(loader.set_epoch(epoch)):
            global_step = epoch * steps_per_epoch + step
            for g, base_lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base_lr * lr_factor(global_step, steps_per_epoch, tcfg)
            images = images.to(device, non_blocking=True)
            if not data.features:
                images = data.normalize(augment(images, gen))
                if tcfg["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = net.loss(net(images), targets)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingError(
                    f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}): lower train.lr or set train.amp=none"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg["grad_clip"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(images)
            seen += len(images)
            bar.update(len(images))
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        bar.close()
        train_time = time.perf_counter() - t0
        # multi-label: each epoch is judged at its own best threshold, which best.pt then keeps
        val = (evaluate_split(net, data, "val", cfg["eval"]["batch_size"], device, amp, tune_threshold=True)
               if len(data.val) else {})
        score = val.get(select_key, float(epoch))  # no val split (val_fraction 0): the last epoch is kept
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / max(seen, 1),
            "train_images_per_s": seen / train_time,
            **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
        }
        history.append(row)
        _write_log(out / "log.csv", history)
        if tcfg["progress"]:
            tqdm.write(
                f"epoch {epoch + 1}/{epochs}  loss {row['train_loss']:.4f}  "
                f"val {select_key} {score:.4f}  {row['train_images_per_s']:.0f} img/s"
            )
        if score > best:
            best = score
            save_checkpoint(out / "best.pt", checkpoint(epoch + 1))
        save_checkpoint(out / "last.pt", checkpoint(epoch + 1))

    if stop_at < epochs:
        return {"stopped_at_epoch": stop_at}

    # --- final evaluation with the best checkpoint
    model.load_state_dict(load_checkpoint(out / "best.pt", taxonomy)["model"])
    result = evaluate_split(net, data, "test", cfg["eval"]["batch_size"], device, amp)
    if data.multi_label:
        result["threshold"] = float(model.threshold)
    mode = getattr(model, "eval_mode", None)
    for other in model.eval_modes:  # e.g. HierNet: routing beside conditional
        if other != mode:
            model.set_eval_mode(other)
            result[other] = evaluate_split(net, data, "test", cfg["eval"]["batch_size"], device, amp)
    if mode is not None:
        model.set_eval_mode(mode)
    given_level = cfg["eval"]["given_level"]
    if given_level is not None:
        given = evaluate_split(net, data, "test", cfg["eval"]["batch_size"], device, amp, given_level=given_level)
        result["given"] = {"level": given_level, **given}
    result.update(
        split="test",
        train_images_per_s=sum(r["train_images_per_s"] for r in history) / max(len(history), 1),
        epochs=epochs,
        best_val=best,
        select=select_key,
        device=str(device),
        amp=str(amp).replace("torch.", "") if amp else "none",
        data=data.name,
        data_note=data.note,
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _write_log(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loading a finished run
def load_run(run_dir: str | os.PathLike, which: str = "best", device: str = "cpu"):
    """``(cfg, taxonomy, model, meta)`` of a run folder written by :func:`train`."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise TrainingError(f"{run}: not a hiervision run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    state = load_checkpoint(run / f"{which}.pt", taxonomy)
    meta = state.get("meta", {})
    model_cfg = dict(cfg["model"])
    if model_cfg.get("backbone_kwargs"):  # the checkpoint holds the weights: the start file need not exist any more
        model_cfg["backbone_kwargs"] = {k: v for k, v in model_cfg["backbone_kwargs"].items() if k != "pretrained_path"}
    model = create_model(model_cfg.pop("name"), taxonomy, in_chans=meta.get("in_chans", 3),
                         multi_label=meta.get("multi_label", False), image_size=meta.get("image_size", 32),
                         **model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise TrainingError(f"{run / (which + '.pt')}: weights do not fit the configured model ({first})") from None
    return cfg, taxonomy, model.to(device).eval(), meta
