"""Starting from a pretrained encoder (issue 41), measured on real data we have; writes RESULTS.md § encoders.

    python benchmarks/encoders.py transfer  # Tiny-ImageNet: pretrain on half of the classes, transfer to the rest
    python benchmarks/encoders.py speed     # feature extraction vs a bare AutoModel loop; head epochs on features
    python benchmarks/encoders.py int8      # trains the runs of RESULTS.md § int8, then benchmarks/quantize.py

**transfer**: the 200 Tiny-ImageNet classes are split in two halves by a hash of their WordNet id. Our
ResNet-20 is pretrained (flat, one seed) on half A; on half B, with half B's own WordNet tree, four rows
train with 3 paired seeds: from scratch; the pretrained encoder frozen with a flat head on its cached
features; the same with the recommended head (HAFrame); and the whole network fine-tuned (encoder at a
tenth of the learning rate). Each row reports path accuracy, mistake severity, hdist@5 and wall time, and
its seed-paired difference to the from-scratch row with a 95 % t-interval.

**speed**: the frozen-feature path (``train.freeze_backbone``) over an ``hf:`` encoder (a DINOv2-small-sized
network, random weights: speed does not depend on them) against a bare ``transformers`` forward loop over the
same images, batch and precision; and seconds per head epoch on cached features of Tiny-ImageNet's training set.

**int8**: the runs that ``benchmarks/quantize.py`` compares in float and int8 on both data sets — our flat
ResNet-20 (2 epochs on Fashion-MNIST; the transfer part's from-scratch seed-0 run on Tiny-ImageNet's half B)
and a small ViT (``hf:``, 6 layers of width 192, patch 4) trained here from random weights for one short epoch
on each (no pretrained weights download on these machines): its accuracy is low, the int8 change is the point.

Each part keeps its numbers in ``results/encoders-<part>.json``; the section is written from every part
that has run, so either command can be rerun alone.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from comparison_stats import mean_std, paired_difference
from hiervision.config import load_config
from hiervision.data.tiny_imagenet import tiny_imagenet_taxonomy
from hiervision.training import train
from results_md import write_section
from run import machine

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "comparison" / "tinyimagenet-flat.yaml"
SEEDS = (0, 1, 2)
METRICS = (("path_accuracy", "path acc", 100, "{:.1f}"), ("mistake_severity", "mistake sev.", 1, "{:.2f}"),
           ("hdist@5", "hdist@5", 1, "{:.2f}"))
#: (row, overrides on half B) — {pretrained} is the half-A run's best.pt
ROWS = (
    ("from scratch", []),
    ("frozen encoder + flat head", ["model.backbone_kwargs.pretrained_path={pretrained}",
                                    "train.freeze_backbone=true"]),
    ("frozen encoder + HAFrame head", ["model.name=haframe", "model.backbone_kwargs.pretrained_path={pretrained}",
                                       "train.freeze_backbone=true"]),
    ("fine-tuned (encoder lr × 0.1)", ["model.backbone_kwargs.pretrained_path={pretrained}",
                                       "train.backbone_lr_scale=0.1"]),
)


def class_halves() -> tuple[list[str], list[str]]:
    """Tiny-ImageNet's 200 WordNet ids in two halves of 100, by a hash of the id (stable, no seed to pick)."""
    tree = tiny_imagenet_taxonomy()
    wnids = sorted(tree.external_ids[n] for n in tree.leaves)
    ranked = sorted(wnids, key=lambda w: hashlib.sha256(w.encode()).hexdigest())
    return sorted(ranked[:100]), sorted(ranked[100:])


def _config(classes: list[str], sets: list[str], seed: int, cache: Path) -> dict:
    cfg = load_config(CONFIG, [*sets, f"seed={seed}", "train.progress=false", f"train.feature_cache={cache}"])
    cfg["data"]["keep_classes"] = classes  # a list of 100 WordNet ids: set here rather than as an override string
    return cfg


