"""``hiervision induce``: HierNet's class tree from a trained run's confusion probability matrix."""

from __future__ import annotations

import argparse

from hiervision.cli.common import open_fraction, positive_int

__all__ = ["add_parser", "cmd_induce"]


def cmd_induce(args: argparse.Namespace) -> int:
    """HierNet's hierarchy from a trained run's confusion probability matrix on its validation split."""
    from hiervision.induce import induce_from_run, plot_taxonomy

    tree = induce_from_run(args.run_dir, args.p_min, args.g_max)
    tree.save(args.out)
    print(tree.render(max_nodes=args.max_nodes))
    groups = tree.num_nodes - 1 - len(tree.leaves)
    print(f"{len(tree.leaves)} classes in {groups} groups, depth {tree.max_depth}; written to {args.out}")
    if args.plot:
        plot_taxonomy(tree, args.plot, f"induced from {args.run_dir} (p_min {args.p_min}, g_max {args.g_max})")
        print(f"picture: {args.plot}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``induce RUN --p-min P... --out TREE.json``."""
    ind = sub.add_parser("induce", help="HierNet: a class tree from a trained run's confusion probability matrix")
    ind.add_argument("run_dir", help="a trained run (its validation split is predicted)")
    ind.add_argument("--p-min", type=open_fraction, nargs="+", required=True,
                     help="minimum group proximity; several values group recursively, one per depth")
    ind.add_argument("--g-max", type=positive_int, nargs="+", default=[50], help="maximum group size (per depth)")
    ind.add_argument("--out", required=True, help="taxonomy JSON to write (use as data.tree)")
    ind.add_argument("--plot", default=None, help="also draw the tree to this image file")
    ind.add_argument("--max-nodes", type=int, default=None, help="print at most this many nodes")
    ind.set_defaults(func=cmd_induce)
