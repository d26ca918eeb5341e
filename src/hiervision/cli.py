"""Command line: ``hiervision train|evaluate|predict|taxonomy|induce|demo``; a thin layer over the Python API.

Every user error ends in one line on stderr and a non-zero exit code; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hiervision.checkpoint import CheckpointError
from hiervision.config import ConfigError, load_config, merge
from hiervision.taxonomy import Taxonomy, TaxonomyError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
USER_ERRORS = (ConfigError, TaxonomyError, CheckpointError, FileNotFoundError, ValueError, OSError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from hiervision.training import TrainingError

    return (*USER_ERRORS, TrainingError)


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from hiervision.training import train

    cfg = load_config(args.config, args.set)
    if args.quiet:
        cfg["train"]["progress"] = False
    result = train(cfg, args.out, resume=not args.no_resume)
    _print_metrics(result)
    print(f"run written to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hiervision.data import build_data
    from hiervision.training import autocast_dtype, evaluate_split, load_run

    cfg, taxonomy, model, _ = load_run(args.run_dir, which=args.checkpoint)
    data = build_data({**cfg["data"], "split_seed": cfg["data"].get("split_seed", cfg["seed"])})
    if data.taxonomy != taxonomy:
        raise CheckpointError(f"{args.run_dir}: the data's taxonomy differs from the run's taxonomy.json")
    amp = autocast_dtype(cfg["train"]["amp"], torch.device("cpu"))
    if args.mode is not None:
        if args.mode not in model.eval_modes:
            raise ValueError(f"--mode {args.mode}: model {cfg['model']['name']} has modes {list(model.eval_modes)}")
        model.set_eval_mode(args.mode)
    decode = args.decode or cfg["eval"].get("decode", "argmax")
    if args.accuracy is not None or decode != "argmax" or _temperature(args.run_dir, model) != 1.0:
        if args.given_level is not None:
            raise ValueError("--given-level cannot be combined with --accuracy, --decode crm or a calibrated run")
        result = evaluate_decisions(args.run_dir, model, data, args.split, cfg["eval"]["batch_size"], amp,
                                    args.accuracy, decode)
    else:
        result = evaluate_split(model, data, args.split, cfg["eval"]["batch_size"], torch.device("cpu"), amp,
                                given_level=args.given_level)
    result["split"] = args.split
    if args.given_level is not None:
        result["given_level"] = args.given_level
    print(json.dumps(result, indent=2))
    return 0


def _temperature(run_dir: str | Path, model) -> float:
    """The run's calibration temperature: the checkpoint's buffer, else ``decisions.json``, else 1."""
    from hiervision.decisions import load_decisions

    t = float(getattr(model, "temperature", 1.0))
    return t if t != 1.0 else float(load_decisions(run_dir).get("temperature", 1.0))


def evaluate_decisions(run_dir: str | Path, model, data, split: str, batch_size: int, amp,
                       accuracy: float | None = None, decode: str = "argmax",
                       device: torch.device | None = None) -> dict:
    """Metrics of a split on the run's calibrated scores (``decode``: argmax | crm), plus, with an
    ``accuracy`` target, the ``hedged`` entry (λ fitted on the val split; :func:`hedged_evaluation`),
    whose λ is also stored in the run's ``decisions.json`` for ``predict``."""
    from hiervision import metrics as M
    from hiervision.decisions import calibrate, hedged_evaluation, load_decisions, save_decisions
    from hiervision.training import predict_dataset

    if accuracy is not None and not 0 < accuracy < 1:
        raise ValueError(f"--accuracy must lie in (0, 1), got {accuracy}")
    if data.multi_label:
        raise ValueError("--accuracy and --decode crm apply to single-label runs only")
    device = device or torch.device("cpu")
    sets = {"train": data.train, "val": data.val, "test": data.test}
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, sets[split], batch_size, device, amp)
    seconds = time.perf_counter() - t0
    temperature = _temperature(run_dir, model)
    result = {**M.evaluate(calibrate(pred, data.taxonomy, temperature, decode), targets, data.taxonomy),
              "eval_images_per_s": len(targets) / max(seconds, 1e-9), "decode": decode, "temperature": temperature}
    if accuracy is not None:
        if data.val is None or len(data.val) == 0:
            raise ValueError(f"{run_dir}: --accuracy needs a validation split to fit λ (data.val_fraction is 0)")
        val, val_targets = (pred, targets) if split == "val" else predict_dataset(model, data, data.val, batch_size,
                                                                                  device, amp)
        result["hedged"] = hedged_evaluation(val, val_targets, pred, targets, data.taxonomy, accuracy, temperature)
        # keep λ for `predict --accuracy` and the server (hiervision.decisions.hedge_lambda)
        fitted = load_decisions(run_dir).get("hedge", {})
        save_decisions(run_dir, hedge={**fitted, str(accuracy): result["hedged"]["lambda"]})
    return result


