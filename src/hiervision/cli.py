"""Command line: ``hiervision train|evaluate|predict|export|serve|list|taxonomy|induce|data|demo``.

Every user error ends in one line on stderr and a non-zero exit code; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from hiervision.checkpoint import CheckpointError
from hiervision.config import ConfigError, check_given_level, load_config, merge
from hiervision.imagefile import find_images
from hiervision.recipe import METHOD_OPTIONS
from hiervision.taxonomy import Taxonomy, TaxonomyError

__all__ = ["build_parser", "main"]

USER_ERRORS = (ConfigError, TaxonomyError, CheckpointError, FileNotFoundError, ValueError, OSError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from hiervision.experiment import RunError
    from hiervision.training import TrainingError

    return (*USER_ERRORS, TrainingError, RunError)


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from hiervision.recipe import auto_config, describe, is_data_source

    auto = is_data_source(args.config)  # a folder, zip or CSV of images: the recommended recipe, no YAML
    if args.method is not None and not auto:
        raise ValueError(f"--method applies to a folder or CSV of images; {args.config} is a config "
                         "(use --set model.name=NAME there)")
    cfg = auto_config(args.config, args.method, args.set) if auto else load_config(args.config, args.set)
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
    if main_rank and auto:
        print(_closing_screen(result, args.out))
    elif main_rank:
        _print_metrics(result)
        print(f"run written to {args.out}")
    return 0


def _closing_screen(result: dict, out: str) -> str:
    """What a first run ends with: its test metrics, where it is, and the three commands that come next."""
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
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hiervision.evaluation import autocast_dtype, evaluate_split, select_device
    from hiervision.experiment import load_run, run_data
    from hiervision.marginals import is_identity
    from hiervision.posthoc import evaluate_decisions

    device = select_device(args.device)
    cfg, taxonomy, model, meta = load_run(args.run_dir, which=args.checkpoint, device=device)
    check_given_level(args.given_level, taxonomy)
    data = run_data(cfg, args.run_dir, args.allow_changed_data, meta)  # the normalisation it was trained with
    if data.taxonomy != taxonomy:
        raise CheckpointError(f"{args.run_dir}: the data's taxonomy differs from the run's taxonomy.json")
    amp = autocast_dtype(cfg["train"]["amp"], device)
    if args.mode is not None:
        if args.mode not in model.eval_modes:
            raise ValueError(f"--mode {args.mode}: model {cfg['model']['name']} has modes {list(model.eval_modes)}")
        model.set_eval_mode(args.mode)
    if args.beam_width is not None:
        model.set_beam_width(args.beam_width)
    decode = _decode(args) or cfg["eval"].get("decode", "argmax")
    if args.accuracy is not None or decode != "argmax" or not is_identity(model.temperature):
        if args.given_level is not None and args.accuracy is not None:
            raise ValueError("--given-level cannot be combined with --accuracy (hedging fits on plain predictions)")
        result, pred, targets = evaluate_decisions(args.run_dir, model, data, args.split, cfg["eval"]["batch_size"],
                                                   amp, args.accuracy, decode, device, args.given_level)
    else:
        result, pred, targets = evaluate_split(model, data, args.split, cfg["eval"]["batch_size"], device, amp,
                                               given_level=args.given_level, return_prediction=True)
    result["split"] = args.split
    if args.given_level is not None:
        result["given_level"] = args.given_level
    if args.report:  # pictures of the same predictions (see hiervision.report)
        from hiervision.report import write_report

        write_report(pred, targets, taxonomy, args.report, title=f"{args.run_dir}: {args.split} split")
        result["report"] = str(Path(args.report) / "index.html")
    print(json.dumps(result, indent=2))
    return 0


def _image_files(inputs: list[str]) -> list[Path]:
    """Files named on the command line, and the images inside folders (recursively; hidden files and
    folders, and files without an image suffix, are skipped)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = find_images(p)  # as training reads folders: recursive, hidden files and folders skipped
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no images")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _decode(args: argparse.Namespace) -> str | None:
    """``--decode/--metric/--allow-inner`` as one rule name (``hiervision.bayes.rule_spec``); None when unset."""
    if args.decode is None:
        if args.metric is not None or args.allow_inner:
            raise ValueError("--metric and --allow-inner go with --decode bayes")
        return None
    from hiervision.bayes import rule_spec

    return rule_spec(args.decode, args.metric, args.allow_inner)


