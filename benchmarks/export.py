"""CPU latency (1 image) and throughput (batches of 64): PyTorch eager ``model.predict`` vs the
exported ONNX graph on onnxruntime + the numpy decoders of ``hiervision.runtime``, per family, in one run.

Both sides include decoding (a whole prediction per image). Models are the configs' own settings on
the 28x28 Fashion-MNIST tree with random weights (timing does not depend on training); the images
are real Fashion-MNIST test images where installed. The two engines are timed in interleaved rounds
and the median of the rounds is reported, since a shared machine drifts between rounds.

    python benchmarks/export.py                       # every family, writes benchmarks/results/export.json
    python benchmarks/export.py --tiny --out /tmp/export.json   # seconds: 2 families, narrow nets, 1 round
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hiervision.config import load_config
from hiervision.data.fashion_mnist import fashion_mnist_taxonomy, read_idx
from hiervision.export import export_model
from hiervision.models import create_model
from hiervision.runtime import Predictor

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
META = {"in_chans": 1, "image_size": [28, 28], "mean": [0.286], "std": [0.353]}
# family -> (config, variable-depth tree)
FAMILIES = {
    "flat": ("fmnist-flat.yaml", False),
    "dhnn_rnn": ("fmnist-res-rnn-resi.yaml", False),
    "dhnn_s2s": ("fmnistvar-res-s2s-pool.yaml", True),
    "guo_multihead": ("fmnist-guo-c2f.yaml", False),
    "guo_rnn": ("fmnist-guo-rnn.yaml", False),
    "hiernet": ("fmnist-hiernet.yaml", False),
}


def build(family: str, tiny: bool) -> torch.nn.Module:
    config, variable = FAMILIES[family]
    model_cfg = dict(load_config(CONFIGS / config)["model"])
    bk = {k: v for k, v in (model_cfg.get("backbone_kwargs") or {}).items() if k != "pretrained_path"}
    if tiny:
        bk["width"] = 0.25
    model_cfg["backbone_kwargs"] = bk
    torch.manual_seed(0)
    tax = fashion_mnist_taxonomy(variable_depth=variable)
    return create_model(model_cfg.pop("name"), tax, in_chans=1, image_size=28, **model_cfg).eval()


def images(n: int) -> np.ndarray:
    if FMNIST.is_file():
        return read_idx(FMNIST)[:n, None].astype(np.float32) / 255
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls (after one untimed warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(family: str, args: argparse.Namespace, tmp: Path) -> dict:
    model = build(family, args.tiny)
    t0 = time.perf_counter()
    export_model(model, META, tmp / f"{family}.onnx")
    export_s = time.perf_counter() - t0
    ort = Predictor(tmp / f"{family}.onnx", top_k=1, batch_size=args.batch, threads=args.threads)
    x = images(args.batch)
    xt = (torch.from_numpy(x) - META["mean"][0]) / META["std"][0]
    one, one_t = x[:1], xt[:1]
    rounds: dict[str, list[float]] = {k: [] for k in ("torch_1", "ort_1", "torch_64", "ort_64")}
    note = None
    try:
        model.predict(one_t)
    except RuntimeError as e:  # a model whose eager predict fails on one image is timed on ONNX only
        note = f"torch predict of 1 image failed: {str(e).splitlines()[0][:120]}"
    with torch.no_grad():
        for _ in range(args.rounds):  # interleaved: drift hits both engines alike
            rounds["torch_1"].append(timed(lambda: model.predict(one_t), args.reps) if note is None else np.nan)
            rounds["ort_1"].append(timed(lambda: ort.predict_arrays(one), args.reps))
            rounds["torch_64"].append(timed(lambda: model.predict(xt), args.reps))
            rounds["ort_64"].append(timed(lambda: ort.predict_arrays(x), args.reps))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    row = {
        "family": family, "config": FAMILIES[family][0], "export_s": round(export_s, 1),
        "latency_ms": {"torch": round(med["torch_1"] * 1e3, 2), "onnxruntime": round(med["ort_1"] * 1e3, 2)},
        "latency_speedup": round(med["torch_1"] / med["ort_1"], 2),
        "throughput_img_s": {"torch": round(args.batch / med["torch_64"]),
                             "onnxruntime": round(args.batch / med["ort_64"])},
        "throughput_speedup": round(med["torch_64"] / med["ort_64"], 2),
    }
    if note is not None:
        row["latency_ms"]["torch"], row["latency_speedup"], row["note"] = None, None, note
    return row


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=None)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="smoke run: narrow nets, flat + guo_rnn, 1 round of 2")
    p.add_argument("--out", default=str(HERE / "results" / "export.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.families = args.families or ["flat", "guo_rnn"]
        args.reps, args.rounds, args.batch = 2, 1, min(args.batch, 8)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families or list(FAMILIES):
            rows.append(measure(family, args, Path(tmp)))
            r = rows[-1]
            lat, thr = r["latency_ms"], r["throughput_img_s"]
            eager = lat["torch"] if lat["torch"] is not None else float("nan")
            print(f"{family:<14} latency {eager:>8.2f} ms torch {lat['onnxruntime']:>8.2f} ms ort "
                  f"({r['latency_speedup']}x)  throughput {thr['torch']:>6} vs {thr['onnxruntime']:>6} img/s "
                  f"({r['throughput_speedup']}x)", flush=True)
    result = {"command": "python benchmarks/export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": args.threads, "batch": args.batch, "reps": args.reps, "rounds": args.rounds,
              "tiny": args.tiny, "torch": torch.__version__, "onnxruntime": _ort_version(),
              "machine": platform.processor() or platform.machine(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
