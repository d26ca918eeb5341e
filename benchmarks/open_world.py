"""Issue 37's measurements: classes the model never saw, labels known only to a coarser level, classes added later.

    python benchmarks/open_world.py                          # both data sets, seeds 0 1 2 (trains what is missing)
    python benchmarks/open_world.py --data fmnist --seeds 0  # part of it; the section covers every cell measured
    python benchmarks/open_world.py --parts coarse           # one part (novelty, extend, coarse; in that order)
    python benchmarks/open_world.py --budget tiny --seeds 0  # smoke test in minutes (results under the runs folder)
    python benchmarks/open_world.py --table-only             # rewrite the section from the measured cells

Cells, per data set and seed, at the comparison's budget (``benchmarks/comparison_plan.py``: its configs and
epochs; the full-label flat and HAFrame cells are the comparison's own: their folders, or their metrics from its
ledger ``benchmarks/results/comparison-cells.json`` on a machine without the folders):

* **novelty** — ``data.holdout_leaves`` (Fashion-MNIST: Shirt and Sandal, one end class per top-level group;
  Tiny-ImageNet: a seeded 20 % of the end classes). The flat head's rules (:func:`hiervision.posthoc.
  open_world_report`: climbing = the flat-threshold baseline, DARTS, Bayes-hF1 with inner answers) and the ``hnd``
  head (Lee et al.'s flatten + leave-one-out, its novel-class bias swept): the known–novel curve's area and the
  novel accuracy at flat's own known accuracy.
* **coarse** — ``data.coarsen=0.4`` (40 % of the training labels cut to a random proper ancestor) for flat and
  HAFrame (the hierarchy-aware head of the Fashion-MNIST recipe, ``configs/recommended-fmnist.yaml``): test path
  accuracy against the same head on full labels.
* **extend** — the novelty flat run extended with its held-out classes (``hiervision extend RUN --set
  data.holdout_leaves=null``: weights kept, new rows imprinted, the head fine-tuned 3 epochs): accuracy on the
  new classes' and on the old classes' test images, and wall time, against the full-label flat cell's training
  when this benchmark trained it, else the held-out run's own training (``train_seconds.txt`` in each folder it
  trains; fewer images than a full retrain, so a lower bound on its cost).

Declared before the runs: ``hnd`` *beats* the flat-threshold baseline on a data set when the seed-paired 95 %
t-interval of (hnd's area − flat climbing's area) lies above 0, *loses* when below, else *not settled*; the
stretch aim is twice the baseline's novel accuracy at flat's known accuracy. Coarse labels *keep* path accuracy
when the mean over seeds of (coarse / full) is at least 0.95.

Per-cell results accumulate in ``benchmarks/results/open_world.json`` (keyed by part, method, data and seed,
with the config digest); every invocation rewrites ``## open world`` in RESULTS.md from all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comparison_plan import CONFIGS, DATASETS, Cell, Ledger, Method, _cell, plan, train_cell  # noqa: E402
from comparison_stats import mean_std, paired_difference  # noqa: E402
from results_md import write_section  # noqa: E402

HOLDOUT = {"fmnist": "data.holdout_leaves=[Shirt, Sandal]", "tiny32": "data.holdout_leaves=0.2"}
COARSEN = "data.coarsen=0.4"
EXTEND_EPOCHS = 3
KEEP = 0.95  # coarse / full path accuracy that counts as "keeps"


def cells(budget: str, seed: int, data_key: str, runs: Path) -> dict[str, Cell]:
    """The cells of one data set and seed, by role (module docstring)."""
    data = next(d for d in DATASETS if d.key == data_key)
    root = runs / f"comparison-{budget}"
    ledger = Ledger(HERE / "results" / "comparison-cells.json")
    full = {c.method.key: c for c in plan(budget, [seed], root, only=[f"flat/{data_key}", f"haframe/{data_key}"],
                                          datasets=(data,), ledger=ledger) if not c.hidden}
    sets = [*data.overrides.get(budget, ()), f"train.epochs={data.epochs[budget]}"]

    def variant(base: Cell, key: str, *extra: str) -> Cell:
        method = Method(key, key, base.method.config)
        return _cell(data, method, seed, root / "open-world", CONFIGS, [*sets, *extra])

    return {"flat": full["flat"], "haframe": full["haframe"],
            "flat_holdout": variant(full["flat"], "flat-holdout", HOLDOUT[data_key]),
            "hnd_holdout": variant(full["flat"], "hnd-holdout", HOLDOUT[data_key], "model.name=hnd"),
            "flat_coarse": variant(full["flat"], "flat-coarse", COARSEN),
            "haframe_coarse": variant(full["haframe"], "haframe-coarse", COARSEN)}


def trained(cell: Cell, train) -> dict:
    """``cell``'s test metrics: the comparison ledger's record or its folder's (:meth:`Cell.metrics`), else trained
    first (resumable; its wall time kept in ``train_seconds.txt``)."""
    if not cell.done():
        t0 = time.perf_counter()
        train_cell(cell, train, print)
        (cell.run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n", encoding="utf-8")
    return cell.metrics()


def _seconds(run: Path) -> float | None:
    """A run's training wall time when this benchmark trained it (a folder trained elsewhere has none)."""
    f = run / "train_seconds.txt"
    return float(f.read_text()) if f.is_file() else None


