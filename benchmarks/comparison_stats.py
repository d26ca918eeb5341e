"""The comparison's statistics: mean ± std per cell and the seed-paired difference to flat with a 95 % t-interval.

Pure arithmetic on finished cells' metrics (no scipy: a small table of t quantiles), kept apart from
running cells and from writing tables so each can be checked on its own.
"""

from __future__ import annotations

import math
import statistics

from comparison_plan import METRICS, Cell, DataSet, Method

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; above 30 the normal 1.96
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile(df: int) -> float:
    """Two-sided 95 % Student-t quantile (table up to 30 degrees of freedom, 1.96 above)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_std(values: list[float]) -> dict:
    """``{n, mean, std}`` (std: sample standard deviation, 0 for one value; mean None for none)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_difference(method: dict[int, float], baseline: dict[int, float]) -> dict:
    """Seed-paired ``method − baseline``: ``{n, seeds, mean, std, lo, hi}``, a 95 % t-interval (None for n < 2).

    Only seeds present (and not None) in both count: the pairing is what removes the split/order noise
    both runs share.
    """
    seeds = sorted(s for s in method if s in baseline and method[s] is not None and baseline[s] is not None)
    diffs = [float(method[s]) - float(baseline[s]) for s in seeds]
    out = {"n": len(diffs), "seeds": seeds, **{k: v for k, v in mean_std(diffs).items() if k != "n"},
           "lo": None, "hi": None}
    if len(diffs) >= 2:
        half = t_quantile(len(diffs) - 1) * out["std"] / math.sqrt(len(diffs))
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


def _mean_lists(lists: list[list[float]]) -> list[float]:
    cols = list(zip(*[v for v in lists if v]))
    return [statistics.fmean(c) for c in cols]


def _mean_dict(dicts: list[dict]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d}, key=lambda k: int(k))
    return {str(k): statistics.fmean(float(d[k]) for d in dicts if k in d) for k in keys}


def _shares(counts: dict) -> dict:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def _paired_baseline(cells: list[Cell], data: DataSet, flat: Method, key: str, latest: dict) -> dict:
    """Flat's per-seed metrics to pair row ``key`` with: per seed, flat's run on the machine (the precision)
    the row's cell ran on, where the ledger keeps one; else flat's latest."""
    out = {k: dict(v) for k, v in latest.items()}
    by_seed = {(c.method.key, c.seed): c for c in cells if c.data == data and not c.hidden}
    for (m, seed), cell in by_seed.items():
        base = by_seed.get((flat.key, seed))
        if m != key or base is None or cell.ledger is None:
            continue
        metrics = cell.ledger.metrics_on(base, cell.ledger.machine(cell))
        if metrics is not None:
            for k in out:
                out[k][seed] = metrics.get(k)
    return out


def summarize(cells: list[Cell], budget: str = "cpu") -> dict:
    """Per data set and method: n, mean ± std of every metric, per-level accuracy, length diagnostics
    (means over seeds), and the seed-paired difference to the data set's first row (flat)."""
    out: dict = {}
    for data in {c.data.key: c.data for c in cells}.values():
        rows: dict = {}
        for m in data.methods:
            ms = {c.seed: c.metrics() for c in cells if c.data == data and c.method == m and not c.hidden
                  and c.done()}
            if not ms and not any(c.method == m and c.data == data for c in cells):
                continue
            diag = [x["length_diagnostics"] for x in ms.values() if x.get("length_diagnostics")]
            rows[m.key] = {
                "label": m.label,
                "optional": m.optional,
                "n": len(ms),
                "seeds": sorted(ms),
                "per_seed": {k: {s: x.get(k) for s, x in ms.items()} for k, *_ in METRICS},
                **{k: mean_std([x.get(k) for x in ms.values()]) for k, *_ in METRICS},
                "level_accuracy": _mean_lists([x.get("level_accuracy") or [] for x in ms.values()]),
                "path_accuracy_by_length": _mean_dict([x.get("path_accuracy_by_length") or {} for x in ms.values()]),
                "diagnostics": {k: statistics.fmean(d[k] for d in diag)
                                for k in ("too_short", "too_long", "stopped_early", "ran_on")} if diag else {},
                "level_accuracy_given_prefix": _mean_lists([d.get("level_accuracy_given_prefix") or []
                                                            for d in diag]),
                "first_wrong_level": _mean_dict([_shares(d.get("first_wrong_level") or {}) for d in diag]),
                "beam_width": {s: x["beam_width"] for s, x in ms.items() if "beam_width" in x},
            }
        base_key = data.methods[0].key
        for key, row in rows.items():
            if key != base_key and base_key in rows:
                base = _paired_baseline(cells, data, data.methods[0], key, rows[base_key]["per_seed"])
                row["vs_flat"] = {k: paired_difference(row["per_seed"][k], base[k])
                                  for k, _, _, paired, _ in METRICS if paired}
        out[data.key] = {"label": data.label, "epochs": data.epochs.get(budget),
                         "pretrain_fraction": data.pretrain_fraction, "induce": list(data.induce), "rows": rows}
    return out

