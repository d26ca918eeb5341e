"""What several commands share: the user-error types ``main`` turns into one line, argparse types and the
decoding flags (so ``evaluate``, ``predict``, ``serve`` and ``export`` spell them the same way)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

from hiervision.checkpoint import CheckpointError
from hiervision.config import ConfigError
from hiervision.taxonomy import TaxonomyError

__all__ = ["USER_ERRORS", "add_answers", "add_beam_width", "add_decode", "answers", "count", "decode_rule",
           "int_at_least", "open_fraction", "positive_int", "print_metrics", "probability", "user_errors"]

USER_ERRORS = (ConfigError, TaxonomyError, CheckpointError, FileNotFoundError, ValueError, OSError)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end in one line on stderr; training's and the run folder's are imported late (torch)."""
    from hiervision.experiment import RunError
    from hiervision.training import TrainingError

    return (*USER_ERRORS, TrainingError, RunError)


def print_metrics(result: dict) -> None:
    """A run's headline metrics as one JSON line (the float ones, rounded to 4 places)."""
    keys = ["path_accuracy", "node_accuracy", "leaf_accuracy", "hierarchical_f1", "path_f1", "node_f1"]
    shown = {k: round(result[k], 4) for k in keys if isinstance(result.get(k), float)}
    print(json.dumps(shown))


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: a whole number ≥ ``lo`` (argparse names the flag in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number ≥ {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be ≥ {lo}, got {value}")
        return value

    return parse


def port(text: str) -> int:
    """argparse type: a TCP port, 0–65535 (0: any free one)."""
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0–65535, got {value}")
    return value


def finite_at_least(lo: float, strict: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number ≥ ``lo`` (> ``lo`` when ``strict``): waits, sizes, rates."""
    said = f"{'>' if strict else '≥'} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {said}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (strict and value == lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {said}, got {text}")
        return value

    return parse


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1 (sizes, counts of images, top-k)."""
    return int_at_least(1)(text)


def count(text: str) -> int:
    """argparse type: a whole number ≥ 0."""
    return int_at_least(0)(text)


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (an accuracy target, a proximity threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1] (a roll-up threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def add_answers(parser: argparse.ArgumentParser) -> None:
    """``--min-prob/--min-prob-at`` (roll-up) and ``--within/--classes`` (restriction): one help text for every
    command that answers (evaluate, predict, serve)."""
    parser.add_argument("--min-prob", type=probability, default=None, metavar="P",
                        help="roll each answer up to the deepest node on its path whose probability is at least P "
                        "(the record's rollup says where and why it stopped)")
    parser.add_argument("--min-prob-at", default=None, metavar="LEVEL=P,...",
                        help="a threshold per level (1 = under the root), e.g. 3=0.8,2=0.6: the species only above "
                        "0.8, else the genus above 0.6, else the level above; other levels take --min-prob (or 0)")
    parser.add_argument("--within", default=None, metavar="NODE[,NODE...]",
                        help="answer only end classes under these nodes (names, or paths such as 'Animals/Dogs'): "
                        "probabilities are renormalised over them before any decision rule")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="answer only the end classes listed in FILE, one per line (with --within: those "
                        "inside the subtrees)")


def answers(args: argparse.Namespace, tree, end_nodes: str = "leaves", defaults: dict | None = None):
    """``(allowed, thresholds)`` for ``tree`` from :func:`add_answers`' flags over ``defaults`` (the sidecar's
    ``within``/``classes``/``min_prob``/``min_prob_at``, or a run's: :func:`hiervision.export.answer_defaults`):
    ``--within``/``--classes`` replace the default restriction as a whole, each threshold flag its own key.
    Either is None when nothing asks for it."""
    from hiervision.restrict import Allowed  # numpy only
    from hiervision.rollup import Thresholds

    d = defaults or {}
    if args.within is None and args.classes is None:
        allowed = Allowed.of(tree, d.get("within"), class_names=d.get("classes"), end_nodes=end_nodes,
                             where=("the run's within", "the run's classes"))
    else:
        allowed = Allowed.of(tree, args.within, args.classes, end_nodes=end_nodes)
    min_prob = args.min_prob if args.min_prob is not None else d.get("min_prob")
    levels = args.min_prob_at if args.min_prob_at is not None else d.get("min_prob_at")
    return allowed, Thresholds.of(tree, min_prob, levels, ranks=d.get("ranks") or ())


def add_beam_width(parser: argparse.ArgumentParser) -> None:
    """``--beam-width``: one help text for every command that decodes."""
    parser.add_argument("--beam-width", type=positive_int, default=None, metavar="K",
                        help="decode with tree-restricted beam search of width K (1 = greedy) instead of the run's "
                        "configured decoding (guo_rnn, dhnn_rnn, dhnn_s2s; compare widths with evaluate --beam-width)")


def add_decode(parser: argparse.ArgumentParser, default: str) -> None:
    """``--decode/--metric/--allow-inner``; ``default`` says in the help what applies when none is given."""
    from hiervision.bayes import BAYES_METRICS, DECODE_RULES  # numpy only

    parser.add_argument("--decode", choices=DECODE_RULES, default=None,
                        help="crm: the leaf of least expected mistake severity (Karthik et al.); bayes: the answer of "
                        f"largest expected --metric (Plaud et al.); default {default}")
    parser.add_argument("--metric", choices=BAYES_METRICS, default=None,
                        help="with --decode bayes: hf1 (per-image hierarchical F1, the default), severity (LCA height: "
                        "CRM's answer) or path_accuracy (the most probable class)")
    parser.add_argument("--allow-inner", action="store_true",
                        help="with --decode bayes: the answer may stop at an inner node where the metric rewards it")


def decode_rule(args: argparse.Namespace) -> str | None:
    """``--decode/--metric/--allow-inner`` as one rule name (``hiervision.bayes.rule_spec``); None when unset."""
    if args.decode is None:
        if args.metric is not None or args.allow_inner:
            raise ValueError("--metric and --allow-inner go with --decode bayes")
        return None
    from hiervision.bayes import rule_spec

    return rule_spec(args.decode, args.metric, args.allow_inner)
