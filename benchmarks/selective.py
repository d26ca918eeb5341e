"""Issue 36's measurements: when the model is unsure, on the comparison's own flat and HAFrame runs.

    python benchmarks/selective.py                          # both data sets, seeds 0 1 2 (trains missing runs)
    python benchmarks/selective.py --data fmnist            # one data set; the section covers every cell measured
    python benchmarks/selective.py --budget tiny --seeds 0  # smoke test in minutes (results under the runs folder)

The runs are the comparison's cells (``benchmarks/comparison_plan.py``: the same configs, digests and run
folders ``RUNS/comparison-<budget>/<data>/<method>-s<seed>-<digest>``); a cell whose folder is missing is
trained here, resumably (the comparison's ledger keeps metrics, not checkpoints). Nothing is trained again
once its folder holds ``metrics.json``. For each run, on its test split at the run's fitted temperature:

* **hAURC** (Goren, Galil & El-Yaniv, NeurIPS 2024: the area under the hierarchical risk–coverage curve,
  lower is better) of each rule of :func:`hiervision.posthoc.selective_report` — argmax (the model's answer
  or nothing), climbing from it with and without the temperature, climbing from CRM's and Bayes-hF1's answers,
  DARTS (Deng et al.'s λ); each rule's difference from argmax is paired by seed (95 % t-interval);
* **the guaranteed threshold** (:func:`hiervision.selective.threshold_misses`): over 100 random halves of
  the test split, a climbing threshold fitted on one half to reach accuracy A with confidence 0.95, measured
  on the other half: how often it missed A (must be at most 5 % plus the test half's own noise), the mean
  and worst accuracy reached and the mean coverage; and the threshold fitted on the val split, on test.

Declared before the runs: HSC's ordering "climbing + temperature has lower hAURC than argmax, and than
DARTS" counts as reproduced on a data set and method when the paired 95 % interval of the difference lies
below 0, reversed when it lies above, and not settled otherwise.

Per-cell results accumulate in ``benchmarks/results/selective.json`` (keyed by cell and config digest); every
invocation rewrites ``## decisions`` in RESULTS.md and the curve plots from all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comparison_plan import DATASETS, plan, train_cell  # noqa: E402
from comparison_stats import mean_std, paired_difference  # noqa: E402
from results_md import write_section  # noqa: E402

METHODS = ("flat", "haframe")
RULES = ("argmax", "climbing", "climbing_t1", "crm", "bayes:hf1", "darts")
RULE_NAMES = {"argmax": "argmax (answer or abstain)", "climbing": "climbing + temperature",
              "climbing_t1": "climbing, no temperature", "crm": "climbing from CRM",
              "bayes:hf1": "climbing from Bayes-hF1", "darts": "DARTS (λ swept)"}
TARGETS = (0.9, 0.95, 0.99)
CONFIDENCE = 0.95


def measure(run_dir: Path) -> dict:
    """One run's hAURC per rule and guaranteed thresholds (see the module docstring)."""
    from hiervision import selective as S
    from hiervision.distributed import autocast_dtype
    from hiervision.distributions import EndDistribution
    from hiervision.evaluation import predict_dataset
    from hiervision.experiment import load_run, run_data
    from hiervision.marginals import as_temperature
    from hiervision.posthoc import selective_report

    cfg, tax, model, meta = load_run(run_dir)
    data = run_data(cfg, run_dir, meta=meta)
    amp, bs, cpu = autocast_dtype(cfg["train"]["amp"], torch.device("cpu")), cfg["eval"]["batch_size"], "cpu"
    test, test_t = predict_dataset(model, data, data.test, bs, torch.device(cpu), amp)
    val, val_t = predict_dataset(model, data, data.val, bs, torch.device(cpu), amp)
    t = as_temperature(model.temperature)
    test_d, val_d = EndDistribution(test, tax), EndDistribution(val, tax)
    curves = selective_report(test_d, test_t, tax, t, max_points=120)
    m, start = test_d.node_marginals(t).double().numpy(), test.nodes.numpy()
    vm = val_d.node_marginals(t).double().numpy()
    guaranteed = {}
    for a in TARGETS:
        fit = S.guaranteed_threshold(vm, val.nodes.numpy(), val_t.numpy(), tax.view, a, CONFIDENCE, len(test_t))
        on_test = S.threshold_misses(m, start, test_t.numpy(), tax.view, a, CONFIDENCE, repeats=100)
        scores = S.tight_thresholds(m, start, test_t.numpy(), tax.view)
        guaranteed[str(a)] = {**on_test, "val_threshold": fit["threshold"], "val_feasible": fit["feasible"],
                              "val_fit_test_accuracy": float((scores < fit["threshold"]).mean())}
    return {"temperature": t, "n_test": len(test_t), "leaf_accuracy": float((test.nodes == test_t).float().mean()),
            "curves": curves, "hAURC": {r: curves[r]["area"] for r in RULES}, "guaranteed": guaranteed}


