"""Why Hier-COS stays at chance on Tiny-ImageNet while it keeps flat's top-1 on Fashion-MNIST (issue 40).

    python benchmarks/hiercos_collapse.py              # trains the one-epoch arms that are missing (~4 min each)
    python benchmarks/hiercos_collapse.py --table-only # rewrite the section from what is measured

The comparison's Hier-COS cells on Tiny-ImageNet 32×32 (ResNet-20 from scratch, 10 epochs) end near chance
top-1. To tell the method's training dynamics from a defect of ours, each arm trains the comparison's
Tiny-ImageNet config for one epoch (the whole cosine schedule in it; seed 0) and changes one thing:

* ``flat``: the flat head, the reference that shows one epoch is enough to leave chance;
* ``hiercos``: Hier-COS as in the comparison (α = 0.05, every parameter at lr 0.1);
* ``authors_split``: the authors' optimiser (``Depanshu-Sani/Hier-COS``, ``MBM/scripts/start_training.py``:
  ``_custom_sgd``, CIFAR-100 from scratch: the transformation head at 0.1, the backbone at 0.01);
* ``no_aux``: KL only (α = 0): no per-level term, so no pull towards 0 on the levels below a shallow leaf.

Each arm's test top-1 and the collapse measure: the share of test images given the single most common answer
(1/200 = 0.5 % when answers are spread like the classes). An arm is marked *collapsed* when its top-1 is below
2 % (four times chance) and its most common answer takes over 20 % of the test images (thresholds set after a
first one-epoch look at the Hier-COS arms, which sat at 0.6–1.4 % top-1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comparison_plan import CONFIGS, DATASETS, Cell, Ledger, Method, _cell, plan  # noqa: E402
from open_world import trained  # noqa: E402
from results_md import write_section  # noqa: E402

DATA = "tiny32"
#: arm -> (what it is, config file, overrides)
ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flat": ("flat softmax (reference)", "tinyimagenet-flat.yaml", ()),
    "hiercos": ("Hier-COS as in the comparison (α 0.05, one learning rate)", "tinyimagenet-hiercos.yaml", ()),
    "authors_split": ("Hier-COS, the authors' optimiser: head at lr 0.1, backbone at 0.01",
                      "tinyimagenet-hiercos.yaml", ("train.backbone_lr_scale=0.1",)),
    "no_aux": ("Hier-COS, KL only (α = 0)", "tinyimagenet-hiercos.yaml", ("model.aux_weight=0",)),
}
TOP1_BELOW, SHARE_ABOVE = 0.02, 0.20  # the collapse mark (module docstring)


def cell(arm: str, runs: Path) -> Cell:
    """One arm's one-epoch cell (its folder named by its config's digest, so a changed arm trains afresh)."""
    data = next(d for d in DATASETS if d.key == DATA)
    _, config, sets = ARMS[arm]
    return _cell(data, Method(f"{arm}-1ep", arm, config), 0, runs / "hiercos-collapse", CONFIGS,
                 ["train.epochs=1", *sets])


def most_common_share(run_dir: Path) -> float:
    """The share of test images given the single most common answer (the run's best.pt, argmax decoding)."""
    import torch

    from hiervision.evaluation import predict_dataset
    from hiervision.experiment import load_run, run_data

    cfg, _, model, _ = load_run(run_dir)
    data = run_data(cfg, run_dir)
    with torch.no_grad():
        pred, _ = predict_dataset(model, data, data.test, 512, torch.device("cpu"), None)
    return torch.bincount(pred.nodes).max().item() / len(pred)


def measure(arm: str, runs: Path, ledger: dict, train) -> None:
    """Train ``arm`` unless the ledger has it under this very config, and record its top-1 and answer share."""
    c = cell(arm, runs)
    if ledger.get(arm, {}).get("digest") == c.digest:
        return
    top1 = trained(c, train)["leaf_accuracy"]
    ledger[arm] = {"digest": c.digest, "top1": top1, "most_common_share": most_common_share(c.run_dir)}


def comparison_top1(runs: Path) -> dict[str, list[float]]:
    """The comparison's 10-epoch Tiny-ImageNet top-1 of flat and Hier-COS, seeds 0–2 (:meth:`Cell.metrics`)."""
    data = next(d for d in DATASETS if d.key == DATA)
    ledger = Ledger(HERE / "results" / "comparison-cells.json")
    out: dict[str, list[float]] = {}
    for c in plan("cpu", [0, 1, 2], runs / "comparison-cpu", only=[f"flat/{DATA}", f"hiercos/{DATA}"],
                  datasets=(data,), ledger=ledger):
        if not c.hidden and c.done():
            out.setdefault(c.method.key, []).append(c.metrics()["leaf_accuracy"])
    return out


def section(ledger: dict, command: str, runs: Path) -> str:
    """The table of the measured arms with the collapse mark, then the comparison's 10-epoch cells."""
    lines = ["## hiercos collapse", "",
             f"Command: `{command}` (module docstring: the arms and the rule). Tiny-ImageNet 32×32, "
             "ResNet-20 from scratch, one epoch, seed 0; chance top-1 is 0.5 %.", "",
             "| arm | what changes | top-1 % | most common answer's share of test images % | collapses |",
             "|---|---|---|---|---|"]
    for arm, (what, *_) in ARMS.items():
        if arm in ledger:
            r = ledger[arm]
            collapsed = r["top1"] < TOP1_BELOW and r["most_common_share"] > SHARE_ABOVE
            lines.append(f"| {arm} | {what} | {r['top1'] * 100:.1f} | {r['most_common_share'] * 100:.1f} | "
                         f"{'yes' if collapsed else 'no'} |")
    ten = comparison_top1(runs)
    if ten:
        lines += ["", "The comparison's 10-epoch cells (top-1 % per seed): " + "; ".join(
            f"{m} {', '.join(f'{v * 100:.1f}' for v in vals)}" for m, vals in ten.items()) + "."]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="runs/bench", help="where the arms' run folders go")
    p.add_argument("--table-only", action="store_true", help="rewrite the section from the measured arms")
    args = p.parse_args(argv)
    from hiervision.training import train

    path = HERE / "results" / "hiercos_collapse.json"
    ledger = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for arm in [] if args.table_only else args.arms:
        measure(arm, Path(args.out), ledger, train)
        path.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    text = section(ledger, "python benchmarks/hiercos_collapse.py", Path(args.out))
    write_section("hiercos collapse", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