def novelty(ow: dict, hnd: dict) -> dict:
    """The flat run's rules and hnd's own curve, each as ``{area, novel_at, known, novel}``."""
    def point(entry: dict) -> dict:
        return {k: entry.get(k) for k in ("area", "novel_at", "novel_at_50", "known", "novel")}

    out = {rule: point(ow[rule]) for rule in ("climbing", "darts", "bayes:hf1:inner", "argmax")}
    own = hnd["open_world"]
    out["hnd"] = {**point(own["novel_bias"]), "argmax_known": own["argmax"]["known"],
                  "argmax_novel": own["argmax"]["novel"]}
    out["flat_known"] = ow["argmax"]["known"]
    return out


def extend_cell(parent: Path, out: Path) -> dict:
    """``hiervision extend`` of the held-out flat run with its held-out classes: wall time, and leaf accuracy on
    the new classes' test images and on the others'."""
    import torch

    from hiervision.cli import main
    from hiervision.evaluation import predict_dataset
    from hiervision.experiment import load_run, run_data

    if not (out / "metrics.json").is_file():
        t0 = time.perf_counter()
        if main(["extend", str(parent), "--out", str(out), "--epochs", str(EXTEND_EPOCHS),
                 "--set", "data.holdout_leaves=null", "--quiet"]) != 0:
            raise RuntimeError(f"extend {parent} failed")
        (out / "extend_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n", encoding="utf-8")
    cfg, tree, model, meta = load_run(out)
    known = len(load_run(parent)[1].names)
    data = run_data(cfg, out, meta=meta)
    pred, targets = predict_dataset(model, data, data.test, 256, torch.device("cpu"), None)
    right = pred.nodes == targets
    new = targets >= known
    return {"seconds": float((out / "extend_seconds.txt").read_text()),
            "new_accuracy": float(right[new].float().mean()), "old_accuracy": float(right[~new].float().mean()),
            "new_images": int(new.sum()),
            "path_accuracy": json.loads((out / "metrics.json").read_text())["path_accuracy"]}


PARTS = ("novelty", "extend", "coarse")
ROLES = {"novelty": ("flat_holdout", "hnd_holdout"), "extend": ("flat_holdout", "flat"),
         "coarse": ("flat", "haframe", "flat_coarse", "haframe_coarse")}


def measure(budget: str, seed: int, data_key: str, runs: Path, ledger: dict, train, part: str) -> None:
    """Train what one part of one data set and seed still lacks and record it in ``ledger``."""
    c = cells(budget, seed, data_key, runs)
    key = f"{part}/{data_key}/s{seed}"
    digests = [c[role].digest for role in ROLES[part]]
    if ledger.get(key, {}).get("digests") == digests:
        return  # measured in an earlier sitting (maybe elsewhere: the run folders need not be here)
    m = {role: trained(c[role], train) for role in ROLES[part]}
    if part == "novelty":
        ledger[key] = {"digests": digests, **novelty(m["flat_holdout"]["open_world"], m["hnd_holdout"])}
    elif part == "coarse":
        ledger[key] = {"digests": digests, **{h: {"coarse": m[f"{h}_coarse"]["path_accuracy"],
                                                  "full": m[h]["path_accuracy"]} for h in ("flat", "haframe")}}
    else:
        run = c["flat_holdout"].run_dir
        ext = extend_cell(run, run.with_name(run.name + "-extended"))
        ledger[key] = {"digests": digests, **ext, "full_path_accuracy": m["flat"]["path_accuracy"],
                       "full_seconds": _seconds(c["flat"].run_dir), "holdout_seconds": _seconds(run)}


