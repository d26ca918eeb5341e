"""``hiervision demo``: every method trained side by side on Fashion-MNIST at one small budget, in one table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hiervision.config import load_config, merge
from hiervision.recipe import RECOMMENDED_HEAD

__all__ = ["DEMO_BASE", "DEMO_METHODS", "add_parser", "cmd_demo"]

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
DEMO_VERDICT = ("at a credible budget (8-10 epochs, 3 paired seeds) HAFrame keeps flat's top-1 within 0.5 pt with "
                "milder mistakes on Fashion-MNIST but not on Tiny-ImageNet, so flat stays the recipe, and no "
                "architecture beats flat: DHNN and Guo's CNN-RNN are not settled on Fashion-MNIST and lose on "
                "Tiny-ImageNet, so this short run cannot rank them (README 'Which method?'; benchmarks/RESULTS.md, "
                "section comparison)")
#: accuracy target of the demo table's hedged answer (Deng et al.'s DARTS, λ fitted on validation)
DEMO_HEDGE_TARGET = 0.95
# (table label, head, config overrides on top of the head's own ``--method`` options): the package's methods,
# same backbone, seed and budget
#: heads the demo always trains, by table label: flat, the baseline every method is measured against (HierNet's
#: row starts from its weights), and HAFrame, the head that met the comparison's rule on Fashion-MNIST
_ALWAYS = {"flat": "flat", "haframe": "HAFrame"}
DEMO_METHODS: list[tuple[str, str, dict]] = [
    # first: the recipe hiervision recommends (recipe.RECOMMENDED_HEAD; CRM on its run shown beside it)
    (f"{_ALWAYS.get(RECOMMENDED_HEAD, RECOMMENDED_HEAD)} (recommended)", RECOMMENDED_HEAD, {}),
    *((label, head, {}) for head, label in _ALWAYS.items() if head != RECOMMENDED_HEAD),
    # Koo et al.'s best variant in benchmarks/RESULTS.md (dhnn profile): its --method options, residual arc on
    ("DHNN CNN-RNN-Resi", "dhnn_rnn", {}),
    # Guo et al.'s CNN-RNN generator, as configs/fmnist-guo-rnn.yaml (guo profile)
    ("Guo CNN-RNN", "guo_rnn", {}),
    # HierNet on the given tree, as configs/fmnist-hiernet.yaml (hiernet profile): starts from the flat
    # row's weights (transfer), so its total budget is twice the others'; routing reported beside conditional
    ("HierNet conditional", "hiernet", {"model": {"split": [5, 7], "extra_blocks": 2,
                                                  "backbone_kwargs": {"pretrained_path": "{flat}"}},
                                        "train": {"lr": 0.05}}),
]


def _demo_hedged(run: Path, target: float) -> dict:
    """Calibrate a finished demo run on its val split and report the hedged answer on test."""
    import torch

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
    """Train each of DEMO_METHODS (HierNet from the flat row's weights) and print the table and its verdict."""
    from hiervision.models import model_info
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
    for label, head, extra in DEMO_METHODS:
        overrides = merge(model_info(head).recipe_options(), extra)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``demo [--full]``."""
    d = sub.add_parser("demo", help="train every method side by side on Fashion-MNIST and print one table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=None, help="epochs per method (default 2; --full 3)")
    d.add_argument("--limit-train", type=int, default=None, help="training images (default 4000; --full 20000)")
    d.add_argument("--full", action="store_true", help="the larger budget of the README's table (≈ 13 min on "
                   "2 cores) instead of the ≤ 3 min default")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
