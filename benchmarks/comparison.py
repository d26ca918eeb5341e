"""Issue 14's comparison: every method against flat at budgets where flat is good, paired by seed.

    python benchmarks/run.py --profile comparison                       # CPU budget, seeds 0 1 2
    python benchmarks/run.py --profile comparison --status              # which cells are done
    python benchmarks/run.py --profile comparison --max-hours 2         # one sitting; rerun to continue
    python benchmarks/run.py --profile comparison --device cuda --budget gpu   # + Tiny-ImageNet at 64x64
    python benchmarks/run.py --profile comparison --only 'guo_rnn/*' 'flat/fmnist' --seeds 0
    python benchmarks/run.py --profile comparison --budget tiny --seeds 0   # smoke test, minutes
    python benchmarks/run.py --profile comparison --only flat_crm flat_bayes_hf1 haframe haframe_crm haf \
        haf_crm soft_max_margin soft_max_margin_crm                     # issue 24's rows (optional until run)

Resumable and cumulative: each (method, data, seed) cell is one run folder
``RUNS/comparison-<budget>/<data>/<method>-s<seed>-<digest>`` named by the digest of its full config
(so a changed recipe makes new cells instead of mixing results); a cell with ``metrics.json`` and a
matching ``cell.json`` is skipped, an interrupted one resumes from ``last.pt``. Run folders are not
committed: each finished cell's test metrics also go, as it finishes, into the committed ledger
``benchmarks/results/comparison-cells.json`` (:class:`Ledger`, keyed by cell and config digest), so a
fresh checkout on another machine starts with every cell ever finished and only runs the rest. Every
invocation rewrites the tables from every finished cell, with ``n`` per cell (and, when they differ,
which machine each came from): the table fills in over sittings.

HierNet-induced gets the flat row's whole budget: a flat pre-train (same recipe, ``pretrain_fraction``
of the epochs; its own hidden cell), the tree induced from that run's validation confusion, then
HierNet for the remaining epochs, transferred from the pre-train.

Statistics: per cell mean ± std over seeds; per method the difference to flat paired by seed, with a
95 % Student-t interval (small table below, no scipy). Writes ``benchmarks/results/comparison.json``
(``comparison-gpu.json``), a plot per data set, the ``## comparison`` section of RESULTS.md and the
README's "Which method?" paragraph (generated from the intervals; a placeholder until every row of a
data set has >= 3 seeds).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from hiervision.config import dump, load_config
from results_md import replace_section

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "comparison"

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; above 30 the normal 1.96
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass(frozen=True)
class Method:
    """One row: ``key`` is what ``--only`` matches; ``induced`` marks HierNet's pre-train + induce + transfer.

    ``beam_widths``: a row that trains nothing — it decodes the run of the row ``reuses`` (same config,
    same folder) with tree-restricted beam search, the width picked on val path accuracy among these.
    ``decode``: a row that trains nothing either — it answers the reused run's calibrated test scores
    by a post-hoc decision rule (``crm``, ``bayes:hf1:inner``; :func:`decision_metrics`).
    ``networks``: an ensemble's count; such a row is shown (its label says the cost) but never recommended.
    """

    key: str
    label: str
    config: str
    induced: bool = False
    optional: bool = False  # run only when asked for (--optional, or named by --only)
    reuses: str | None = None
    beam_widths: tuple[int, ...] = ()
    decode: str | None = None
    networks: int = 1  # networks trained and run (HiE's fine + coarse: 2); above 1 it is not equal budget

    @property
    def run_key(self) -> str:
        """The key its run folder is named by (a decoding-only row shares the trained row's)."""
        return self.reuses or self.key


@dataclass(frozen=True)
class DataSet:
    """One table: its methods (the first is the flat baseline every other row is paired with) and budgets."""

    key: str
    label: str
    methods: tuple[Method, ...]
    epochs: dict[str, int]  # budget -> flat's epochs (the whole budget of every row)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # budget -> overrides for every row
    induce: tuple[float, int] = (0.02, 5)  # p_min, g_max
    pretrain_fraction: float = 0.5


BEAM_WIDTHS = (1, 3, 10)  # the decoding-only row picks one of these on val


def _mistake_rows(prefix: str) -> tuple[Method, ...]:
    """Issue 24's rows: the post-hoc rules on flat's runs, and the hierarchy-aware losses that keep a
    flat softmax (each also decoded by CRM). Optional until their cells are run: ``--optional``, or
    ``--only`` with their names."""
    rows = [Method("flat_crm", "flat + temperature + CRM", f"{prefix}-flat.yaml", reuses="flat", decode="crm",
                   optional=True),
            Method("flat_bayes_hf1", "flat + Bayes hF1 (inner answers)", f"{prefix}-flat.yaml", reuses="flat",
                   decode="bayes:hf1:inner", optional=True)]
    for key, label, config in (("haframe", "HAFrame", "haframe"), ("haf", "HAF", "haf"),
                               ("soft_max_margin", "soft-max-margin", "soft-max-margin"), ("bilt", "BiLT", "bilt")):
        rows += [Method(key, label, f"{prefix}-{config}.yaml", optional=True),
                 Method(f"{key}_crm", f"{label} + CRM", f"{prefix}-{config}.yaml", reuses=key, decode="crm",
                        optional=True)]
    hie = "HiE (fine + coarse network: 2x flat's compute)"
    rows += [Method("hie", hie, f"{prefix}-hie.yaml", optional=True, networks=2),
             Method("hie_crm", f"{hie} + CRM", f"{prefix}-hie.yaml", reuses="hie", decode="crm", optional=True,
                    networks=2)]
    return tuple(rows)


MISTAKE_ROWS = ("flat_crm", "flat_bayes_hf1", "haframe", "haframe_crm", "haf", "haf_crm", "soft_max_margin",
                "soft_max_margin_crm", "bilt", "bilt_crm", "hie", "hie_crm")


def _rows(prefix: str, dhnn: tuple[str, str], extra: tuple[Method, ...] = ()) -> tuple[Method, ...]:
    return (Method("flat", "flat", f"{prefix}-flat.yaml"),
            Method("dhnn", dhnn[0], f"{prefix}-{dhnn[1]}.yaml"),
            Method("guo_rnn", "Guo CNN-RNN", f"{prefix}-guo-rnn.yaml"),
            Method("guo_rnn_beam", "Guo CNN-RNN, beam (width tuned on val)", f"{prefix}-guo-rnn.yaml",
                   reuses="guo_rnn", beam_widths=BEAM_WIDTHS),
            Method("hiernet", "HierNet (induced tree)", f"{prefix}-hiernet-induced.yaml", induced=True),
            *extra, *_mistake_rows(prefix))


_TINY_EXTRA = (Method("guo_rnn_tuned", "Guo CNN-RNN + sched. sampling, end weight, beam",
                      "tinyimagenet-guo-rnn-tuned.yaml", optional=True),
               Method("dhnn_tuned", "DHNN CNN-S2S-Pool + sched. sampling, end weight",
                      "tinyimagenet-dhnn-s2s-pool-tuned.yaml", optional=True))
_TINY_BUDGET = ("data.limit_train=2000", "data.limit_test=1000")
DATASETS: tuple[DataSet, ...] = (
    DataSet("fmnist", "Fashion-MNIST, 3-level tree", _rows("fmnist", ("DHNN CNN-RNN-Resi", "dhnn-rnn-resi")),
            epochs={"cpu": 8, "gpu": 20, "tiny": 2}, overrides={"tiny": _TINY_BUDGET}, induce=(0.02, 5)),
    DataSet("tiny32", "Tiny-ImageNet 32x32, WordNet tree (variable depth)",
            _rows("tinyimagenet", ("DHNN CNN-S2S-Pool", "dhnn-s2s-pool"), _TINY_EXTRA),
            epochs={"cpu": 10, "gpu": 30, "tiny": 2}, overrides={"tiny": _TINY_BUDGET}, induce=(0.012, 100)),
    DataSet("tiny64", "Tiny-ImageNet 64x64, WordNet tree (variable depth)",
            _rows("tinyimagenet", ("DHNN CNN-S2S-Pool", "dhnn-s2s-pool"), _TINY_EXTRA),
            epochs={"gpu": 30, "tiny": 2}, overrides={"gpu": ("data.image_size=64",),
                                                       "tiny": ("data.image_size=64", *_TINY_BUDGET)},
            induce=(0.012, 100)),
)
#: cpu and gpu are the comparison's budgets; tiny is a smoke test of the whole machinery on real data
#: (minutes; its tables go under the runs folder, never into RESULTS.md or the README)
BUDGETS = ("cpu", "gpu", "tiny")

# (metrics.json key, column, scale, paired, higher is better)
METRICS = [
    ("leaf_accuracy", "leaf acc %", 100, True, True),
    ("path_accuracy", "path acc %", 100, True, True),
    ("node_accuracy", "node acc %", 100, True, True),
    ("hierarchical_f1", "hier. F1 %", 100, True, True),
    ("hierarchical_f1_macro", "hF1 per image %", 100, True, True),
    ("mistake_severity", "mistake sev.", 1, True, False),
    ("depth_severity", "depth sev.", 1, True, False),
    ("hdist@5", "hdist@5", 1, True, False),
    ("operating_area_correct", "op. curve area", 1, True, True),
    ("train_images_per_s", "train img/s", 1, False, True),
]

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
validation path accuracy; every number is on the test set. Seeds are paired: each method's
difference to flat is taken seed by seed (same split and order) and reported as mean, std and a 95 %
Student-t interval (n-1 degrees of freedom; none for n < 2); a row pairs with flat's run on the machine (the
precision: amp auto picks bf16 where the CPU has it) its own cell ran on, kept by the ledger — the flat row shows the
latest. Issue 24's rows: HAFrame, HAF and
soft-max-margin train with the papers' settings on the same recipe; the "+ CRM" rows and "flat + Bayes hF1"
train nothing: they answer the named run's calibrated test scores by the post-hoc rule (CRM: least expected LCA
height; Bayes hF1: largest expected per-image hierarchical F1, inner answers allowed), and their hdist@k ranks the
classes by the rule's expected score. "depth sev." counts the true path's levels a mistake misses (equal to
"mistake sev.", the LCA height, on a fixed-depth tree); "op. curve area" is the area under Valmadre's
correct-vs-specificity operating curve."""


# ----------------------------------------------------------------------------- statistics
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


GIVEN_TREE = "metrics_given_tree.json"


# ----------------------------------------------------------------------------- the plan
@dataclass
class Cell:
    """One (data, method, seed) run, or a hidden flat pre-train that an induced HierNet cell needs."""

    data: DataSet
    method: Method
    seed: int
    cfg: dict
    run_dir: Path
    digest: str
    needs: Cell | None = None
    tree: Path | None = None  # HierNet: where the induced tree goes (from ``needs``)
    hidden: bool = False
    ledger: Ledger | None = None  # finished cells committed with the results (see :class:`Ledger`)

    @property
    def name(self) -> str:
        return f"{self.method.key}{'-pretrain' if self.hidden else ''}/{self.data.key}/s{self.seed}"

    def trained(self) -> bool:
        """Training finished: metrics.json written and cell.json naming this very config."""
        try:
            meta = json.loads((self.run_dir / "cell.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return meta.get("digest") == self.digest and (self.run_dir / "metrics.json").exists()

    @property
    def given(self) -> Path | None:
        """An induced-tree run's test metrics in the data set's own tree."""
        return self.run_dir / GIVEN_TREE if self.tree is not None else None

    @property
    def decoded(self) -> Path | None:
        """A decoding-only row's test metrics (beside the trained row's metrics.json)."""
        m = self.method
        return self.run_dir / f"metrics_{m.key}.json" if m.beam_widths or m.decode else None

    def finished_here(self) -> bool:
        """Trained in this run folder, and the steps after training done: scored in the given tree, decoded."""
        return self.trained() and all(f.exists() for f in (self.given, self.decoded) if f is not None)

    def done(self) -> bool:
        """Finished here, or in an earlier sitting whose metrics the ledger holds under this very config."""
        return self.finished_here() or (self.ledger is not None and self.ledger.get(self) is not None)

    def state(self) -> str:
        if self.finished_here():
            return "done"
        if self.done():
            return "done (ledger)"
        if self.trained():
            return "trained; to " + ("score" if self.given and not self.given.exists() else "decode")
        if (self.run_dir / "last.pt").exists():
            log = self.run_dir / "log.csv"
            epochs = max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0
            return f"partial ({epochs}/{self.cfg['train']['epochs']} epochs)"
        return "todo"

    def metrics(self) -> dict:
        """Test metrics; an induced-tree run's are those in the data set's own tree (comparable with flat)."""
        if not self.finished_here() and self.ledger is not None and self.ledger.get(self) is not None:
            return self.ledger.get(self)
        m = json.loads((self.run_dir / "metrics.json").read_text(encoding="utf-8"))
        for extra in (self.given, self.decoded):
            if extra is not None:
                m = {**m, **json.loads(extra.read_text(encoding="utf-8"))}
        return m


#: what a ledger keeps of a cell's metrics: everything the tables read
LEDGER_KEYS = (*(k for k, *_ in METRICS), "level_accuracy", "path_accuracy_by_length", "length_diagnostics",
               "beam_width")


class Ledger:
    """Every finished cell's test metrics, keyed by cell and config digest, in a committed JSON file.

    Run folders are not committed and a fresh machine has none: without the ledger a sitting that
    runs the new rows would rewrite the tables from its own cells only. With it, a cell is done when
    this config's metrics are recorded (a changed recipe has a new digest, so it is a new cell), every
    sitting adds the cells it finishes as they finish, and the tables always cover every cell ever
    run. A decoding-only row whose trained run is only in the ledger trains that run again (the rule
    needs its checkpoint); the new run's metrics then replace the recorded ones."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cells: dict = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}

    def get(self, cell: Cell) -> dict | None:
        entry = self.cells.get(cell.name)
        return entry["metrics"] if entry and entry.get("digest") == cell.digest else None

    def machine(self, cell: Cell) -> str | None:
        entry = self.cells.get(cell.name)
        return entry["machine"] if entry and entry.get("digest") == cell.digest else None

    def metrics_on(self, cell: Cell, machine: str | None) -> dict | None:
        """The cell's metrics from a run on ``machine`` (this config), the latest or an earlier one."""
        entry = self.cells.get(cell.name) or {}
        for e in [entry, *entry.get("earlier", [])]:
            if e.get("digest") == cell.digest and e.get("machine") == machine:
                return e["metrics"]
        return None

    def record(self, cell: Cell, machine: str) -> None:
        """Keep a cell finished in its run folder (written at once, atomically: a killed sitting loses nothing)."""
        metrics = {k: v for k, v in cell.metrics().items() if k in LEDGER_KEYS}
        entry = {"digest": cell.digest, "machine": machine, "run_dir": str(cell.run_dir), "metrics": metrics}
        old = self.cells.get(cell.name, {})
        if {k: v for k, v in old.items() if k not in ("recorded", "earlier")} == entry:
            return
        # a rerun on another machine (another precision) keeps the earlier result: rows that ran there pair with it
        earlier = [e for e in [{k: v for k, v in old.items() if k != "earlier"}, *old.get("earlier", [])]
                   if e and e.get("machine") != machine]
        self.cells[cell.name] = {**entry, "recorded": time.strftime("%Y-%m-%d"),
                                 **({"earlier": earlier} if earlier else {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(self.cells.items())), indent=1, default=str), encoding="utf-8")
        tmp.replace(self.path)


