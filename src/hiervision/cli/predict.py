"""``hiervision predict``: one JSON line or CSV row per image, from a run folder or an exported .onnx."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hiervision.cli.common import (
    add_answers,
    add_beam_width,
    add_decode,
    answers,
    decode_rule,
    open_fraction,
    positive_int,
)
from hiervision.imagefile import find_images

if TYPE_CHECKING:
    from hiervision.runtime import Predictor

__all__ = ["CSV_FIELDS", "CSV_PATHS_SEP", "add_parser", "cmd_predict"]

CSV_FIELDS = ["file", "path", "path_ids", "path_probability", "node_probabilities"]
#: between the paths of a multi-label record in the CSV ``paths`` column
CSV_PATHS_SEP = " ; "


def _image_files(inputs: list[str]) -> list[Path]:
    """Files named on the command line, and the images inside folders (recursively; hidden files and
    folders, and files without an image suffix, are skipped)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = find_images(p)  # as training reads folders: recursive, hidden files and folders skipped
            if not found:
                raise FileNotFoundError(f"{p}: folder holds no images")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _predictor(args: argparse.Namespace) -> Predictor:
    """An exported .onnx runs on onnxruntime; a run folder on PyTorch. Both decode in hiervision.runtime.
    ``--within/--classes/--min-prob`` replace the run's (or export's) defaults."""
    from hiervision.runtime import Predictor

    decode = decode_rule(args)
    if Path(args.run_dir).suffix.lower() == ".onnx":
        if args.device not in ("cpu", "auto"):
            raise ValueError(f"--device {args.device}: an exported .onnx runs on onnxruntime's CPU provider")
        predictor = Predictor(args.run_dir, top_k=args.top_k, batch_size=args.batch_size,
                              beam_width=args.beam_width, decode=decode)
    else:
        from hiervision.distributed import select_device
        from hiervision.export import run_predictor

        device = str(select_device(args.device, "--device"))
        predictor = run_predictor(args.run_dir, args.top_k, args.batch_size, device, beam_width=args.beam_width,
                                  decode=decode)
    side = predictor.sidecar
    predictor.allowed, predictor.thresholds = answers(args, predictor.tree, side["decoder"].get("end_nodes", "leaves"),
                                                      side)
    if predictor.allowed is not None and side["decoder"]["kind"] == "multi_label":
        raise ValueError("--within/--classes apply to single-label models only")
    return predictor


def _csv_separators(names: Sequence[str], sep: str, multi_label: bool) -> None:
    """A separator that occurs in a class name would make a CSV path ambiguous: refuse it (one line)."""
    if not sep:
        raise ValueError("--path-sep must not be empty")
    for s, what in [(sep, "--path-sep"), *([(CSV_PATHS_SEP, "the paths column's separator")] if multi_label else [])]:
        clash = next((n for n in names[1:] if s in n), None)
        if clash is not None:
            raise ValueError(f"{what} {s!r}: the class name {clash!r} contains it; pass another --path-sep "
                             "(or use --format jsonl)")


def _csv_row(record: dict, top_k: int, sep: str, hedged: bool = False, rolled: bool = False,
             multi: bool = False) -> list:
    """One CSV row: paths joined by ``sep`` (``--path-sep``, never found in a class name; ``path_ids`` are
    exact), numbers by spaces, top-k flattened; with ``hedged`` (``--accuracy``) the hedged answer's path
    and probability, with ``rolled`` (``--min-prob``) the roll-up's path, probability and reason, before the
    error column; ``multi`` (a multi-label model): the ``paths`` column (single-label records have none)."""
    if "error" in record:
        return [record["file"], "", "", "", "", *[""] * (2 * top_k), *[""] * multi, *["", ""] * hedged,
                *["", "", ""] * rolled, record["error"]]
    row = [record["file"], sep.join(record["path"]), " ".join(map(str, record["path_ids"])),
           record["path_probability"], " ".join(map(str, record["node_probabilities"]))]
    alts = record["top_k"][:top_k]
    for i in range(top_k):
        row += [sep.join(alts[i]["path"]), alts[i]["probability"]] if i < len(alts) else ["", ""]
    if multi:
        row.append(CSV_PATHS_SEP.join(sep.join(p) for p in record.get("paths", [])))
    if hedged:
        row += [sep.join(record["hedged"]["path"]), record["hedged"]["probability"]]
    if rolled:
        up = record["rollup"]
        row += [sep.join(up["path"]), up["probability"], up["why"]]
    return [*row, ""]


def cmd_predict(args: argparse.Namespace) -> int:
    """Records for every image (one JSON line or CSV row each); unreadable files get an error record,
    the others are still predicted, and the exit status says how many failed."""
    import csv

    from tqdm.auto import tqdm

    predictor = _predictor(args)  # a run that cannot be loaded is reported before any image is looked at
    hedge = predictor.hedger(args.accuracy) if args.accuracy is not None else None  # the sidecar's λ table
    files = _image_files(args.inputs)
    writer = None
    multi = predictor.sidecar["decoder"]["kind"] == "multi_label"
    if args.format == "csv":
        _csv_separators(predictor.tree.names, args.path_sep, multi)
        writer = csv.writer(sys.stdout)
        tops = [f"top{i + 1}_{c}" for i in range(args.top_k) for c in ("path", "probability")]
        hedged = ["hedged_path", "hedged_probability"] if hedge is not None else []
        rolled = ["rollup_path", "rollup_probability", "rollup_why"] if predictor.thresholds is not None else []
        writer.writerow([*CSV_FIELDS, *tops, *["paths"] * multi, *hedged, *rolled, "error"])
    failed: list[dict] = []
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.quiet or len(files) < 256)
    try:
        for start in range(0, len(files), args.batch_size):
            for record in predictor.predict(files[start : start + args.batch_size], node_scores=hedge is not None):
                if "error" in record:
                    failed.append(record)
                elif hedge is not None:  # the answer that stops at a confident node (issue 12's DARTS rule)
                    record["hedged"] = hedge(record)
                    del record["node_scores"]
                if writer is not None:
                    writer.writerow(_csv_row(record, args.top_k, args.path_sep, hedge is not None,
                                             predictor.thresholds is not None, multi))
                else:
                    print(json.dumps(record, ensure_ascii=False))
            sys.stdout.flush()
            bar.update(min(args.batch_size, len(files) - start))
    finally:
        bar.close()
    if failed:
        print(f"hiervision: error: {len(failed)} of {len(files)} images could not be predicted "
              f"(first: {failed[0]['error']})", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``predict RUN_OR_ONNX IMAGE_OR_FOLDER...``."""
    pr = sub.add_parser("predict", help="one record per image: path, per-node probabilities, top-k alternatives")
    pr.add_argument("run_dir", metavar="RUN_OR_ONNX", help="a run folder, or a .onnx written by hiervision export")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images; folders are searched recursively")
    pr.add_argument("--batch-size", type=positive_int, default=64)
    pr.add_argument("--top-k", type=positive_int, default=3, help="alternative paths per image (default 3)")
    pr.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    pr.add_argument("--path-sep", default=" > ", metavar="SEP",
                    help="csv: between the names of a path (default ' > '; refused when a class name contains it)")
    pr.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (run folders only)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--accuracy", type=open_fraction, default=None, metavar="A",
                    help="also give each image's hedged answer: the most specific node that meets accuracy A "
                    "(λ from the run's decisions.json: 0.9, 0.95, 0.99 after training, others by evaluate --accuracy)")
    add_beam_width(pr)
    add_decode(pr, "the export's, or the run's eval.decode")
    add_answers(pr)
    pr.set_defaults(func=cmd_predict)
