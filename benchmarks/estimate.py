"""Issue 39's time estimate, checked: `hiervision train FOLDER` says how long the run will take after its first
steps ("time: about 2 min 10 s for 4 epoch(s) …"); this trains a quickstart-sized folder and compares that
estimate with the wall time the epochs then took.

    python benchmarks/estimate.py                        # 3,600 Fashion-MNIST images in nested class folders
    python benchmarks/estimate.py --epochs 4 --write     # ... and puts the row in RESULTS.md § estimate

The folder is written once (PNGs of the first images of each Fashion-MNIST class, under their 3-level paths:
``Clothes/Tops/Shirt/…``), the run is the recipe `train FOLDER` picks with ``--set train.epochs=N``, and two
times are kept: the estimate the planner prints after its first steps (:class:`hiervision.training.budget.Planner`)
and the wall time of the epochs (training and validation; the post-training steps are not in the estimate).
Declared before the run: the estimate is *good* when it lies within 25 % of the wall time. Run it alone: on two
cores another process changes the speed halfway through and no estimate can know that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.25  # |estimate − wall| / wall that counts as within


def write_folder(root: Path, images: int) -> Path:
    """``images`` Fashion-MNIST training images as PNGs in class folders named by their tree paths."""
    from PIL import Image

    from hiervision.data.fashion_mnist import default_root, fashion_mnist_taxonomy, read_idx

    pixels = read_idx(default_root() / "train-images-idx3-ubyte.gz")
    labels = read_idx(default_root() / "train-labels-idx1-ubyte.gz")
    tree = fashion_mnist_taxonomy()
    leaves = [tree.path(n) for n in tree.leaves]
    for i in range(images):
        folder = root.joinpath(*(tree.names[n] for n in leaves[int(labels[i])]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i}.png")
    return root


def measure(folder: Path, out: Path, epochs: int) -> dict:
    """Train the recipe on ``folder`` for ``epochs``; the planner's first estimate and the epochs' wall time."""
    import hiervision.training.engine as engine
    from hiervision.recipe import auto_config
    from hiervision.training import budget, train

    said, walls = [], []
    plan = budget.Planner._plan

    def recorded(self):
        text = plan(self)
        said.append({"text": text, "seconds": self.epoch_seconds() * (self.configured - self.first_epoch)})
        return text

    run_epochs = engine.run_epochs

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        run_epochs(*args, **kwargs)
        walls.append(time.perf_counter() - t0)

    budget.Planner._plan, engine.run_epochs = recorded, timed
    try:
        cfg = auto_config(folder, overrides=[f"train.epochs={epochs}", "train.progress=false"])
        t0 = time.perf_counter()
        train(cfg, out, resume=False)
        total = time.perf_counter() - t0
    finally:
        budget.Planner._plan, engine.run_epochs = plan, run_epochs
    estimate, wall = said[0]["seconds"], walls[0]
    return {"images": sum(1 for _ in folder.rglob("*.png")), "epochs": epochs, "estimate_s": estimate,
            "said": said[0]["text"], "epochs_wall_s": wall, "run_wall_s": total,
            "error": (estimate - wall) / wall, "within": abs(estimate - wall) <= TOLERANCE * wall}


def section(row: dict, command: str) -> str:
    return "\n".join([
        "## estimate", "",
        f"`{command}` — the planner's estimate after the first steps against the epochs' wall time (training and "
        f"validation), on one `train FOLDER` run; declared: within {TOLERANCE:.0%} is good.", "",
        "| images | epochs | estimate | epochs' wall time | error | within 25 %? | whole run (with post-training) |",
        "|---|---|---|---|---|---|---|",
        f"| {row['images']:,} | {row['epochs']} | {row['estimate_s']:.0f} s | {row['epochs_wall_s']:.0f} s | "
        f"{row['error']:+.0%} | {'yes' if row['within'] else 'no'} | {row['run_wall_s']:.0f} s |", "",
        f"What it said: \"{row['said']}\"", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3600)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--write", action="store_true", help="write the row to RESULTS.md § estimate")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "photos", args.images)
        row = measure(folder, Path(tmp) / "run", args.epochs)
    (HERE / "results").mkdir(exist_ok=True)
    command = " ".join(["python benchmarks/estimate.py", *(argv if argv is not None else sys.argv[1:])])
    (HERE / "results" / "estimate.json").write_text(json.dumps({"command": command, **row}, indent=1))
    text = section(row, command)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section("estimate", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
