"""``hiervision export``: a trained run as an ONNX graph and JSON sidecar, for ``hiervision.runtime``."""

from __future__ import annotations

import argparse

from hiervision.cli.common import add_beam_width, add_decode, decode_rule, positive_int

__all__ = ["add_parser", "cmd_export"]


def cmd_export(args: argparse.Namespace) -> int:
    """Write the graph and its sidecar; print the files written."""
    from hiervision.export import export_onnx

    if args.calibration_images is not None and args.quantize is None:
        raise ValueError("--calibration-images: applies with --quantize int8 only")
    for path in export_onnx(args.run_dir, args.out, which=args.checkpoint, beam_width=args.beam_width,
                            verbose=args.verbose, decode=decode_rule(args), quantize=args.quantize,
                            calibration_images=args.calibration_images or 128):
        print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``export RUN --out FILE.onnx [--quantize int8]``."""
    ex = sub.add_parser("export", help="ONNX graph + JSON sidecar of a trained run, for hiervision.runtime")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="the .onnx file to write (sidecar: same name, .json)")
    ex.add_argument("--checkpoint", choices=["best", "last"], default="best")
    add_beam_width(ex)
    ex.add_argument("--verbose", action="store_true", help="show the ONNX exporter's own messages and warnings")
    add_decode(ex, "the run's eval.decode; the sidecar records the rule and predict/serve apply it")
    ex.add_argument("--quantize", choices=["int8"], default=None,
                    help="write an int8 model to --out instead of the float one (onnxruntime quantisation): static, "
                    "calibrated on the run's validation images, for the graph with the image input; dynamic for an "
                    "autoregressive head's decoder step graph and for a run without validation images. The sidecar "
                    "records it (key 'quantization'); predict/serve run it like any export")
    ex.add_argument("--calibration-images", type=positive_int, default=None, metavar="N",
                    help="with --quantize int8: the validation images that calibrate it (default 128, spread over the "
                    "split; fewer when it holds fewer)")
    ex.set_defaults(func=cmd_export)