def digest(cfg: dict) -> str:
    """12 hex digits of the SHA-256 of the resolved config: the cell's identity."""
    return hashlib.sha256(dump(cfg).encode()).hexdigest()[:12]


def _cell(data: DataSet, method: Method, seed: int, root: Path, config_dir: Path, sets: list[str],
          hidden: bool = False) -> Cell:
    cfg = load_config(config_dir / method.config, [*sets, f"seed={seed}", "train.progress=false"])
    d = digest(cfg)
    tag = f"{method.key}-pretrain" if hidden else method.run_key
    return Cell(data, method, seed, cfg, root / data.key / f"{tag}-s{seed}-{d}", d, hidden=hidden)


def plan(budget: str, seeds: list[int], root: Path, device: str | None = None, only: list[str] | None = None,
         optional: bool = False, datasets: tuple[DataSet, ...] = DATASETS, config_dir: Path = CONFIGS,
         extra: list[str] | None = None, ledger: Ledger | None = None) -> list[Cell]:
    """Every cell of the budget, seed-major (seed 0 of every row first, so pairs fill in early).

    ``only``: ``METHOD/DATA`` glob patterns (``guo_rnn/*``, ``*/fmnist``, ``flat``); the pre-train an
    induced cell needs is included with it. Optional rows come with ``optional`` or when named.
    """
    if budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    root = Path(root)

    def wanted(m: Method, d: DataSet) -> bool:
        if not only:
            return optional or not m.optional
        for p in only:
            p = p if "/" in p else f"{p}/*"
            # an optional row needs --optional, or its own name (not a wildcard) in the pattern
            if fnmatch.fnmatch(f"{m.key}/{d.key}", p) and (optional or not m.optional or p.split("/")[0] == m.key):
                return True
        return False

    cells: list[Cell] = []
    for seed in seeds:
        for data in datasets:
            if budget not in data.epochs:
                continue
            epochs = data.epochs[budget]
            sets = [*data.overrides.get(budget, ()), *(extra or [])]
            if device:
                sets.append(f"train.device={device}")
            for m in data.methods:
                if not wanted(m, data):
                    continue
                if not m.induced:
                    cells.append(_cell(data, m, seed, root, config_dir, [*sets, f"train.epochs={epochs}"]))
                    continue
                pre_epochs = max(1, round(epochs * data.pretrain_fraction))
                if pre_epochs >= epochs:
                    raise ValueError(f"{data.key}: {epochs} epochs leave none for HierNet after a "
                                     f"{pre_epochs}-epoch pre-train")
                flat = data.methods[0]
                pre = _cell(data, flat, seed, root, config_dir, [*sets, f"train.epochs={pre_epochs}"], hidden=True)
                p_min, g_max = data.induce
                tree = pre.run_dir / f"induced-p{p_min}-g{g_max}.json"
                own = [*sets, f"train.epochs={epochs - pre_epochs}", f"data.tree={tree}",
                       f"model.backbone_kwargs.pretrained_path={pre.run_dir / 'best.pt'}"]
                cell = _cell(data, m, seed, root, config_dir, own)
                cell.needs, cell.tree = pre, tree
                cells += [pre, cell]
    for c in cells:
        c.ledger = ledger
    return cells


