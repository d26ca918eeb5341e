"""Images per second of the lazy 224-px ImageNet-style pipeline against the model's own training rate.

Tiny-ImageNet's 64-px JPEGs go through ``data.pipeline: imagenet`` (decode, random resized crop
upscaled to 224 px, flip, uint8 batches) with 0, 1 and 2 DataLoader workers; the model is a flat
head on a ResNet-50 of our registry training on random 224-px batches. A ratio ≥ 1 means the
loader keeps the model fed.

    python benchmarks/pipeline.py                  # 2000 images, 0/1/2 workers, ResNet-50 at 224 (minutes)
    python benchmarks/pipeline.py --write-results  # also pipeline.json and the RESULTS.md section
    python benchmarks/pipeline.py --tiny           # seconds: a smoke test of the script itself
    python benchmarks/pipeline.py --device cuda --workers 0 2 4 8
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

from hiervision.data import BatchLoader
from hiervision.data.base import FileImageDataset
from hiervision.data.imageio import ImageReader
from hiervision.data.pipeline import PipelineDataset, RandomResizedCrop
from hiervision.models import create_model
from hiervision.taxonomy import Taxonomy
from results_md import write_section

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = Path(os.environ.get("HIERVISION_DATA", HERE.parents[1] / "shared" / "data")) / "tiny-imagenet-200"


def tiny_imagenet_files(root: Path, n: int) -> FileImageDataset:
    """``n`` training JPEGs spread over the classes (the first ones of each), labelled on a flat tree."""
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: Tiny-ImageNet not found (give --root)")
    wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
    per_class = max(1, -(-n // len(wnids)))
    tax = Taxonomy.from_parent_map({w: None for w in wnids})
    sources, targets = [], []
    for w in wnids:
        for f in sorted((train / w / "images").iterdir())[:per_class]:
            sources.append(str(f))
            targets.append(tax.index(w))
    sources, targets = sources[:n], targets[:n]
    return FileImageDataset(sources, torch.tensor(targets), tax, ImageReader(3))


def loader_rate(ds: PipelineDataset, batch: int, workers: int, device: torch.device, epochs: int) -> float:
    """img/s over whole epochs after the first batch (worker start-up excluded), float batches on ``device``."""
    loader = BatchLoader(ds, batch, shuffle=True, seed=0, num_workers=workers, device=device, drop_last=True)
    rates = []
    for epoch in range(epochs):
        seen, t0 = 0, None
        for x, _ in loader.set_epoch(epoch):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates)


def model_rate(tax: Taxonomy, backbone: str, crop: int, batch: int, steps: int, device: torch.device) -> float:
    """Training img/s of a flat head on ``backbone`` at ``crop`` px (median step time after one warm-up)."""
    torch.manual_seed(0)
    model = create_model("flat", tax, backbone=backbone, image_size=crop).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.tensor(tax.leaves, device=device)[torch.arange(batch, device=device) % len(tax.leaves)]
    amp = torch.bfloat16 if device.type == "cuda" else None
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "## pipeline",
        "",
        f"The lazy ImageNet-style pipeline (`data.pipeline: imagenet`: JPEG decode, random resized crop to "
        f"{a['crop']} px, flip, uint8 batches converted to float) on {result['images']} Tiny-ImageNet training "
        f"images (64 px, so every crop is upscaled), against a flat {a['backbone']} training at {a['crop']} px "
        f"(batch {a['model_batch']}, median of {a['steps']} steps). Ratio ≥ 1: the loader keeps the model fed.",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}",
        "",
        "| loader workers | pipeline img/s | model train img/s | ratio |",
        "|---|---|---|---|",
    ]
    for w, r in result["pipeline_images_per_s"].items():
        lines.append(f"| {w} | {r:.0f} | {result['model_images_per_s']:.1f} | {r / result['model_images_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Tiny-ImageNet-200 folder")
    p.add_argument("--images", type=int, default=2000, help="training images in the subset")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64, help="loader batch")
    p.add_argument("--epochs", type=int, default=2, help="timed loader epochs per worker count (median)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed model steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a few seconds' budget (checks the script, measures nothing)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where pipeline.json goes")
    p.add_argument("--write-results", action="store_true", help="write pipeline.json and the RESULTS.md section")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.batch_size, args.epochs, args.crop = 24, 8, 1, 64
        args.model_batch, args.steps, args.workers = 2, 1, [w for w in args.workers if w <= 1]
    device = torch.device(args.device)
    files = tiny_imagenet_files(args.root, args.images)
    ds = PipelineDataset(files, RandomResizedCrop(args.crop))
    rates = {}
    for w in args.workers:
        rates[str(w)] = loader_rate(ds, args.batch_size, w, device, args.epochs)
        print(f"{w} workers: {rates[str(w)]:.0f} img/s", flush=True)
    model = model_rate(files.taxonomy, args.backbone, args.crop, args.model_batch, args.steps, device)
    print(f"{args.backbone} at {args.crop} px trains at {model:.1f} img/s", flush=True)
    cpu = platform.processor() or platform.machine()
    result = {
        "images": len(files), "pipeline_images_per_s": rates, "model_images_per_s": model,
        "ratio": {w: r / model for w, r in rates.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu}, {os.cpu_count()} cores, {device}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }  # fmt: skip
    section = markdown(result)
    print(section)
    if args.write_results:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pipeline.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        write_section("pipeline", section, args.out.parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
