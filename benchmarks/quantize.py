"""int8 against float: ``hiervision export RUN --quantize int8`` beside the plain export of the same run.

For each run folder: the float and the int8 export (static QDQ int8 calibrated on the run's validation
images; a decoder step graph dynamic), then per model its graph bytes, the runtime's images/s
(``Predictor.predict_arrays`` on the same preprocessed test images, same batch, median of ``--repeats``
timings after a warm-up pass) and its path accuracy on the run's test split, and how often the two answer
alike. Both models decode as the run does (its ``eval.decode``), in ``hiervision.runtime``.

    python benchmarks/quantize.py runs/a runs/b           # writes results/quantize.json and RESULTS.md "## int8"
    python benchmarks/quantize.py runs/a --no-write       # prints the section only
    python benchmarks/quantize.py runs/tiny --out /tmp/q/results --repeats 1 --limit-test 64   # a check of the
                                                          # script: JSON in /tmp/q/results, RESULTS.md in /tmp/q
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hiervision.experiment import load_run, run_data
from hiervision.export import export_onnx
from hiervision.runtime import Predictor
from results_md import write_section

HERE = Path(__file__).resolve().parent
SECTION = "int8"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _arrays(dataset, indices: range) -> np.ndarray:
    """Images ``indices`` of a split as the runtime takes them: ``(n, C, H, W)`` float32 in [0, 1]."""
    return np.stack([dataset[i][0].numpy() for i in indices]).astype(np.float32)


def _rate(predictor: Predictor, images: np.ndarray, batch: int, repeats: int) -> float:
    """Images per second of ``predict_arrays`` over ``images`` in batches of ``batch``: the median of
    ``repeats`` timed passes after one untimed pass (sessions and caches warm)."""
    def one_pass() -> float:
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            predictor.predict_arrays(images[s : s + batch])
        return time.perf_counter() - t0

    one_pass()
    return len(images) / statistics.median(one_pass() for _ in range(repeats))


def _answers(predictors: dict[str, Predictor], dataset, n: int, batch: int) -> dict[str, list[list[int]]]:
    """Each model's decoded path per test image, the images read once per batch for both."""
    out: dict[str, list[list[int]]] = {k: [] for k in predictors}
    for s in range(0, n, batch):
        images = _arrays(dataset, range(s, min(s + batch, n)))
        for k, p in predictors.items():
            out[k].extend(r["path_ids"] for r in p.predict_arrays(images))
    return out


def measure(run: Path, args: argparse.Namespace, tmp: Path) -> dict:
    """One run's row: bytes, images/s and path accuracy of its float and int8 exports, and their agreement."""
    cfg, tax, _, meta = load_run(run)
    test = run_data(cfg, run, meta=meta).test
    n = min(len(test), args.limit_test or len(test))
    if n == 0:
        raise SystemExit(f"{run}: the run's test split is empty")
    files = {kind: export_onnx(run, tmp / run.name / kind / "m.onnx", quantize=None if kind == "fp32" else "int8",
                               calibration_images=args.calibration_images) for kind in ("fp32", "int8")}
    predictors = {kind: Predictor(f[0], batch_size=args.batch_size, threads=args.threads) for kind, f in files.items()}
    answers = _answers(predictors, test, n, args.batch_size)
    truth = None if test.multi_label else [list(tax.path(int(t))) for t in test.targets[:n]]
    timed = _arrays(test, range(min(n, args.timing_images)))
    row: dict = {"run": str(run), "model": cfg["model"]["name"], "test_images": n, "timed_images": len(timed),
                 "quantization": json.loads(files["int8"][-1].read_text(encoding="utf-8"))["quantization"]}
    for kind, predictor in predictors.items():
        acc = None if truth is None else float(np.mean([a == t for a, t in zip(answers[kind], truth)]))
        row[kind] = {"bytes": sum(f.stat().st_size for f in files[kind] if f.suffix == ".onnx"),
                     "images_per_s": _rate(predictor, timed, args.batch_size, args.repeats), "path_accuracy": acc}
    row["size_ratio"] = row["int8"]["bytes"] / row["fp32"]["bytes"]
    row["speedup"] = row["int8"]["images_per_s"] / row["fp32"]["images_per_s"]
    row["agreement"] = float(np.mean([a == b for a, b in zip(answers["fp32"], answers["int8"])]))
    return row


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def markdown(result: dict) -> str:
    """The ``## int8`` section of RESULTS.md."""
    a = result["args"]
    lines = [
        f"## {SECTION}",
        "",
        "`hiervision export RUN --quantize int8` against the float export of the same run: static int8 (QDQ, "
        f"per-channel weights) calibrated on up to {a['calibration_images']} validation images, a decoder step graph "
        "dynamic. Both run in `hiervision.runtime` (`Predictor.predict_arrays` on the same preprocessed test "
        f"images, batch {a['batch_size']}, median of {a['repeats']} timed passes after a warm-up); path accuracy "
        "on the run's test split, decoded as the run decodes; *same answer*: the two give the same path.",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}",
        "",
        "| run | model | int8 | fp32 MB | int8 MB | size | fp32 img/s | int8 img/s | speed-up "
        "| fp32 path acc | int8 path acc | same answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = r["quantization"]
        kind = q["kind"] + (f" + step {q['step_graph']}" if "step_graph" in q else "")
        f, i = r["fp32"], r["int8"]
        cells = [Path(r["run"]).name, r["model"], kind, f"{f['bytes'] / 1e6:.2f}", f"{i['bytes'] / 1e6:.2f}",
                 f"{r['size_ratio']:.2f}×", f"{f['images_per_s']:.0f}", f"{i['images_per_s']:.0f}",
                 f"{r['speedup']:.2f}×", _pct(f["path_accuracy"]), _pct(i["path_accuracy"]),
                 f"{_pct(r['agreement'])} of {r['test_images']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """``command``: what to record as the command (a caller that trained the runs first names itself)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (hiervision train … --out RUN)")
    p.add_argument("--calibration-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed passes (the median is reported)")
    p.add_argument("--timing-images", type=int, default=1024, help="test images per timed pass (the first ones)")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="where quantize.json goes; RESULTS.md is the one in its parent folder")
    p.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for run in args.runs:
            rows.append(measure(run, args, Path(tmp)))
            r = rows[-1]
            print(f"{run}: {r['size_ratio']:.2f}x size, {r['speedup']:.2f}x img/s, same answer on "
                  f"{r['agreement']:.1%}", flush=True)
    cpu = platform.processor() or platform.machine()
    result = {
        "command": command or "python benchmarks/quantize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu}, {os.cpu_count()} cores, onnxruntime {_ort_version()}, "
                   f"{args.threads or 'default'} intra-op threads",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "runs"},
        "rows": rows,
    }  # fmt: skip
    section = markdown(result)
    print(section)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        write_section(SECTION, section, args.out.parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