def status(cells: list[Cell]) -> str:
    """One line per cell (done / partial / todo) and a count: what ``--status`` prints."""
    lines = [f"{c.name:<36} {c.state():<24} {c.run_dir}" for c in cells]
    done = sum(c.done() for c in cells)
    return "\n".join([*lines, f"{done} of {len(cells)} cells done"])


def given_tree_metrics(run_dir: Path) -> dict:
    """A run on an induced tree scored in the data set's own tree.

    Its path, node and level accuracies, hierarchical F1 and mistake severity are otherwise measured
    in a tree of its own making (two levels of confusion groups) and do not compare with flat's: here
    each predicted class is moved to its path in the given tree (classes matched as ``data.tree``
    matches them: external id, else name) and scored there, with the same test images.
    """
    import torch

    from hiervision import metrics as M
    from hiervision.data import build_data
    from hiervision.decisions import end_distribution, node_marginals
    from hiervision.decoding import Prediction, last_node
    from hiervision.evaluation import autocast_dtype, predict_dataset, select_device
    from hiervision.experiment import data_config, load_run, run_data
    from hiervision.marginals import as_temperature

    cfg, tax, model, _ = load_run(run_dir)
    device = select_device(cfg["train"]["device"])
    model = model.to(device)
    data = run_data(cfg, run_dir)
    own = build_data({**data_config(cfg), "tree": None}).taxonomy
    amp = autocast_dtype(cfg["train"]["amp"], device)
    pred, targets = predict_dataset(model, data, data.test, cfg["eval"]["batch_size"], device, amp)
    of = {own.external_ids[n] or own.names[n]: n for n in own.leaves}
    lut = torch.full((tax.num_nodes,), -1, dtype=torch.long)
    for n in tax.leaves:
        lut[n] = of[tax.external_ids[n] or tax.names[n].rsplit(" (", 1)[0]]
    nodes = lut[last_node(pred.paths).clamp(min=0)]
    # the model's calibrated class distribution, moved to the given tree's leaves: its node marginals
    # there are the scores (so ECE and hdist@k are the given tree's too) and the answer's mass its probability
    q = end_distribution(pred, tax, temperature=as_temperature(model.temperature))
    q_own = torch.zeros(len(q), own.num_nodes, dtype=q.dtype)
    q_own[:, lut[list(tax.leaves)]] = q[:, list(tax.leaves)]
    prob = q_own.gather(1, nodes.unsqueeze(1)).squeeze(1)
    report = M.evaluate(Prediction(own.path_matrix[nodes], node_marginals(q_own, own), prob), lut[targets], own)
    return {**report, "scored_in": "given tree"}