def _run(cfg: dict, out: Path) -> dict:
    t0 = time.perf_counter()
    m = train(cfg, out, resume=True)
    wall = json.loads((out / "timing.json").read_text())["wall_s"] if (out / "timing.json").exists() else None
    if wall is None:
        wall = time.perf_counter() - t0
        (out / "timing.json").write_text(json.dumps({"wall_s": wall}))
    return {**{k: m[k] for k, *_ in METRICS}, "wall_s": wall}


def transfer(out: Path, pretrain_epochs: int, epochs: int, head_epochs: int) -> dict:
    """Pretrain on half A, then every row on half B at every seed; finished runs are reused (resumable)."""
    half_a, half_b = class_halves()
    cache = out / "features"
    pre = _run(_config(half_a, [f"train.epochs={pretrain_epochs}"], 0, cache), out / "pretrain-A")
    pretrained = out / "pretrain-A" / "best.pt"
    rows: dict[str, dict[int, dict]] = {}
    for label, sets in ROWS:
        frozen = "train.freeze_backbone=true" in sets
        budget = [f"train.epochs={head_epochs if frozen else epochs}"]
        for seed in SEEDS:
            sets_s = [s.replace("{pretrained}", str(pretrained)) for s in sets] + budget
            print(f"[encoders] {label} seed {seed}", flush=True)
            slug = label.split(" (")[0].replace(" + ", "-").replace(" ", "-")
            rows.setdefault(label, {})[seed] = _run(_config(half_b, sets_s, seed, cache), out / f"{slug}-s{seed}")
    return {"pretrain": pre, "rows": rows, "epochs": epochs, "head_epochs": head_epochs,
            "pretrain_epochs": pretrain_epochs, "half_a": half_a, "half_b": half_b}


def transfer_table(res: dict) -> list[str]:
    """Mean ± std per row, then each row's seed-paired difference to from scratch (95 % t-interval)."""
    head = "| row | " + " | ".join(c for _, c, *_ in METRICS) + " | wall time |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    scratch = res["rows"]["from scratch"]
    for label, by_seed in res["rows"].items():
        cells = []
        for key, _, scale, fmt in METRICS:
            s = mean_std([m[key] * scale for m in by_seed.values()])
            cell = f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"
            if label != "from scratch":
                d = paired_difference({k: m[key] * scale for k, m in by_seed.items()},
                                      {k: m[key] * scale for k, m in scratch.items()})
                cell += f" (Δ {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}])"
            cells.append(cell)
        wall = mean_std([m["wall_s"] for m in by_seed.values()])["mean"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} s |")
    return lines


def section(parts: dict[str, dict]) -> str:
    lines = ["## encoders", ""]
    if "transfer" in parts:
        r = parts["transfer"]
        lines += ["### transfer: Tiny-ImageNet, pretrained on the other half of the classes", "",
                  f"Command: `{r['command']}`  ", f"Machine: {r['machine']}", "",
                  f"Half A (100 classes by a hash of the WordNet id) pretrains a flat ResNet-20 for "
                  f"{r['pretrain_epochs']} epochs ({r['pretrain']['wall_s']:.0f} s, path accuracy "
                  f"{100 * r['pretrain']['path_accuracy']:.1f} % on half A's test images). Half B (the other 100 "
                  f"classes, their WordNet tree), 32x32, 3 paired seeds; {r['epochs']} epochs for the rows that "
                  f"train the encoder, {r['head_epochs']} head epochs on cached features for the frozen ones; Δ = "
                  "seed-paired difference to from scratch with its 95 % t-interval (path accuracy in points).", "",
                  *transfer_table(r), ""]
    if "speed" in parts:
        lines += speed_lines(parts["speed"])
    return "\n".join(lines)


#: a DINOv2-small-sized encoder (ViT-S/14 at 224 px), randomly initialised: extraction speed needs no weights
DINOV2_SMALL = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
                "patch_size": 14, "image_size": 224}
