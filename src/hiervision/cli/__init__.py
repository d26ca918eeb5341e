"""Command line: ``hiervision train|extend|evaluate|predict|export|serve|list|taxonomy|induce|data|demo``.

Every user error ends in one line on stderr and a non-zero exit code; only bugs show a traceback.
Each command lives in its own module beside the sub-parser it adds (``add_parser``); this one only
puts them together, in the order ``hiervision --help`` lists them.
"""

from __future__ import annotations

import argparse
import sys

from hiervision.cli import data, demo, evaluate, export, extend, induce, listing, predict, serve, taxonomy, train
from hiervision.cli.common import user_errors

__all__ = ["build_parser", "main"]

#: the command modules, in the order of ``hiervision --help``
COMMANDS = (train, extend, evaluate, predict, serve, export, listing, taxonomy, induce, data, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``hiervision`` argument parser (the docs site's CLI reference is generated from it)."""
    p = argparse.ArgumentParser(prog="hiervision", description="Hierarchical image classification.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one ``hiervision`` command; returns the exit status (user errors: one line on stderr, 1)."""
    from hiervision.training import Preempted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM/SIGINT during training: a checkpoint was saved
        print(f"hiervision: {e}", file=sys.stderr)
        return 128 + e.signum
    except user_errors() as e:
        print(f"hiervision: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hiervision: interrupted (run again with the same --out to resume)", file=sys.stderr)
        return 130