def _ci(d: dict, scale: float = 100.0) -> str:
    if d["lo"] is None:
        return f"{d['mean'] * scale:+.1f} (n = {d['n']})" if d["n"] else "–"
    return f"{d['mean'] * scale:+.1f} [{d['lo'] * scale:+.1f}, {d['hi'] * scale:+.1f}]"


def _pm(values: list, scale: float = 100.0) -> str:
    s = mean_std(values)
    if s["mean"] is None:
        return "–"
    return f"{s['mean'] * scale:.1f}" + (f" ± {s['std'] * scale:.1f}" if len(values) > 1 else " (n = 1)")


def _by_seed(ledger: dict, part: str, data_key: str, get) -> dict[int, float]:
    out = {}
    for k, v in ledger.items():
        p, d, s = k.split("/")
        if p == part and d == data_key and get(v) is not None:
            out[int(s[1:])] = float(get(v))
    return out


def novelty_lines(ledger: dict, data_key: str, figures: str = "results") -> list[str]:
    """The novelty table of one data set, its verdict (the declared rule) and its figure."""
    if not any(k.startswith(f"novelty/{data_key}/") for k in ledger):
        return ["Novelty: not measured yet (`python benchmarks/open_world.py --parts novelty`)."]
    rows = [("flat: climbing (the threshold baseline)", lambda v: v["climbing"]),
            ("flat: DARTS", lambda v: v["darts"]), ("hnd (novel bias swept)", lambda v: v["hnd"])]
    lines = ["| rule | known–novel area % | novel acc. % at flat's known acc. | novel acc. % at 50 % known |",
             "|---|---|---|---|"]
    for name, get in rows:
        cols = [list(_by_seed(ledger, "novelty", data_key, lambda v, g=get, f=f: g(v)[f]).values())
                for f in ("area", "novel_at", "novel_at_50")]
        lines.append(f"| {name} | " + " | ".join(_pm(c) for c in cols) + " |")
    bayes = list(_by_seed(ledger, "novelty", data_key, lambda v: v["bayes:hf1:inner"]["novel"]).values())
    lines.append(f"| flat: Bayes-hF1, inner answers (one point) | – | novel {_pm(bayes)} | – |")
    d = paired_difference(_by_seed(ledger, "novelty", data_key, lambda v: v["hnd"]["area"]),
                          _by_seed(ledger, "novelty", data_key, lambda v: v["climbing"]["area"]))
    verdict = ("not settled" if d["lo"] is None or d["lo"] <= 0 <= d["hi"] else "beats" if d["lo"] > 0 else "loses")
    return lines + ["", f"hnd − flat climbing, area: {_ci(d)} (seed-paired 95 % interval): hnd **{verdict}** "
                        "the flat-threshold baseline by the declared rule.", "",
                    f"![known–novel curves]({figures}/open-world-{data_key}.png)"]