PROCESSOR = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 256},
             "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def _median_rate(fn, n: int, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[len(times) // 2]


def extraction_speed(out: Path, images: int) -> dict:
    """``train.freeze_backbone``'s extraction (:func:`hiervision.training.features.extract`) against a bare
    ``AutoModel`` forward loop over the same normalised batches, same precision; medians of 3 after a warm-up."""
    import torch
    import transformers

    from hiervision.data import build_data, iter_batches
    from hiervision.distributed import DistEnv, autocast_dtype
    from hiervision.models import create_model
    from hiervision.training.features import extract

    folder = out / "dinov2-small-random"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        transformers.AutoModel.from_config(transformers.Dinov2Config(**DINOV2_SMALL)).save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    data = build_data({"name": "tiny_imagenet", "image_size": 224, "limit_train": images, "limit_test": 1,
                       "val_fraction": 0, "mean": PROCESSOR["image_mean"], "std": PROCESSOR["image_std"]})
    data = dataclasses.replace(data, val=data.val.subset([]), test=data.test.subset([]))
    model = create_model("flat", data.taxonomy, backbone=f"hf:{folder}", image_size=224).eval()
    cpu, batch, rows = torch.device("cpu"), 32, {}
    for amp_name in ("none", "auto"):
        amp = autocast_dtype(amp_name, cpu)
        env = DistEnv(0, 1, 0, cpu)

        def ours(amp: torch.dtype | None = amp, env: DistEnv = env) -> None:
            extract(model, data, batch, cpu, amp, env)

        @torch.no_grad()
        def bare(amp: torch.dtype | None = amp) -> None:
            for x, _ in iter_batches(data.train, batch):
                with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                    model.backbone.model(pixel_values=data.normalize(x)).pooler_output.float()

        ours(), bare()  # warm-up
        rate_ours, rate_bare = _median_rate(ours, len(data.train)), _median_rate(bare, len(data.train))
        rows[str(amp).replace("torch.", "") if amp else "fp32"] = {"ours": rate_ours, "bare": rate_bare}
    return {"images": len(data.train), "batch": batch, "rows": rows}


def head_epochs(out: Path) -> dict:
    """Seconds per head epoch on cached features of Tiny-ImageNet's training set (ResNet-20 encoder, 32 px),
    the first run's extraction included and a second run's reuse."""
    cfg = load_config(CONFIG, ["train.epochs=3", "train.progress=false", "train.freeze_backbone=true",
                               f"train.feature_cache={out / 'features'}"])
    out_rows = {}
    for name in ("first", "second"):
        t0 = time.perf_counter()
        train(cfg, out / f"head-epochs-{name}", resume=False, force=True)
        wall = time.perf_counter() - t0
        run = out / f"head-epochs-{name}"
        log = [row for row in csv.DictReader((run / "log.csv").open())]
        n = json.loads((run / "features.json").read_text())
        epoch_s = [n["rows"]["train"] / float(r["train_images_per_s"]) for r in log]
        out_rows[name] = {"wall_s": wall, "epoch_s": epoch_s, "reused": n["reused"]}
    return out_rows


#: a small ViT, trained here from random weights (the int8 rows need a trained transformers encoder)
VIT_SMALL = {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
             "patch_size": 4}
VIT_TRAIN = ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.05", "train.warmup_epochs=0.2",
             "train.progress=false", "train.amp=none"]  # fp32: bf16 autocast is slower for it on CPUs here


