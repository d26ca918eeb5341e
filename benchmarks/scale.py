"""Large taxonomies (issue 23): train step, predict, evaluate (CRM, Bayes hF1, hdist@k), export + runtime predict
and peak memory of each head on trees of 10^3 to 10^5 nodes.

Random variable-depth trees (every inner node has 2–12 children; the node that gets the next children is
drawn at random from the open ones, so leaves sit at many depths) and two WordNet trees built by ``hiervision
taxonomy build --from wordnet`` (a synset with several hypernyms keeps the deepest): ``wordnet`` collapses
single-child chains (68,326 nodes), ``wordnet-full`` keeps them and every synset (``--keep-chains
--all-synsets``: 82,116 nodes). resnet20 at 32×32, batch 64, random images; one process per (tree, model) cell, under
an address-space cap, so one cell's memory never counts toward another's; median of ``--steps`` steps after a
warm-up step; the peak RSS is the cell process's own ``ru_maxrss``.

    python benchmarks/scale.py                              # the default grid, prints a table
    python benchmarks/scale.py --write                      # ... and puts it in RESULTS.md § scale
    python benchmarks/scale.py --sizes 420 45000 --models flat
    python benchmarks/scale.py --cell random:1000 flat      # one cell, one JSON line (what the grid runs)
    python benchmarks/scale.py --cell wordnet-full hiernet  # builds the tree once (in the temp folder)
    python benchmarks/scale.py --sizes 420 --models flat --repeat 3 --section "scale flat" --write
                                                            # flat's predict across tree sizes, 3 interleaved rounds
    python benchmarks/scale.py --posthoc wordnet-full --images 300 --threads 2 --write
                                                            # the post-training steps and evaluate --report

Every head runs on every tree: above 1,000 nodes Guo's and DHNN's decoders score each step over the current
node's children only (their default ``step_softmax: auto``), and HierNet's default ``branch_depth="auto"`` bounds
its branches (see :mod:`hiervision.models.hiernet`). HAFrame and BiLT are left out: HAFrame's frame is a dense
C x C matrix and BiLT trains two C x C matrices per level (each refuses more than 5,000 classes).

One machine's noise can land on one cell (a grid runs for minutes); ``--repeat N`` runs the whole grid N times,
round after round, and reports each cell's median, so a ratio never rests on one noisy cell.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BREEDS = ROOT.parent / "shared" / "data" / "imagenet" / "breeds" / "wordnet"
#: the WordNet trees: ``taxonomy build --from wordnet`` flags of each
WORDNET = {"wordnet": [], "wordnet-full": ["--keep-chains", "--all-synsets"]}
SIZES = (420, 1_000, 10_000, 45_000, 100_000)
MODELS = ("flat", "guo_rnn", "dhnn_s2s", "hiernet", "haf", "soft_max_margin")
#: what a head needs besides the defaults at 32×32 (DHNN's default pooling conversion needs bigger maps)
HEAD_KWARGS = {"dhnn_s2s": {"conversion": "linear"}}


def random_tree(num_nodes: int, seed: int = 0, min_children: int = 2, max_children: int = 12):
    """A random tree of about ``num_nodes`` nodes (root included) whose inner nodes have 2–12 children."""
    import numpy as np

    from hiervision.taxonomy import Taxonomy

    rng = np.random.default_rng(seed)
    parents, open_nodes = [-1], [0]
    while len(parents) < num_nodes:
        at = int(rng.integers(len(open_nodes)))
        v = open_nodes[at]
        open_nodes[at] = open_nodes[-1]  # leaves the open list (swap-remove): it gets all its children now
        open_nodes.pop()
        k = min(int(rng.integers(min_children, max_children + 1)), max(num_nodes - len(parents), min_children))
        open_nodes.extend(range(len(parents), len(parents) + k))
        parents.extend([v] * k)
    return Taxonomy(["root"] + [f"c{i}" for i in range(1, len(parents))], parents)


def load_tree(spec: str):
    from hiervision.taxonomy import Taxonomy

    kind, _, arg = spec.partition(":")
    if kind in WORDNET:
        return Taxonomy.load(wordnet_tree(kind))
    if kind == "random":
        return random_tree(int(arg))
    if kind == "json":
        return Taxonomy.load(arg)
    raise ValueError(f"tree spec {spec!r}: expected random:N, json:PATH or one of {', '.join(WORDNET)}")


def run_cell(tree_spec: str, model_name: str, steps: int, batch: int, threads: int, export: bool = False) -> dict:
    """One cell, in this process: build, warm up, time; returns what the table shows."""
    import torch

    from hiervision.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tax = load_tree(tree_spec)
    model = create_model(model_name, tax, backbone="resnet20", in_chans=3, image_size=32,
                         **HEAD_KWARGS.get(model_name, {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32)
    leaves = torch.tensor(tax.leaves)
    targets = leaves[torch.randint(len(leaves), (batch,))]

    def train_step() -> None:
        model.train()
        loss = model.loss(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        fn()  # warm-up, untimed
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    train = timed(train_step)
    predict = timed(lambda: model.predict(images))
    out = {"nodes": tax.num_nodes, "leaves": len(tax.leaves), "depth": tax.max_depth, "train_s": train,
           "predict_s": predict, "evaluate_s": evaluate_once(model, tax, images, targets)}
    if export:
        out.update(export_and_run(model, tax, images))
    return {**out, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def evaluate_once(model, tax, images, targets) -> float:
    """Seconds for what ``evaluate`` adds after predicting (timed once: Bayes hF1 is the slow part): the
    metrics report (hdist@k included), CRM and the Bayes hF1 rule with inner answers, on one batch."""
    from hiervision import metrics
    from hiervision.decisions import bayes_nodes, crm_nodes, end_distribution

    pred = model.predict(images)
    t0 = time.perf_counter()
    metrics.evaluate(pred, targets, tax)
    q = end_distribution(pred, tax)
    crm_nodes(q, tax)
    bayes_nodes(q, tax, "hf1", allow_inner=True)
    return time.perf_counter() - t0


def export_and_run(model, tax, images) -> dict:
    """ONNX export of the model, then the numpy runtime predicting the batch (median of 3 after a warm-up),
    then the server on the export answering one uploaded PNG as the page asks (``?siblings=6``; median of 3)."""
    import shutil

    import numpy as np

    from hiervision.export import export_model
    from hiervision.restrict import Allowed
    from hiervision.rollup import Thresholds
    from hiervision.runtime import Predictor

    folder = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        export_model(model, {"in_chans": 3, "image_size": 32}, folder / "m.onnx")
        seconds = time.perf_counter() - t0
        predictor = Predictor(folder / "m.onnx", top_k=3, batch_size=len(images), threads=1)
        x = images.numpy()
        # issue 36: answers restricted to a class list of every other end class, plus a roll-up, timed in turn
        # with the plain predict (interleaved, so the machine's drift lands on both)
        ends = np.flatnonzero(predictor.tree.end_mask("leaves"))
        allowed = Allowed.of(predictor.tree, class_names=["/".join(predictor.tree.names[n] for n in
                                                                    predictor.tree.path(int(e))) for e in ends[::2]])
        thresholds = Thresholds.of(predictor.tree, 0.5)
        predictor.predict_arrays(x)
        predictor.predict_arrays(x, allowed=allowed, thresholds=thresholds)
        times, restricted = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            predictor.predict_arrays(x)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            predictor.predict_arrays(x, allowed=allowed, thresholds=thresholds)
            restricted.append(time.perf_counter() - t0)
        return {"export_s": seconds, "runtime_predict_s": statistics.median(times),
                "restricted_predict_s": statistics.median(restricted), "serve_s": serve_once(predictor)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_once(runtime) -> float:
    """Seconds for the app (:func:`hiervision.serve.app.create_app`, in this process) to answer one upload."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from hiervision.serve.app import create_app
    from hiervision.serve.predictor import RuntimePredictor

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
    times = []
    with TestClient(create_app(RuntimePredictor(runtime), max_batch=1)) as client:
        for _ in range(4):
            t0 = time.perf_counter()
            r = client.post("/predict?siblings=6", files={"file": ("a.png", png.getvalue(), "image/png")})
            times.append(time.perf_counter() - t0)
            r.raise_for_status()
    return statistics.median(times[1:])


