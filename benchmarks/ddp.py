"""DDP on CPU, measured: 2 gloo processes × 1 thread against 1 process × 2 threads, same config and seed.

Both runs train the same config (global batch 128, the same epoch order) on real Fashion-MNIST; the
table gives each run's final test metrics (equivalence: the difference should sit inside the ±0.9 pt
seed spread measured by the foundation profile) and its training img/s and wall time (scaling: the
honest answer on a 2-core machine, whatever it is).

    python benchmarks/ddp.py                    # 20k training images, 2 epochs (about 6 min on 2 cores)
    python benchmarks/ddp.py --limit-train 2000 --epochs 1 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from results_md import write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist-flat.yaml")
    p.add_argument("--limit-train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="runs/bench/ddp")
    p.add_argument("--no-write", action="store_true", help="print only; leave results/ and RESULTS.md alone")
    args = p.parse_args()
    sets = ["--set", f"data.limit_train={args.limit_train}", "--set", f"train.epochs={args.epochs}",
            "--set", "train.progress=false", "--quiet", "--no-resume", "--force"]
    out = Path(args.out)
    rows = {}
    for label, cmd, threads in [
        ("1 process × 2 threads", [sys.executable, "-m", "hiervision", "train", args.config, "--out",
                                   str(out / "one"), "--set", "train.threads=2", *sets], 2),
        ("2 processes × 1 thread (DDP, gloo)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node", "2", "-m", "hiervision", "train", args.config,
                                                 "--out", str(out / "ddp"), "--set", "train.threads=1", *sets], 1),
    ]:
        wall = run(cmd, threads)
        m = json.loads((out / ("one" if threads == 2 else "ddp") / "metrics.json").read_text())
        rows[label] = {"wall_s": wall, "train_images_per_s": m["train_images_per_s"], "world_size": m["world_size"],
                       "path_accuracy": m["path_accuracy"], "node_accuracy": m["node_accuracy"]}
        print(label, json.dumps(rows[label]), flush=True)
    one, ddp = rows.values()
    command = "python benchmarks/ddp.py " + " ".join(sys.argv[1:])
    lines = ["## ddp", "",
             f"`{command}` — {args.config}, {args.limit_train} training images, {args.epochs} epochs, seed 0, "
             f"global batch 128, real Fashion-MNIST; {platform.machine()} CPU, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}. Each rank draws its own augmentation, so the runs are not "
             "bit-identical (tests/test_distributed.py checks identical weights with augmentation off).", "",
             "| setting | path acc | node acc | train img/s | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['path_accuracy']:.4f} | {v['node_accuracy']:.4f} | {v['train_images_per_s']:.0f} | "
              f"{v['wall_s']:.0f} |" for k, v in rows.items()]
    lines += ["", f"DDP / single process: img/s ×{ddp['train_images_per_s'] / one['train_images_per_s']:.2f}, "
              f"path accuracy {100 * (ddp['path_accuracy'] - one['path_accuracy']):+.2f} pt."]
    print("\n".join(lines))
    if not args.no_write:
        (HERE / "results" / "ddp.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2),
                                                    encoding="utf-8")
        write_section("ddp", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
