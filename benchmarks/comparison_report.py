"""The comparison's write-up: tables, plots, the RESULTS.md section and the README's "Which method?" paragraph.

Every sentence here is generated from the summary's paired intervals (``comparison_stats.summarize``),
so a claim never outlives the numbers behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

from comparison_plan import BEAM_WIDTHS, DATASETS, METRICS, Cell, Ledger
from results_md import replace_section

HERE = Path(__file__).resolve().parent

PROTOCOL = """Protocol (issue 14). Data: Fashion-MNIST with its 3-level tree (full training set, 10 % carved
off as validation, the official test set); Tiny-ImageNet-200 with its WordNet tree (variable depth;
every training image in shared/data, 10 % carved off as validation, the official val set as test) at 32x32, and on
the gpu budget also at 64x64. One frozen flat recipe (configs/comparison/*-flat.yaml: ResNet-20, SGD
lr 0.1 Nesterov, wd 5e-4, cosine with 0.2-epoch warm-up, batch 128, pad+flip augmentation) and every
method gets the same backbone, epochs, augmentation and data order (the seed fixes split and order;
the LSTM heads add grad_clip 5). Budget: {budget}. HierNet-induced: a flat pre-train of
{pre} of the epochs, the tree induced from its validation confusion (p_min, g_max per data set), then
HierNet for the rest, transferred from it: the same total epochs as flat. "Guo CNN-RNN, beam" is
the Guo run itself decoded with tree-restricted beam search instead of the paper's greedy decoding,
the width ({widths}) picked on validation path accuracy: no extra training. best.pt is picked on
validation path accuracy; every number is on the test set. Issue 40's contenders (flat, HAFrame,
soft-max-margin, HiE, and the rows that decode their runs) run five seeds, the other rows three. Seeds are
paired: each method's
difference to flat is taken seed by seed (same split and order) and reported as mean, std and a 95 %
Student-t interval (n-1 degrees of freedom; none for n < 2); a row pairs with flat's run on the machine (the
precision: amp auto picks bf16 where the CPU has it) its own cell ran on, kept by the ledger — the flat row shows the
latest. Issue 24's rows: HAFrame, HAF and
soft-max-margin train with the papers' settings on the same recipe; the "+ CRM" rows and "flat + Bayes hF1"
train nothing: they answer the named run's calibrated test scores by the post-hoc rule (CRM: least expected LCA
height; Bayes hF1: largest expected per-image hierarchical F1, inner answers allowed), and their hdist@k ranks the
classes by the rule's expected score. "depth sev." counts the true path's levels a mistake misses (equal to
"mistake sev.", the LCA height, on a fixed-depth tree); "op. curve area" is the area under Valmadre's
correct-vs-specificity operating curve; "HOPS" is Sani & Anand's score of the whole ranking of end classes
(Hier-COS, issue 40), recorded for cells trained since it landed ("–" where a row's cells predate it)."""


def _fmt(stat: dict, scale: float) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    digits = 2 if scale == 1 and abs(stat["mean"]) < 100 else 1
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _fmt_diff(d: dict, scale: float) -> str:
    if not d or d["n"] == 0:
        return "–"
    digits = 2  # a paired difference in points: one decimal rounds a -0.03 mean to "-0.0"
    s = f"{d['mean'] * scale:+.{digits}f}"
    if d["lo"] is not None:
        s += f" [{d['lo'] * scale:+.{digits}f}, {d['hi'] * scale:+.{digits}f}]"
    return s


_PLACEHOLDER = "not measured yet"
_CLAIM = " pt"  # every claim of the "Which method?" tables carries its interval in points: " pt [lo, hi]"


#: declared before the five-seed runs (issue 40): a row *keeps* flat's top-1 when the lower end of the seed-paired
#: 95 % interval of Δ top-1 is at least −MARGIN_PT points; it makes *milder mistakes* when the upper ends of
#: Δ mistake severity and of Δ hdist@5 are below 0. "Not distinguishable" (an interval holding 0) is no tie.
MARGIN_PT = 0.5


def top1_words(d: dict) -> str:
    """What a paired interval of Δ top-1 (fractions) allows us to say about a row against flat, by the margin."""
    lo, hi, m = d["lo"] * 100, d["hi"] * 100, MARGIN_PT
    if lo > 0:
        return "beats flat"
    if hi < 0:
        return "loses" if lo < -m else f"loses by less than {m} pt (keeps top-1)"
    if lo < -m:
        return f"not settled at n = {d['n']}"
    if hi <= m:
        return f"ties (within ±{m} pt)"
    return f"keeps top-1 (a gain not settled at n = {d['n']})"


def which_method(summary: dict, min_seeds: int = 3) -> str:
    """The README's "Which method?" tables, one per data set, generated from the paired intervals: each row's
    Δ top-1 with its interval and what :func:`top1_words` lets us say, its Δ mistake severity and Δ hdist@5, and
    whether it meets :data:`RULE` there.

    Only rows with ``min_seeds`` paired seeds get a row; the others are named as not measured yet, and a data set
    without any such row (or whose flat row is short) gets a placeholder. Optional rows short of ``min_seeds``
    are exploratory: the RESULTS tables show them, these do not.
    """
    def interval(d: dict | None, scale: float, unit: str = "") -> str:
        if not d or d["lo"] is None:
            return "–"
        return f"{d['mean'] * scale:+.2f}{unit} [{d['lo'] * scale:+.2f}, {d['hi'] * scale:+.2f}]"

    parts = []
    for data in summary.values():
        rows = data["rows"]
        short = [r["label"] for r in rows.values() if r["n"] < min_seeds and not r.get("optional")]
        table = []
        for key, r in rows.items():
            d = r.get("vs_flat", {}).get("leaf_accuracy")
            if not d or d["lo"] is None or r["n"] < min_seeds or d["n"] < min_seeds:
                continue
            v = r["vs_flat"]
            bar = [v.get(m) for m, *_ in RECIPE_BAR]
            meets = "–" if not all(x and x["lo"] is not None for x in bar) else \
                "yes" + (" (2 networks)" if key in ENSEMBLES else "") if all(
                    ok(x) for x, (*_, ok) in zip(bar, RECIPE_BAR)) else "no"
            table.append(f"| {r['label']} | {d['n']} | {interval(d, 100, _CLAIM)} | {top1_words(d)} | "
                         f"{interval(v.get('mistake_severity'), 1)} | {interval(v.get('hdist@5'), 1)} | {meets} |")
        missing = (f"{_PLACEHOLDER} with >= {min_seeds} seeds: {', '.join(short)}; placeholder until "
                   "`benchmarks/run.py --profile comparison` fills it") if short else ""
        if table:
            parts.append("\n".join([
                f"*{data['label']}* — against flat, paired by seed (95 % t-intervals; the words by the declared "
                f"margin of {MARGIN_PT} pt):", "",
                "| method | n | Δ top-1 | top-1 against flat | Δ mistake sev. | Δ hdist@5 | meets the rule |",
                "|---|---|---|---|---|---|---|", *table])
                + (f"\n\n{missing[0].upper()}{missing[1:]}." if missing else ""))
        else:
            parts.append(f"*{data['label']}*: {missing}.")
    return "\n\n".join(parts)


#: the rule for the recipe hiervision recommends: (metric, short name, scale, what its paired 95 % interval
#: against flat must show on a data set)
RECIPE_BAR = (("leaf_accuracy", "Δ top-1 pt", 100, lambda d: d["lo"] * 100 >= -MARGIN_PT),  # keeps top-1
              ("mistake_severity", "Δ mistake sev.", 1, lambda d: d["hi"] < 0),  # milder
              ("hdist@5", "Δ hdist@5", 1, lambda d: d["hi"] < 0))  # milder
RULE = (f"keeps flat's top-1 (lower end of Δ top-1 at or above −{MARGIN_PT} pt) and makes milder mistakes (upper "
        "ends of Δ mistake severity and Δ hdist@5 below 0)")


#: rows that train and run more than one network (HiE): not equal budget, so never the recommended recipe
ENSEMBLES = frozenset(m.key for d in DATASETS for m in d.methods if m.networks > 1)


def _pairs(summary: dict, key: str, metric: str, min_seeds: int) -> list[dict] | None:
    ds = [data["rows"].get(key, {}).get("vs_flat", {}).get(metric) for data in summary.values()]
    return ds if all(d and d["lo"] is not None and d["n"] >= min_seeds for d in ds) else None


def recipe_choice(summary: dict, min_seeds: int = 3) -> dict | None:
    """What the rule picks (None until every contender has ``min_seeds`` paired seeds of the three metrics).

    ``recipe``: the row that meets :data:`RULE` on every data set (the highest mean Δ top-1 among several), else
    None: flat. ``per_data[data key]``: ``meets`` (the same pick on that data set alone, or None), ``trade_off``
    where nothing meets it (among rows that lower a mistake measure: those keeping top-1 first, then the most
    measures lowered, then the highest lower end of Δ top-1) and ``ensembles`` (ensemble rows meeting it there).
    Equal budget only: an ensemble's row (:data:`ENSEMBLES`) is never picked."""
    first = next(iter(summary.values()))["rows"] if summary else {}
    measured = [k for k in first if k != "flat" and all(_pairs(summary, k, m, min_seeds) for m, *_ in RECIPE_BAR)]
    if not [k for k in measured if k not in ENSEMBLES]:
        return None

    def ok(key: str, i: int, bar=RECIPE_BAR) -> list[bool]:
        return [test(_pairs(summary, key, m, min_seeds)[i]) for m, *_, test in bar]

    def top1(key: str, i: int) -> dict:
        return _pairs(summary, key, "leaf_accuracy", min_seeds)[i]

    singles = [k for k in measured if k not in ENSEMBLES]
    per_data = {}
    for i, data_key in enumerate(summary):
        meets = [k for k in singles if all(ok(k, i))]
        lowers = [k for k in singles if any(ok(k, i)[1:])]
        per_data[data_key] = {
            "meets": max(meets, key=lambda k: top1(k, i)["mean"]) if meets else None,
            "trade_off": None if meets or not lowers else max(
                lowers, key=lambda k: (ok(k, i)[0], sum(ok(k, i)[1:]), top1(k, i)["lo"])),
            "ensembles": [k for k in measured if k in ENSEMBLES and all(ok(k, i))]}
    everywhere = [k for k in singles if all(all(ok(k, i)) for i in range(len(summary)))]
    recipe = max(everywhere, key=lambda k: sum(top1(k, i)["mean"] for i in range(len(summary)))) if everywhere \
        else None
    return {"recipe": recipe, "per_data": per_data}


def recommendation(summary: dict, min_seeds: int = 3) -> str:
    """The recommended recipe in words, from :func:`recipe_choice` (the numbers quoted beside every name)."""
    choice = recipe_choice(summary, min_seeds)
    if choice is None:
        return (f"*Recommended recipe*: not decided yet — it needs >= {min_seeds} paired seeds of top-1, mistake "
                "severity and hdist@5 on every data set.")
    first = next(iter(summary.values()))["rows"]

    def on(key: str, i: int) -> str:
        return ", ".join(f"{name} {d['mean'] * f:+.2f} [{d['lo'] * f:+.2f}, {d['hi'] * f:+.2f}]"
                         for m, name, f, _ in RECIPE_BAR for d in [_pairs(summary, key, m, min_seeds)[i]])

    labels = [data["label"] for data in summary.values()]
    if choice["recipe"]:
        best = choice["recipe"]
        return (f"*Recommended recipe*: **{first[best]['label']}** — on every data set it {RULE}: "
                + "; ".join(f"{label}: {on(best, i)}" for i, label in enumerate(labels))
                + f" (95 % CI, n >= {min_seeds}).")
    said = []
    for i, (label, pick) in enumerate(zip(labels, choice["per_data"].values())):
        if pick["meets"]:
            text = f"{label}: **{first[pick['meets']]['label']}** meets it ({on(pick['meets'], i)})"
        elif pick["trade_off"]:
            text = (f"{label}: no row meets it; the best trade-off there is **{first[pick['trade_off']]['label']}** "
                    f"({on(pick['trade_off'], i)})")
        else:
            text = f"{label}: no row meets it or lowers a mistake measure (flat)"
        if pick["ensembles"]:
            names = [first[k]["label"] for k in pick["ensembles"]]
            text += f" — {' and '.join(names)} {'meet' if len(names) > 1 else 'meets'} it at more compute"
        said.append(text)
    return (f"*Recommended recipe*: **flat** — no single-network row {RULE} on every data set. Per data set (95 % "
            f"CI, n >= {min_seeds}): " + "; ".join(said) + ".")


def crm_on_deep_trees(summary: dict, synthetic: Path = HERE / "results" / "crm-depth.json") -> str:
    """Issue 24's CRM finding, from the numbers: what CRM costs flat on each data set (paired intervals) and,
    from ``benchmarks/crm_depth.py``'s exact expectations, how much of its top-1 cost comes from the variable
    depth (WordNet vs the same tree padded to one depth) and how much from low confidence (28 % vs 75 %)."""
    said = []
    for data in summary.values():
        d = data["rows"].get("flat_crm", {}).get("vs_flat", {})
        if all(d.get(k) and d[k]["lo"] is not None for k in ("leaf_accuracy", "mistake_severity", "depth_severity")):
            said.append(f"{data['label']}: " + ", ".join(
                f"{name} {d[k]['mean'] * f:+.2f} [{d[k]['lo'] * f:+.2f}, {d[k]['hi'] * f:+.2f}]"
                for k, name, f in (("leaf_accuracy", "Δ top-1 pt", 100), ("mistake_severity", "Δ mistake sev.", 1),
                                   ("depth_severity", "Δ depth sev.", 1))) + f" (n = {d['leaf_accuracy']['n']})")
    if not said or not synthetic.exists():
        return ""
    q = json.loads(synthetic.read_text(encoding="utf-8"))

    def cost(key: str, tree: str) -> float:
        r = q[key][tree]
        return 100 * (r["argmax"]["top1"] - r["crm"]["top1"])

    deep, padded, sure = cost("hier@0.284", "wordnet"), cost("hier@0.284", "padded"), cost("hier@0.75", "wordnet")
    why = ("the cost comes from low confidence, the variable depth adds a little" if padded >= deep / 2 > sure
           else "the variable depth accounts for much of it" if padded < deep / 2 else "confidence does not explain it")
    return ("*CRM on deep trees*: flat + temperature + CRM against flat, paired by seed — " + "; ".join(said)
            + ". Why it costs top-1 on Tiny-ImageNet and not in the CRM paper (exact expectations over calibrated "
            "synthetic distributions on the same 200 classes, `benchmarks/crm_depth.py`): CRM costs "
            f"{deep:.2f} pt top-1 on the WordNet tree and {padded:.2f} pt on the same tree padded to one depth when "
            f"argmax is right 28 % of the time, {sure:.2f} pt on WordNet at 75 %: {why}. LCA height rewards moving "
            "answers into bushy deep subtrees on such a tree; `depth sev.` (levels of the true path a mistake misses) "
            "is the column to compare mistakes across depths, `mistake sev.` the papers' (benchmarks/DECISIONS.md).")


def section(summary: dict, budget: str, command: str, machine: str, wall_s: float | None, name: str,
            progress: str = "") -> str:
    """The RESULTS.md section: protocol, machine, command, then per data set the table (n per row),
    the paired differences, per-level accuracy and the length diagnostics of variable-length paths."""
    epochs = ", ".join(f"{d['label']}: {d['epochs']} epochs, HierNet tree p_min {d['induce'][0]}, g_max "
                       f"{d['induce'][1]}" for d in summary.values())
    pre = ", ".join(sorted({f"{d['pretrain_fraction']:.0%}" for d in summary.values()})) or "–"
    lines = [f"## {name}", "", PROTOCOL.format(budget=f"{budget} ({epochs})", pre=pre,
                                                 widths=", ".join(map(str, BEAM_WIDTHS))).replace("\n", " "), "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             (f"Wall time of this sitting: {wall_s / 60:.1f} min (cells are cached: earlier sittings add to the "
              "tables)" if wall_s is not None else "Wall time: this sitting trained nothing (tables rewritten from "
              "the cached cells; each row's training speed is its train img/s column)") + ("  " if progress else ""),
             *([progress] if progress else [])]
    for key, data in summary.items():
        rows = data["rows"]
        lines += ["", f"### {data['label']}", "",
                  "| method | n | " + " | ".join(c for _, c, *_ in METRICS) + " | level acc |",
                  "|---" * (len(METRICS) + 3) + "|"]
        for r in rows.values():
            lvl = " / ".join(f"{v:.3f}" for v in r["level_accuracy"]) or "–"
            lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(_fmt(r[k], s) for k, _, s, *_ in METRICS)
                         + f" | {lvl} |")
        paired = [(k, c, s) for k, c, s, p, _ in METRICS if p]
        lines += ["", "Difference to flat, paired by seed: mean [95 % t-interval] (accuracies in points):", "",
                  "| method | n pairs | " + " | ".join(f"Δ {c}" for _, c, _ in paired) + " |",
                  "|---" * (len(paired) + 2) + "|"]
        for r in rows.values():
            if "vs_flat" in r:
                n = r["vs_flat"]["path_accuracy"]["n"]
                lines.append(f"| {r['label']} | {n} | "
                             + " | ".join(_fmt_diff(r["vs_flat"][k], s) for k, _, s in paired) + " |")
        for r in rows.values():
            if r.get("beam_width"):
                picked = ", ".join(f"s{s}: {k}" for s, k in sorted(r["beam_width"].items()))
                lines += ["", f"{r['label']}: beam width picked on val per seed: {picked}."]
        if any(r["diagnostics"] for r in rows.values()):
            lines += ["", "Where the paths go wrong (means over seeds): shares of test images whose predicted "
                      "path is too short / too long, a strict prefix of the true one (stopped early) or runs on "
                      "past its end; where wrong paths first leave the true one (share of errors per level); "
                      "level accuracy among images whose levels above were right — a per-step error rate free of "
                      "compounding, to hold beside the plain level accuracy above.", "",
                      "| method | too short | too long | stopped early | ran on | first wrong level | "
                      "level acc given right prefix |", "|---|---|---|---|---|---|---|"]
            for r in rows.values():
                d = r["diagnostics"]
                if not d:
                    continue
                lvl = " / ".join(f"{v:.3f}" for v in r["level_accuracy_given_prefix"])
                first = " / ".join(f"{k}: {v:.2f}" for k, v in r["first_wrong_level"].items()) or "–"
                lines.append(f"| {r['label']} | {d['too_short']:.3f} | {d['too_long']:.3f} | "
                             f"{d['stopped_early']:.3f} | {d['ran_on']:.3f} | {first} | {lvl} |")
        lengths = sorted({int(n) for r in rows.values() for n in r["path_accuracy_by_length"]})
        if len(lengths) > 1:
            lines += ["", "Path accuracy per true path length (means over seeds):", "",
                      "| method | " + " | ".join(str(n) for n in lengths) + " |",
                      "|---" * (len(lengths) + 1) + "|"]
            for r in rows.values():
                v = r["path_accuracy_by_length"]
                lines.append(f"| {r['label']} | " + " | ".join(
                    f"{v[str(n)]:.3f}" if str(n) in v else "–" for n in lengths) + " |")
        lines += ["", f"![paired differences]({_plot_name(name, key)})"]
    crm = crm_on_deep_trees(summary)
    lines += ["", "### Which method?", "", which_method(summary), "", recommendation(summary), "",
              *([crm, ""] if crm else [])]
    return "\n".join(lines)


def _plot_name(name: str, data_key: str) -> str:
    return f"results/{name}-{data_key}.png"


def plot(summary: dict, name: str, outdir: Path) -> list[Path]:
    """Per data set: each method's paired difference to flat (path accuracy, hierarchical F1) with its
    95 % interval; methods without an interval (n < 2) are drawn as points only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, data in summary.items():
        rows = [r for r in data["rows"].values() if "vs_flat" in r]
        fig, axes = plt.subplots(1, 2, figsize=(9, 0.6 * max(len(rows), 2) + 1.4), sharey=True)
        for ax, (metric, title) in zip(axes, [("path_accuracy", "path accuracy"),
                                             ("hierarchical_f1", "hierarchical F1")]):
            for i, r in enumerate(rows):
                d = r["vs_flat"][metric]
                if d["n"] == 0:
                    continue
                m = d["mean"] * 100
                err = [[m - d["lo"] * 100], [d["hi"] * 100 - m]] if d["lo"] is not None else None
                ax.errorbar([m], [i], xerr=err, fmt="o", capsize=4)
            ax.axvline(0, color="grey", lw=1)
            ax.set_xlabel(f"Δ {title} vs flat (pt), 95 % CI")
            ax.grid(alpha=0.3, axis="x")
        axes[0].set_yticks(range(len(rows)), [f"{r['label']} (n={r['vs_flat']['path_accuracy']['n']})"
                                              for r in rows])
        axes[0].invert_yaxis()  # rows top to bottom as in the tables
        fig.suptitle(f"{data['label']}: paired difference to flat")
        fig.tight_layout()
        path = outdir / Path(_plot_name(name, key)).name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


README_START, README_END = "<!-- which-method:start -->", "<!-- which-method:end -->"


def write_outputs(summary: dict, budget: str, command: str, machine: str, wall_s: float | None,
                  results_dir: Path = HERE / "results", results_md: Path = HERE / "RESULTS.md",
                  readme: Path | None = HERE.parent / "README.md", progress: str = "") -> str:
    """JSON, plots, the RESULTS.md section and the README's "Which method?" paragraph (between
    :data:`README_START` and :data:`README_END`; replaced only by a paragraph with at least as many
    claims (intervals) as the one there, so a partial sitting never erases measured claims)."""
    name = "comparison" if budget == "cpu" else f"comparison-{budget}"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(
        {"profile": name, "budget": budget, "command": command, "machine": machine, "summary": summary},
        indent=1, default=str), encoding="utf-8")
    plot(summary, name, results_dir)
    body = section(summary, budget, command, machine, wall_s, name, progress)
    text = results_md.read_text(encoding="utf-8") if results_md.exists() else "# Benchmark results\n"
    results_md.write_text(replace_section(text, name, body), encoding="utf-8")
    if readme is not None and readme.exists():
        text = readme.read_text(encoding="utf-8")
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            old, tail = rest.split(README_END, 1)
            para = (f"{which_method(summary)}\n\n{recommendation(summary)}\n\n(Generated from `{command}`; protocol "
                    f"and tables: benchmarks/RESULTS.md, section `{name}`.)")
            claims = f"{_CLAIM} ["  # an interval; the words ("ties (within ±0.5 pt)") are not claims
            if para.count(claims) >= old.count(claims):
                readme.write_text(f"{head}{README_START}\n{para}\n{README_END}{tail}", encoding="utf-8")
    return body


def machines_note(cells: list[Cell], ledger: Ledger, machine: str) -> str:
    """Where the table's cells ran, when not all on this sitting's machine (sittings add up across machines)."""
    where: dict[str, list[str]] = {}
    for c in cells:
        entry = ledger.cells.get(c.name)
        if c.done() and not c.hidden and entry:
            where.setdefault(entry["machine"], []).append(c.name)
    if set(where) <= {machine}:
        return ""
    return "  \nCells by machine: " + "; ".join(f"{len(v)} on {m} ({', '.join(sorted({n.split('/')[0] for n in v}))})"
                                             for m, v in where.items()) + "."

