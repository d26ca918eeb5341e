"""Where trained runs' paths go wrong: length and level breakdowns on their test split, side by side.

    python benchmarks/diagnose.py RUN_DIR [RUN_DIR ...] [--split val|test] [--json OUT.json]

For runs trained before ``metrics.length_diagnostics`` was part of every report (or on another split):
each run's best.pt predicts the split again (greedy / beam as configured) and the table shows, per run,
how often the path is too short / too long, stops on a right prefix (stopped early) or runs on past
the true end, where wrong paths first leave the true one, level accuracy among images whose levels
above were right (per-step error free of compounding) beside plain level accuracy, and path accuracy
per true length. Same columns as the comparison profile's table (benchmarks/comparison.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hiervision.experiment import load_run, run_data
from hiervision.training import autocast_dtype, evaluate_split, select_device


def diagnose(run_dir: str | Path, split: str = "test") -> dict:
    """The metrics report (with ``length_diagnostics``) of a run's best.pt on one split."""
    cfg, _, model, _ = load_run(run_dir)
    device = select_device(cfg["train"]["device"])
    data = run_data(cfg, run_dir)
    amp = autocast_dtype(cfg["train"]["amp"], device)
    return evaluate_split(model.to(device), data, split, cfg["eval"]["batch_size"], device, amp)


def table(reports: dict[str, dict]) -> str:
    """Markdown: one row per run."""
    lines = ["| run | path acc | too short | too long | stopped early | ran on | first wrong level (share of "
             "errors) | level acc | level acc given right prefix |", "|---" * 9 + "|"]
    for name, r in reports.items():
        d = r["length_diagnostics"]
        wrong = sum(d["first_wrong_level"].values()) or 1
        first = " / ".join(f"{k}: {v / wrong:.2f}" for k, v in d["first_wrong_level"].items()) or "–"
        lvl = " / ".join(f"{v:.3f}" for v in r["level_accuracy"])
        given = " / ".join(f"{v:.3f}" for v in d["level_accuracy_given_prefix"])
        lines.append(f"| {name} | {r['path_accuracy']:.4f} | {d['too_short']:.3f} | {d['too_long']:.3f} | "
                     f"{d['stopped_early']:.3f} | {d['ran_on']:.3f} | {first} | {lvl} | {given} |")
    lengths = sorted({int(n) for r in reports.values() for n in r["path_accuracy_by_length"]})
    if len(lengths) > 1:
        lines += ["", "| run | " + " | ".join(f"length {n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for name, r in reports.items():
            v = {int(k): x for k, x in r["path_accuracy_by_length"].items()}
            lines.append(f"| {name} | " + " | ".join(f"{v[n]:.3f}" if n in v else "–" for n in lengths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by hiervision train / benchmarks")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--json", default=None, help="also write every report here")
    args = p.parse_args(argv)
    reports = {str(r): diagnose(r, args.split) for r in args.runs}
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
