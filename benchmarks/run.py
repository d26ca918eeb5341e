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

Every row is mean ± std over the seeds. Each profile writes its own section of
``benchmarks/RESULTS.md`` (replacing that section only), ``benchmarks/results/<profile>.json`` with
every seed's metrics, and a per-level accuracy plot ``benchmarks/results/<profile>.png``. Rows may
name a group (4th entry): each group gets its own table, and ``img/s ratio`` compares every row's
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
from hiervision.evaluation import autocast_dtype, select_device
from hiervision.induce import induce_from_run, plot_taxonomy
from hiervision.training import train

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"

# HierNet rows start from the flat rows' weights (placeholders filled per seed by run_profile)
_FROM_FLAT = "model.backbone_kwargs.pretrained_path={runs}/flat-3-epochs-s{seed}/best.pt"
_FROM_TINY = "model.backbone_kwargs.pretrained_path={runs}/flat-tiny-3-epochs-s{seed}/best.pt"
_TINY_PMIN = 0.012  # 8 groups from the 3-epoch flat model's CPM (the paper: 6-8 groups work best)

# profile -> (rows: (label, config file, overrides[, group[, options]]), seeds, description); options:
# "run" (reuse another row's run folder), "metrics" ("given" / "routing": report that sub-report),
# "induce" ({"from": row, "p_min", "g_max"}: induce a tree from that row's run and set data.tree)
PROFILES: dict[str, dict] = {
    "quick": {
        "description": "Fashion-MNIST (real), 3-level tree, 12k train images, ResNet-20, 2 epochs",
        "seeds": [0, 1, 2],
        "rows": [
            ("flat", "fmnist-flat.yaml", ["data.limit_train=12000", "train.epochs=2"]),
        ],
    },
    "foundation": {
        "description": "flat baselines on real data: Fashion-MNIST (3-level tree, ResNet-20, 3 epochs) and "
        "Tiny-ImageNet (WordNet tree, variable depth, 32x32, ResNet-20, 5 epochs)",
        "seeds": [0, 1, 2],
        "rows": [
            ("fmnist flat", "fmnist-flat.yaml", ["train.epochs=3"]),
            ("tiny-imagenet flat", "tinyimagenet-flat.yaml", ["train.epochs=5"]),
        ],
    },
    "dhnn": {
        "description": "Koo et al.'s DHNN beside the flat baseline on real data, ResNet-20, same seed, split and "
        "budget per group: Fashion-MNIST 20k train images x 3 epochs (FPL tree, variable-depth tree, 2x2 "
        "multi-label canvases: 6k x 3 epochs), Tiny-ImageNet 32x32 with its WordNet tree 20k x 3 epochs",
        "seeds": [0],
        "rows": [
            *[(label, cfg, ["data.limit_train=20000", "train.epochs=3"], "Fashion-MNIST, 3-level tree (FPL)")
              for label, cfg in [("flat", "fmnist-flat.yaml"), ("CNN-RNN", "fmnist-res-rnn.yaml"),
                                 ("CNN-RNN-Alt", "fmnist-res-rnn-alt.yaml"),
                                 ("CNN-RNN-Alt-Resi", "fmnist-res-rnn-alt-resi.yaml"),
                                 ("CNN-RNN-Resi", "fmnist-res-rnn-resi.yaml")]],
            *[(label, cfg, ["data.limit_train=20000", "train.epochs=3"], "Fashion-MNIST, variable-depth tree")
              for label, cfg in [("flat (var)", "fmnistvar-flat.yaml"),
                                 ("CNN-S2S-Linear", "fmnistvar-res-s2s-linear.yaml"),
                                 ("CNN-S2S-Conv", "fmnistvar-res-s2s-conv.yaml"),
                                 ("CNN-S2S-Pool", "fmnistvar-res-s2s-pool.yaml")]],
            *[(label, cfg, ["data.limit_train=6000", "data.limit_test=3000", "train.epochs=3"],
               "Fashion-MNIST 2x2 canvases, multi-label (path/node F1)")
              for label, cfg in [("flat-sigmoid", "fmnist-canvas-flat.yaml"),
                                 ("CNN-S2S-Pool (ML)", "fmnist-canvas-res-s2s-pool.yaml")]],
            *[(label, cfg, ["data.limit_train=20000", "train.epochs=3"], "Tiny-ImageNet 32x32, WordNet tree")
              for label, cfg in [("flat (tiny)", "tinyimagenet-flat.yaml"),
                                 ("CNN-S2S-Pool (tiny)", "tinyimagenet-res-s2s-pool.yaml")]],
        ],
    },
    "guo": {
        "description": "Guo et al.'s CNN-RNN beside its CNN-based generators and the specific networks on real data, "
        "ResNet-20, same seed and split per group: Fashion-MNIST 3-level tree, 20k train images x 3 epochs (coarse-"
        "specific = one softmax over the 6 level-2 groups; CNN-RNN* = the same CNN-RNN run with each test image's true "
        "level-2 group given). Coarse-only data: of the same 18k-image training set, |S_fine| = 0.1/0.2/0.5 keep "
        "full labels and |S_coarse| = 0.5 only their level-2 group, 3 epochs per training (the pseudo-label protocol "
        "trains twice: on S_fine, then on both). Tiny-ImageNet 32x32 with its WordNet tree (paths of 1-12 nodes), "
        "20k x 3 epochs; the frozen-feature CNN-RNN trains 10 epochs of its LSTM on features of the flat row's CNN "
        "(pre-computed once)",
        "seeds": [0],
        "rows": [
            *[(label, cfg, ["data.limit_train=20000", "train.epochs=3", *extra], "Fashion-MNIST, 3-level tree", opts)
              for label, cfg, extra, opts in [
                  ("flat (fine-specific)", "fmnist-flat.yaml", [], {}),
                  ("coarse-specific (level 2)", "fmnist-guo-coarse.yaml", [], {}),
                  ("coarse-to-fine", "fmnist-guo-c2f.yaml", [], {}),
                  ("fine-to-coarse", "fmnist-guo-f2c.yaml", [], {}),
                  ("fine-and-coarse", "fmnist-guo-fandc.yaml", [], {}),
                  ("CNN-RNN", "fmnist-guo-rnn.yaml", [], {}),
                  ("CNN-RNN* (level 2 given)", "fmnist-guo-rnn.yaml", [], {"run": "CNN-RNN", "metrics": "given"})]],
            *[(f"{proto} |S_fine|={f}", f"fmnist-guo-rnn-partial-{cfg}.yaml",
               ["data.limit_train=20000", "train.epochs=3", f"data.fine_fraction={f}", "eval.given_level=null"],
               f"Fashion-MNIST, coarse-only training data (|S_coarse| = 0.5), |S_fine| = {f}")
              for f in (0.1, 0.2, 0.5)
              for proto, cfg in [("S_fine", "sfine"), ("S_fine + S_coarse- (pseudo)", "pseudo"),
                                 ("S_fine + S_coarse masked", "masked"), ("S_fine + S_coarse+ (oracle)", "oracle")]],
            *[(label, cfg, ["data.limit_train=20000", *extra], "Tiny-ImageNet 32x32, WordNet tree (variable length)")
              for label, cfg, extra in [
                  ("flat (tiny)", "tinyimagenet-flat.yaml", ["train.epochs=3"]),
                  ("CNN-RNN end-to-end (tiny)", "tinyimagenet-guo-rnn.yaml", ["train.epochs=3"]),
                  ("CNN-RNN on frozen flat features (tiny)", "tinyimagenet-guo-rnn-frozen.yaml",
                   ["train.epochs=10", "model.backbone_kwargs.pretrained_path={runs}/flat-tiny-s{seed}/best.pt"])]],
        ],
    },
    "hiernet": {
        "description": "Tempfli & Sandor's HierNet beside its backbone on real data, ResNet-20, same seed and split: "
        "Fashion-MNIST 20k train images, Tiny-ImageNet 32x32 20k train images. Budget: the flat backbone trains 3 "
        "epochs; HierNet starts from that run's weights (transfer, Sec. 5.4) and trains 3 more, so it has seen 6 "
        "epochs in all (the 6-epoch flat rows are the equal-budget backbones). Induced trees come from the 3-epoch "
        "flat run's confusion on the validation split. Eval img/s: test-set prediction, batch 512 (conditional = "
        "every branch, routing = one route per image)",
        "seeds": [0],
        "rows": [
            *[(label, cfg, ["data.limit_train=20000", *extra], "Fashion-MNIST, ResNet-20", opts)
              for label, cfg, extra, opts in [
                  ("flat, 3 epochs", "fmnist-flat.yaml", ["train.epochs=3"], {}),
                  ("flat, 6 epochs", "fmnist-flat.yaml", ["train.epochs=6"], {}),
                  ("HierNet given tree, conditional", "fmnist-hiernet.yaml", ["train.epochs=3", _FROM_FLAT], {}),
                  ("HierNet given tree, routing", "fmnist-hiernet.yaml", ["train.epochs=3", _FROM_FLAT],
                   {"run": "HierNet given tree, conditional", "metrics": "routing"}),
                  ("HierNet induced tree, conditional", "fmnist-hiernet-induced.yaml", ["train.epochs=3", _FROM_FLAT],
                   {"induce": {"from": "flat, 3 epochs", "p_min": 0.02, "g_max": 5}}),
                  ("HierNet induced tree, routing", "fmnist-hiernet-induced.yaml", ["train.epochs=3", _FROM_FLAT],
                   {"run": "HierNet induced tree, conditional", "metrics": "routing",
                    "induce": {"from": "flat, 3 epochs", "p_min": 0.02, "g_max": 5}})]],
            *[(label, cfg, ["data.limit_train=20000", "train.epochs=3", *extra],
               "Tiny-ImageNet 32x32 (200 classes), ResNet-20", opts)
              for label, cfg, extra, opts in [
                  ("flat (tiny), 3 epochs", "tinyimagenet-flat.yaml", [], {}),
                  ("flat (tiny), 6 epochs", "tinyimagenet-flat.yaml", ["train.epochs=6"], {}),
                  ("HierNet (tiny) induced tree, conditional", "tinyimagenet-hiernet-induced.yaml", [_FROM_TINY],
                   {"induce": {"from": "flat (tiny), 3 epochs", "p_min": _TINY_PMIN, "g_max": 100}}),
                  ("HierNet (tiny) induced tree, routing", "tinyimagenet-hiernet-induced.yaml", [_FROM_TINY],
                   {"run": "HierNet (tiny) induced tree, conditional", "metrics": "routing",
                    "induce": {"from": "flat (tiny), 3 epochs", "p_min": _TINY_PMIN, "g_max": 100}}),
                  ("HierNet (tiny) WordNet tree, conditional", "tinyimagenet-hiernet-wordnet.yaml", [_FROM_TINY], {}),
                  ("HierNet (tiny) WordNet tree, routing", "tinyimagenet-hiernet-wordnet.yaml", [_FROM_TINY],
                   {"run": "HierNet (tiny) WordNet tree, conditional", "metrics": "routing"})]],
        ],
    },
    # Bertinetto et al.'s hierarchy-aware losses on the flat model (configs/decisions): top-1 against
    # mistake severity and hdist@5, cross-entropy first
    "losses": {
        "description": "flat ResNet-20 with cross-entropy, soft labels (beta 4/10/30) and HXE (alpha 0.1/0.4/0.6), "
        "and DHNN CNN-RNN-Resi with cross-entropy and soft labels (beta 10): Fashion-MNIST (3-level tree, 3 epochs) "
        "and Tiny-ImageNet (WordNet tree, 32x32, 5 epochs)",
        "seeds": [0, 1, 2],
        "rows": [
            *[(label, cfg, ["train.epochs=3"], "Fashion-MNIST")
              for label, cfg in [("cross-entropy", "fmnist-flat.yaml"),
                                 *[(f"soft labels β={b}", f"decisions/fmnist-flat-soft-b{b}.yaml")
                                   for b in (4, 10, 30)],
                                 *[(f"HXE α={a}", f"decisions/fmnist-flat-hxe-a{a}.yaml") for a in (0.1, 0.4, 0.6)],
                                 ("DHNN CNN-RNN-Resi", "fmnist-res-rnn-resi.yaml"),
                                 ("DHNN CNN-RNN-Resi, soft labels β=10",
                                  "decisions/fmnist-res-rnn-resi-soft-b10.yaml")]],
            *[(label, cfg, ["train.epochs=5"], "Tiny-ImageNet")
              for label, cfg in [("cross-entropy (tiny)", "tinyimagenet-flat.yaml"),
                                 *[(f"soft labels β={b} (tiny)", f"decisions/tinyimagenet-flat-soft-b{b}.yaml")
                                   for b in (4, 10, 30)],
                                 *[(f"HXE α={a} (tiny)", f"decisions/tinyimagenet-flat-hxe-a{a}.yaml")
                                   for a in (0.1, 0.4, 0.6)]]],
        ],
    },
}

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
