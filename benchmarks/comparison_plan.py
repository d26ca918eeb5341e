"""The comparison's plan and its running: rows, data sets, budgets, one cell per (data, method, seed), the ledger.

Kept apart from the statistics (``comparison_stats``) and the write-up (``comparison_report``) so that
what a cell is, where its run folder lives and how it is trained can change without touching the tables.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from hiervision.config import dump, load_config

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "comparison"


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
    seeds: int = 3  # seeds 0 … seeds-1 when a sitting names none (the contenders: :data:`FIVE_SEEDS`)

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
#: issue 40's contenders (and the rows that decode their runs) run five seeds; every other row three
FIVE_SEEDS = ("flat", "haframe", "soft_max_margin", "hie")


def _seeds(run_key: str) -> int:
    return 5 if run_key in FIVE_SEEDS else 3


def _mistake_rows(prefix: str) -> tuple[Method, ...]:
    """Issue 24's rows: the post-hoc rules on flat's runs, and the hierarchy-aware losses that keep a
    flat softmax (each also decoded by CRM). Optional until their cells are run: ``--optional``, or
    ``--only`` with their names."""
    rows = [Method("flat_crm", "flat + temperature + CRM", f"{prefix}-flat.yaml", reuses="flat", decode="crm",
                   optional=True, seeds=_seeds("flat")),
            Method("flat_bayes_hf1", "flat + Bayes hF1 (inner answers)", f"{prefix}-flat.yaml", reuses="flat",
                   decode="bayes:hf1:inner", optional=True, seeds=_seeds("flat"))]
    for key, label, config in (("haframe", "HAFrame", "haframe"), ("haf", "HAF", "haf"),
                               ("soft_max_margin", "soft-max-margin", "soft-max-margin"), ("bilt", "BiLT", "bilt"),
                               ("hiercos", "Hier-COS", "hiercos")):
        rows += [Method(key, label, f"{prefix}-{config}.yaml", optional=True, seeds=_seeds(key)),
                 Method(f"{key}_crm", f"{label} + CRM", f"{prefix}-{config}.yaml", reuses=key, decode="crm",
                        optional=True, seeds=_seeds(key))]
    hie = "HiE (fine + coarse network: 2x flat's compute)"
    rows += [Method("hie", hie, f"{prefix}-hie.yaml", optional=True, networks=2, seeds=_seeds("hie")),
             Method("hie_crm", f"{hie} + CRM", f"{prefix}-hie.yaml", reuses="hie", decode="crm", optional=True,
                    networks=2, seeds=_seeds("hie"))]
    return tuple(rows)


MISTAKE_ROWS = ("flat_crm", "flat_bayes_hf1", "haframe", "haframe_crm", "haf", "haf_crm", "soft_max_margin",
                "soft_max_margin_crm", "bilt", "bilt_crm", "hiercos", "hiercos_crm", "hie", "hie_crm")


def _rows(prefix: str, dhnn: tuple[str, str], extra: tuple[Method, ...] = ()) -> tuple[Method, ...]:
    return (Method("flat", "flat", f"{prefix}-flat.yaml", seeds=_seeds("flat")),
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
    ("hops", "HOPS %", 100, True, True),  # Sani & Anand's score of the whole ranking (cells since issue 40)
    ("operating_area_correct", "op. curve area", 1, True, True),
    ("train_images_per_s", "train img/s", 1, False, True),
]

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
        """Test metrics: the ledger's record of this config when it has one (the numbers the tables quote: a run
        folder may hold a rerun that another script made), else this run folder's (:meth:`folder_metrics`)."""
        recorded = self.ledger.get(self) if self.ledger is not None else None
        return recorded if recorded is not None else self.folder_metrics()

    def folder_metrics(self) -> dict:
        """This run folder's test metrics; an induced-tree run's are those in the data set's own tree (comparable
        with flat)."""
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
        metrics = {k: v for k, v in cell.folder_metrics().items() if k in LEDGER_KEYS}
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


def plan(budget: str, seeds: list[int] | None, root: Path, device: str | None = None, only: list[str] | None = None,
         optional: bool = False, datasets: tuple[DataSet, ...] = DATASETS, config_dir: Path = CONFIGS,
         extra: list[str] | None = None, ledger: Ledger | None = None) -> list[Cell]:
    """Every cell of the budget, seed-major (seed 0 of every row first, so pairs fill in early).

    ``seeds``: every row's, or ``None`` for each row's own (:attr:`Method.seeds`: five for the contenders).

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
    for seed in seeds if seeds is not None else range(max(m.seeds for d in datasets for m in d.methods)):
        for data in datasets:
            if budget not in data.epochs:
                continue
            epochs = data.epochs[budget]
            sets = [*data.overrides.get(budget, ()), *(extra or [])]
            if device:
                sets.append(f"train.device={device}")
            for m in data.methods:
                if not wanted(m, data) or (seeds is None and seed >= m.seeds):
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
    from hiervision.distributed import autocast_dtype, select_device
    from hiervision.evaluation import predict_dataset
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
    temperature fitted after training; ``hiervision evaluate --decode``). Its ``hdist@k`` and HOPS rank the end
    classes by the rule's own expected score (CRM: least expected LCA height, as Karthik et al. rank)."""
    import torch

    from hiervision import metrics as M
    from hiervision.bayes import decode_rule, expected_scores
    from hiervision.decisions import end_distribution
    from hiervision.decoding import last_node
    from hiervision.distributed import autocast_dtype, select_device
    from hiervision.experiment import load_run, run_data
    from hiervision.posthoc import Answers, evaluate_decisions

    cfg, tax, model, _ = load_run(run_dir)
    device = select_device(cfg["train"]["device"])
    model = model.to(device)
    data = run_data(cfg, run_dir)
    amp = autocast_dtype(cfg["train"]["amp"], device)
    report, pred, targets = evaluate_decisions(run_dir, model, data, "test", cfg["eval"]["batch_size"], amp,
                                               Answers(decode=rule), device=device)
    _, metric, _ = decode_rule(rule)
    q = end_distribution(pred, tax)
    ranking = -torch.from_numpy(expected_scores(q.double().cpu().numpy(), tax, metric or "severity")).to(q)
    end = last_node(M.target_paths(targets, tax))
    report.update(M.hierarchical_distance_at_k(q, end, tax, ranking=ranking),
                  hops=M.hops(q, end, tax, ranking=ranking)["hops"])
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


def record_new(table: list[Cell], ledger: Ledger, machine: str) -> None:
    """Keep the cells finished in their run folders that the ledger does not know yet (trained before it existed,
    or by a sitting that stopped before recording). A cell it knows keeps its recorded metrics: a run folder may
    hold a rerun of the same config that another script made (``open_world.py`` trains the comparison's flat and
    HAFrame cells where their folders are missing), and silently swapping it in would move committed rows."""
    for c in table:
        if c.finished_here() and ledger.get(c) is None:
            ledger.record(c, machine)


def train_cell(cell: Cell, train_fn, log) -> None:
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
                    train_cell(cell.needs, train_fn, log)
                if not cell.tree.exists():
                    p_min, g_max = cell.data.induce
                    induce_fn(cell.needs.run_dir, p_min, g_max).save(cell.tree)
            train_cell(cell, train_fn, log)
        else:  # only the steps after training are missing
            log(f"[comparison] {cell.name}: {cell.state()} ({cell.run_dir})")
        _finish(cell, score_fn, decode_fn, rule_fn)
        if on_done is not None:
            on_done(cell)
        ran.append(cell.name)
    return {"ran": ran, "skipped": skipped, "stopped": False}