def _predictor(args: argparse.Namespace):
    """An exported .onnx runs on onnxruntime; a run folder on PyTorch. Both decode in hiervision.runtime."""
    from hiervision.runtime import Predictor

    decode = _decode(args)
    if Path(args.run_dir).suffix.lower() == ".onnx":
        if args.device not in ("cpu", "auto"):
            raise ValueError(f"--device {args.device}: an exported .onnx runs on onnxruntime's CPU provider")
        return Predictor(args.run_dir, top_k=args.top_k, batch_size=args.batch_size, beam_width=args.beam_width,
                         decode=decode)
    from hiervision.export import run_predictor

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return run_predictor(args.run_dir, args.top_k, args.batch_size, device, beam_width=args.beam_width, decode=decode)


CSV_FIELDS = ["file", "path", "path_ids", "path_probability", "node_probabilities"]
#: between the paths of a multi-label record in the CSV ``paths`` column
CSV_PATHS_SEP = " ; "


def _csv_separators(names: Sequence[str], sep: str, multi_label: bool) -> None:
    """A separator that occurs in a class name would make a CSV path ambiguous: refuse it (one line)."""
    if not sep:
        raise ValueError("--path-sep must not be empty")
    for s, what in [(sep, "--path-sep"), *([(CSV_PATHS_SEP, "the paths column's separator")] if multi_label else [])]:
        clash = next((n for n in names[1:] if s in n), None)
        if clash is not None:
            raise ValueError(f"{what} {s!r}: the class name {clash!r} contains it; pass another --path-sep "
                             "(or use --format jsonl)")


def _csv_row(record: dict, top_k: int, sep: str, hedged: bool = False) -> list:
    """One CSV row: paths joined by ``sep`` (``--path-sep``, never found in a class name; ``path_ids`` are
    exact), numbers by spaces, top-k flattened; with ``hedged`` (``--accuracy``) the hedged answer's path
    and probability before the error column."""
    if "error" in record:
        return [record["file"], "", "", "", "", *[""] * (2 * top_k), "", *["", ""] * hedged, record["error"]]
    row = [record["file"], sep.join(record["path"]), " ".join(map(str, record["path_ids"])),
           record["path_probability"], " ".join(map(str, record["node_probabilities"]))]
    alts = record["top_k"][:top_k]
    for i in range(top_k):
        row += [sep.join(alts[i]["path"]), alts[i]["probability"]] if i < len(alts) else ["", ""]
    row.append(CSV_PATHS_SEP.join(sep.join(p) for p in record.get("paths", [])))
    if hedged:
        row += [sep.join(record["hedged"]["path"]), record["hedged"]["probability"]]
    return [*row, ""]


