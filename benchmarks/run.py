"""Run configs side by side (same data split, backbone, budget) over several seeds; write RESULTS.md.

    python benchmarks/run.py --profile quick          # ≤ 15 min on 2 CPU cores
    python benchmarks/run.py --profile foundation     # flat baselines on Fashion-MNIST and Tiny-ImageNet
    python benchmarks/run.py --profile dhnn --seeds 0 # Koo et al.'s DHNN variants beside flat (~45 min)
    python benchmarks/run.py --profile guo            # Guo et al.'s CNN-RNN, generators, coarse-only data
    python benchmarks/run.py --profile hiernet        # HierNet: given / induced trees, conditional vs routing
    python benchmarks/run.py --profile comparison     # issue 14: every method vs flat, 3 seeds, paired, resumable
                                                      # (--status, --budget gpu --device cuda, --only M/D,
                                                      #  --max-hours H; see benchmarks/comparison.py)
    python benchmarks/run.py --profile losses         # soft labels / HXE vs cross-entropy (configs/decisions)

Each profile but comparison is a YAML file, ``benchmarks/profiles/<name>.yaml``: a description,
the seeds, and rows of label, config file (under configs/), overrides, and optionally a group and
options (checked on load: a mistake stops the command with one line naming the file and field).
Every row is mean ± std over the seeds. Each profile writes its own section of
``benchmarks/RESULTS.md`` (replacing that section only), ``benchmarks/results/<profile>.json`` with
every seed's metrics, and a per-level accuracy plot ``benchmarks/results/<profile>.png``. Rows may
name a group: each group gets its own table, and ``img/s ratio`` compares every row's
training throughput with the group's first row (its flat baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from hiervision.config import load_config
from hiervision.distributed import autocast_dtype, select_device
from hiervision.induce import induce_from_run, plot_taxonomy
from hiervision.training import train

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"

#: one YAML file per profile (``profiles/<name>.yaml``): tables are data, kept apart from the engine below
PROFILE_DIR = HERE / "profiles"
ROW_FIELDS = ("label", "config", "overrides", "group", "options")
OPTION_FIELDS = ("run", "metrics", "induce")


class ProfileError(ValueError):
    """A profile file that run_profile could not follow; the message is one line naming the file and field."""


def _check(ok: object, where: str, field: str, what: str) -> None:
    """Stop with one line naming the file and field: a profile is hand-written, its mistakes should be easy to find."""
    if not ok:
        raise ProfileError(f"{where}: {field}: {what}")


def _options(raw: object, where: str, at: str) -> dict:
    """A row's options: ``run`` (another row's run folder), ``metrics`` (that sub-report), ``induce``."""
    _check(isinstance(raw, dict), where, at, f"expected a mapping of {', '.join(OPTION_FIELDS)}")
    for key in raw:
        _check(key in OPTION_FIELDS, where, f"{at}.{key}", f"unknown option (known: {', '.join(OPTION_FIELDS)})")
    _check("run" not in raw or isinstance(raw["run"], str), where, f"{at}.run", "expected a row's label")
    _check(raw.get("metrics", "given") in ("given", "routing"), where, f"{at}.metrics",
           "expected given or routing")
    if "induce" in raw:
        spec = raw["induce"]
        _check(isinstance(spec, dict) and set(spec) == {"from", "p_min", "g_max"}, where, f"{at}.induce",
               "expected a mapping of exactly from, p_min, g_max")
        _check(isinstance(spec["from"], str), where, f"{at}.induce.from", "expected a row's label")
        for key in ("p_min", "g_max"):
            _check(isinstance(spec[key], int | float) and not isinstance(spec[key], bool), where,
                   f"{at}.induce.{key}", "expected a number")
    return raw


def _row(raw: object, where: str, at: str) -> tuple:
    """One row as run_profile and write_results read it: ``(label, config, overrides[, group[, options]])``.

    Options without a group get the group ``""``, which write_results treats as no group at all.
    """
    _check(isinstance(raw, dict), where, at, "expected a mapping with label, config and overrides")
    for key in raw:
        _check(key in ROW_FIELDS, where, f"{at}.{key}", f"unknown field (known: {', '.join(ROW_FIELDS)})")
    for key in ("label", "config"):
        _check(isinstance(raw.get(key), str) and raw[key], where, f"{at}.{key}", "expected a non-empty string")
    overrides = raw.get("overrides")
    _check(isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides), where,
           f"{at}.overrides", "expected a list of KEY=VALUE strings")
    _check(isinstance(raw.get("group", ""), str), where, f"{at}.group", "expected a string")
    row = (raw["label"], raw["config"], list(overrides))
    if "options" in raw:
        return (*row, raw.get("group", ""), _options(raw["options"], where, f"{at}.options"))
    return (*row, raw["group"]) if "group" in raw else row


def load_profile(path: Path) -> dict:
    """One profile from its YAML file: ``{description, seeds, rows}``, each row a tuple (see :func:`_row`).

    Checked here, before anything trains, so a typo stops the command at once instead of hours in.
    """
    import yaml

    where = str(path.relative_to(HERE.parent)) if path.is_relative_to(HERE.parent) else str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}"
                           f"{f' at line {mark.line + 1}' if mark else ''})") from None
    _check(isinstance(raw, dict), where, "(top level)", "expected a mapping with description, seeds and rows")
    for key in raw:
        _check(key in ("description", "seeds", "rows"), where, key, "unknown field (known: description, seeds, rows)")
    _check(isinstance(raw.get("description"), str) and raw["description"], where, "description",
           "expected a non-empty string")
    seeds = raw.get("seeds")
    _check(isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds), where, "seeds",
           "expected a non-empty list of integers")
    _check(isinstance(raw.get("rows"), list) and raw["rows"], where, "rows", "expected a non-empty list of rows")
    rows = [_row(r, where, f"rows[{i}]") for i, r in enumerate(raw["rows"])]
    labels = [r[0] for r in rows]
    for i, row in enumerate(rows):
        _check(row[0] not in labels[:i], where, f"rows[{i}].label", f"{row[0]!r} is already a row's label")
        opts = row[4] if len(row) > 4 else {}
        for field, named in (("run", opts.get("run")), ("induce.from", opts.get("induce", {}).get("from"))):
            _check(named is None or named in labels, where, f"rows[{i}].options.{field}",
                   f"{named!r} is no row's label")
    return {"description": raw["description"], "seeds": seeds, "rows": rows}


def load_profiles(directory: Path = PROFILE_DIR) -> dict[str, dict]:
    """Every ``<name>.yaml`` in ``directory`` by name (``comparison`` is benchmarks/comparison.py's own)."""
    profiles = {}
    for path in sorted(directory.glob("*.yaml")):
        _check(path.stem != "comparison", str(path), "(file name)", "comparison is the comparison profile's name")
        profiles[path.stem] = load_profile(path)
    return profiles


# profile -> {description, seeds, rows}; each row (label, config file under configs/, overrides[, group[,
# options]]); options: "run" (reuse another row's run folder), "metrics" ("given" / "routing": report that
# sub-report), "induce" ({"from": row, "p_min", "g_max"}: induce a tree from that row's run and set data.tree)
PROFILES: dict[str, dict] = load_profiles()

COLUMNS = [
    ("path_f1", "path F1"),
    ("node_f1", "node F1"),
    ("leaf_accuracy", "leaf acc"),
    ("path_accuracy", "path acc"),
    ("node_accuracy", "node acc"),
    ("hierarchical_f1", "hier. F1"),
    ("mistake_severity", "mistake sev."),
    ("hdist@5", "hdist@5"),
    ("ece", "ECE"),
    ("valid_path_rate", "valid paths"),
    ("pseudo_label_accuracy", "pseudo-label acc"),
    ("eval_images_per_s", "eval img/s"),
    ("train_images_per_s", "train img/s"),
]


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}" if m > 10 else f"{m:.4f} ± {s:.4f}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    amp = autocast_dtype("auto", select_device("auto"))
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"amp auto = {str(amp).replace('torch.', '') if amp else 'fp32'}")