def _cells(budget: str, seeds: list[int], runs: Path, data: list[str]):
    only = [f"{m}/{d}" for m in METHODS for d in data]
    return [c for c in plan(budget, seeds, runs / f"comparison-{budget}", only=only) if not c.hidden]


def _pm(s: dict, scale: float = 100.0, digits: int = 2) -> str:
    return "–" if s["mean"] is None else f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _interval(d: dict, scale: float = 100.0) -> str:
    if d["lo"] is None:
        return f"{d['mean'] * scale:+.2f} (n = {d['n']})" if d["n"] else "–"
    return f"{d['mean'] * scale:+.2f} [{d['lo'] * scale:+.2f}, {d['hi'] * scale:+.2f}]"


def verdict(d: dict) -> str:
    """The declared rule: the paired 95 % interval below 0 (lower hAURC) reproduces, above 0 reverses."""
    if d["lo"] is None:
        return f"not settled at n = {d['n']}"
    if d["hi"] < 0:
        return "reproduced"
    return "reversed" if d["lo"] > 0 else f"not settled at n = {d['n']}"


def _table(cells: dict, data_key: str) -> list[str]:
    """Markdown rows for one data set: hAURC × 100 per rule and method, and the paired differences."""
    lines = ["| rule | " + " | ".join(f"{m} hAURC ×100 | Δ vs argmax" for m in METHODS) + " |",
             "|---|" + "---|---|" * len(METHODS)]
    per = {m: {int(k.rsplit("/s", 1)[1]): v for k, v in cells.items() if k.startswith(f"{m}/{data_key}/")}
           for m in METHODS}
    for rule in RULES:
        row = [RULE_NAMES[rule]]
        for m in METHODS:
            vals = {s: c["hAURC"][rule] for s, c in per[m].items()}
            base = {s: c["hAURC"]["argmax"] for s, c in per[m].items()}
            row += [_pm(mean_std(list(vals.values()))) + f" (n = {len(vals)})",
                    "—" if rule == "argmax" else _interval(paired_difference(vals, base))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for m in METHODS:
        if not per[m]:
            continue
        climb = {s: c["hAURC"]["climbing"] for s, c in per[m].items()}
        vs = {other: verdict(paired_difference(climb, {s: c["hAURC"][other] for s, c in per[m].items()}))
              for other in ("argmax", "darts")}
        lines.append(f"- {m}: climbing + temperature below argmax: **{vs['argmax']}**; below DARTS: **{vs['darts']}**.")
    return lines


def _guarantee_rows(cells: dict, data_key: str) -> list[str]:
    lines = ["| method | target A | population bound: missed A, accuracy mean (worst), coverage | test-set bound: "
             "missed A, accuracy mean (worst), coverage | fitted on val (test-set bound), on test | seeds |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        runs = [v for k, v in cells.items() if k.startswith(f"{m}/{data_key}/")]
        for a in TARGETS:
            g = [r["guaranteed"][str(a)] for r in runs]
            if not g:
                continue
            cols = []
            for part in (g, [x["test_set"] for x in g]):
                worst = min(x["accuracy_min"] for x in part)
                cols.append(f"{_pm(mean_std([x['miss_rate'] for x in part]), 100, 1)} %, "
                            f"{_pm(mean_std([x['accuracy_mean'] for x in part]))} % ({worst * 100:.2f} %), "
                            f"{_pm(mean_std([x['coverage_mean'] for x in part]))} %")
            lines.append(f"| {m} | {a:.2f} | {cols[0]} | {cols[1]} | "
                         f"{_pm(mean_std([x['val_fit_test_accuracy'] for x in g]))} % | {len(g)} |")
    return lines


def reproduced(cells: dict) -> str:
    """How the runs measured here compare with the comparison ledger's test leaf accuracy of the same cells
    (same config digest): the runs were retrained where their folders were gone."""
    path = HERE / "results" / "comparison-cells.json"
    ledger = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    pairs = [(c["leaf_accuracy"], ledger[k]["metrics"]["leaf_accuracy"]) for k, c in cells.items()
             if k in ledger and ledger[k].get("digest") == c["digest"]]
    if not pairs:
        return ""
    same = sum(abs(a - b) < 5e-5 for a, b in pairs)
    worst = max(abs(a - b) for a, b in pairs)
    return (f"The runs are the comparison's cells (same configs); their test leaf accuracy here equals the comparison "
            f"ledger's on {same} of {len(pairs)} (largest difference {worst * 100:.2f} pt).")


def section(cells: dict, command: str) -> str:
    out = ["## decisions", "", "When the model is unsure (issue 36): hierarchical selective classification on the "
           "comparison's own flat and HAFrame runs (CPU budget; each run's test split, at its fitted temperature). "
           "hAURC = area under the hierarchical risk–coverage curve (Goren et al., NeurIPS 2024), lower is better; "
           "Δ = rule − argmax on the same run, paired by seed, mean [95 % t-interval] ×100. Declared before the runs: "
           "an interval below 0 reproduces HSC's ordering, above 0 reverses it, across 0 is not settled.", "",
           f"Command: `{command}` (resumable; `--data fmnist`, `--seeds 0` run part of it, `--table-only` "
           "rewrites this section from the measured cells)", "", reproduced(cells), ""]
    for d in DATASETS:
        if not any(f"/{d.key}/" in k for k in cells):
            continue
        out += [f"### {d.label}", "", *_table(cells, d.key), "",
                f"Guaranteed threshold, confidence {CONFIDENCE}: fitted on one random half of the test split, "
                "measured on the other, 100 splits per run (mean ± std over seeds of the per-run shares). The "
                "population bound promises the accuracy of all future images, so a finite half misses it more "
                "often, by its own sampling noise; the test-set bound promises the accuracy of a set of that many "
                "images (the half's size), which is what is measured. Missed A must stay at most "
                f"{(1 - CONFIDENCE) * 100:.0f} % for the test-set bound. Last column: the threshold fitted on the val "
                "split for a set of the test split's size, its accuracy on test.", "",
                *_guarantee_rows(cells, d.key), "", f"![risk–coverage]({'results/selective-' + d.key + '.png'})", ""]
    return "\n".join(out)


def plot(cells: dict, data_key: str, path: Path) -> None:
    """Seed 0's curves, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hiervision.report import plot_risk_coverage

    fig, axes = plt.subplots(1, len(METHODS), figsize=(5.5 * len(METHODS), 4), sharey=True)
    for ax, m in zip(axes, METHODS):
        cell = cells.get(f"{m}/{data_key}/s0")
        if cell is not None:
            plot_risk_coverage({RULE_NAMES[r]: cell["curves"][r] for r in RULES}, path, f"{m}, seed 0", ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=[d.key for d in DATASETS if "cpu" in d.epochs])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget", default="cpu", choices=["cpu", "gpu", "tiny"])
    p.add_argument("--out", default="runs/bench", help="where the comparison's run folders are (or go)")
    p.add_argument("--table-only", action="store_true", help="rewrite the section and plots from the measured cells")
    args = p.parse_args(argv)
    from hiervision.training import train

    runs = Path(args.out)
    results = (runs / "comparison-tiny" / "results" if args.budget == "tiny" else HERE / "results")
    results.mkdir(parents=True, exist_ok=True)
    ledger_path = results / "selective.json"
    ledger = json.loads(ledger_path.read_text(encoding="utf-8")) if ledger_path.exists() else {}
    for cell in [] if args.table_only else _cells(args.budget, args.seeds, runs, args.data):
        key = f"{cell.method.key}/{cell.data.key}/s{cell.seed}"
        if ledger.get(key, {}).get("digest") == cell.digest:  # measured in an earlier sitting (maybe elsewhere)
            continue
        if not cell.trained():
            train_cell(cell, train, print)
        t0 = time.perf_counter()
        ledger[key] = {"digest": cell.digest, **measure(cell.run_dir)}
        print(f"[selective] {key}: hAURC {ledger[key]['hAURC']} ({time.perf_counter() - t0:.0f} s)", flush=True)
        ledger_path.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    # every cell in the section comes from this command (a sitting may run part of it: --data, --seeds)
    text = section(ledger, "python benchmarks/selective.py" + (" --budget tiny" if args.budget == "tiny" else ""))
    for d in DATASETS:
        if any(f"/{d.key}/" in k for k in ledger):
            plot(ledger, d.key, results / f"selective-{d.key}.png")
    if args.budget == "tiny":
        (results / "RESULTS.md").write_text(text, encoding="utf-8")
    else:
        write_section("decisions", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