def tuned_beam_metrics(run_dir: Path, widths: tuple[int, ...]) -> dict:
    """Test metrics of a run decoded with the beam width (of ``widths``) that scores best on val path
    accuracy (the smallest among ties), and the val accuracy of each width."""
    from hiervision.evaluation import evaluate_split
    from hiervision.experiment import load_run, run_data

    cfg, _, model, _ = load_run(run_dir)
    data = run_data(cfg, run_dir)
    bs = cfg["eval"]["batch_size"]
    val = {}
    for k in sorted(widths):
        model.set_beam_width(k)
        val[k] = evaluate_split(model, data, "val", bs)["path_accuracy"]
    best = max(val, key=lambda k: (val[k], -k))
    model.set_beam_width(best)
    return {**evaluate_split(model, data, "test", bs), "beam_width": best, "val_path_accuracy_by_width": val}


def decision_metrics(run_dir: Path, rule: str) -> dict:
    """Test metrics of a run answered by a post-hoc decision rule on its calibrated scores (the
    temperature fitted after training; ``hiervision evaluate --decode``). Its ``hdist@k`` ranks the end
    classes by the rule's own expected score (CRM: least expected LCA height, as Karthik et al. rank)."""
    import torch

    from hiervision import metrics as M
    from hiervision.bayes import decode_rule, expected_scores
    from hiervision.decisions import end_distribution
    from hiervision.decoding import last_node
    from hiervision.experiment import load_run, run_data
    from hiervision.posthoc import evaluate_decisions
    from hiervision.training import autocast_dtype, select_device

    cfg, tax, model, _ = load_run(run_dir)
    device = select_device(cfg["train"]["device"])
    model = model.to(device)
    data = run_data(cfg, run_dir)
    amp = autocast_dtype(cfg["train"]["amp"], device)
    report, pred, targets = evaluate_decisions(run_dir, model, data, "test", cfg["eval"]["batch_size"], amp,
                                               decode=rule, device=device)
    _, metric, _ = decode_rule(rule)
    q = end_distribution(pred, tax)
    ranking = -torch.from_numpy(expected_scores(q.double().cpu().numpy(), tax, metric or "severity")).to(q)
    report.update(M.hierarchical_distance_at_k(q, last_node(M.target_paths(targets, tax)), tax, ranking=ranking))
    return report


