"""Post-hoc decision rules on trained runs: calibration, hedged answers, CRM — no training here.

    python benchmarks/decisions.py flat=runs/bench/foundation/fmnist-flat-s0 \\
        flat=runs/bench/foundation/fmnist-flat-s1 guo=runs/bench/guo/guo-s0 --name fmnist
    python benchmarks/decisions.py --tiny      # self-check: trains two tiny synthetic runs (~1 min on CPU)

Each ``LABEL=RUN_DIR`` is a run folder written by ``hiervision train``; a label given several times
(one run per seed) is reported as mean ± std. For every run the val split fits the temperature, the
hedging multipliers λ and the conformal thresholds (:func:`hiervision.posthoc.posthoc_report`; the run
folder is not modified unless ``--write``), and the test split measures:

* ECE (end class, equal-width and equal-mass bins, and per level) before and after temperature scaling,
  with one temperature and with one per tree level (``eval.calibrate: per_level``);
* hedged answers (Deng et al.'s DARTS) at each target vs the naive back-off baseline and the
  split-conformal answers: achieved accuracy and information gain;
* CRM (Karthik et al.) vs argmax: top-1, mistake severity, hdist@1/5/20 (CRM ranks by expected risk).

Writes ``benchmarks/results/decisions-<name>.json``, a Markdown section to stdout and
``benchmarks/results/decisions-<name>.md``, reliability diagrams and the accuracy–specificity curve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiervision.config import load_config
from hiervision.data import build_data
from hiervision.decisions import (
    accuracy_specificity_curve,
    conformal_nodes,
    conformal_threshold,
    covers,
    end_distribution,
    fit_lambda,
    fit_temperature,
    hedge_nodes,
    node_marginals,
)
from hiervision.evaluation import predict_dataset
from hiervision.experiment import data_config, load_run
from hiervision.metrics import calibration_points, calibration_report
from hiervision.posthoc import posthoc_report
from hiervision.report import plot_accuracy_specificity, plot_reliability
from hiervision.training import train

HERE = Path(__file__).resolve().parent
CURVE_TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def _predictions(run_dir: Path, limit_test: int | None) -> tuple:
    cfg, taxonomy, model, _ = load_run(run_dir)
    data_cfg = data_config(cfg)
    if limit_test:
        data_cfg["limit_test"] = limit_test
    data = build_data(data_cfg)
    if data.multi_label:
        raise ValueError(f"{run_dir}: decision rules apply to single-label runs")
    if data.val is None or len(data.val) == 0:
        raise ValueError(f"{run_dir}: needs a validation split (data.val_fraction > 0) to fit on")
    bs = cfg["eval"]["batch_size"]
    device = torch.device("cpu")
    val = predict_dataset(model, data, data.val, bs, device, None)
    test = predict_dataset(model, data, data.test, bs, device, None)
    return model, taxonomy, val, test


def same_distribution_check(qt: torch.Tensor, test_t: torch.Tensor, taxonomy, targets: tuple[float, ...],
                            seed: int = 0) -> list[dict]:
    """Hedged accuracy when λ and τ are fitted on one random half of the *test* split and measured on the
    other (two folds, averaged): fitting and test data then come from one distribution. Where this meets
    the target and the val-fitted rule does not, the shortfall is a val→test shift, not the rule."""
    order = torch.randperm(len(test_t), generator=torch.Generator().manual_seed(seed))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    mt = node_marginals(qt, taxonomy)
    rows = []
    for a in targets:
        darts, conf = [], []
        for fit, held in (halves, halves[::-1]):
            lam = fit_lambda(mt[fit], test_t[fit], taxonomy, a)
            tau = conformal_threshold(qt[fit], test_t[fit], taxonomy, 1 - a)
            darts.append(float(covers(hedge_nodes(mt[held], taxonomy, lam), test_t[held], taxonomy).float().mean()))
            conf.append(float(covers(conformal_nodes(qt[held], taxonomy, tau), test_t[held], taxonomy).float().mean()))
        rows.append({"target": a, "darts_accuracy": statistics.fmean(darts),
                     "conformal_accuracy": statistics.fmean(conf)})
    return rows


def evaluate_run(run_dir: Path, targets: tuple[float, ...], limit_test: int | None, write: bool) -> dict:
    """The post-hoc report of one run, plus its curve and reliability points (kept for the plots)."""
    model, taxonomy, (val, val_t), (test, test_t) = _predictions(run_dir, limit_test)
    rep = posthoc_report(model, val, val_t, test, test_t, taxonomy, run_dir if write else None, targets)
    levels = fit_temperature(end_distribution(val, taxonomy), val_t, taxonomy, per_level=True)
    qt_levels = end_distribution(test, taxonomy, temperature=levels)
    rep["per_level"] = {"temperature": levels, "calibration": calibration_report(qt_levels, test_t, taxonomy),
                        "nll": {k: _nll(q, test_t, taxonomy) for k, q in (
                            ("raw", end_distribution(test, taxonomy)),
                            ("one", end_distribution(test, taxonomy, temperature=rep["temperature"])),
                            ("per_level", qt_levels))}}
    mv = node_marginals(end_distribution(val, taxonomy, temperature=rep["temperature"]), taxonomy)
    mt = node_marginals(end_distribution(test, taxonomy, temperature=rep["temperature"]), taxonomy)
    rep["curve"] = accuracy_specificity_curve(mv, val_t, mt, test_t, taxonomy, CURVE_TARGETS)
    rep["reliability"] = {
        "T=1": calibration_points(end_distribution(test, taxonomy), test_t, taxonomy)[-1],
        f"T={rep['temperature']:.2f}": calibration_points(end_distribution(test, taxonomy, temperature=rep[
            "temperature"]), test_t, taxonomy)[-1],
    }
    qt = end_distribution(test, taxonomy, temperature=rep["temperature"])
    rep["same_distribution"] = same_distribution_check(qt, torch.as_tensor(test_t).long(), taxonomy, targets)
    rep["run"] = str(run_dir)
    rep["max_information_gain"] = float(torch.log(torch.tensor(float(len(taxonomy.leaves)))))
    return rep


def _nll(q: torch.Tensor, targets, taxonomy) -> float:
    """Mean negative log-likelihood of the targets (a coarse target: the mass under it)."""
    t = torch.as_tensor(targets).long()
    return float(-torch.log(node_marginals(q, taxonomy)[torch.arange(len(t)), t].clamp(min=1e-12)).mean())


def _ms(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def _per_level(before: list[list[float]], after: list[list[float]]) -> str:
    """``b → a / b → a / …``: one pair per level, each the mean ± std over runs."""
    return " / ".join(f"{_ms([b[i] for b in before])} → {_ms([a[i] for a in after])}" for i in range(len(before[0])))


def markdown(results: dict[str, list[dict]], title: str, command: str) -> str:
    """Three tables: calibration, hedged vs back-off vs conformal, CRM vs argmax."""
    lines = [f"## Decision rules: {title}", "", f"`{command}`", "",
             "### Calibration (test, end class; 15 bins)", "",
             "| model | T | ECE before | ECE after | ECE (equal-mass) before | after | per-level ECE before → after |",
             "|---|---|---|---|---|---|---|"]
    for label, reps in results.items():
        cal = [r["calibration"] for r in reps]
        levels = _per_level([c["before"]["ece_per_level"] for c in cal], [c["after"]["ece_per_level"] for c in cal])
        lines.append(f"| {label} | {_ms([r['temperature'] for r in reps])} | "
                     f"{_ms([c['before']['ece'] for c in cal])} | {_ms([c['after']['ece'] for c in cal])} | "
                     f"{_ms([c['before']['ece_mass'] for c in cal])} | {_ms([c['after']['ece_mass'] for c in cal])} | "
                     f"{levels} |")
    lines += ["", "### One temperature per tree level (fitted on val, each level alone; test)", "",
              "| model | T per level | NLL raw | NLL one T | NLL per level | ECE one T | ECE per level "
              "| per-level ECE, one T → per level |", "|---|---|---|---|---|---|---|---|"]
    for label, reps in results.items():
        if not all("per_level" in r for r in reps):
            continue
        pl = [r["per_level"] for r in reps]
        ts = " / ".join(_ms([p["temperature"][i] for p in pl]) for i in range(len(pl[0]["temperature"])))
        levels = _per_level([r["calibration"]["after"]["ece_per_level"] for r in reps],
                            [p["calibration"]["ece_per_level"] for p in pl])
        lines.append(f"| {label} | {ts} | {_ms([p['nll']['raw'] for p in pl])} | {_ms([p['nll']['one'] for p in pl])} "
                     f"| {_ms([p['nll']['per_level'] for p in pl])} | "
                     f"{_ms([r['calibration']['after']['ece'] for r in reps])} | "
                     f"{_ms([p['calibration']['ece'] for p in pl])} | {levels} |")
    lines += ["", "### Hedged answers (λ fitted on val; test accuracy and information gain in nats)", "",
              "| model | target | DARTS acc | DARTS info | back-off acc | back-off info | conformal acc "
              "| conformal info |",
              "|---|---|---|---|---|---|---|---|"]
    for label, reps in results.items():
        for i, h in enumerate(reps[0]["hedged"]):
            hs = [r["hedged"][i] for r in reps]
            lines.append(f"| {label} | {h['target']} | {_ms([x['accuracy'] for x in hs])} | "
                         f"{_ms([x['information_gain'] for x in hs])} | "
                         f"{_ms([x['baseline']['accuracy'] for x in hs])} | "
                         f"{_ms([x['baseline']['information_gain'] for x in hs])} | "
                         f"{_ms([x['conformal']['accuracy'] for x in hs])} | "
                         f"{_ms([x['conformal']['information_gain'] for x in hs])} |")
    lines += ["", f"(information gain of always the right leaf: {reps[0]['max_information_gain']:.3f} nats)", "",
              "Same-distribution check: λ and τ fitted on one random half of test, accuracy on the other half "
              "(two folds): where these meet the target and the val-fitted answers above do not, the shortfall "
              "is a shift between the validation split and the test set, not the rule.", "",
              "| model | target | DARTS acc (test-half fit) | conformal acc (test-half fit) |", "|---|---|---|---|"]
    for label, reps in results.items():
        for i, row in enumerate(reps[0].get("same_distribution", [])):
            xs = [r["same_distribution"][i] for r in reps]
            lines.append(f"| {label} | {row['target']} | {_ms([x['darts_accuracy'] for x in xs])} | "
                         f"{_ms([x['conformal_accuracy'] for x in xs])} |")
    lines += ["",
              "### CRM vs argmax (test)", "",
              "| model | decode | top-1 | mistake sev. | hdist@1 | hdist@5 | hdist@20 |",
              "|---|---|---|---|---|---|---|"]
    for label, reps in results.items():
        for rule in ("argmax", "crm"):
            ms = [r["crm"][rule] for r in reps]
            lines.append(f"| {label} | {rule} | " + " | ".join(_ms([m[k] for m in ms]) for k in (
                "leaf_accuracy", "mistake_severity", "hdist@1", "hdist@5", "hdist@20")) + " |")
    return "\n".join(lines) + "\n"


def _tiny_runs(root: Path) -> list[tuple[str, Path]]:
    """Two 1-epoch runs on small synthetic images: the flat model and per-level softmax heads."""
    runs = []
    for label, model in (("flat", "{name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}"),
                         ("guo-multihead", "{name: guo_multihead, backbone: resnet20, backbone_kwargs: {width: 0.5}}")):
        cfg = load_config(overrides=["data={name: synthetic, n_train: 480, n_test: 160, size: 16, val_fraction: 0.3}",
                                     f"model={model}", "train.epochs=1", "train.batch_size=64",
                                     "train.progress=false", "train.amp=none"])
        train(cfg, root / label, resume=False)
        runs.append((label, root / label))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="LABEL=RUN_DIR")
    p.add_argument("--name", default=None, help="results file stem (default: tiny or the first label)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    p.add_argument("--limit-test", type=int, default=None, help="cap test images (class-balanced)")
    p.add_argument("--write", action="store_true", help="also store T and λ in each run's decisions.json")
    p.add_argument("--tiny", action="store_true", help="self-check on two tiny synthetic runs it trains itself")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON, Markdown and plots")
    args = p.parse_args(argv)
    command = "python benchmarks/decisions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            specs = _tiny_runs(Path(tmp))
        else:
            if not args.runs:
                p.error("give LABEL=RUN_DIR run folders, or --tiny")
            specs = []
            for item in args.runs:
                label, sep, run = item.partition("=")
                if not sep or not label or not Path(run).is_dir():
                    p.error(f"{item!r}: expected LABEL=RUN_DIR with an existing run folder")
                specs.append((label, Path(run)))
        name = args.name or ("tiny" if args.tiny else specs[0][0])
        results: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for label, run in specs:
            print(f"[decisions] {label}: {run}", flush=True)
            results.setdefault(label, []).append(evaluate_run(run, tuple(args.targets), args.limit_test, args.write))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_specificity({label: reps[0]["curve"] for label, reps in results.items()},
                              out / f"decisions-{name}-curve.png", f"accuracy–specificity ({name}, test)")
    for label, reps in results.items():
        plot_reliability(reps[0]["reliability"], out / f"decisions-{name}-{label}-reliability.png",
                         title=f"{label} (test, end class)")
    md = markdown(results, name, command)
    (out / f"decisions-{name}.md").write_text(md, encoding="utf-8")
    saved = {label: [{k: v for k, v in r.items() if k != "reliability"} for r in reps]
             for label, reps in results.items()}
    (out / f"decisions-{name}.json").write_text(json.dumps({"command": command, "results": saved,
                                                            "seconds": time.perf_counter() - t0}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