def cmd_predict(args: argparse.Namespace) -> int:
    """Records for every image (one JSON line or CSV row each); unreadable files get an error record,
    the others are still predicted, and the exit status says how many failed."""
    import csv

    from tqdm.auto import tqdm

    predictor = _predictor(args)  # a run that cannot be loaded is reported before any image is looked at
    hedge = predictor.hedger(args.accuracy) if args.accuracy is not None else None  # the sidecar's λ table
    files = _image_files(args.inputs)
    writer = None
    if args.format == "csv":
        _csv_separators(predictor.tree.names, args.path_sep, predictor.sidecar["decoder"]["kind"] == "multi_label")
        writer = csv.writer(sys.stdout)
        tops = [f"top{i + 1}_{c}" for i in range(args.top_k) for c in ("path", "probability")]
        hedged = ["hedged_path", "hedged_probability"] if hedge is not None else []
        writer.writerow([*CSV_FIELDS, *tops, "paths", *hedged, "error"])
    failed: list[dict] = []
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.quiet or len(files) < 256)
    try:
        for start in range(0, len(files), args.batch_size):
            for record in predictor.predict(files[start : start + args.batch_size], node_scores=hedge is not None):
                if "error" in record:
                    failed.append(record)
                elif hedge is not None:  # the answer that stops at a confident node (issue 12's DARTS rule)
                    record["hedged"] = hedge(record)
                    del record["node_scores"]
                if writer is not None:
                    writer.writerow(_csv_row(record, args.top_k, args.path_sep, hedge is not None))
                else:
                    print(json.dumps(record, ensure_ascii=False))
            sys.stdout.flush()
            bar.update(min(args.batch_size, len(files) - start))
    finally:
        bar.close()
    if failed:
        print(f"hiervision: error: {len(failed)} of {len(files)} images could not be predicted "
              f"(first: {failed[0]['error']})", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hiervision.export import export_onnx

    for path in export_onnx(args.run_dir, args.out, which=args.checkpoint, beam_width=args.beam_width,
                            verbose=args.verbose, decode=_decode(args)):
        print(path)
    return 0


def _config_dirs() -> list[Path]:
    here = Path.cwd() / "configs"
    repo = Path(__file__).resolve().parents[2] / "configs"
    return [d for d in dict.fromkeys([here, repo]) if d.is_dir()]


def cmd_list(args: argparse.Namespace) -> int:
    """What can be named in a config: registered models and backbones, datasets, shipped configs."""
    if args.what == "models":
        from hiervision.models.registry import list_models

        names = list_models()
    elif args.what == "backbones":
        from hiervision.models.backbones import list_backbones

        names = list_backbones()
    elif args.what == "datasets":
        from hiervision.data import DATASETS

        names = sorted(DATASETS)
    else:
        dirs = _config_dirs()
        if not dirs:
            raise FileNotFoundError("no configs/ folder here or next to the package")
        names = []
        for d in dirs:
            for f in sorted(d.rglob("*.yaml")):
                try:
                    desc = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("description") or ""
                except (yaml.YAMLError, AttributeError):
                    desc = ""
                line = " ".join(str(desc).split())
                names.append(f"{f.relative_to(d.parent)}" + (f"  {line[:100]}" if line else ""))
    print("\n".join(names))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """HTTP server over a run folder or .onnx file (needs the ``[serve]`` extra)."""
    try:
        from hiervision.serve import Limits, serve
    except ImportError as e:
        raise ValueError(f"hiervision serve needs: pip install 'hiervision[serve]' ({e.name} missing)") from None
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.top_k < 1 or args.max_files < 1:
        raise ValueError("--max-batch, --top-k and --max-files must be ≥ 1 and --max-wait-ms ≥ 0")
    if not (args.max_body_mb > 0 and args.read_timeout > 0 and args.min_body_rate >= 0):
        raise ValueError("--max-body-mb and --read-timeout must be > 0 and --min-body-rate ≥ 0")
    limits = Limits(max_files=args.max_files, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                    read_timeout_s=args.read_timeout, min_body_rate=args.min_body_rate, max_queue=args.max_queue)
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          top_k=args.top_k, limits=limits, hedge_accuracy=args.hedge_accuracy, beam_width=args.beam_width,
          decode=_decode(args))
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
        return Taxonomy.from_wordnet(src, args.names, classes=classes, max_depth=args.max_depth,
                                     keep_chains=args.keep_chains, all_synsets=args.all_synsets)
    for flag in ("keep_chains", "all_synsets"):
        if getattr(args, flag):
            raise ValueError(f"taxonomy build --{flag.replace('_', '-')} applies to --from wordnet only, "
                             f"not --from {args.source}")
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
        try:
            for line in tax.iter_render(max_nodes=args.max_nodes):  # streamed: huge trees print in bounded memory
                print(line)
        except BrokenPipeError:  # `| head`: the reader is gone, which is not an error
            sys.stdout = open(os.devnull, "w")  # keeps the final flush quiet
        return 0
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
#: under the table: what the comparison (benchmarks/comparison.py, 3 paired seeds) found at a credible budget, since
#: the demo's minutes-long budget is too short to rank the methods and a reader would otherwise take its order
DEMO_VERDICT = ("at a credible budget (8-10 epochs, 3 paired seeds) HAFrame keeps flat's top-1 with milder mistakes "
                "on both data sets, and no architecture beats flat: DHNN and Guo's CNN-RNN tie it on Fashion-MNIST "
                "and lose on Tiny-ImageNet, so this short run cannot rank them (README 'Which method?'; "
                "benchmarks/RESULTS.md, section comparison)")
