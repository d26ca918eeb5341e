"""``hiervision extend RUN --data SOURCE --out NEW_RUN``: classes a trained run lacks join it without retraining it."""

from __future__ import annotations

import argparse
from pathlib import Path

from hiervision.cli.common import print_metrics

__all__ = ["add_parser", "cmd_extend", "extend_config"]


def extend_config(run: str | Path, data: str | None, epochs: int, train_backbone: bool, lr_scale: float,
                  overrides: list[str]) -> dict:
    """The new run's config: the parent's, with ``data`` (a folder, zip or CSV of images; else the parent's data,
    changed by ``--set data.*``) normalised as the parent was, its tree grown from the parent's
    (``data.grow_from``), its weights the parent's (``train.init_from``), fine-tuned for ``epochs`` at
    ``lr_scale`` × the parent's learning rate, the head alone unless ``train_backbone``."""
    from hiervision.config import apply_overrides, validate_config
    from hiervision.experiment import load_run
    from hiervision.extend import check_extendable
    from hiervision.recipe import data_section, is_data_source

    run = Path(run).resolve()
    if not (run / "config.yaml").is_file() or not (run / "best.pt").is_file():
        raise ValueError(f"{run}: not a trained hiervision run folder (no config.yaml and best.pt)")
    cfg, _, model, meta = load_run(run)
    check_extendable(model, str(run))  # before the new run's folder is made
    if data is not None:
        if not is_data_source(data) or not Path(data).exists():
            raise ValueError(f"--data {data}: not a folder, zip or CSV of images")
        kept = {k: cfg["data"][k] for k in ("image_size", "channels") if k in cfg["data"]}
        cfg["data"] = {**data_section(Path(data)), **kept}
    cfg["data"].update({"grow_from": str(run / "taxonomy.json")}, **{k: meta[k] for k in ("mean", "std") if k in meta})
    t = cfg["train"]
    t.update(init_from=str(run), epochs=epochs, freeze_backbone=not train_backbone, lr=t["lr"] * lr_scale)
    t.pop("unfreeze_after", None)
    cfg["name"] = f"{cfg.get('name') or run.name}-extended"
    return validate_config(apply_overrides(cfg, overrides))


def cmd_extend(args: argparse.Namespace) -> int:
    """Train the grown run (:func:`extend_config`) and print its test metrics."""
    from hiervision.training import train

    cfg = extend_config(args.run, args.data, args.epochs, args.train_backbone, args.lr_scale, args.set)
    if args.quiet:
        cfg["train"]["progress"] = False
    result = train(cfg, args.out, resume=not args.no_resume, force=args.force)
    print_metrics(result)
    print(f"run written to {args.out} (started from {args.run}; evaluate, export and serve it as any run)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``extend RUN --data SOURCE --out NEW_RUN``."""
    e = sub.add_parser("extend", help="add the classes new images bring to a trained run: every learned weight "
                       "kept, new classes imprinted from their images, a short fine-tune of the head")
    e.add_argument("run", metavar="RUN", help="the trained run folder (flat, hnd or soft_max_margin head)")
    e.add_argument("--data", default=None, metavar="FOLDER|CSV",
                   help="images of the new classes (nested class folders, their .zip, or a CSV), best with some "
                   "of the known classes too, so the fine-tune keeps them; default: RUN's own data (change it "
                   "with --set data.KEY=VALUE)")
    e.add_argument("--out", required=True, help="the new run folder")
    e.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    e.add_argument("--lr-scale", type=float, default=0.1, help="learning rate: RUN's times this (default 0.1)")
    e.add_argument("--train-backbone", action="store_true", help="fine-tune the whole model, not the head alone")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=0.01")
    e.add_argument("--no-resume", action="store_true", help="start over even if --out holds last.pt")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--force", action="store_true", help="write into an --out folder that is not a hiervision run")
    e.set_defaults(func=cmd_extend)
