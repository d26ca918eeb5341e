"""Prediction throughput of trained runs on the same real test images, measured back to back.

The epoch-end evaluations inside a benchmark run drift by ±15 % on a shared 2-core machine; here
every run predicts the same batches, interleaved, and the median of the rounds is reported. Used for
HierNet's routing target (its latency within 1.1x of the flat backbone's):

    python benchmarks/infer.py runs/bench/hiernet/flat-3-epochs-s0 \\
        runs/bench/hiernet/hiernet-given-tree-conditional-s0 runs/bench/hiernet/hiernet-induced-tree-conditional-s0

The first run is the base; a run whose model has several eval modes (HierNet) is timed in each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hiervision.experiment import load_run, run_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (the first is the base)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    models = {}
    for run in args.runs:
        _, _, model, _ = load_run(run)
        for mode in model.eval_modes or [None]:
            clone = load_run(run)[2] if mode else model
            if mode:
                clone.set_eval_mode(mode)
            models[f"{run.rstrip('/').split('/')[-1]}{f' ({mode})' if mode else ''}"] = clone.eval()
    cfg = load_run(args.runs[0])[0]
    data = run_data(cfg)
    n = min(args.images, len(data.test))
    images = data.normalize(torch.stack([data.test[i][0] for i in range(n)]))
    images = images.contiguous(memory_format=torch.channels_last)
    rates: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad():
        for _ in range(args.rounds):
            for label, model in models.items():
                model.predict(images[: args.batch_size])  # warm-up, untimed
                t0 = time.perf_counter()
                for b in range(0, n, args.batch_size):
                    model.predict(images[b : b + args.batch_size])
                rates[label].append(n / (time.perf_counter() - t0))
    print(f"predict images/s on {n} real test images of {args.runs[0]}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print("| run | predict img/s | ratio to the first |\n|---|---|---|")
    base = statistics.median(next(iter(rates.values())))
    for label, r in rates.items():
        print(f"| {label} | {statistics.median(r):.0f} | {statistics.median(r) / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