#: accuracy target of the demo table's hedged answer (Deng et al.'s DARTS, λ fitted on validation)
DEMO_HEDGE_TARGET = 0.95
# (table label, config overrides): every method of the package, same backbone, seed and budget
DEMO_METHODS: list[tuple[str, dict]] = [
    # first: the recipe hiervision recommends (README "Which method?": HAFrame; CRM on its run shown beside it)
    ("HAFrame (recommended)", {"model": {"name": "haframe"}}),
    # the baseline every method is measured against; HierNet's row starts from its weights
    ("flat", {"model": {"name": "flat"}}),
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
    from hiervision.decisions import evaluate_hedging, fit_decisions
    from hiervision.evaluation import predict_dataset
    from hiervision.experiment import load_run, run_data

    cfg, taxonomy, model, meta = load_run(run)
    data = run_data(cfg, run, meta=meta)
    bs, device = cfg["eval"]["batch_size"], torch.device("cpu")
    val, val_t = predict_dataset(model, data, data.val, bs, device, None)
    test, test_t = predict_dataset(model, data, data.test, bs, device, None)
    temperature = fit_decisions(model, val, val_t, taxonomy, run, targets=(target,))["temperature"]
    return evaluate_hedging(val, val_t, test, test_t, taxonomy, target, temperature)


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
        if label == DEMO_METHODS[0][0] and "crm" in m.get("crm", {}):  # CRM on the recipe's run: no training
            r = m["crm"]["crm"]
            rows.append((f"{label.split()[0]} + CRM", r["leaf_accuracy"], r["path_accuracy"], r["hdist@5"], None,
                         None, 0.0))
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
    print(DEMO_VERDICT)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``data pack``: any folder/CSV data set (a folder, or a config's ``data`` section) as tar shards."""
    from hiervision.data import build_data
    from hiervision.data.pipeline import PIPELINE_KEYS
    from hiervision.data.shards import pack
    from hiervision.experiment import data_config

    src = Path(args.source)
    if src.is_dir() or src.suffix.lower() == ".zip":
        data_cfg: dict = {"name": "folder", "root": str(src)}
    elif src.is_file():
        cfg = load_config(src, args.set)
        data_cfg = data_config(cfg)  # training's splits
    else:
        raise FileNotFoundError(f"{src}: no such config file or image folder")
    data_cfg = {k: v for k, v in data_cfg.items() if k not in PIPELINE_KEYS}  # pack the images as stored
    data = build_data(data_cfg)
    t0 = time.perf_counter()
    index = pack({"train": data.train, "val": data.val, "test": data.test}, data.taxonomy, args.out,
                 args.shard_size, data.in_chans)
    counts = ", ".join(f"{k} {v['count']} in {len(v['shards'])} shards" for k, v in index["splits"].items())
    print(f"packed {counts} to {args.out} ({time.perf_counter() - t0:.1f} s); "
          f"train on it with data: {{name: shards, root: {args.out}}}")
    return 0


def _print_metrics(result: dict) -> None:
    keys = ["path_accuracy", "node_accuracy", "leaf_accuracy", "hierarchical_f1", "path_f1", "node_f1"]
    shown = {k: round(result[k], 4) for k in keys if isinstance(result.get(k), float)}
    print(json.dumps(shown))


# ----------------------------------------------------------------------------- parser
def _int_at_least(lo: int):
    """argparse type: a whole number ≥ ``lo`` (argparse names the flag in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be ≥ {lo}, got {value}")
        return value

    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (an accuracy target, a proximity threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _add_beam_width(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beam-width", type=_positive_int, default=None, metavar="K",
                        help="decode with tree-restricted beam search of width K (1 = greedy) instead of the run's "
                        "configured decoding (guo_rnn, dhnn_rnn, dhnn_s2s; compare widths with evaluate --beam-width)")


def _add_decode(parser: argparse.ArgumentParser, default: str) -> None:
    from hiervision.bayes import BAYES_METRICS, DECODE_RULES  # numpy only

    parser.add_argument("--decode", choices=DECODE_RULES, default=None,
                        help="crm: the leaf of least expected mistake severity (Karthik et al.); bayes: the answer of "
                        f"largest expected --metric (Plaud et al.); default {default}")
    parser.add_argument("--metric", choices=BAYES_METRICS, default=None,
                        help="with --decode bayes: hf1 (per-image hierarchical F1, the default), severity (LCA height: "
                        "CRM's answer) or path_accuracy (the most probable class)")
    parser.add_argument("--allow-inner", action="store_true",
                        help="with --decode bayes: the answer may stop at an inner node where the metric rewards it")


def build_parser() -> argparse.ArgumentParser:
    """The ``hiervision`` argument parser (the docs site's CLI reference is generated from it)."""
    p = argparse.ArgumentParser(prog="hiervision", description="Hierarchical image classification.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a config, or a folder/CSV of your images; writes checkpoints, log.csv "
                       "and metrics.json to --out")
    t.add_argument("config", metavar="CONFIG|FOLDER|CSV",
                   help="a YAML config (see configs/), or your images: a folder of nested class folders (or its "
                   ".zip), or a CSV with path,label columns (labels as A/B/C paths); these get the recommended recipe")
    t.add_argument("--method", default=None, metavar="NAME",
                   help=f"FOLDER|CSV only: another method than flat ({', '.join(METHOD_OPTIONS)}) with the "
                   "options it had in the comparison")
    t.add_argument("--out", help="run folder (required unless --print-config)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.05")
    t.add_argument("--no-resume", action="store_true", help="start over even if --out holds last.pt")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true", help="write into an --out folder that is not a hiervision run")
    t.add_argument("--allow-changed-data", action="store_true",
                   help="resume although the data's splits differ from the run's splits.json")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after base: and --set) and exit")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--given-level", type=int, default=None, metavar="DEPTH",
                   help="give the model each image's true ancestor at this depth (Guo et al.'s CNN-RNN*)")
    e.add_argument("--accuracy", type=_open_fraction, default=None, metavar="TARGET",
                   help="also report hedged answers (Deng et al.'s DARTS) reaching this accuracy, e.g. 0.99; "
                        "λ is fitted on the val split")
    _add_decode(e, "eval.decode")
    e.add_argument("--mode", default=None, help="how the model predicts, where it has several ways "
                   "(hiernet: conditional | routing)")
    _add_beam_width(e)
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda | cuda:N")
    e.add_argument("--allow-changed-data", action="store_true",
                   help="evaluate although the data's splits differ from the run's splits.json (prints the overlap)")
    e.add_argument("--report", default=None, metavar="DIR",
                   help="also write plots (per-level accuracy, confusion per level, tree coloured by node accuracy, "
                   "mistake severity) and DIR/index.html showing them")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="one record per image: path, per-node probabilities, top-k alternatives")
    pr.add_argument("run_dir", metavar="RUN_OR_ONNX", help="a run folder, or a .onnx written by hiervision export")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images; folders are searched recursively")
    pr.add_argument("--batch-size", type=_positive_int, default=64)
    pr.add_argument("--top-k", type=_positive_int, default=3, help="alternative paths per image (default 3)")
    pr.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    pr.add_argument("--path-sep", default=" > ", metavar="SEP",
                    help="csv: between the names of a path (default ' > '; refused when a class name contains it)")
    pr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (run folders only)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--accuracy", type=_open_fraction, default=None, metavar="A",
                    help="also give each image's hedged answer: the most specific node that meets accuracy A "
                    "(λ from the run's decisions.json: 0.9, 0.95, 0.99 after training, others by evaluate --accuracy)")
    _add_beam_width(pr)
    _add_decode(pr, "the export's, or the run's eval.decode")
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
    sv.add_argument("--read-timeout", type=float, default=10.0, metavar="S",
                    help="longest pause while a request body arrives (more: 408, connection closed)")
    sv.add_argument("--min-body-rate", type=float, default=8192, metavar="BYTES_PER_S",
                    help="slowest average upload accepted after the first --read-timeout seconds (slower: 408)")
    sv.add_argument("--max-queue", type=_positive_int, default=256,
                    help="most images waiting for the model (more: 503 with Retry-After)")
    sv.add_argument("--hedge-accuracy", type=_open_fraction, default=None, metavar="A",
                    help="add each image's hedged answer at this accuracy target (λ from the run's decisions.json)")
    _add_beam_width(sv)
    _add_decode(sv, "the export's, or the run's eval.decode")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="ONNX graph + JSON sidecar of a trained run, for hiervision.runtime")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="the .onnx file to write (sidecar: same name, .json)")
    ex.add_argument("--checkpoint", choices=["best", "last"], default="best")
    _add_beam_width(ex)
    ex.add_argument("--verbose", action="store_true", help="show the ONNX exporter's own messages and warnings")
    _add_decode(ex, "the run's eval.decode; the sidecar records the rule and predict/serve apply it")
    ex.set_defaults(func=cmd_export)

    ls = sub.add_parser("list", help="what is there: registered models, backbones, datasets, shipped configs")
    ls.add_argument("what", choices=["models", "backbones", "datasets", "configs"])
    ls.set_defaults(func=cmd_list)

    tx = sub.add_parser("taxonomy", help="show, validate or build a taxonomy (JSON, parent/child CSV, run folder)")
    tx.add_argument("action", choices=["show", "validate", "build"])
    tx.add_argument("file", help="taxonomy file; for build, the source (see --from)")
    tx.add_argument("--max-nodes", type=_count, default=None, help="show: print at most this many nodes")
    tx.add_argument("--from", dest="source", choices=["auto", "openimages", "wordnet", "folders"], default="auto",
                    help="build: the source's kind (auto = our JSON or a parent,child CSV)")
    tx.add_argument("--names", help="build: Open Images class-descriptions CSV or WordNet node_names.txt")
    tx.add_argument("--classes", help="build --from wordnet: file of class wnids to keep (prune, collapse)")
    tx.add_argument("--max-depth", type=_positive_int, default=None, help="build --from wordnet: cap path length")
    tx.add_argument("--keep-chains", action="store_true",
                    help="build --from wordnet: keep single-child chains, so every synset reachable from the root "
                         "is a node (default: collapse them)")
    tx.add_argument("--all-synsets", action="store_true",
                    help="build --from wordnet: also every synset of --names that no edge names (WordNet's "
                         "instances), as classes under the root")
    tx.add_argument("--out", help="build: where to write the JSON")
    tx.set_defaults(func=cmd_taxonomy)

    ind = sub.add_parser("induce", help="HierNet: a class tree from a trained run's confusion probability matrix")
    ind.add_argument("run_dir", help="a trained run (its validation split is predicted)")
    ind.add_argument("--p-min", type=_open_fraction, nargs="+", required=True,
                     help="minimum group proximity; several values group recursively, one per depth")
    ind.add_argument("--g-max", type=_positive_int, nargs="+", default=[50], help="maximum group size (per depth)")
    ind.add_argument("--out", required=True, help="taxonomy JSON to write (use as data.tree)")
    ind.add_argument("--plot", default=None, help="also draw the tree to this image file")
    ind.add_argument("--max-nodes", type=int, default=None, help="print at most this many nodes")
    ind.set_defaults(func=cmd_induce)

    da = sub.add_parser("data", help="data tools: pack a folder/CSV data set into tar shards (data.name: shards)")
    da.add_argument("action", choices=["pack"])
    da.add_argument("source", metavar="SRC_CONFIG_OR_FOLDER",
                    help="a config whose data section names the set, or a folder of class folders")
    da.add_argument("--out", required=True, help="folder to write the shards, taxonomy.json and index.json to")
    da.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    da.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    da.set_defaults(func=cmd_data)

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
    """Run one ``hiervision`` command; returns the exit status (user errors: one line on stderr, 1)."""
    from hiervision.training import Preempted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM/SIGINT during training: a checkpoint was saved
        print(f"hiervision: {e}", file=sys.stderr)
        return 128 + e.signum
    except _user_errors() as e:
        print(f"hiervision: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hiervision: interrupted (run again with the same --out to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