def _finish(cell: Cell, score_fn, decode_fn, rule_fn=None) -> None:
    """The steps after training: scoring in the given tree (induced trees), decoding (decoding-only rows:
    a beam width tuned on val, or a post-hoc decision rule)."""
    if cell.given is not None and not cell.given.exists():
        cell.given.write_text(json.dumps(score_fn(cell.run_dir), indent=1), encoding="utf-8")
    if cell.decoded is not None and not cell.decoded.exists():
        m = cell.method
        out = decode_fn(cell.run_dir, m.beam_widths) if m.beam_widths else (rule_fn or decision_metrics)(
            cell.run_dir, m.decode)
        cell.decoded.write_text(json.dumps(out, indent=1), encoding="utf-8")


def recorder(ledger: Ledger, table: list[Cell], machine: str):
    """``on_done`` for :func:`run_cells`: a finished cell goes into the ledger with every row of ``table``
    that shares its run folder (flat's own row, when a post-hoc row trained flat's run)."""
    def record(cell: Cell) -> None:
        for c in table:
            if c.run_dir == cell.run_dir and c.finished_here():
                ledger.record(c, machine)

    return record


def _train_cell(cell: Cell, train_fn, log) -> None:
    log(f"[comparison] {cell.name} ({cell.cfg['train']['epochs']} epochs) -> {cell.run_dir}")
    train_fn(cell.cfg, cell.run_dir, resume=True)  # the run folder is the engine's: cell.json goes in after
    (cell.run_dir / "cell.json").write_text(json.dumps(
        {"digest": cell.digest, "data": cell.data.key, "method": cell.method.run_key, "seed": cell.seed,
         "hidden": cell.hidden}, indent=1), encoding="utf-8")


