"""``hiervision train``: a config, or a folder/CSV of images with the recommended recipe, and the closing screen
a first run ends with."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from hiervision.cli.common import print_metrics
from hiervision.config import load_config
from hiervision.recipe import RECIPE_WORDS, method_options

__all__ = ["add_parser", "cmd_train"]


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or with ``--print-config`` only resolve) one run; under torchrun only rank 0 prints."""
    from hiervision.recipe import auto_config, describe, is_data_source

    auto = is_data_source(args.config)  # a folder, zip or CSV of images: the recommended recipe, no YAML
    for flag, value, key in (("--method", args.method, "model.name=NAME"), ("--encoder", args.encoder,
                                                                          "model.backbone=hf:NAME")):
        if value is not None and not auto:
            raise ValueError(f"{flag} applies to a folder or CSV of images; {args.config} is a config "
                             f"(use --set {key} there)")
    cfg = (auto_config(args.config, args.method, args.set, args.encoder) if auto
           else load_config(args.config, args.set))
    if args.time is not None:  # a budget: the epochs that fit are planned once the first steps are timed
        from hiervision.config import parse_duration

        cfg["train"]["time_budget"] = parse_duration(args.time)
    if args.print_config:  # the resolved config (base: chain and --set applied), nothing trained
        print(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), end="")
        return 0
    if not args.out:
        raise ValueError("train needs --out RUN_FOLDER")
    from hiervision.training import train

    if args.quiet:
        cfg["train"]["progress"] = False
    main_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one rank reports
    if auto and main_rank:
        print(describe(cfg))
    result = train(cfg, args.out, resume=not args.no_resume, force=args.force,
                   allow_changed_data=args.allow_changed_data)
    from hiervision.tracking import log_locations

    logs = [f"logs: {where}" for where in log_locations(cfg, args.out)]
    if main_rank and auto:
        model = cfg["model"]
        scratch = not (str(model["backbone"]).startswith("hf:") or (model.get("backbone_kwargs") or {}).get(
            "pretrained_path"))
        print("\n".join([closing_screen(result, args.out, from_scratch=scratch), *logs]))
    elif main_rank:
        print_metrics(result)
        print("\n".join([f"run written to {args.out}", *logs]))
    return 0


def closing_screen(result: dict, out: str, from_scratch: bool = False) -> str:
    """What a first run ends with: its test metrics, where it is, and the three commands that come next (and,
    for a run from scratch, that a pretrained encoder is the way to better accuracy)."""
    levels = result.get("level_accuracy") or []
    lines = ["", f"test ({result.get('data_note', '')}):",
             f"  path accuracy {result['path_accuracy']:.4f}   leaf accuracy {result['leaf_accuracy']:.4f}"
             + (f"   per level {' / '.join(f'{a:.3f}' for a in levels)}" if levels else "")]
    extra = [f"{k} {result[k]:.3f}" for k in ("hdist@5", "ece") if isinstance(result.get(k), float)]
    if extra:
        lines.append("  " + "   ".join(extra))
    run = Path(out)
    nxt = [(f"hiervision evaluate {run} --report {run / 'report'}", f"plots, {run / 'report' / 'index.html'}"),
           (f"hiervision export {run} --out {run / 'model.onnx'}", "ONNX + sidecar ([export] extra)"),
           (f"hiervision serve {run / 'model.onnx'}", "API and web page at http://127.0.0.1:8000/ ([serve] extra)")]
    width = max(len(c) for c, _ in nxt)
    lines += [f"run: {run}  (config.yaml, best.pt, metrics.json, log.csv)", "next:",
              *(f"  {c:<{width}}  # {why}" for c, why in nxt)]
    if from_scratch:
        lines.append("better accuracy: start from a pretrained encoder, e.g. --encoder hf:facebook/dinov2-small "
                     "(or a folder saved with save_pretrained; docs: 'Start from a pretrained encoder')")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``train CONFIG|FOLDER|CSV --out RUN``."""
    t = sub.add_parser("train", help="train a config, or a folder/CSV of your images; writes checkpoints, log.csv "
                       "and metrics.json to --out")
    t.add_argument("config", metavar="CONFIG|FOLDER|CSV",
                   help="a YAML config (see configs/), or your images: a folder of nested class folders (or its "
                   ".zip), or a CSV with path,label columns (labels as A/B/C paths); these get the recommended recipe: "
                   + RECIPE_WORDS)
    t.add_argument("--method", default=None, metavar="NAME",
                   help=f"FOLDER|CSV only: train this head ({', '.join(method_options())}) instead of the "
                   "recommended one, with the options the head declares")
    t.add_argument("--encoder", default=None, metavar="hf:NAME",
                   help="FOLDER|CSV only: start from a pretrained image encoder (a Hugging Face hub id or a local "
                   "save_pretrained folder; [hf] extra): the head trains on its features, computed once")
    t.add_argument("--out", help="run folder (required unless --print-config)")
    t.add_argument("--time", default=None, metavar="BUDGET",
                   help="fit the run into this much time (20m, 1h30m, 90s): the first steps are timed and the "
                   "epochs that fit (at most train.epochs) planned, the learning-rate schedule with them; without "
                   "it the run's estimated length is printed once those steps are timed")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.05")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out holds last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true", help="write into an --out folder that is not a hiervision run")
    t.add_argument("--allow-changed-data", action="store_true",
                   help="resume although the data's splits differ from the run's splits.json")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after base: and --set) and exit")
    t.set_defaults(func=cmd_train)