def int8_runs(out: Path, pretrained_half_b: Path) -> list[Path]:
    """Train (or reuse) the four runs the int8 rows compare; returns their folders."""
    import torch
    import transformers

    fmnist = HERE.parent / "configs" / "comparison" / "fmnist-flat.yaml"
    runs = []
    for name, config, size, sets in (("fmnist-flat", fmnist, None, ["train.epochs=2", "train.progress=false"]),
                                     ("fmnist-vit", fmnist, 28, ["train.epochs=1", "data.limit_train=8000",
                                                                 *VIT_TRAIN]),
                                     ("tiny-half-b-vit", CONFIG, 32, ["train.epochs=1", *VIT_TRAIN])):
        if size is not None:
            folder = out / f"vit-small-{size}"
            if not (folder / "config.json").exists():
                torch.manual_seed(0)
                vit = transformers.ViTConfig(**VIT_SMALL, image_size=size)
                transformers.AutoModel.from_config(vit).save_pretrained(folder)
            sets = [*sets, f"model.backbone=hf:{folder.resolve()}", "model.backbone_kwargs={}", "train.augment=null"]
        cfg = load_config(config, sets)
        if config == CONFIG:
            cfg["data"]["keep_classes"] = class_halves()[1]
        train(cfg, out / name, resume=True)
        runs.append(out / name)
    return [runs[0], pretrained_half_b, *runs[1:]]


def speed(out: Path, images: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return {"extraction": extraction_speed(out, images), "head": head_epochs(out)}


def speed_lines(r: dict) -> list[str]:
    ex, head = r["extraction"], r["head"]
    lines = ["### speed", "", f"Command: `{r['command']}`  ", f"Machine: {r['machine']}", "",
             f"Feature extraction, a DINOv2-small-sized encoder (random weights) on {ex['images']} Tiny-ImageNet "
             f"images at 224 px, batch {ex['batch']}: `train.freeze_backbone`'s extraction against a bare "
             "`AutoModel` forward loop over the same batches (median of 3 after a warm-up; aim ≥ 0.95×).", "",
             "| precision | ours img/s | bare AutoModel img/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {p} | {v['ours']:.1f} | {v['bare']:.1f} | {v['ours'] / v['bare']:.2f}× |"
              for p, v in ex["rows"].items()]
    first, second = head["first"], head["second"]
    lines += ["", "Head training on cached features of Tiny-ImageNet's training set (ResNet-20 encoder, 32 px, "
              "flat head, batch 128): seconds per epoch "
              f"{' / '.join(f'{x:.1f}' for x in first['epoch_s'])} s; the first run took {first['wall_s']:.0f} s "
              f"with the extraction, a second run {second['wall_s']:.0f} s reading the cache "
              f"(reused: {second['reused']})."]
    return lines


def write(part: str, res: dict, command: str) -> None:
    res = {**res, "command": command, "machine": machine()}
    (HERE / "results" / f"encoders-{part}.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    parts = {p: json.loads(f.read_text()) for p in ("transfer", "speed")
             if (f := HERE / "results" / f"encoders-{p}.json").exists()}
    write_section("encoders", section(parts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["transfer", "speed", "int8"])
    p.add_argument("--out", default="runs/encoders", help="where the runs and the feature cache go")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=6, help="epochs of the rows that train the encoder")
    p.add_argument("--head-epochs", type=int, default=10, help="head epochs on cached features")
    p.add_argument("--images", type=int, default=256, help="speed: images the two extraction loops read")
    args = p.parse_args()
    command = "python benchmarks/encoders.py " + " ".join(sys.argv[1:])
    if args.part == "int8":
        import quantize

        runs = int8_runs(Path(args.out), Path(args.out) / "from-scratch-s0")
        return quantize.main([str(r) for r in runs], command=f"{command} (trains the runs, then benchmarks/quantize.py "
                             + " ".join(str(r) for r in runs) + ")")
    if args.part == "transfer":
        res = transfer(Path(args.out), args.pretrain_epochs, args.epochs, args.head_epochs)
    else:
        res = speed(Path(args.out), args.images)
    write(args.part, res, command)
    print((HERE / "RESULTS.md").read_text().split("## encoders", 1)[1].split("\n## ", 1)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
