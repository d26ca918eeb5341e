"""Command line: ``hiervision train|evaluate|predict|serve|taxonomy|induce|demo``; a thin layer over the Python API.

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
    result = evaluate_split(model, data, args.split, cfg["eval"]["batch_size"], torch.device("cpu"), amp,
                            given_level=args.given_level)
    result["split"] = args.split
    if args.given_level is not None:
        result["given_level"] = args.given_level
    if args.report:  # pictures of the same split (predicted once more; see hiervision.report)
        from hiervision.report import write_report
        from hiervision.training import predict_dataset

        dataset = data.val if args.split == "val" else data.test
        pred, targets = predict_dataset(model, data, dataset, cfg["eval"]["batch_size"], torch.device("cpu"), amp,
                                        given_level=args.given_level)
        write_report(pred, targets, taxonomy, args.report, title=f"{args.run_dir}: {args.split} split")
        result["report"] = str(Path(args.report) / "index.html")
    print(json.dumps(result, indent=2))
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    """HTTP server over a run folder or .onnx file (needs the ``[serve]`` extra)."""
    try:
        from hiervision.serve import Limits, serve
    except ImportError as e:
        raise ValueError(f"hiervision serve needs: pip install 'hiervision[serve]' ({e.name} missing)") from None
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.top_k < 1 or args.max_files < 1:
        raise ValueError("--max-batch, --top-k and --max-files must be ≥ 1 and --max-wait-ms ≥ 0")
    limits = Limits(max_files=args.max_files, max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          top_k=args.top_k, limits=limits, hedge_accuracy=args.hedge_accuracy)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from hiervision.training import train

    base = merge(DEMO_BASE, {"train": {"progress": not args.quiet}})
    if args.epochs:
        base["train"]["epochs"] = args.epochs
    if args.limit_train:
        base["data"]["limit_train"] = args.limit_train
    rows, m = [], {}
    flat = str(Path(args.out) / "flat" / "best.pt")
    for label, overrides in DEMO_METHODS:
        cfg = merge(merge(load_config(), base), overrides)
        if cfg["model"].get("backbone_kwargs", {}).get("pretrained_path") == "{flat}":
            cfg["model"]["backbone_kwargs"]["pretrained_path"] = flat  # transfer from the flat row
        out = Path(args.out) / label.split()[0]
        print(f"== {label}")
        t0 = time.perf_counter()
        m = train(cfg, out, resume=False)
        rows.append((label, m["leaf_accuracy"], m["path_accuracy"], m["node_accuracy"], time.perf_counter() - t0))
        if "routing" in m:
            r = m["routing"]
            rows.append(("HierNet routing", r["leaf_accuracy"], r["path_accuracy"], r["node_accuracy"], 0.0))
    real = m.get("data") == "fashion_mnist"
    data = "Fashion-MNIST (real)" if real else "synthetic images (fallback)"
    print(f"\n{data}, {base['model']['backbone']}, {base['train']['epochs']} epochs, seed {base['seed']}")
    if not real:
        print(f"note: {m.get('data_note')}")
    print(f"{'method':<24}{'leaf acc':>10}{'path acc':>10}{'node acc':>10}{'time s':>9}")
    for label, leaf, path, node, secs in rows:
        print(f"{label:<24}{leaf:>10.4f}{path:>10.4f}{node:>10.4f}{secs:>9.1f}")
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
    e.add_argument("--mode", default=None, help="how the model predicts, where it has several ways "
                   "(hiernet: conditional | routing)")
    e.add_argument("--report", default=None, metavar="DIR",
                   help="also write plots (per-level accuracy, confusion per level, tree coloured by node accuracy, "
                   "mistake severity) and DIR/index.html showing them")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="one JSON line per image: file, path, path probability")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.set_defaults(func=cmd_predict)

    sv = sub.add_parser("serve", help="HTTP API and web page over a run folder or .onnx file ([serve] extra)")
    sv.add_argument("model", metavar="RUN_OR_ONNX")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=32, help="most images predicted in one forward pass")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="how long the first image of a batch waits for others (0: no waiting)")
    sv.add_argument("--top-k", type=int, default=3, help="alternative paths per image")
    sv.add_argument("--max-files", type=int, default=64, help="most images in one request (more: 413)")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (more: 413)")
    sv.add_argument("--hedge-accuracy", type=float, default=None, metavar="A",
                    help="add each image's hedged answer at this accuracy target (λ from the run's decisions.json)")
    sv.set_defaults(func=cmd_serve)

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
    d.add_argument("--epochs", type=int, default=None, help="epochs per method (default 3)")
    d.add_argument("--limit-train", type=int, default=None, help="training images (default 20000)")
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