def spawn(tree_spec: str, model_name: str, args) -> dict:
    """Run one cell in a child process under the address-space cap and the time cap."""
    cap = int(args.cap_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, __file__, "--cell", tree_spec, model_name, "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads), "--export"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, preexec_fn=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {args.timeout} s cap"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        oom = "MemoryError" in done.stderr or "alloc" in done.stderr.lower()
        return {"error": f"over the {args.cap_gb:g} GB cap" if oom else f"failed: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def posthoc_cell(tree_spec: str, images: int, threads: int, out: Path) -> dict:
    """Issue 39's post-training cell: a flat head over the tree predicts ``images`` validation and ``images`` test
    images (random pixels, untrained weights: the cost does not depend on what the model learned); then the steps
    every run takes after training (:func:`hiervision.posthoc.posthoc_report`: temperature, three hedging targets,
    conformal sets, CRM and the Bayes rules, selective curves) and ``evaluate --report``'s (its metrics, selective
    curves and every picture, :func:`hiervision.report.write_report`), each timed once."""
    import torch

    from hiervision.distributions import EndDistribution
    from hiervision.models import create_model
    from hiervision.posthoc import posthoc_report, selective_report
    from hiervision.report import write_report

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tax = load_tree(tree_spec)
    model = create_model("flat", tax, backbone="resnet20", in_chans=3, image_size=32).eval()
    leaves = torch.tensor(tax.leaves)
    with torch.no_grad():
        val, test = (model.predict(torch.randn(images, 3, 32, 32)) for _ in range(2))
    val_t, test_t = (leaves[torch.randint(len(leaves), (images,))] for _ in range(2))
    t0 = time.perf_counter()
    posthoc_report(model, val, val_t, test, test_t, tax)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    curves = selective_report(EndDistribution(test, tax), test_t, tax, model.temperature)
    write_report(test, test_t, tax, out, selective=curves)
    report = time.perf_counter() - t0
    return {"nodes": tax.num_nodes, "leaves": len(tax.leaves), "images": images, "posthoc_fit_s": fit,
            "report_s": report, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def wordnet_tree(kind: str) -> Path:
    """Build a WordNet tree with the CLI (the documented rule), once, in the temp folder; returns its path."""
    out = Path(tempfile.gettempdir()) / f"hiervision-{kind}-tree.json"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "hiervision", "taxonomy", "build", str(BREEDS / "class_hierarchy.txt"),
                        "--from", "wordnet", "--names", str(BREEDS / "node_names.txt"), *WORDNET[kind],
                        "--out", str(out)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", nargs=2, metavar=("TREE", "MODEL"), help="run one cell here and print it as JSON")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="random trees of about these nodes")
    p.add_argument("--no-wordnet", action="store_true", help="leave out the WordNet trees")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell (the machine is shared)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per cell")
    p.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap per cell (ulimit -v)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over the whole grid; each cell's median is kept")
    p.add_argument("--write", action="store_true", help="write the table to RESULTS.md (§ --section)")
    p.add_argument("--section", default="scale", help="the RESULTS.md section --write replaces")
    p.add_argument("--export", action="store_true", help="with --cell: also ONNX-export and time the runtime "
                   "(the grid does, for every cell)")
    p.add_argument("--posthoc", metavar="TREE", help="time the post-training steps and evaluate --report on TREE "
                   "(e.g. wordnet-full) with --images validation and test images (issue 39's cell) and exit")
    p.add_argument("--images", type=int, default=300)
    args = p.parse_args()
    args.load = os.getloadavg()[0]
    if args.posthoc:
        if args.posthoc in WORDNET:
            wordnet_tree(args.posthoc)
        with tempfile.TemporaryDirectory() as tmp:
            cell = posthoc_cell(args.posthoc, args.images, args.threads, Path(tmp) / "report")
        print(json.dumps(cell))
        if args.write:
            sys.path.insert(0, str(HERE))
            from results_md import write_section

            write_section("scale post-training", render_posthoc(cell, args))
        return 0
    if args.cell:
        print(json.dumps(run_cell(*args.cell, args.steps, args.batch, args.threads, args.export)))
        return 0
    trees = [(f"random {n:,}", f"random:{n}") for n in args.sizes]
    if not args.no_wordnet:
        trees += [("WordNet", "wordnet"), ("WordNet, chains kept, all synsets", "wordnet-full")]
        for kind in WORDNET:
            wordnet_tree(kind)  # here, not inside a timed, memory-capped cell
    rounds: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for label, spec in trees:
            for name in args.models:
                cell = spawn(spec, name, args)
                rounds.setdefault((label, name), []).append(cell)
                print(label, name, json.dumps(cell), flush=True)
    rows = [(label, name, median_cell(cells)) for (label, name), cells in rounds.items()]
    table = render(rows, args)
    print(table)
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section

        write_section(args.section, table)
    return 0


def render_posthoc(cell: dict, args) -> str:
    cmd = " ".join(["python benchmarks/scale.py", *sys.argv[1:]])
    return "\n".join([
        "## scale post-training", "",
        f"`{cmd}` — {args.threads} torch thread(s), load average at start {args.load:.1f} on 2 cores. A flat "
        "ResNet-20 head (untrained) over the tree; the post-training fit is what every run does after its last "
        "epoch (temperature, hedging at 0.9/0.95/0.99, conformal sets, CRM and Bayes rules, selective curves), "
        "the report is `evaluate --report`'s work after predicting (metrics, selective curves, every picture). "
        "Issue 39's aim: fit ≤ 60 s, report ≤ 90 s on the full WordNet tree with 300 images.", "",
        "| tree | nodes | end classes | images (val + test) | post-training fit | evaluate --report | peak RSS |",
        "|---|---|---|---|---|---|---|",
        f"| {args.posthoc} | {cell['nodes']:,} | {cell['leaves']:,} | {cell['images']} + {cell['images']} | "
        f"{cell['posthoc_fit_s']:.1f} s | {cell['report_s']:.1f} s | {cell['peak_rss_mb']:.0f} MB |", "",
        f"Aim met: fit {'yes' if cell['posthoc_fit_s'] <= 60 else 'no'}, report "
        f"{'yes' if cell['report_s'] <= 90 else 'no'} (one run, an untrained head: the cost of the hedging "
        "and conformal searches depends on the scores: how many nodes can win at some λ, how many ranks a set "
        "needs).", ""])


def median_cell(cells: list[dict]) -> dict:
    """One cell's rounds as one: each timing's median, the largest peak RSS; failed if any round failed."""
    failed = [c for c in cells if "error" in c]
    if failed:
        return failed[0]
    out = dict(cells[0])
    for key, value in out.items():
        if isinstance(value, float):
            values = [c[key] for c in cells]
            out[key] = max(values) if key == "peak_rss_mb" else statistics.median(values)
    return out


def render(rows: list[tuple[str, str, dict]], args) -> str:
    flat = {label: c for label, name, c in rows if name == "flat" and "error" not in c}
    base = next(iter(flat.values()), None)  # the smallest tree's flat predict: the "~400-node" cost
    cmd = " ".join(["python benchmarks/scale.py", *sys.argv[1:]])
    lines = [
        f"## {args.section}",
        "",
        f"`{cmd}` — resnet20 at 32×32, batch {args.batch}, {args.threads} torch thread(s), median of {args.steps} "
        f"steps after a warm-up{f', median over {args.repeat} rounds of the whole grid' if args.repeat > 1 else ''}"
        f", one process per cell under a {args.cap_gb:g} GB address-space cap and a "
        f"{args.timeout} s time cap; peak RSS = the cell's own `ru_maxrss` (load average at start: "
        f"{args.load:.1f} on {os.cpu_count()} cores).",
        "",
        "| tree | nodes | leaves | depth | model | train step | predict | predict / smallest-tree flat | × flat train "
        "| × flat predict | evaluate (CRM, Bayes hF1, hdist@k) | export / runtime predict / serve one upload "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shape = {label: c for label, _, c in rows if "error" not in c}
    for label, name, c in rows:
        s = shape.get(label, {})
        head = f"| {label} | {s.get('nodes', '')} | {s.get('leaves', '')} | {s.get('depth', '')} | {name} |"
        if "error" in c:
            lines.append(f"{head} — | — | — | — | — | — | — | {c['error']} |")
            continue
        f = flat.get(label)
        rel = (f"{c['train_s'] / f['train_s']:.2f}× | {c['predict_s'] / f['predict_s']:.2f}×"
               if f and name != "flat" else "— | —")
        ratio = f"{c['predict_s'] / base['predict_s']:.2f}×" if base and name == "flat" else "—"
        deploy = (f"{c['export_s']:.0f} s / {c['runtime_predict_s']:.3f} s / {c.get('serve_s', float('nan')):.3f} s"
                  if "export_s" in c else "—")
        lines.append(f"{head} {c['train_s']:.3f} s | {c['predict_s']:.3f} s | {ratio} | {rel} | "
                     f"{c['evaluate_s']:.2f} s | {deploy} | {c['peak_rss_mb']:.0f} MB |")
    big = [f for f in flat.values() if f["nodes"] >= 40_000]
    if base and big:
        worst = max(f["predict_s"] / base["predict_s"] for f in big)
        rss = max(f["peak_rss_mb"] for f in big)
        lines += ["", f"Issue 23's flat targets at ≥ 40,000 nodes: predict ≤ 2× its cost on the smallest tree "
                      f"(worst here {worst:.2f}×), peak RSS ≤ 2 GB (largest here {rss:.0f} MB)."]
    heads: dict[str, list[tuple[float, float, float]]] = {}
    for label, name, c in rows:
        f = flat.get(label)
        if name != "flat" and f and "error" not in c and c["nodes"] >= 40_000:
            heads.setdefault(name, []).append((c["train_s"] / f["train_s"], c["predict_s"] / f["predict_s"],
                                               c["peak_rss_mb"]))
    restricted = [(c["nodes"], c["restricted_predict_s"] / c["runtime_predict_s"]) for _, name, c in rows
                  if name == "flat" and "restricted_predict_s" in c]
    if restricted:
        lines += ["", "Issue 36's answers restricted to a class list (every other end class) with a roll-up at 0.5, "
                      "against the plain runtime predict of the same flat export (target ≤ 1.2× at 10⁴ and 10⁵ "
                      "nodes): " + "; ".join(f"{n:,} nodes {r:.2f}×" for n, r in restricted) + "."]
    if heads:
        lines += ["", "Every head at ≥ 40,000 nodes (targets: train step and predict ≤ 1.5× flat's on the same tree, "
                      "peak RSS ≤ 2 GB), worst over those trees: " + "; ".join(
                          f"{name} {max(t for t, _, _ in v):.2f}× / {max(p for _, p, _ in v):.2f}× / "
                          f"{max(r for _, _, r in v):.0f} MB" for name, v in heads.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