def run_profile(name: str, out_root: Path, seeds: list[int] | None, extra: list[str]) -> dict:
    prof = PROFILES[name]
    seeds = seeds or prof["seeds"]
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for label, config, overrides, *rest in prof["rows"]:
        opts = rest[1] if len(rest) > 1 else {}
        for seed in seeds:
            # {runs}/{seed} in overrides name other rows' run folders (e.g. a CNN trained by an earlier row)
            sets = [o.replace("{runs}", str(out_root / name)).replace("{seed}", str(seed))
                    for o in [*overrides, *extra]]
            tree = None
            if "induce" in opts:  # HierNet's own hierarchy, from another row's trained run
                spec = opts["induce"]
                tree_path = out_root / name / f"{_slug(opts.get('run', label))}-s{seed}-tree.json"
                tree = induce_from_run(out_root / name / f"{_slug(spec['from'])}-s{seed}", spec["p_min"],
                                       spec["g_max"])
                tree.save(tree_path)
                plot_taxonomy(tree, str(HERE / "results" / f"{name}-{_slug(label)}-tree.png"),
                              f"induced from '{spec['from']}' (p_min {spec['p_min']}, g_max {spec['g_max']})")
                sets.append(f"data.tree={tree_path}")
            cfg = load_config(CONFIGS / config, [*sets, f"seed={seed}", "train.progress=false"])
            print(f"[{name}] {label} seed {seed}", flush=True)
            run_dir = out_root / name / f"{_slug(opts.get('run', label))}-s{seed}"
            m = train(cfg, run_dir, resume=True)  # a row sharing an earlier row's run only re-evaluates it
            if opts.get("metrics") in ("given", "routing"):
                m = {**m[opts["metrics"]], "train_images_per_s": m["train_images_per_s"]}
            if tree is not None:
                groups = tree.num_nodes - 1 - len(tree.leaves)
                m["induced_tree"] = (f"{opts['induce']['from']} → p_min {opts['induce']['p_min']}, g_max "
                                     f"{opts['induce']['g_max']}: {groups} groups\n" + tree.render(max_nodes=80))
            pseudo = run_dir / "round1" / "pseudo_labels.json"
            if pseudo.exists():
                m["pseudo_label_accuracy"] = json.loads(pseudo.read_text())["accuracy"]
            results.setdefault(label, []).append(m)
    wall = time.perf_counter() - t0
    return {"profile": name, "seeds": seeds, "results": results, "wall_s": wall, "rows": prof["rows"]}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label.replace("*", "-star")).strip("-").lower()