def coarse_and_extend_lines(ledger: dict, data_key: str) -> list[str]:
    """The coarse-label and extend rows of one data set."""
    lines = ["| head | path acc. %, full labels | path acc. %, 40 % coarsened | coarse / full | keeps (≥ 0.95)? |",
             "|---|---|---|---|---|"]
    if not any(k.startswith(f"coarse/{data_key}/") for k in ledger):
        lines = ["Coarse labels: not measured yet (`python benchmarks/open_world.py --parts coarse`)."]
    for head in ("flat", "haframe") if len(lines) > 1 else ():
        full = list(_by_seed(ledger, "coarse", data_key, lambda v, h=head: v[h]["full"]).values())
        coarse = list(_by_seed(ledger, "coarse", data_key, lambda v, h=head: v[h]["coarse"]).values())
        ratio = mean_std([c / f for c, f in zip(coarse, full)])["mean"] if full else None
        keeps = "–" if ratio is None else ("yes" if ratio >= KEEP else "no")
        lines.append(f"| {head} | {_pm(full)} | {_pm(coarse)} | {'–' if ratio is None else f'{ratio:.3f}'} | "
                     f"{keeps} |")
    ext = [v for k, v in ledger.items() if k.startswith(f"extend/{data_key}/")]
    if ext:
        mean = lambda key: mean_std([e[key] for e in ext if e.get(key)])["mean"]  # noqa: E731
        secs, full_s, held_s = mean("seconds"), mean("full_seconds"), mean("holdout_seconds")
        held = [e["holdout_seconds"] for e in ext if e.get("holdout_seconds")]
        against = (f"against {full_s:.0f} s for the full retrain" if full_s else
                   f"against {held_s:.0f} s ({min(held):.0f}–{max(held):.0f} s) to train the held-out run from "
                   "scratch (a full retrain sees the held-out classes' images too, so it costs more)" if held_s else
                   "(no retrain was timed in this sitting)")
        lines += ["", f"Extend (n = {len(ext)}): new classes {_pm([e['new_accuracy'] for e in ext])} % leaf accuracy, "
                  f"old classes {_pm([e['old_accuracy'] for e in ext])} %, path accuracy "
                  f"{_pm([e['path_accuracy'] for e in ext])} % against {_pm([e['full_path_accuracy'] for e in ext])} % "
                  f"for the full-label run; wall time {secs:.0f} s {against}."]
    return lines


def plot(ledger: dict, data_key: str, path: Path) -> None:
    """Seed 0's known–novel curves (the Pareto fronts) of the flat rules and of hnd, and flat's own answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = ledger.get(f"novelty/{data_key}/s0")
    if cell is None:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, entry in (("flat: climbing", cell["climbing"]), ("flat: DARTS", cell["darts"]), ("hnd", cell["hnd"])):
        ax.plot(entry["known"], entry["novel"], label=f"{name} (area {entry['area'] * 100:.1f})")
    ax.plot([cell["argmax"]["known"]], [cell["argmax"]["novel"]], "k^", label="flat's own answer")
    ax.set(xlabel="known accuracy", ylabel="novel accuracy (at the right ancestor)", xlim=(0, 1), ylim=(0, 1),
           title=f"{data_key}, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(ledger: dict, command: str, figures: str = "results") -> str:
    lines = ["## open world", "", f"Command: `{command}` (module docstring: cells, protocol, declared rules). Cells: "
             + ", ".join(sorted(ledger)) + "."]
    for d in DATASETS:
        if any(f"/{d.key}/" in k for k in ledger):
            lines += ["", f"### {d.label}", "", *novelty_lines(ledger, d.key, figures), "",
                      *coarse_and_extend_lines(ledger, d.key)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=list(HOLDOUT))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="measured in this order")
    p.add_argument("--budget", default="cpu", choices=["cpu", "gpu", "tiny"])
    p.add_argument("--out", default="runs/bench", help="where the comparison's run folders are (or go)")
    p.add_argument("--table-only", action="store_true", help="rewrite the section from the measured cells")
    args = p.parse_args(argv)
    from hiervision.training import train

    runs = Path(args.out)
    results = runs / "comparison-tiny" / "results" if args.budget == "tiny" else HERE / "results"
    results.mkdir(parents=True, exist_ok=True)
    ledger_path = results / "open_world.json"
    ledger = json.loads(ledger_path.read_text(encoding="utf-8")) if ledger_path.exists() else {}
    for part in [] if args.table_only else args.parts:
        for data_key in args.data:
            for seed in args.seeds:
                measure(args.budget, seed, data_key, runs, ledger, train, part)
                ledger_path.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    text = section(ledger, "python benchmarks/open_world.py" + (" --budget tiny" if args.budget == "tiny" else ""))
    for d in args.data:
        plot(ledger, d, results / f"open-world-{d}.png")
    if args.budget == "tiny":
        (results / "RESULTS-open-world.md").write_text(text, encoding="utf-8")
    else:
        write_section("open world", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
