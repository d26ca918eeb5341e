"""Pictures of an evaluation a person would rather see than read: ``hiervision evaluate RUN --report DIR``.

:func:`write_report` takes one split's :class:`~hiervision.decoding.Prediction`, its targets and the
tree, and writes PNGs (matplotlib, Agg) plus ``index.html`` that shows them beside the headline numbers:

* ``level_accuracy.png`` — accuracy at each depth (coarse → fine) and the whole-path accuracy;
* ``confusion_level{d}.png`` — confusion matrix of the nodes at depth ``d`` (rows: true, normalised),
  for every level with at most ``max_confusion_classes`` nodes (the coarse levels at least);
* ``tree_accuracy.png`` — the tree, each node coloured by its accuracy (of the images whose true path
  passes through the node, the share whose predicted path does too);
* ``mistake_severity.png`` — histogram of the height of the lowest common ancestor of the predicted
  and the true class over the mistakes (Bertinetto et al.; 1 = a sibling class, higher = worse).

The post-hoc decision rules' pictures live here too, beside the report's: :func:`plot_reliability`
(before/after temperature scaling) and :func:`plot_accuracy_specificity` (hedged answers against the
back-off baseline), drawn from numbers :mod:`hiervision.metrics` and :mod:`hiervision.decisions` compute.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiervision import metrics
from hiervision.decoding import Prediction, last_node, tree_tables
from hiervision.distributions import end_distribution, node_marginals
from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["MAX_TREE_LEAVES", "SENTENCES", "metric_sentences", "node_accuracy_per_node", "plot_accuracy_specificity",
           "plot_reliability", "write_report"]


def _closed(paths: np.ndarray, num_nodes: int) -> np.ndarray:
    """``(B, D)`` PAD-padded paths → ``(B, N+1)`` bool: the nodes each path passes through."""
    marks = np.zeros((len(paths), num_nodes), dtype=bool)
    rows, cols = np.nonzero((paths > 0) & (paths < num_nodes))
    marks[rows, paths[rows, cols]] = True
    return marks


def node_accuracy_per_node(pred_paths: np.ndarray, true_paths: np.ndarray, num_nodes: int) -> np.ndarray:
    """``(N+1,)``: for each node, of the images whose true path passes through it, the share whose
    predicted path does too (NaN where no image's true path reaches the node)."""
    true, pred = _closed(true_paths, num_nodes), _closed(pred_paths, num_nodes)
    support = true.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (true & pred).sum(0) / support
    return np.where(support > 0, acc, np.nan)


def _level_confusion(pred_paths: np.ndarray, true_paths: np.ndarray, nodes: tuple[int, ...],
                     level: int, most: int | None = None) -> tuple[np.ndarray, list[int]]:
    """``(counts (K, K+1), the K nodes)`` for one level: true node (rows) vs predicted node at the same depth; the
    last column counts predictions at none of the K nodes (no node at that depth, or one left out). With ``most``,
    the K nodes are the ``most`` with the most wrongly predicted images (a level of 7,725 WordNet nodes is drawn
    as its 40 most confused). Vectorised: O(B) per level."""
    t = true_paths[:, level] if true_paths.shape[1] > level else np.full(len(true_paths), PAD)
    p = pred_paths[:, level] if pred_paths.shape[1] > level else np.full(len(pred_paths), PAD)
    if most is not None and len(nodes) > most:
        wrong = np.bincount(t[(t > 0) & (t != p)], minlength=max(nodes) + 1)[list(nodes)]
        seen = np.bincount(t[t > 0], minlength=max(nodes) + 1)[list(nodes)]
        order = np.lexsort((-seen, -wrong))  # most mistakes first, then most images
        nodes = tuple(nodes[i] for i in order[:most] if seen[i])
    index = np.full(max(max(nodes, default=0), int(t.max(initial=0)), int(p.max(initial=0))) + 2, -1)
    index[list(nodes)] = np.arange(len(nodes))
    rows = index[np.where(t >= 0, t, -1)]
    cols = index[np.where(p >= 0, p, -1)]
    keep = rows >= 0
    conf = np.zeros((len(nodes), len(nodes) + 1), dtype=np.int64)
    np.add.at(conf, (rows[keep], np.where(cols[keep] >= 0, cols[keep], len(nodes))), 1)
    return conf, list(nodes)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_levels(level_acc: list[float], path_acc: float, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * (len(level_acc) + 1), 3.6))
    labels = [f"level {d + 1}" for d in range(len(level_acc))] + ["whole path"]
    values = [*level_acc, path_acc]
    bars = ax.bar(labels, values, color=["#5b8def"] * len(level_acc) + ["#d9480f"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{100 * v:.1f}%", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per level (coarse → fine)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_confusion(conf: np.ndarray, names: list[str], level: int, out: Path, of: int) -> None:
    plt = _plt()
    k = len(names)
    show_none = conf[:, -1].sum() > 0
    counts = conf if show_none else conf[:, :-1]
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    side = min(14.0, max(4.8, 2.2 + 0.45 * k))
    fig, ax = plt.subplots(figsize=(side + (0.4 if show_none else 0), side * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    cols = [*names, "(none)" if k == of else "(other)"] if show_none else names
    short = [n if len(n) <= 16 else n[:15] + "…" for n in cols]
    ax.set_xticks(range(len(cols)), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), short[:k], fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(len(cols)):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    which = f"its {k} most confused of {of:,} nodes" if k < of else f"all {k} nodes"
    ax.set_title(f"Level {level} confusion, {which}\n(colour: share of the row; numbers: images)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_tree(taxonomy: Taxonomy, acc: np.ndarray, out: Path) -> None:
    """Root on the left, leaves stacked on the right (names stay readable for wide trees)."""
    plt = _plt()
    y: dict[int, float] = {}
    row = iter(range(len(taxonomy.leaves)))

    def place(n: int) -> float:
        kids = taxonomy.children[n]
        y[n] = float(next(row)) if not kids else float(np.mean([place(c) for c in kids]))
        return y[n]

    place(0)
    depth, leaves = taxonomy.max_depth, len(taxonomy.leaves)
    fig, ax = plt.subplots(figsize=(2.5 + 2.4 * depth, min(60.0, 1.0 + 0.32 * leaves)))
    cmap = plt.get_cmap("RdYlGn")
    for n in range(1, taxonomy.num_nodes):
        p = taxonomy.parents[n]
        ax.plot([taxonomy.depth(p), taxonomy.depth(n)], [-y[p], -y[n]], color="0.75", lw=0.8, zorder=1)
    for n in range(taxonomy.num_nodes):
        a = acc[n] if n else np.nan
        color = "0.85" if np.isnan(a) else cmap(float(a))
        ax.scatter(taxonomy.depth(n), -y[n], s=90, color=color, edgecolors="0.3", linewidths=0.6, zorder=2)
        label = taxonomy.names[n] if np.isnan(a) else f"{taxonomy.names[n]}  {100 * a:.0f}%"
        ax.text(taxonomy.depth(n) + 0.08, -y[n], label, fontsize=8, va="center", ha="left", zorder=3)
    ax.set_xlim(-0.3, depth + 1.2)
    ax.set_ylim(-(leaves - 1) - 0.7, 0.7)
    ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="node accuracy")
    ax.set_title("Tree coloured by per-node accuracy (grey: no test image reaches the node)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_severity(heights: np.ndarray, max_height: int, n_images: int, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    levels = np.arange(1, max_height + 1)  # a mistake's common ancestor is never a leaf: height ≥ 1
    counts = np.bincount(heights, minlength=max_height + 1)[1: max_height + 1]
    ax.bar(levels, counts, color="#d9480f", width=0.7)
    for h, c in zip(levels, counts):
        if c:
            ax.text(h, c, str(int(c)), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(levels)
    ax.set_xlabel("height of the common ancestor of predicted and true class\n(1 = a sibling; higher = worse)")
    ax.set_ylabel("mistakes")
    mean = f", mean {heights.mean():.2f}" if len(heights) else ""
    ax.set_title(f"Mistake severity: {len(heights)} mistakes of {n_images} images{mean}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


#: the tree picture names every node: above this many end classes it is left out (report.json keeps the numbers)
MAX_TREE_LEAVES = 300


def write_report(
    prediction: Prediction,
    targets: torch.Tensor,
    taxonomy: Taxonomy,
    out_dir: str | os.PathLike,
    title: str = "hiervision evaluation",
    max_confusion_classes: int = 40,
    selective: dict | None = None,
) -> dict[str, Any]:
    """Write the plots and ``index.html`` to ``out_dir``; returns the numbers shown and the files written.

    ``targets``: ``(B,)`` node ids or ``(B, D)`` PAD-padded paths (single-label; a multi-label run has
    no single true path per image, so it is refused with a ValueError). ``selective``: the rules'
    risk–coverage curves (:func:`hiervision.posthoc.selective_report`), drawn as ``risk_coverage.png``.
    Every step is O(B·N) or less: a 10⁵-node tree gets its levels' most confused nodes and no tree picture.
    """
    targets = torch.as_tensor(targets)
    if targets.dim() == 2 and (targets.dtype == torch.bool or targets.is_floating_point()):
        raise ValueError("--report: multi-label runs are not supported (no single true path per image)")
    if len(targets) != len(prediction):
        raise ValueError(f"--report: {len(prediction)} predictions but {len(targets)} targets")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    true_t = metrics.target_paths(targets, taxonomy) if targets.dim() == 1 else targets.long()
    pred_t = prediction.paths.long().cpu()
    q = end_distribution(prediction, taxonomy)
    summary = metrics.evaluate(prediction, targets, taxonomy, q=q)
    true, pred = true_t.cpu().numpy(), pred_t.numpy()
    figures: list[tuple[str, str]] = []  # (file, what to look at)

    _plot_levels(summary["level_accuracy"], summary["path_accuracy"], out / "level_accuracy.png")
    figures.append(("level_accuracy.png", "Accuracy at each depth, coarse to fine, and of the whole path. A steep "
                    "drop between two levels is where the model stops telling classes apart."))
    for level, nodes in enumerate(taxonomy.levels):
        conf, shown = _level_confusion(pred, true, nodes, level, max_confusion_classes)
        if not shown or conf.sum() == 0:
            continue
        name = f"confusion_level{level + 1}.png"
        _plot_confusion(conf, [taxonomy.names[n] for n in shown], level + 1, out / name, len(nodes))
        figures.append((name, f"Level {level + 1}: which node each true node's images were given (rows sum to 1). "
                        "Off-diagonal cells are the mix-ups" + (f"; the {len(shown)} nodes with the most mistakes "
                                                                 f"of {len(nodes):,}" if len(shown) < len(nodes)
                                                                 else "") + "."))
    acc = node_accuracy_per_node(pred, true, taxonomy.num_nodes)
    if len(taxonomy.leaves) <= MAX_TREE_LEAVES:
        _plot_tree(taxonomy, acc, out / "tree_accuracy.png")
        figures.append(("tree_accuracy.png", "The tree, each node coloured by how often images under it were "
                        "placed under it: red branches are the ones to look at first."))
    p_end, t_end = last_node(pred_t), last_node(true_t).cpu()
    tables = tree_tables(taxonomy, "cpu")
    wrong = p_end != t_end
    heights = tables.height[tables.lca(p_end[wrong].clamp(min=0), t_end[wrong])].numpy()
    _plot_severity(heights, taxonomy.max_depth, len(p_end), out / "mistake_severity.png")
    figures.append(("mistake_severity.png", "How far the mistakes land: the height of the common ancestor of the "
                    "answer and the truth. Bars on the left (siblings) are mild mistakes, bars on the right bad ones."))
    end = last_node(true_t).to(q.device)
    plot_reliability({"end class": metrics.calibration_points(q, end, taxonomy)[-1]}, out / "reliability.png",
                     title="Is a 70 % answer right 70 % of the time?")
    figures.append(("reliability.png", "Confidence against accuracy: on the dashed diagonal the probabilities can be "
                    "read as chances; below it the model is over-confident. `evaluate --calibrate` fits a temperature "
                    "on validation."))
    curve = metrics.operating_curve(node_marginals(q, taxonomy), end, taxonomy)
    _plot_operating_curve(curve, out / "operating_curve.png")
    figures.append(("operating_curve.png", "Hedged answers: stopping higher up the path where the model is unsure "
                    "trades specificity (1 = always an end class) for correctness. `predict --accuracy 0.9` picks "
                    "the point that is right 90 % of the time."))
    if selective:
        plot_risk_coverage(selective, out / "risk_coverage.png", "when the model is unsure: risk vs coverage")
        figures.append(("risk_coverage.png", "Each rule for rolling an unsure answer up the tree: the lower its curve, "
                        "the better it knows when to say less."))

    result = {"summary": summary, "node_accuracy": {taxonomy.names[n]: (None if np.isnan(acc[n]) else float(acc[n]))
                                                    for n in range(1, taxonomy.num_nodes)},
              "mistake_lca_heights": np.bincount(heights, minlength=taxonomy.max_depth + 1).tolist(),
              "files": [*(f for f, _ in figures), "index.html", "report.json"]}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    _write_html(out / "index.html", title, summary, figures, len(taxonomy.leaves) > MAX_TREE_LEAVES)
    return result


#: (metrics key, its sentence): the report's plain words for each headline number
SENTENCES = (
    ("path_accuracy", "{v:.1%} of the images got their whole path right, from the top level to the end class."),
    ("leaf_accuracy", "The end class was right for {v:.1%} (top-1)."),
    ("node_accuracy", "On average {v:.1%} of the nodes on an image's true path were on its predicted path: a wrong "
                      "end class with the right ancestors still earns part of the credit."),
    ("mistake_severity", "When the end class was wrong, answer and truth met on average {v:.2f} levels up (1 = a "
                         "sibling class: the mildest mistake)."),
    ("hdist@5", "The five most likely classes lay on average {v:.2f} levels from the truth (hdist@5; lower is "
                "better)."),
    ("hops", "The ranking of all classes scored {v:.2f} on HOPS (1 = every class in order of its distance to the "
             "truth)."),
    ("ece", "Confidence and accuracy differed by {v:.1%} on average (expected calibration error; 0 = a 70 % answer "
            "is right 70 % of the time)."),
    ("valid_path_rate", "{invalid:.1%} of the predicted paths were not paths of the tree."),
    ("num_samples", "{v:,} images."),
)


def metric_sentences(summary: dict) -> list[str]:
    """One plain sentence per headline number of ``summary`` (:func:`hiervision.metrics.evaluate`)."""
    return [text.format(v=summary[k], invalid=1 - summary[k]) for k, text in SENTENCES
            if summary.get(k) is not None and not (k == "valid_path_rate" and summary[k] >= 1)]


def _write_html(path: Path, title: str, summary: dict, figures: list[tuple[str, str]], no_tree: bool) -> None:
    keys = ["path_accuracy", "leaf_accuracy", "node_accuracy", "hierarchical_f1", "mistake_severity", "hdist@5",
            "hops", "ece", "valid_path_rate", "num_samples"]

    def fmt(k: str, v: Any) -> str:
        if v is None:
            return "—"
        if k in ("mistake_severity", "hdist@5", "hops"):
            return f"{v:.2f}"
        return f"{v:.1%}" if isinstance(v, float) else f"{v:,}"

    rows = "".join(f"<tr><th>{k.replace('_', ' ')}</th><td>{fmt(k, summary[k])}</td></tr>" for k in keys
                   if k in summary)
    said = "".join(f"<li>{html.escape(t)}</li>" for t in metric_sentences(summary))
    figs = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                   "</figcaption></figure>" for f, c in figures)
    tree = ("<p class=note>The tree has too many end classes to draw; every node's accuracy is in report.json.</p>"
            if no_tree else "")
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:15px system-ui,sans-serif;margin:1.5rem;color:#1d2330;background:#f5f6f8;max-width:1100px}}
table{{border-collapse:collapse;background:#fff}}th,td{{padding:.3rem .8rem;border:1px solid #d6dae1;text-align:left}}
td{{font-variant-numeric:tabular-nums}}ul{{line-height:1.5}}
figure{{display:inline-block;vertical-align:top;margin:.6rem;padding:.6rem;background:#fff;border:1px solid #d6dae1;
border-radius:8px;max-width:min(100%,920px)}}img{{max-width:100%}}figcaption{{color:#4b5563;font-size:.9rem;
max-width:60ch}}.note{{color:#6b7280}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>In words</h2><ul>{said}</ul><h2>The numbers</h2><table>{rows}</table>
<h2>Pictures</h2>{tree}{figs}</body></html>
""", encoding="utf-8")


def _plot_operating_curve(curve: dict, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(curve["specificity"], curve["correct"], label=f"correct (area {curve['correct_area']:.2f})")
    ax.plot(curve["specificity"], curve["exact"], ls="--", label=f"exact (area {curve['exact_area']:.2f})")
    ax.set(xlabel="specificity (0 = the root, 1 = an end class)", ylabel="share of images",
           title="Answers at every threshold", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- the decision rules' pictures
def plot_reliability(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | os.PathLike,
                     bins: int = 15, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per equal-width bin, one line per
    ``{label: (confidence, correct)}`` (e.g. before/after temperature scaling, from
    :func:`hiervision.metrics.calibration_points`), the diagonal is perfect."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    for label, (conf, ok) in curves.items():
        conf, ok = torch.as_tensor(conf).double(), torch.as_tensor(ok).double()
        idx = (conf * bins).long().clamp(0, bins - 1)
        count = torch.bincount(idx, minlength=bins)
        has = count > 0
        mean_conf = torch.bincount(idx, conf, minlength=bins)[has] / count[has]
        acc = torch.bincount(idx, ok, minlength=bins)[has] / count[has]
        ax.plot(mean_conf.tolist(), acc.tolist(), marker="o", ms=3, label=label)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_accuracy_specificity(curves: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy–specificity curves from :func:`hiervision.decisions.accuracy_specificity_curve` rows
    (``{label: rows}``): DARTS solid, the back-off baseline dashed, the same colour per label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot([r["information_gain"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=color,
                label=f"{label} DARTS")
        ax.plot([r["baseline"]["information_gain"] for r in rows], [r["baseline"]["accuracy"] for r in rows],
                marker="x", ls="--", color=color, label=f"{label} back-off")
    ax.set(xlabel="information gain (nats)", ylabel="hedged accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_risk_coverage(curves: dict[str, dict], path: str | os.PathLike, title: str = "", ax=None) -> Path:
    """Hierarchical risk–coverage curves (``{rule: RiskCoverage.as_dict()}``, :mod:`hiervision.selective`),
    each labelled with its area (hAURC ×100, lower is better): the lower-left a curve runs, the better the
    rule knows when to answer less specifically. With ``ax``, draws there and leaves saving to the caller."""
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
    for rule, c in curves.items():
        ax.plot(c["coverage"], c["risk"], label=f"{rule} ({c['area'] * 100:.2f})")
    ax.set(xlabel="coverage (1 = always an end class, 0 = the root)", ylabel="risk (answers that miss the truth)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="rule (hAURC ×100)", title_fontsize=7)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return Path(path)