def write_results(run: dict, command: str) -> None:
    name = run["profile"]
    outdir = HERE / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(run, indent=1, default=str), encoding="utf-8")
    lines = [
        f"## {name}",
        "",
        PROFILES[name]["description"] + f"; mean ± std over seeds {run['seeds']}.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Wall time: {run['wall_s'] / 60:.1f} min",
    ]
    groups: dict[str, list[str]] = {}
    for label, _, _, *group in run["rows"]:
        groups.setdefault(group[0] if group else "", []).append(label)
    for group, labels in groups.items():
        results = {label: run["results"][label] for label in labels}
        cols = [(k, c) for k, c in COLUMNS if any(m.get(k) is not None for ms in results.values() for m in ms)]
        base_rate = statistics.fmean(m["train_images_per_s"] for m in results[labels[0]])
        lines += ["", f"### {group}" if group else "", "",
                  "| method | " + " | ".join(c for _, c in cols) + " | img/s ratio | level acc |",
                  "|---" * (len(cols) + 3) + "|"]
        for label, ms in results.items():
            cells = [_mean_std([m.get(k) for m in ms]) for k, _ in cols]
            ratio = statistics.fmean(m["train_images_per_s"] for m in ms) / base_rate
            levels = list(zip(*[m.get("level_accuracy") or [] for m in ms]))
            lvl = " / ".join(f"{statistics.fmean(v):.3f}" for v in levels) or "–"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} | {lvl} |")
        for label, ms in results.items():
            if ms[0].get("induced_tree") and "routing" not in label:
                lines += ["", f"Induced tree ({label}; the picture: `results/{name}-{_slug(label)}-tree.png`):", "",
                          "```", ms[0]["induced_tree"], "```"]
        by_len = {label: ms[0].get("path_accuracy_by_length") or {} for label, ms in results.items()}
        if any(len(v) > 1 for v in by_len.values()):  # variable-length paths: accuracy per true path length
            lengths = sorted({int(n) for v in by_len.values() for n in v})
            lines += ["", "path accuracy by true path length (first seed):", "",
                      "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
            for label, v in by_len.items():
                cells = [v.get(n, v.get(str(n))) for n in lengths]  # JSON round trips make the keys strings
                lines.append(f"| {label} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += ["", f"![per-level accuracy](results/{name}.png)", ""]
    section = "\n".join(lines)
    _plot(run, outdir / f"{name}.png")

    path = HERE / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def _plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, ms in run["results"].items():
        levels = list(zip(*[m.get("level_accuracy") or [] for m in ms]))
        if not levels:
            continue
        means = [statistics.fmean(v) for v in levels]
        stds = [statistics.stdev(v) if len(v) > 1 else 0 for v in levels]
        ax.errorbar(range(1, len(means) + 1), means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("tree level")
    ax.set_ylabel("top-1 accuracy at level")
    ax.set_title(f"per-level accuracy ({run['profile']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted([*PROFILES, "comparison"]), default="quick")
    p.add_argument("--out", default="runs/bench", help="where the runs go")
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--set", action="append", default=[], help="override for every row")
    p.add_argument("--device", default=None, help="train.device for every row (e.g. cuda)")
    c = p.add_argument_group("comparison profile (resumable: finished cells are skipped)")
    c.add_argument("--budget", choices=["cpu", "gpu", "tiny"], default="cpu",
                   help="gpu: more epochs, and Tiny-ImageNet at 64x64 as well; tiny: a smoke test (2 epochs on "
                   "2000 images, tables under --out only)")
    c.add_argument("--status", action="store_true", help="print which cells are done and exit")
    c.add_argument("--only", nargs="*", default=None, metavar="METHOD/DATA",
                   help="glob patterns, e.g. 'guo_rnn/*' '*/fmnist' flat")
    c.add_argument("--optional", action="store_true", help="also the optional (tuned) rows")
    c.add_argument("--max-hours", type=float, default=None, help="start no new cell after this many hours")
    c.add_argument("--table-only", action="store_true", help="train nothing; rewrite tables from finished cells")
    args = p.parse_args()
    if args.profile == "comparison":
        import comparison  # benchmarks/comparison.py, beside this file

        return comparison.main(args, machine)
    if args.device:
        args.set.append(f"train.device={args.device}")
    run = run_profile(args.profile, Path(args.out), args.seeds, args.set)
    write_results(run, "python benchmarks/run.py " + " ".join(sys.argv[1:]))
    print((HERE / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
