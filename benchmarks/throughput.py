"""Training throughput of each method's head against the flat model, measured back to back.

Epoch timings inside full benchmark runs drift by ±10 % on a shared 2-core machine, which is as
large as the effect to measure (Koo et al.'s head must cost ≤ 10 % of the flat model's training
throughput). Here every config trains on the same fixed batch, in rounds that interleave the
models, and the median of the rounds is reported.

    python benchmarks/throughput.py                      # DHNN twins vs flat, 28x28 Fashion-MNIST shapes
    python benchmarks/throughput.py --rows guo           # Guo's generators and CNN-RNN vs flat
    python benchmarks/throughput.py --rows hiernet --infer  # prediction img/s: flat, HierNet routing / conditional
    python benchmarks/throughput.py --rounds 7 --steps 10
    python benchmarks/throughput.py --only CNN-S2S-Linear --rounds 3 --steps 2   # one row beside its flat base
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from hiervision.config import load_config
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
from hiervision.models import create_model
from hiervision.training import build_optimizer

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
# row set -> (label, config, variable-depth tree[, model overrides]); the first "flat" row of a run is the base
ROWS = {
    "dhnn": [
        ("flat", "fmnist-flat.yaml", False),
        ("CNN-RNN", "fmnist-res-rnn.yaml", False),
        ("CNN-RNN-Resi", "fmnist-res-rnn-resi.yaml", False),
        ("flat (var)", "fmnistvar-flat.yaml", True),
        ("CNN-S2S-Linear", "fmnistvar-res-s2s-linear.yaml", True),
        ("CNN-S2S-Conv", "fmnistvar-res-s2s-conv.yaml", True),
        ("CNN-S2S-Pool", "fmnistvar-res-s2s-pool.yaml", True),
    ],
    "guo": [
        ("flat", "fmnist-flat.yaml", False),
        ("coarse-specific", "fmnist-guo-coarse.yaml", False),
        ("coarse-to-fine", "fmnist-guo-c2f.yaml", False),
        ("fine-to-coarse", "fmnist-guo-f2c.yaml", False),
        ("fine-and-coarse", "fmnist-guo-fandc.yaml", False),
        ("CNN-RNN", "fmnist-guo-rnn.yaml", False),
    ],
    "hiernet": [
        ("flat", "fmnist-flat.yaml", False),
        ("HierNet given tree, conditional", "fmnist-hiernet.yaml", False),
        ("HierNet given tree, routing", "fmnist-hiernet.yaml", False, {"eval_mode": "routing"}),
    ],
}


def build(config: str, variable: bool, overrides: dict | None = None):
    cfg = load_config(CONFIGS / config)
    tax = fashion_mnist_taxonomy(variable_depth=variable)
    model_cfg = {**cfg["model"], **(overrides or {})}
    bk = model_cfg.get("backbone_kwargs") or {}
    # a transfer start does not change the timing: random weights stand in for it
    model_cfg["backbone_kwargs"] = {k: v for k, v in bk.items() if k != "pretrained_path"}
    model = create_model(model_cfg.pop("name"), tax, in_chans=1, image_size=28, **model_cfg)
    model = model.to(memory_format=torch.channels_last).train()
    return model, build_optimizer(model.parameters(), cfg["train"]), tax, cfg["train"].get("grad_clip")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    p.add_argument("--rows", choices=sorted(ROWS), default="dhnn", help="which methods to time")
    p.add_argument("--infer", action="store_true", help="time prediction (eval mode, no grad) instead of training")
    p.add_argument("--only", nargs="+", metavar="LABEL",
                   help="time only these rows (and the flat row they are compared with): a short check")
    args = p.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    rows = ROWS[args.rows]
    if args.only:
        unknown = sorted(set(args.only) - {r[0] for r in rows})
        if unknown:
            p.error(f"--only: no row {unknown[0]!r} in --rows {args.rows} (rows: {', '.join(r[0] for r in rows)})")
        # each chosen row keeps the flat row of its own tree (the last flat row before it) as its base
        keep, base = [], None
        for r in rows:
            if r[0].startswith("flat"):
                base = r
            elif r[0] in args.only:
                keep += [x for x in (base, r) if x is not None and x not in keep]
        rows = keep
    runs = {}
    for label, config, variable, *over in rows:
        model, opt, tax, clip = build(config, variable, over[0] if over else None)
        leaves = torch.tensor(tax.leaves)
        targets = leaves[torch.arange(args.batch_size) % len(leaves)]
        runs[label] = (model.eval() if args.infer else model, opt, targets, clip)
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, (model, opt, targets, clip) in runs.items():
            for step in range(args.steps + 1):  # the first step of a round warms caches up, untimed
                if step == 1:
                    t0 = time.perf_counter()
                if args.infer:
                    model.predict(images)
                    continue
                loss = model.loss(model(images), targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            rates[label].append(args.batch_size * args.steps / (time.perf_counter() - t0))
    what = "predict" if args.infer else "train"
    print(f"{what} images/s, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.rounds} "
          f"rounds x {args.steps} steps")
    print(f"| method | {what} img/s | ratio to flat |\n|---|---|---|")
    base = None
    for label, r in rates.items():
        med = statistics.median(r)
        if label.startswith("flat"):
            base = med
        print(f"| {label} | {med:.0f} | {med / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
