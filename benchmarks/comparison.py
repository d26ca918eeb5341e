"""Issue 14's comparison: every method against flat at budgets where flat is good, paired by seed.

    python benchmarks/run.py --profile comparison                       # CPU budget, 3 seeds (contenders 5)
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
``benchmarks/results/comparison-cells.json`` (:class:`comparison_plan.Ledger`, keyed by cell and config digest), so a
fresh checkout on another machine starts with every cell ever finished and only runs the rest. Every
invocation rewrites the tables from every finished cell, with ``n`` per cell (and, when they differ,
which machine each came from): the table fills in over sittings.

HierNet-induced gets the flat row's whole budget: a flat pre-train (same recipe, ``pretrain_fraction``
of the epochs; its own hidden cell), the tree induced from that run's validation confusion, then
HierNet for the remaining epochs, transferred from the pre-train.

Statistics: per cell mean ± std over seeds; per method the difference to flat paired by seed, with a
95 % Student-t interval (a small table of quantiles, no scipy). Writes ``benchmarks/results/comparison.json``
(``comparison-gpu.json``), a plot per data set, the ``## comparison`` section of RESULTS.md and the
README's "Which method?" paragraph (generated from the intervals; a placeholder until every row of a
data set has >= 3 seeds).

The code is split by what it holds: ``comparison_plan`` (rows, data sets, cells, the ledger, running
cells), ``comparison_stats`` (the paired statistics) and ``comparison_report`` (tables, plots, the
generated paragraphs); this file only ties them together for ``run.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from comparison_plan import Ledger, plan, record_new, recorder, run_cells, status
from comparison_report import machines_note, write_outputs
from comparison_stats import summarize

HERE = Path(__file__).resolve().parent


def _without_only(argv: list[str]) -> list[str]:
    """The command line minus ``--only PATTERN...``, ``--seeds N...`` and ``--table-only``: the command that
    regenerates the whole table (and continues every cell, each row at its own seeds) from the cache."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a in ("--only", "--seeds")
            if skipping or a == "--table-only":
                continue
        if not skipping:
            out.append(a)
    return out


def main(args: argparse.Namespace, machine_fn: Callable[[], str]) -> int:
    """``benchmarks/run.py --profile comparison`` lands here (one engine: run.py parses, this runs)."""
    root = Path(args.out) / f"comparison-{args.budget}"
    seeds = args.seeds or None  # None: each row's own (three, five for the contenders)
    name = "comparison" if args.budget == "cpu" else f"comparison-{args.budget}"
    # the smoke test's ledger stays beside its runs; the budgets' is committed with their tables
    ledger = Ledger((root / "results" if args.budget == "tiny" else HERE / "results") / f"{name}-cells.json")
    machine = machine_fn()
    cells = plan(args.budget, seeds, root, args.device, args.only, args.optional, extra=args.set, ledger=ledger)
    if args.status:
        print(status(cells))
        return 0
    # the tables cover every row at its own seeds whatever this sitting runs (`--only`, `--seeds` never shrink
    # them), and the cells this sitting adds beyond those
    table = plan(args.budget, None, root, args.device, None, args.optional, extra=args.set, ledger=ledger)
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
    record_new(table, ledger, machine)
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
    wall = None if args.table_only else time.perf_counter() - t0
    print(write_outputs(summary, args.budget, command, machine, wall, progress=progress,
                        **where))
    print(status(cells))
    return 0
