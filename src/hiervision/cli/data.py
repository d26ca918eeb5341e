"""``hiervision data``: data tools; ``pack`` writes a folder/CSV data set as tar shards (``data.name: shards``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hiervision.config import load_config

__all__ = ["add_parser", "cmd_data"]


def cmd_data(args: argparse.Namespace) -> int:
    """``data pack``: any folder/CSV data set (a folder, or a config's ``data`` section) as tar shards."""
    from hiervision.data import build_data
    from hiervision.data.pipeline import PIPELINE_KEYS
    from hiervision.data.shards import pack
    from hiervision.experiment import data_config

    src = Path(args.source)
    if src.is_dir() or src.suffix.lower() == ".zip":
        data_cfg: dict = {"name": "folder", "root": str(src)}
    elif src.is_file():
        cfg = load_config(src, args.set)
        data_cfg = data_config(cfg)  # training's splits
    else:
        raise FileNotFoundError(f"{src}: no such config file or image folder")
    data_cfg = {k: v for k, v in data_cfg.items() if k not in PIPELINE_KEYS}  # pack the images as stored
    data = build_data(data_cfg)
    t0 = time.perf_counter()
    index = pack({"train": data.train, "val": data.val, "test": data.test}, data.taxonomy, args.out,
                 args.shard_size, data.in_chans)
    counts = ", ".join(f"{k} {v['count']} in {len(v['shards'])} shards" for k, v in index["splits"].items())
    print(f"packed {counts} to {args.out} ({time.perf_counter() - t0:.1f} s); "
          f"train on it with data: {{name: shards, root: {args.out}}}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``data pack SRC --out DIR``."""
    da = sub.add_parser("data", help="data tools: pack a folder/CSV data set into tar shards (data.name: shards)")
    da.add_argument("action", choices=["pack"])
    da.add_argument("source", metavar="SRC_CONFIG_OR_FOLDER",
                    help="a config whose data section names the set, or a folder of class folders")
    da.add_argument("--out", required=True, help="folder to write the shards, taxonomy.json and index.json to")
    da.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    da.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    da.set_defaults(func=cmd_data)