def run_cells(cells: list[Cell], max_hours: float | None = None, train_fn=None, induce_fn=None, score_fn=None,
              log=print, decode_fn=None, rule_fn=None, on_done=None) -> dict:
    """Train every unfinished cell in order (resuming interrupted ones); stop starting new cells after
    ``max_hours``. Induced-tree cells are then scored in the given tree (``score_fn``:
    :func:`given_tree_metrics`), decoding-only rows decoded (``decode_fn``: :func:`tuned_beam_metrics`;
    ``rule_fn``: :func:`decision_metrics`); ``on_done(cell)`` follows each finished cell (the ledger).
    A hidden pre-train runs only while a cell that needs it is unfinished.
    Returns ``{"ran": [...], "skipped": [...], "stopped": bool}``."""
    if train_fn is None:
        from hiervision.training import train as train_fn
    if induce_fn is None:
        from hiervision.induce import induce_from_run as induce_fn
    score_fn, decode_fn = score_fn or given_tree_metrics, decode_fn or tuned_beam_metrics
    waiting = {c.needs.name for c in cells if c.needs is not None and not c.done()}
    t0, ran, skipped = time.monotonic(), [], []
    for cell in cells:
        if cell.done() or (cell.hidden and cell.name not in waiting):
            skipped.append(cell.name)
            continue
        if not cell.trained():
            if max_hours is not None and time.monotonic() - t0 > max_hours * 3600:
                log(f"[comparison] {max_hours} h used: stopping before {cell.name}; run the same command to go on")
                return {"ran": ran, "skipped": skipped, "stopped": True}
            if cell.needs is not None:
                if not cell.needs.trained():  # finished in an earlier sitting: its checkpoint is needed again
                    _train_cell(cell.needs, train_fn, log)
                if not cell.tree.exists():
                    p_min, g_max = cell.data.induce
                    induce_fn(cell.needs.run_dir, p_min, g_max).save(cell.tree)
            _train_cell(cell, train_fn, log)
        else:  # only the steps after training are missing
            log(f"[comparison] {cell.name}: {cell.state()} ({cell.run_dir})")
        _finish(cell, score_fn, decode_fn, rule_fn)
        if on_done is not None:
            on_done(cell)
        ran.append(cell.name)
    return {"ran": ran, "skipped": skipped, "stopped": False}


# ----------------------------------------------------------------------------- the summary
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
_CLAIM = "95 % CI"  # every claim of the "Which method?" paragraph carries its interval


