"""``hiervision serve``: the HTTP API and web page over a run folder or .onnx file (the ``[serve]`` extra)."""

from __future__ import annotations

import argparse

from hiervision.cli.common import (
    add_answers,
    add_beam_width,
    add_decode,
    answers,
    decode_rule,
    finite_at_least,
    open_fraction,
    port,
    positive_int,
)

__all__ = ["add_parser", "cmd_serve"]


def cmd_serve(args: argparse.Namespace) -> int:
    """HTTP server over a run folder or .onnx file (needs the ``[serve]`` extra)."""
    try:
        from hiervision.serve import Limits, serve
    except ImportError as e:
        raise ValueError(f"hiervision serve needs: pip install 'hiervision[serve]' ({e.name} missing)") from None
    mb = 1024 * 1024
    limits = Limits(max_files=args.max_files, max_body_bytes=int(args.max_body_mb * mb),
                    read_timeout_s=args.read_timeout, min_body_rate=args.min_body_rate, max_queue=args.max_queue,
                    max_inflight_bytes=int(args.max_inflight_mb * mb), max_connections=args.max_connections,
                    header_timeout_s=args.header_timeout)
    if limits.max_inflight_bytes < limits.max_body_bytes:
        raise ValueError(f"--max-inflight-mb {args.max_inflight_mb:g} is below --max-body-mb {args.max_body_mb:g}: "
                         "no full-size request could ever be read")
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          top_k=args.top_k, limits=limits, hedge_accuracy=args.hedge_accuracy, beam_width=args.beam_width,
          decode=decode_rule(args), answers=lambda tree, end_nodes, side: answers(args, tree, end_nodes, side))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``serve RUN_OR_ONNX``."""
    sv = sub.add_parser("serve", help="HTTP API and web page over a run folder or .onnx file ([serve] extra)")
    sv.add_argument("model", metavar="RUN_OR_ONNX")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=port, default=8000)
    sv.add_argument("--max-batch", type=positive_int, default=32, help="most images predicted in one forward pass")
    sv.add_argument("--max-wait-ms", type=finite_at_least(0), default=5.0,
                    help="how long the first image of a batch waits for others (0: no waiting)")
    sv.add_argument("--top-k", type=positive_int, default=3, help="alternative paths per image")
    sv.add_argument("--max-files", type=positive_int, default=64, help="most images in one request (more: 413)")
    sv.add_argument("--max-body-mb", type=finite_at_least(0, strict=True), default=32.0,
                    help="largest request body (more: 413)")
    sv.add_argument("--read-timeout", type=finite_at_least(0, strict=True), default=10.0, metavar="S",
                    help="longest pause while a request body arrives (more: 408, connection closed)")
    sv.add_argument("--min-body-rate", type=finite_at_least(0), default=8192, metavar="BYTES_PER_S",
                    help="slowest average upload accepted after the first --read-timeout seconds (slower: 408)")
    sv.add_argument("--max-queue", type=positive_int, default=256,
                    help="most images waiting for the model (more: 503 with Retry-After)")
    sv.add_argument("--max-inflight-mb", type=finite_at_least(0, strict=True), default=256.0,
                    help="most upload bytes held at once over all requests (more: 503 with Retry-After)")
    sv.add_argument("--max-connections", type=positive_int, default=512,
                    help="most open connections; past it the oldest still sending its headers is closed")
    sv.add_argument("--header-timeout", type=finite_at_least(0, strict=True), default=10.0, metavar="S",
                    help="longest a connection may take to send a request's headers (slower: closed)")
    sv.add_argument("--hedge-accuracy", type=open_fraction, default=None, metavar="A",
                    help="add each image's hedged answer at this accuracy target (λ from the run's decisions.json)")
    add_beam_width(sv)
    add_decode(sv, "the export's, or the run's eval.decode")
    add_answers(sv)  # the defaults of requests that send no within/min_prob/min_prob_at fields
    sv.set_defaults(func=cmd_serve)
