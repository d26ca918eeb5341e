"""``hiervision taxonomy``: show, validate or build a class tree (our JSON, a parent/child CSV, a run folder,
Open Images, WordNet or a folder of class folders)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hiervision.cli.common import count, positive_int
from hiervision.taxonomy import Taxonomy

__all__ = ["add_parser", "cmd_taxonomy"]


def _read_taxonomy(path: str) -> Taxonomy:
    """A tree file in our JSON or parent/child CSV, or a run folder's taxonomy.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "taxonomy.json"
    if p.suffix.lower() == ".csv":
        return Taxonomy.from_csv(p)
    return Taxonomy.load(p)


def _build_taxonomy(args: argparse.Namespace) -> Taxonomy:
    """``taxonomy build``: any supported source → the one JSON format."""
    src = args.file
    if args.source == "openimages":
        return Taxonomy.from_openimages(src, args.names)
    if args.source == "wordnet":
        classes = Path(args.classes).read_text().split() if args.classes else None
        return Taxonomy.from_wordnet(src, args.names, classes=classes, max_depth=args.max_depth,
                                     keep_chains=args.keep_chains, all_synsets=args.all_synsets)
    for flag in ("keep_chains", "all_synsets"):
        if getattr(args, flag):
            raise ValueError(f"taxonomy build --{flag.replace('_', '-')} applies to --from wordnet only, "
                             f"not --from {args.source}")
    if args.source == "folders":
        return Taxonomy.from_folders(src)
    return _read_taxonomy(src)


def cmd_taxonomy(args: argparse.Namespace) -> int:
    """``show`` streams the tree, ``validate`` prints its shape, ``build`` writes it as JSON."""
    if args.file is None and not (args.action == "build" and args.source == "wordnet"):
        raise ValueError(f"taxonomy {args.action} needs a FILE (only build --from wordnet has a default: Debian's "
                         "WordNet database)")
    if args.action == "build":
        if not args.out:
            raise ValueError("taxonomy build needs --out FILE")
        tax = _build_taxonomy(args)
        tax.save(args.out)
        print(f"{args.out}: {len(tax.leaves)} classes · {len(tax)} nodes · depth {tax.max_depth}")
        return 0
    tax = _read_taxonomy(args.file)
    if args.action == "show":
        try:
            for line in tax.iter_render(max_nodes=args.max_nodes):  # streamed: huge trees print in bounded memory
                print(line)
        except BrokenPipeError:  # `| head`: the reader is gone, which is not an error
            sys.stdout = open(os.devnull, "w")  # keeps the final flush quiet
        return 0
    else:
        print(f"{args.file}: valid tree, {len(tax.leaves)} classes · {len(tax)} nodes · depth {tax.max_depth}"
              f"{' (fixed depth)' if tax.is_fixed_depth else ' (variable depth)'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``taxonomy show|validate|build FILE``."""
    tx = sub.add_parser("taxonomy", help="show, validate or build a taxonomy (JSON, parent/child CSV, run folder)")
    tx.add_argument("action", choices=["show", "validate", "build"])
    tx.add_argument("file", nargs="?", default=None,
                    help="taxonomy file; for build, the source (see --from; for --from wordnet, a WordNet database "
                    "folder or an edge list, by default Debian's wordnet-base in /usr/share/wordnet)")
    tx.add_argument("--max-nodes", type=count, default=None, help="show: print at most this many nodes")
    tx.add_argument("--from", dest="source", choices=["auto", "openimages", "wordnet", "folders"], default="auto",
                    help="build: the source's kind (auto = our JSON or a parent,child CSV)")
    tx.add_argument("--names", help="build: Open Images class-descriptions CSV or WordNet node_names.txt")
    tx.add_argument("--classes", help="build --from wordnet: file of class wnids to keep (prune, collapse)")
    tx.add_argument("--max-depth", type=positive_int, default=None, help="build --from wordnet: cap path length")
    tx.add_argument("--keep-chains", action="store_true",
                    help="build --from wordnet: keep single-child chains, so every synset reachable from the root "
                         "is a node (default: collapse them)")
    tx.add_argument("--all-synsets", action="store_true",
                    help="build --from wordnet: also every synset of --names that no edge names (WordNet's "
                         "instances), as classes under the root")
    tx.add_argument("--out", help="build: where to write the JSON")
    tx.set_defaults(func=cmd_taxonomy)