def which_method(summary: dict, min_seeds: int = 3) -> str:
    """The README's "Which method?" paragraph, generated from the paired intervals on path accuracy.

    Only rows with ``min_seeds`` paired seeds get a claim (with its interval); the others are named as
    not measured yet, and a data set without any such row (or whose flat row is short) gets a placeholder.
    Optional rows short of ``min_seeds`` are exploratory: the tables show them, this paragraph does not.
    """
    parts = []
    for data in summary.values():
        rows = data["rows"]
        short = [r["label"] for r in rows.values() if r["n"] < min_seeds and not r.get("optional")]
        said = []
        for r in rows.values():
            d = r.get("vs_flat", {}).get("path_accuracy")
            if not d or d["lo"] is None or r["n"] < min_seeds or d["n"] < min_seeds:
                continue
            ci = f"{d['mean'] * 100:+.2f} pt, 95 % CI [{d['lo'] * 100:+.2f}, {d['hi'] * 100:+.2f}], n = {d['n']}"
            if d["lo"] > 0:
                said.append(f"{r['label']} beats flat ({ci})")
            elif d["hi"] < 0:
                said.append(f"{r['label']} loses to flat ({ci})")
            else:
                said.append(f"{r['label']} is not distinguishable from flat ({ci})")
        missing = (f"{_PLACEHOLDER} with >= {min_seeds} seeds: {', '.join(short)}; placeholder until "
                   "`benchmarks/run.py --profile comparison` fills it") if short else ""
        if said:
            parts.append(f"*{data['label']}* (path accuracy, paired by seed): " + "; ".join(said)
                         + (f". {missing[0].upper()}{missing[1:]}." if missing else "."))
        else:
            parts.append(f"*{data['label']}*: {missing}.")
    return "\n\n".join(parts)


#: issue 24's bar for the recipe hiervision recommends: (metric, short name, scale, what its paired 95 %
#: interval against flat must show on every data set)
RECIPE_BAR = (("leaf_accuracy", "Δ top-1 pt", 100, lambda d: d["hi"] >= 0),  # ties or beats flat
              ("mistake_severity", "Δ mistake sev.", 1, lambda d: d["hi"] < 0),  # lower
              ("hdist@5", "Δ hdist@5", 1, lambda d: d["hi"] < 0))  # lower


#: rows that train and run more than one network (HiE): not equal budget, so never the recommended recipe
ENSEMBLES = frozenset(m.key for d in DATASETS for m in d.methods if m.networks > 1)


def recommendation(summary: dict, min_seeds: int = 3) -> str:
    """The recommended recipe, from the paired intervals: a row that on every data set keeps flat's top-1
    (interval reaching 0 or above) and lowers mistake severity and hdist@5 (intervals below 0). Without
    one, the best trade-off: among rows that keep top-1 everywhere, the largest cut in mistake severity.
    Equal budget only: an ensemble's row (:data:`ENSEMBLES`) is never the recipe."""
    first = next(iter(summary.values()))["rows"] if summary else {}

    def pairs(key: str, metric: str) -> list[dict] | None:
        ds = [data["rows"].get(key, {}).get("vs_flat", {}).get(metric) for data in summary.values()]
        return ds if all(d and d["lo"] is not None and d["n"] >= min_seeds for d in ds) else None

    measured = [k for k in first if k != "flat" and k not in ENSEMBLES and all(pairs(k, m) for m, *_ in RECIPE_BAR)]
    if not measured:
        return (f"*Recommended recipe*: not decided yet — it needs >= {min_seeds} paired seeds of top-1, mistake "
                "severity and hdist@5 on every data set (issue 24's rows).")

    def on(key: str, i: int) -> str:
        return ", ".join(f"{name} {d['mean'] * f:+.2f} [{d['lo'] * f:+.2f}, {d['hi'] * f:+.2f}]"
                         for m, name, f, _ in RECIPE_BAR for d in [pairs(key, m)[i]])

    def shown(key: str) -> str:
        return "; ".join(f"{data['label']}: {on(key, i)}" for i, data in enumerate(summary.values())) + \
            f" (95 % CI, n >= {min_seeds})"

    def passes(key: str, bar=RECIPE_BAR) -> bool:
        return all(ok(d) for m, *_, ok in bar for d in pairs(key, m))

    meets = [k for k in measured if passes(k)]
    if meets:
        best = max(meets, key=lambda k: sum(d["mean"] for d in pairs(k, "leaf_accuracy")))
        return (f"*Recommended recipe*: **{first[best]['label']}** — on every data set it keeps flat's top-1 and "
                f"makes milder mistakes: {shown(best)}.")
    text = ("*Recommended recipe*: no row meets the bar (top-1 ties or beats flat, mistake severity and hdist@5 "
            "lower with 95 % intervals below 0, on every data set).")
    keeps = [k for k in measured if passes(k, RECIPE_BAR[:1])]
    if not keeps:
        per_data = []
        for i, data in enumerate(summary.values()):
            # on this data set alone: keeps top-1, then the most mistake measures lowered, then the most surely
            # lowered (the smallest sum of their intervals' upper ends; means within noise would pick at random)
            here = [k for k in measured if RECIPE_BAR[0][3](pairs(k, "leaf_accuracy")[i])
                    and any(ok(pairs(k, m)[i]) for m, *_, ok in RECIPE_BAR[1:])]
            if not here:
                per_data.append(f"{data['label']}: none (flat)")
                continue
            best = min(here, key=lambda k: (-sum(ok(pairs(k, m)[i]) for m, *_, ok in RECIPE_BAR[1:]),
                                            sum(pairs(k, m)[i]["hi"] for m, *_ in RECIPE_BAR[1:])))
            per_data.append(f"{data['label']}: **{first[best]['label']}** ({on(best, i)})")
        return text + (" None keeps flat's top-1 everywhere: flat stays the recipe. Best trade-off per data set "
                       f"(keeps top-1 there and lowers a mistake measure, 95 % CI, n >= {min_seeds}): "
                       + "; ".join(per_data) + ".")
    best = min(keeps, key=lambda k: sum(d["mean"] for d in pairs(k, "mistake_severity")))
    return text + (f" Best trade-off (keeps top-1, largest cut in mistake severity): **{first[best]['label']}**: "
                   f"{shown(best)}.")


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