def load_image(path: Path, in_chans: int, size: tuple[int, int] | None) -> torch.Tensor:
    """Decode one image file as a float tensor C×H×W in [0, 1], with a clear error when it is not an image."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if in_chans == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255


def _image_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no images")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    from hiervision.training import load_run

    _, taxonomy, model, meta = load_run(args.run_dir)
    in_chans = meta.get("in_chans", 3)
    size = tuple(meta["image_size"]) if meta.get("image_size") else None
    mean = torch.tensor(meta.get("mean", [0.0] * in_chans)).view(1, -1, 1, 1)
    std = torch.tensor(meta.get("std", [1.0] * in_chans)).view(1, -1, 1, 1)
    files = _image_files(args.inputs)
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = torch.stack([load_image(f, in_chans, size) for f in chunk])
        pred = model.predict((images - mean) / std)
        for i, f in enumerate(chunk):
            path = [int(n) for n in pred.paths[i] if n >= 0]
            line = {"file": str(f), "path": [taxonomy.names[n] for n in path],
                    "path_probability": round(float(pred.path_prob[i]), 6)}
            if pred.labels is not None:
                ends = pred.labels[i].nonzero().flatten().tolist()
                line["paths"] = [[taxonomy.names[n] for n in taxonomy.path(e)] for e in ends]
            print(json.dumps(line, ensure_ascii=False))
    return 0


def _read_taxonomy(path: str) -> Taxonomy:
    p = Path(path)
    if p.is_dir():
        p = p / "taxonomy.json"
    if p.suffix.lower() == ".csv":
        return Taxonomy.from_csv(p)
    return Taxonomy.load(p)


def _build_taxonomy(args: argparse.Namespace) -> Taxonomy:
    """``taxonomy build``: any supported source → the one JSON format."""
    src = args.file
    if args.source == "openimages":
        return Taxonomy.from_openimages(src, args.names)
    if args.source == "wordnet":
        classes = Path(args.classes).read_text().split() if args.classes else None
        return Taxonomy.from_wordnet(src, args.names, classes=classes, max_depth=args.max_depth)
    if args.source == "folders":
        return Taxonomy.from_folders(src)
    return _read_taxonomy(src)


def cmd_taxonomy(args: argparse.Namespace) -> int:
    if args.action == "build":
        if not args.out:
            raise ValueError("taxonomy build needs --out FILE")
        tax = _build_taxonomy(args)
        tax.save(args.out)
        print(f"{args.out}: {len(tax)} classes, {len(tax.leaves)} leaves, depth {tax.max_depth}")
        return 0
    tax = _read_taxonomy(args.file)
    if args.action == "show":
        print(tax.render(max_nodes=args.max_nodes))
    else:
        print(f"{args.file}: valid tree, {len(tax)} classes, {len(tax.leaves)} leaves, depth {tax.max_depth}"
              f"{' (fixed depth)' if tax.is_fixed_depth else ' (variable depth)'}")
    return 0


def cmd_induce(args: argparse.Namespace) -> int:
    """HierNet's hierarchy from a trained run's confusion probability matrix on its validation split."""
    from hiervision.induce import induce_from_run, plot_taxonomy

    tree = induce_from_run(args.run_dir, args.p_min, args.g_max)
    tree.save(args.out)
    print(tree.render(max_nodes=args.max_nodes))
    groups = tree.num_nodes - 1 - len(tree.leaves)
    print(f"{len(tree.leaves)} classes in {groups} groups, depth {tree.max_depth}; written to {args.out}")
    if args.plot:
        plot_taxonomy(tree, args.plot, f"induced from {args.run_dir} (p_min {args.p_min}, g_max {args.g_max})")
        print(f"picture: {args.plot}")
    return 0


# ----------------------------------------------------------------------------- demo
DEMO_BASE = {
    "seed": 0,
    "data": {"name": "fashion_mnist", "limit_train": 20000, "fallback": "synthetic"},
    "model": {"backbone": "resnet20"},
    "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "warmup_epochs": 0.2,
              "augment": {"pad": 2, "flip": True}},
}
# the default demo's budget (≤ 3 min on 2 CPU cores without bf16); `demo --full` keeps DEMO_BASE's
DEMO_QUICK = {"data": {"limit_train": 4000, "limit_test": 4000}, "train": {"epochs": 2}}
#: accuracy target of the demo table's hedged answer (Deng et al.'s DARTS, λ fitted on validation)
DEMO_HEDGE_TARGET = 0.95
# (table label, config overrides): every method of the package, same backbone, seed and budget
DEMO_METHODS: list[tuple[str, dict]] = [
    ("flat (leaf softmax)", {"model": {"name": "flat"}}),
    # Koo et al.'s best variant in benchmarks/RESULTS.md (dhnn profile): configs/fmnist-res-rnn-resi.yaml
    ("DHNN CNN-RNN-Resi", {"model": {"name": "dhnn_rnn", "conversion": "pool", "pool_fallback": "project",
                                     "input_size": 128, "hidden_size": 256, "residual": True},
                           "train": {"grad_clip": 5.0}}),
    # Guo et al.'s CNN-RNN generator, as configs/fmnist-guo-rnn.yaml (guo profile)
    ("Guo CNN-RNN", {"model": {"name": "guo_rnn", "embed_size": 128, "hidden_size": 256},
                     "train": {"grad_clip": 5.0}}),
    # HierNet on the given tree, as configs/fmnist-hiernet.yaml (hiernet profile): starts from the flat
    # row's weights (transfer), so its total budget is twice the others'; routing reported beside conditional
    ("HierNet conditional", {"model": {"name": "hiernet", "split": [5, 7], "extra_blocks": 2,
                                       "backbone_kwargs": {"pretrained_path": "{flat}"}},
                             "train": {"lr": 0.05}}),
]


def _demo_hedged(run: Path, target: float) -> dict:
    """Calibrate a finished demo run on its val split and report the hedged answer on test."""
    from hiervision.data import build_data
    from hiervision.decisions import fit_decisions, hedged_evaluation
    from hiervision.training import load_run, predict_dataset

    cfg, taxonomy, model, _ = load_run(run)
    data = build_data({**cfg["data"], "split_seed": cfg["data"].get("split_seed", cfg["seed"])})
    bs, device = cfg["eval"]["batch_size"], torch.device("cpu")
    val, val_t = predict_dataset(model, data, data.val, bs, device, None)
    test, test_t = predict_dataset(model, data, data.test, bs, device, None)
    temperature = fit_decisions(model, val, val_t, taxonomy, run, targets=(target,))["temperature"]
    return hedged_evaluation(val, val_t, test, test_t, taxonomy, target, temperature)


def cmd_demo(args: argparse.Namespace) -> int:
    from hiervision.training import train

    base = merge(DEMO_BASE, {"train": {"progress": not args.quiet}})
    if not args.full:
        base = merge(base, DEMO_QUICK)
    if args.epochs:
        base["train"]["epochs"] = args.epochs
    if args.limit_train:
        base["data"]["limit_train"] = args.limit_train
    rows, m = [], {}
    flat = str(Path(args.out) / "flat" / "best.pt")
    target = DEMO_HEDGE_TARGET
    for label, overrides in DEMO_METHODS:
        cfg = merge(merge(load_config(), base), overrides)
        if cfg["model"].get("backbone_kwargs", {}).get("pretrained_path") == "{flat}":
            cfg["model"]["backbone_kwargs"]["pretrained_path"] = flat  # transfer from the flat row
        out = Path(args.out) / label.split()[0]
        print(f"== {label}")
        t0 = time.perf_counter()
        m = train(cfg, out, resume=False)
        hedged = _demo_hedged(out, target)
        rows.append((label, m["leaf_accuracy"], m["path_accuracy"], m["hdist@5"], hedged["accuracy"],
                     hedged["information_gain"], time.perf_counter() - t0))
        if "routing" in m:
            r = m["routing"]
            rows.append(("HierNet routing", r["leaf_accuracy"], r["path_accuracy"], r["hdist@5"], None, None, 0.0))
    real = m.get("data") == "fashion_mnist"
    data = "Fashion-MNIST (real)" if real else "synthetic images (fallback)"
    budget = f"{base['data']['limit_train']} training images" + ("" if args.full else " (--full: 20000, 3 epochs)")
    print(f"\n{data}, {base['model']['backbone']}, {base['train']['epochs']} epochs, {budget}, seed {base['seed']}")
    if not real:
        print(f"note: {m.get('data_note')}")
    print(f"hedged: DARTS answers at target accuracy {target} (λ and temperature fitted on val), "
          "info = information gain in nats (log #leaves = always the right leaf)")
    print(f"{'method':<24}{'leaf acc':>9}{'path acc':>9}{'hdist@5':>9}{'hedged':>8}{'info':>7}{'time s':>8}")
    for label, leaf, path, hd5, hacc, info, secs in rows:
        h = f"{hacc:>8.4f}{info:>7.3f}" if hacc is not None else f"{'-':>8}{'-':>7}"
        print(f"{label:<24}{leaf:>9.4f}{path:>9.4f}{hd5:>9.3f}{h}{secs:>8.1f}")
    return 0


def _print_metrics(result: dict) -> None:
    keys = ["path_accuracy", "node_accuracy", "leaf_accuracy", "hierarchical_f1", "path_f1", "node_f1"]
    shown = {k: round(result[k], 4) for k in keys if isinstance(result.get(k), float)}
    print(json.dumps(shown))


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiervision", description="Hierarchical image classification.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config; writes checkpoints, log.csv and metrics.json to --out")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.05")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out holds last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--given-level", type=int, default=None, metavar="DEPTH",
                   help="give the model each image's true ancestor at this depth (Guo et al.'s CNN-RNN*)")
    e.add_argument("--accuracy", type=float, default=None, metavar="TARGET",
                   help="also report hedged answers (Deng et al.'s DARTS) reaching this accuracy, e.g. 0.99; "
                        "λ is fitted on the val split")
    e.add_argument("--decode", choices=["argmax", "crm"], default=None,
                   help="crm: the leaf of least expected mistake severity (Karthik et al.); default eval.decode")
    e.add_argument("--mode", default=None, help="how the model predicts, where it has several ways "
                   "(hiernet: conditional | routing)")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="one JSON line per image: file, path, path probability")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(func=cmd_predict)

    tx = sub.add_parser("taxonomy", help="show, validate or build a taxonomy (JSON, parent/child CSV, run folder)")
    tx.add_argument("action", choices=["show", "validate", "build"])
    tx.add_argument("file", help="taxonomy file; for build, the source (see --from)")
    tx.add_argument("--max-nodes", type=int, default=None, help="show: print at most this many nodes")
    tx.add_argument("--from", dest="source", choices=["auto", "openimages", "wordnet", "folders"], default="auto",
                    help="build: the source's kind (auto = our JSON or a parent,child CSV)")
    tx.add_argument("--names", help="build: Open Images class-descriptions CSV or WordNet node_names.txt")
    tx.add_argument("--classes", help="build --from wordnet: file of class wnids to keep (prune, collapse)")
    tx.add_argument("--max-depth", type=int, default=None, help="build --from wordnet: cap path length")
    tx.add_argument("--out", help="build: where to write the JSON")
    tx.set_defaults(func=cmd_taxonomy)

    ind = sub.add_parser("induce", help="HierNet: a class tree from a trained run's confusion probability matrix")
    ind.add_argument("run_dir", help="a trained run (its validation split is predicted)")
    ind.add_argument("--p-min", type=float, nargs="+", required=True,
                     help="minimum group proximity; several values group recursively, one per depth")
    ind.add_argument("--g-max", type=int, nargs="+", default=[50], help="maximum group size (per depth)")
    ind.add_argument("--out", required=True, help="taxonomy JSON to write (use as data.tree)")
    ind.add_argument("--plot", default=None, help="also draw the tree to this image file")
    ind.add_argument("--max-nodes", type=int, default=None, help="print at most this many nodes")
    ind.set_defaults(func=cmd_induce)

    d = sub.add_parser("demo", help="train every method side by side on Fashion-MNIST and print one table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=None, help="epochs per method (default 2; --full 3)")
    d.add_argument("--limit-train", type=int, default=None, help="training images (default 4000; --full 20000)")
    d.add_argument("--full", action="store_true", help="the larger budget of the README's table (≈ 13 min on "
                   "2 cores) instead of the ≤ 3 min default")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"hiervision: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hiervision: interrupted (run again with the same --out to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
