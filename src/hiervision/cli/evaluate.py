"""``hiervision evaluate``: a trained run's metrics on a split, optionally hedged, re-decoded or with a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hiervision.checkpoint import CheckpointError
from hiervision.cli.common import add_answers, add_beam_width, add_decode, answers, decode_rule, open_fraction
from hiervision.config import check_given_level

__all__ = ["add_parser", "cmd_evaluate"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Print the run's metrics on ``--split`` as JSON (decision rules go through ``hiervision.posthoc``)."""
    from hiervision.distributed import autocast_dtype, select_device
    from hiervision.evaluation import evaluate_split
    from hiervision.experiment import load_run, run_data
    from hiervision.marginals import is_identity
    from hiervision.posthoc import evaluate_decisions
    from hiervision.runfolder import is_run_dir

    if args.report and is_run_dir(args.report):  # before any work: a report never lands among a run's files
        raise ValueError(f"--report {args.report}: a run folder; give the report a folder of its own "
                         f"(e.g. {Path(args.report) / 'report'})")
    device = select_device(args.device, "--device")
    cfg, taxonomy, model, meta = load_run(args.run_dir, which=args.checkpoint, device=device)
    check_given_level(args.given_level, taxonomy)
    data = run_data(cfg, args.run_dir, args.allow_changed_data, meta)  # the normalisation it was trained with
    if data.taxonomy != taxonomy:
        raise CheckpointError(f"{args.run_dir}: the data's taxonomy differs from the run's taxonomy.json")
    if len(data.val if args.split == "val" else data.test) == 0:
        why = " (data.val_fraction is 0)" if args.split == "val" else ""
        raise ValueError(f"--split {args.split}: {args.run_dir}'s {args.split} split holds no image{why}")
    amp = autocast_dtype(cfg["train"]["amp"], device)
    if args.mode is not None:
        if args.mode not in model.eval_modes:
            raise ValueError(f"--mode {args.mode}: model {cfg['model']['name']} has modes {list(model.eval_modes)}")
        model.set_eval_mode(args.mode)
    if args.beam_width is not None:
        model.set_beam_width(args.beam_width)
    asked = _answers(args, cfg, taxonomy)
    if asked.accuracy is not None or asked.decode != "argmax" or not is_identity(model.temperature) \
            or asked.thresholds or asked.allowed or asked.target or data.novel is not None:
        if args.given_level is not None and (asked.accuracy is not None or asked.target is not None):
            raise ValueError("--given-level cannot be combined with --accuracy or --target-accuracy (they fit on "
                             "plain predictions)")
        result, pred, targets = evaluate_decisions(args.run_dir, model, data, args.split, cfg["eval"]["batch_size"],
                                                   amp, asked, device, args.given_level)
    else:
        result, pred, targets = evaluate_split(model, data, args.split, cfg["eval"]["batch_size"], device, amp,
                                               given_level=args.given_level, return_prediction=True)
    result["split"] = args.split
    if args.given_level is not None:
        result["given_level"] = args.given_level
    if args.report:  # pictures of the same predictions (see hiervision.report)
        from hiervision.report import write_report

        if "selective" not in result and not data.multi_label:
            from hiervision.distributions import EndDistribution
            from hiervision.marginals import as_temperature
            from hiervision.posthoc import selective_report

            result["selective"] = selective_report(EndDistribution(pred, taxonomy), targets, taxonomy,
                                                   as_temperature(model.temperature))
        write_report(pred, targets, taxonomy, args.report, title=f"{args.run_dir}: {args.split} split",
                     selective=result.get("selective"))
        result["report"] = str(Path(args.report) / "index.html")
    print(json.dumps(result, indent=2))
    return 0


def _answers(args: argparse.Namespace, cfg: dict, taxonomy):
    """What to evaluate beyond the model's own answers (:class:`hiervision.posthoc.Answers`): the flags, or else
    the run's ``eval.decode``, ``eval.min_prob``/``min_prob_at`` and ``eval.within``/``classes``."""
    from hiervision.export import answer_defaults
    from hiervision.posthoc import Answers

    ev = cfg["eval"]
    allowed, thresholds = answers(args, taxonomy.view, defaults=answer_defaults(cfg))
    if args.confidence is not None and args.target_accuracy is None:
        raise ValueError("--confidence goes with --target-accuracy")
    target = (args.target_accuracy, args.confidence or 0.95) if args.target_accuracy is not None else None
    return Answers(decode_rule(args) or ev.get("decode", "argmax"), args.accuracy, thresholds, allowed, target)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``evaluate RUN``."""
    e = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["val", "test"], default="test")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best")
    e.add_argument("--given-level", type=int, default=None, metavar="DEPTH",
                   help="give the model each image's true ancestor at this depth (Guo et al.'s CNN-RNN*)")
    e.add_argument("--accuracy", type=open_fraction, default=None, metavar="TARGET",
                   help="also report hedged answers (Deng et al.'s DARTS) reaching this accuracy, e.g. 0.99; "
                        "λ is fitted on the val split")
    e.add_argument("--target-accuracy", type=open_fraction, default=None, metavar="A",
                   help="fit a roll-up threshold on the val split whose answers reach accuracy A with --confidence "
                   "(Goren et al.'s climbing rule with a binomial bound); reports what it reached on --split and how "
                   "often such a threshold misses over 100 random halves")
    e.add_argument("--confidence", type=open_fraction, default=None, metavar="C",
                   help="with --target-accuracy: the probability that the accuracy is met (default 0.95)")
    add_decode(e, "eval.decode")
    add_answers(e)
    e.add_argument("--mode", default=None, help="how the model predicts, where it has several ways "
                   "(hiernet: conditional | routing)")
    add_beam_width(e)
    e.add_argument("--device", default="auto", help="auto (CUDA when there is one) | cpu | cuda | cuda:N")
    e.add_argument("--allow-changed-data", action="store_true",
                   help="evaluate although the data's splits differ from the run's splits.json (prints the overlap)")
    e.add_argument("--report", default=None, metavar="DIR",
                   help="also write DIR/index.html: each number in a sentence, then captioned plots (per-level "
                   "accuracy, each level's most confused nodes, the tree coloured by node accuracy, mistake severity, "
                   "reliability, operating curve, risk-coverage)")
    e.set_defaults(func=cmd_evaluate)