def section(summary: dict, budget: str, command: str, machine: str, wall_s: float, name: str,
            progress: str = "") -> str:
    """The RESULTS.md section: protocol, machine, command, then per data set the table (n per row),
    the paired differences, per-level accuracy and the length diagnostics of variable-length paths."""
    epochs = ", ".join(f"{d['label']}: {d['epochs']} epochs, HierNet tree p_min {d['induce'][0]}, g_max "
                       f"{d['induce'][1]}" for d in summary.values())
    pre = ", ".join(sorted({f"{d['pretrain_fraction']:.0%}" for d in summary.values()})) or "–"
    lines = [f"## {name}", "", PROTOCOL.format(budget=f"{budget} ({epochs})", pre=pre,
                                                 widths=", ".join(map(str, BEAM_WIDTHS))).replace("\n", " "), "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Wall time of this sitting: {wall_s / 60:.1f} min (cells are cached: earlier sittings add to the "
             "tables)" + ("  " if progress else ""), *([progress] if progress else [])]
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


def write_outputs(summary: dict, budget: str, command: str, machine: str, wall_s: float,
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
            if para.count(_CLAIM) >= old.count(_CLAIM):
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


def _without_only(argv: list[str]) -> list[str]:
    """The command line minus ``--only PATTERN...`` and ``--table-only``: the command that regenerates
    the whole table (and continues every cell) from the cache."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a == "--only"
            if skipping or a == "--table-only":
                continue
        if not skipping:
            out.append(a)
    return out


def main(args, machine_fn) -> int:
    """``benchmarks/run.py --profile comparison`` lands here (one engine: run.py parses, this runs)."""
    import sys

    root = Path(args.out) / f"comparison-{args.budget}"
    seeds = args.seeds or [0, 1, 2]
    name = "comparison" if args.budget == "cpu" else f"comparison-{args.budget}"
    # the smoke test's ledger stays beside its runs; the budgets' is committed with their tables
    ledger = Ledger((root / "results" if args.budget == "tiny" else HERE / "results") / f"{name}-cells.json")
    machine = machine_fn()
    cells = plan(args.budget, seeds, root, args.device, args.only, args.optional, extra=args.set, ledger=ledger)
    if args.status:
        print(status(cells))
        return 0
    # the tables cover every row and cached seed whatever this sitting runs: `--only` never shrinks them
    table = plan(args.budget, sorted({0, 1, 2, *seeds}), root, args.device, None, args.optional, extra=args.set,
                 ledger=ledger)
    planned = {t.name for t in table}
    table += [c for c in cells if c.name not in planned]
    record = recorder(ledger, table, machine)

    t0 = time.perf_counter()
    if not args.table_only:
        from hiervision.training import Preempted

        try:
            run_cells(cells, args.max_hours, on_done=record)
        except Preempted as e:  # the cell's last.pt holds the step: the same command resumes it
            print(f"[comparison] {e}", file=sys.stderr)
            return 128 + e.signum
    for c in table:  # cells finished here before the ledger knew them
        if c.finished_here():
            ledger.record(c, machine)
    summary = summarize(table, args.budget)
    command = " ".join(["python benchmarks/run.py", *_without_only(sys.argv[1:])])
    where = {}
    if args.budget == "tiny":  # a smoke test: keep its numbers out of the project's results
        root = Path(args.out) / "comparison-tiny"
        where = {"results_dir": root / "results", "results_md": root / "RESULTS.md", "readme": None}
    shown = [c for c in table if not c.hidden]  # a pre-train is part of its HierNet cell
    done = sum(c.done() for c in shown)
    progress = (f"Progress: {done} of {len(shown)} cells done; "
                f"{'complete' if done == len(shown) else f'continue with `{command}`'} "
                f"(`--status` lists the cells).{machines_note(shown, ledger, machine)}")
    print(write_outputs(summary, args.budget, command, machine, time.perf_counter() - t0, progress=progress,
                        **where))
    print(status(cells))
    return 0
