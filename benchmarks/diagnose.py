"""Where trained runs' paths go wrong: length and level breakdowns on their test split, side by side.

    python benchmarks/diagnose.py RUN_DIR [RUN_DIR ...] [--split val|test] [--json OUT.json]
    python benchmarks/diagnose.py [LABEL=]RUN_DIR ... --search 1 3 10 [--write]   # decoding vs model errors

For runs trained before ``metrics.length_diagnostics`` was part of every report (or on another split):
each run's best.pt predicts the split again (greedy / beam as configured) and the table shows, per run,
how often the path is too short / too long, stops on a right prefix (stopped early) or runs on past
the true end, where wrong paths first leave the true one, level accuracy among images whose levels
above were right (per-step error free of compounding) beside plain level accuracy, and path accuracy
per true length. Same columns as the comparison profile's table (benchmarks/comparison.py).

``--search K [K ...]`` (heads with a beam search: Guo's CNN-RNN, DHNN's decoders) decodes the split
again with tree-restricted beam search at each width K (1 = greedy) and splits the wrong paths into
*search errors* — the model gives the true path (then the end token) a higher log-probability
(``model.path_logprob``, the score the beam ranks by) than the path the search returned, so a better
search would not have returned it — and *model errors*, where the model itself prefers the wrong
path and no search can help (Stahlberg & Byrne, 2019). Many search errors at width 1 that vanish
with K say greedy decoding compounds its mistakes; few say the loss is in the model's per-step
choices.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hiervision.data import iter_batches
from hiervision.decoding import last_node
from hiervision.distributed import autocast_dtype, select_device
from hiervision.evaluation import evaluate_split
from hiervision.experiment import load_run, run_data

HERE = Path(__file__).resolve().parent
SECTION = "decoding errors"


def diagnose(run_dir: str | Path, split: str = "test") -> dict:
    """The metrics report (with ``length_diagnostics``) of a run's best.pt on one split."""
    cfg, _, model, _ = load_run(run_dir)
    device = select_device(cfg["train"]["device"])
    data = run_data(cfg, run_dir)
    amp = autocast_dtype(cfg["train"]["amp"], device)
    return evaluate_split(model.to(device), data, split, cfg["eval"]["batch_size"], device, amp)


@torch.no_grad()
def search_errors(run_dir: str | Path, widths: list[int], split: str = "test") -> dict[int, dict]:
    """Per beam width: path accuracy, and the shares of all images with a search error / a model error
    (see the module docstring)."""
    cfg, _, model, _ = load_run(run_dir)
    data = run_data(cfg, run_dir)
    dataset = data.val if split == "val" else data.test
    model.eval()
    counts = {k: {"correct": 0, "search_error": 0, "model_error": 0} for k in widths}
    n = 0
    bs = cfg["eval"]["batch_size"]
    batches = tqdm(iter_batches(dataset, bs, shuffle=False), total=-(-len(dataset) // bs), unit="batch",
                   desc=f"search {Path(run_dir).name}", leave=False)
    for images, target in batches:
        outputs = model(data.normalize(images))
        true_lp = model.path_logprob(outputs, model.tables.paths[target])
        n += len(target)
        for k in widths:
            model.set_beam_width(k)
            paths = model.decode(outputs).paths
            right = last_node(paths) == target  # paths in the tree: the same end node is the same path
            searched = (true_lp > model.path_logprob(outputs, paths) + 1e-5) & ~right
            c = counts[k]
            c["correct"] += int(right.sum())
            c["search_error"] += int(searched.sum())
            c["model_error"] += int((~right & ~searched).sum())
    return {k: {"path_accuracy": c["correct"] / n, "search_error": c["search_error"] / n,
                "model_error": c["model_error"] / n} for k, c in counts.items()}


def _mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    return f"{m:.4f}" if len(values) == 1 else f"{m:.4f} ± {statistics.stdev(values):.4f}"


def search_table(results: dict[str, list[dict[int, dict]]]) -> str:
    """Markdown: one row per label and beam width, mean ± std over the label's runs (seeds)."""
    lines = ["| run | n | beam width | path acc | search errors | model errors |", "|---" * 6 + "|"]
    for name, runs in results.items():
        for k in runs[0]:
            cells = [_mean_std([r[k][m] for r in runs]) for m in ("path_accuracy", "search_error", "model_error")]
            lines.append(f"| {name} | {len(runs)} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labelled(runs: list[str]) -> dict[str, list[Path]]:
    """``LABEL=RUN_DIR`` (or a bare RUN_DIR, its own label) → runs per label, in order."""
    out: dict[str, list[Path]] = {}
    for r in runs:
        label, _, path = r.rpartition("=")
        out.setdefault(label or path, []).append(Path(path))
    return out


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


def _search_main(args: argparse.Namespace, argv: list[str]) -> int:
    t0 = time.perf_counter()
    runs = _labelled(args.runs)
    results = {label: [search_errors(r, args.search, args.split) for r in dirs] for label, dirs in runs.items()}
    text = search_table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.write:
        from results_md import write_section
        from run import machine

        command = "python benchmarks/diagnose.py " + shlex.join(argv)  # labels may hold spaces
        how = next(par for par in __doc__.split("\n\n") if par.startswith("``--search"))  # what the columns mean
        body = [f"## {SECTION}", "", how.replace("\n", " "), "",
                f"Command: `{command}`  ", f"Machine: {machine()}  ",
                f"Split: {args.split}; wall time {(time.perf_counter() - t0) / 60:.1f} min", "", text]
        write_section(SECTION, "\n".join(body))
        record = {"command": command, "split": args.split, "results": results,
                  "runs": {k: [str(d) for d in v] for k, v in runs.items()}}
        (HERE / "results" / "decoding-errors.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by hiervision train / benchmarks (with --search "
                   "also LABEL=RUN_DIR; a label given several times, one run per seed, is shown as mean ± std)")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--json", default=None, help="also write every report here")
    p.add_argument("--search", nargs="+", type=int, default=None, metavar="K",
                   help="beam widths: split wrong paths into search and model errors (autoregressive heads)")
    p.add_argument("--write", action="store_true", help="with --search: put the table into RESULTS.md "
                   f"(section '{SECTION}') and benchmarks/results/decoding-errors.json")
    args = p.parse_args(argv)
    if args.search:
        return _search_main(args, sys.argv[1:] if argv is None else argv)
    reports = {str(r): diagnose(r, args.split) for r in args.runs}
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
