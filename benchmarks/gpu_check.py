"""The GPU path, measured: training img/s of every method and a short real training of each, on one device.

Run by ``benchmarks/gpu_check.sh`` (which first runs the test suite's CUDA-marked tests). On a GPU
machine it fits in about 8 minutes; ``--budget tiny --device cpu`` runs every code path in a minute
on a CPU (the suite does that).

* throughput: each method's training step (forward, loss, backward, optimizer step) under the run's
  ``amp: auto`` and channels-last, on Fashion-MNIST shapes (28×28, its 3-level tree; the variable-depth
  tree for CNN-S2S) and Tiny-ImageNet shapes at 64×64 (its WordNet tree, depth 2–12), back to back
  on one fixed batch, median of rounds; the input content does not change the timing;
* training: each method's Fashion-MNIST config through ``hiervision.training.train`` on the device
  (real data, the loader, evaluation), a short budget: path accuracy, train img/s, wall time.

    python benchmarks/gpu_check.py --device cuda --write-results
    python benchmarks/gpu_check.py --device cpu --budget tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hiervision.config import load_config, merge
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
from hiervision.distributed import autocast_dtype
from hiervision.models import create_model
from hiervision.taxonomy import Taxonomy
from hiervision.training import build_optimizer, train
from results_md import write_section

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
# label -> Fashion-MNIST config (fixed tree unless the config is a variable-depth one)
METHODS = {
    "flat": "fmnist-flat.yaml",
    "DHNN CNN-RNN-Resi": "fmnist-res-rnn-resi.yaml",
    "DHNN CNN-S2S-Linear": "fmnistvar-res-s2s-linear.yaml",
    "Guo multi-head (fine-to-coarse)": "fmnist-guo-f2c.yaml",
    "Guo CNN-RNN": "fmnist-guo-rnn.yaml",
    "HierNet (given tree)": "fmnist-hiernet.yaml",
}
# the Tiny-ImageNet rows: its WordNet tree has paths of 2-12 nodes, so the fixed-depth heads do not apply
TINY_METHODS = {
    "flat": "tinyimagenet-flat.yaml",
    "DHNN CNN-S2S-Pool": "tinyimagenet-res-s2s-pool.yaml",
    "Guo CNN-RNN": "tinyimagenet-guo-rnn.yaml",
    "HierNet (WordNet tree)": "tinyimagenet-hiernet-wordnet.yaml",
}
BUDGETS = {  # throughput batch/steps/rounds; training: images, epochs
    "full": {"batch": 256, "steps": 20, "rounds": 3, "limit_train": None, "epochs": 1},
    "tiny": {"batch": 8, "steps": 2, "rounds": 1, "limit_train": 256, "epochs": 1},
}


def _model(cfg: dict, tax: Taxonomy, in_chans: int, size: int, device: torch.device):
    model_cfg = dict(cfg["model"])
    bk = model_cfg.get("backbone_kwargs") or {}
    # random weights time the same as transferred ones
    model_cfg["backbone_kwargs"] = {k: v for k, v in bk.items() if k != "pretrained_path"}
    model = create_model(model_cfg.pop("name"), tax, in_chans=in_chans, image_size=size, **model_cfg)
    return model.to(device).to(memory_format=torch.channels_last).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(rows: dict[str, str], tax_of, in_chans: int, size: int, device: torch.device, budget: dict) -> dict:
    """Median training img/s of each row, interleaved in rounds (the first step of a round is untimed)."""
    amp = autocast_dtype("auto", device)
    torch.manual_seed(0)
    images = torch.randn(budget["batch"], in_chans, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    runs = {}
    for label, config in rows.items():
        cfg = load_config(CONFIGS / config)
        tax = tax_of(cfg)
        model = _model(cfg, tax, in_chans, size, device)
        leaves = torch.tensor(tax.leaves, device=device)
        targets = leaves[torch.arange(budget["batch"], device=device) % len(leaves)]
        runs[label] = (model, build_optimizer(model.parameters(), cfg["train"]), targets, cfg["train"]["grad_clip"])
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(budget["rounds"]):
        for label, (model, opt, targets, clip) in runs.items():
            for step in range(budget["steps"] + 1):
                if step == 1:
                    _sync(device)
                    t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = model.loss(model(images), targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            _sync(device)
            rates[label].append(budget["batch"] * budget["steps"] / (time.perf_counter() - t0))
    base = statistics.median(rates[next(iter(rates))])
    return {label: {"images_per_s": statistics.median(r), "ratio_to_flat": statistics.median(r) / base}
            for label, r in rates.items()}


def short_training(device: torch.device, budget: dict, out: Path) -> dict:
    """Each method's Fashion-MNIST config, trained and tested through the engine on the device."""
    results = {}
    for label, config in METHODS.items():
        over = {"train": {"epochs": budget["epochs"], "progress": False, "device": str(device)}}
        if budget["limit_train"]:
            over["data"] = {"limit_train": budget["limit_train"], "limit_test": budget["limit_train"]}
        cfg = merge(load_config(CONFIGS / config), over)
        t0 = time.perf_counter()
        m = train(cfg, out / label.split()[0].lower() / Path(config).stem, resume=False, force=True)
        results[label] = {"path_accuracy": m["path_accuracy"], "node_accuracy": m["node_accuracy"],
                          "train_images_per_s": m["train_images_per_s"], "wall_s": time.perf_counter() - t0,
                          "amp": m["amp"], "epochs": budget["epochs"], "data": m["data"]}
        print(f"  {label}: path acc {m['path_accuracy']:.4f}, {m['train_images_per_s']:.0f} img/s", flush=True)
    return results


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(report: dict, command: str) -> None:
    (HERE / "results" / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lines = ["## gpu check", "", f"`{command}` on {report['machine']}, amp {report['amp']}, {report['date']}.", ""]
    for name, rows in report["throughput"].items():
        lines += [f"Training throughput, {name} (batch {report['budget']['batch']}, median of "
                  f"{report['budget']['rounds']} rounds × {report['budget']['steps']} steps, back to back):", "",
                  "| method | train img/s | ratio to flat |", "|---|---|---|"]
        lines += [f"| {k} | {v['images_per_s']:.0f} | {v['ratio_to_flat']:.2f} |" for k, v in rows.items()]
        lines.append("")
    lines += [f"Short real training on Fashion-MNIST ({report['budget']['epochs']} epochs, the method's config, "
              "through the engine):", "", "| method | path acc | node acc | train img/s (in run) | wall s |",
              "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['path_accuracy']:.4f} | {v['node_accuracy']:.4f} | {v['train_images_per_s']:.0f} | "
              f"{v['wall_s']:.0f} |" for k, v in report["training"].items()]
    write_section("gpu check", "\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--tiny-tree", default=None,
                   help="Tiny-ImageNet taxonomy.json (default: built from HIERVISION_DATA)")
    p.add_argument("--runs", default="runs/gpu_check", help="where the short trainings write their run folders")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.add_argument("--write-results", action="store_true", help="update results/gpu_check.json and RESULTS.md")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    budget = BUDGETS[args.budget]
    fixed, var = fashion_mnist_taxonomy(), fashion_mnist_taxonomy(variable_depth=True)
    report: dict = {"machine": machine(device), "device": str(device), "budget": budget,
                    "amp": str(autocast_dtype("auto", device)).replace("torch.", ""),
                    "date": time.strftime("%Y-%m-%d"), "throughput": {}}
    t0 = time.perf_counter()
    print("throughput: Fashion-MNIST 28x28", flush=True)
    report["throughput"]["Fashion-MNIST 28×28"] = throughput(
        METHODS, lambda cfg: var if cfg["data"].get("name") == "fashion_mnist_var" else fixed, 1, 28, device, budget)
    tiny = None
    if args.tiny_tree:
        tiny = Taxonomy.load(args.tiny_tree)
    else:
        try:
            from hiervision.data.tiny_imagenet import tiny_imagenet_taxonomy

            tiny = tiny_imagenet_taxonomy()
        except (OSError, ValueError) as e:
            print(f"throughput: Tiny-ImageNet skipped ({e})", flush=True)
    if tiny is not None:
        print("throughput: Tiny-ImageNet 64x64", flush=True)
        report["throughput"]["Tiny-ImageNet 64×64"] = throughput(TINY_METHODS, lambda cfg: tiny, 3, 64, device,
                                                                 budget)
    print("short training on Fashion-MNIST", flush=True)
    report["training"] = short_training(device, budget, Path(args.runs))
    report["seconds"] = time.perf_counter() - t0
    for name, rows in report["throughput"].items():
        print(name, json.dumps({k: round(v["images_per_s"]) for k, v in rows.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.write_results:
        write_results(report, "bash benchmarks/gpu_check.sh" if os.environ.get("GPU_CHECK_SH") else
                      "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
