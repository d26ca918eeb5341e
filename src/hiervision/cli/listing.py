"""``hiervision list``: what can be named in a config (models, backbones, datasets, shipped configs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

__all__ = ["add_parser", "cmd_list"]


def _config_dirs() -> list[Path]:
    """``configs/`` in the working directory and in the source checkout (this file is src/hiervision/cli/)."""
    here = Path.cwd() / "configs"
    repo = Path(__file__).resolve().parents[3] / "configs"
    return [d for d in dict.fromkeys([here, repo]) if d.is_dir()]


def cmd_list(args: argparse.Namespace) -> int:
    """What can be named in a config: registered models and backbones, datasets, shipped configs."""
    if args.what == "models":
        from hiervision.models.registry import list_models

        names = list_models()
    elif args.what == "backbones":
        from hiervision.models.backbones import list_backbones

        names = list_backbones()
    elif args.what == "datasets":
        from hiervision.data import DATASETS

        names = sorted(DATASETS)
    else:
        dirs = _config_dirs()
        if not dirs:
            raise FileNotFoundError("no configs/ folder here or next to the package")
        names = []
        for d in dirs:
            for f in sorted(d.rglob("*.yaml")):
                try:
                    desc = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("description") or ""
                except (yaml.YAMLError, AttributeError):
                    desc = ""
                line = " ".join(str(desc).split())
                names.append(f"{f.relative_to(d.parent)}" + (f"  {line[:100]}" if line else ""))
    print("\n".join(names))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``list models|backbones|datasets|configs``."""
    ls = sub.add_parser("list", help="what is there: registered models, backbones, datasets, shipped configs")
    ls.add_argument("what", choices=["models", "backbones", "datasets", "configs"])
    ls.set_defaults(func=cmd_list)
