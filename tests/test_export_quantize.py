"""``hiervision export --quantize int8`` (issue 41): static int8 calibrated on the run's validation images for the
graph with the image input, dynamic for a decoder step graph and for a run without validation images; the
runtime runs the result like any export, its answers stay valid and mostly agree with the float export.

Tiny runs (synthetic 16-px data, a half-width ResNet-20, one epoch) keep it to seconds; their weights are
nearly random, so the agreement bound is loose (measured: 100 % for both heads on 128 test images).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the [export] extra is not installed")
pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
pytest.importorskip("onnxscript", reason="the [export] extra is not installed")

from hiervision.config import load_config  # noqa: E402
from hiervision.experiment import load_run, run_data  # noqa: E402
from hiervision.export import export_onnx, sidecar  # noqa: E402
from hiervision.runtime import Predictor  # noqa: E402
from hiervision.sidecar import check_sidecar  # noqa: E402
from test_bad_inputs import cli  # noqa: E402
from test_runtime import META, build  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quantize.py"
TINY = ["data={name: synthetic, n_train: 320, n_test: 128, size: 16}",
        "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
        "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.amp=none", "eval.batch_size=256"]
GUO_RNN = "model={name: guo_rnn, backbone: resnet20, backbone_kwargs: {width: 0.5}, embed_size: 16, hidden_size: 16}"


def train_tiny(out: Path, *overrides: str) -> Path:
    from hiervision.training import train

    train(load_config(overrides=[*TINY, *overrides]), out)
    return out


def export_both(run: Path, out: Path) -> tuple[list[Path], list[Path]]:
    """The float export and the int8 one of a run, each in its own folder."""
    return export_onnx(run, out / "fp32" / "m.onnx"), export_onnx(run, out / "int8" / "m.onnx", quantize="int8")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, list[Path], list[Path]]]:
    """``{head: (run, float files, int8 files)}`` for a flat run and a guo_rnn run (autoregressive: a step graph)."""
    d = tmp_path_factory.mktemp("quantize")
    runs = {"flat": train_tiny(d / "flat"), "guo_rnn": train_tiny(d / "guo_rnn", GUO_RNN)}
    return {head: (run, *export_both(run, d / head)) for head, run in runs.items()}


def split_images(run: Path) -> np.ndarray:
    """The run's test split as the runtime takes it: ``(n, C, H, W)`` in [0, 1]."""
    cfg, _, _, meta = load_run(run)
    data = run_data(cfg, run, meta=meta)
    return np.stack([data.test[i][0].numpy() for i in range(len(data.test))])


def graph_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.suffix == ".onnx")


def assert_valid(records: list[dict], predictor: Predictor) -> None:
    """Every record a path of the tree, its probabilities finite and in [0, 1]."""
    tree = predictor.tree
    for r in records:
        ids = r["path_ids"]
        assert ids and list(tree.path(ids[-1])) == ids, r
        probs = [r["path_probability"], *r["node_probabilities"], *(t["probability"] for t in r["top_k"])]
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in probs), r


@pytest.mark.slow
@pytest.mark.parametrize("head", ["flat", "guo_rnn"])
def test_int8_is_smaller_valid_and_agrees_with_the_float_export(exports, head):
    run, fp32, int8 = exports[head]
    assert [f.name for f in int8] == [f.name for f in fp32]  # same names, graph(s) then sidecar
    assert graph_bytes(int8) < graph_bytes(fp32)
    images = split_images(run)
    want = Predictor(fp32[0], batch_size=64).predict_arrays(images)
    quantized = Predictor(int8[0], batch_size=64)
    got = quantized.predict_arrays(images)
    assert_valid(got, quantized)
    agree = np.mean([a["path_ids"] == b["path_ids"] for a, b in zip(want, got)])
    assert agree >= 0.7, f"int8 answers as the float export on {agree:.1%} of {len(images)} test images"  # 100 %


@pytest.mark.slow
def test_sidecar_records_static_for_images_and_dynamic_for_the_step_graph(exports):
    run, _, flat = exports["flat"]
    side = json.loads(flat[-1].read_text())
    n_val = len(run_data(load_run(run)[0], run).val)
    assert side["quantization"] == {"kind": "int8-static", "format": "QDQ", "calibration_images": min(128, n_val),
                                    "per_channel": True}
    ops = {n.op_type for n in onnx.load(str(flat[0])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    _, _, rnn = exports["guo_rnn"]
    side = json.loads(rnn[-1].read_text())
    assert side["quantization"]["kind"] == "int8-static" and side["quantization"]["step_graph"] == "int8-dynamic"
    assert side["step_graph"] == "m.step.onnx" and rnn[1].name == "m.step.onnx"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(rnn[1])).graph.node}


@pytest.mark.slow
def test_fp32_intermediate_never_lands_beside_the_output_or_in_the_run(exports):
    run, _, int8 = exports["flat"]
    assert sorted(p.name for p in int8[0].parent.iterdir()) == ["m.json", "m.onnx"]
    assert not [p for p in run.iterdir() if p.suffix == ".onnx"]


@pytest.mark.slow
def test_a_run_without_validation_images_is_quantised_dynamically(tmp_path, capsys):
    run = train_tiny(tmp_path / "run", "data.val_fraction=0")
    capsys.readouterr()
    fp32, int8 = export_both(run, tmp_path)
    assert "validation split is empty: dynamic quantisation" in capsys.readouterr().err
    side = json.loads(int8[-1].read_text())
    assert side["quantization"] == {"kind": "int8-dynamic", "format": "QOperator", "calibration_images": 0,
                                    "per_channel": False}
    assert graph_bytes(int8) < graph_bytes(fp32)
    quantized = Predictor(int8[0])
    assert_valid(quantized.predict_arrays(split_images(run)[:32]), quantized)


@pytest.mark.slow
def test_non_finite_int8_outputs_are_refused_and_nothing_is_written(exports, tmp_path, monkeypatch):
    import hiervision.export as export

    def poisoned(src, dst, batches, verbose, note):  # a "quantised" graph whose first weight is nan
        model = onnx.load(str(src))
        w = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
        w.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(w.dims), np.nan, np.float32), w.name))
        onnx.save(model, str(dst))
        return "int8-static"

    monkeypatch.setattr(export, "_quantize_graph", poisoned)
    with pytest.raises(ValueError, match=r"int8 quantisation gives non-finite values .*nothing written") as e:
        export_onnx(exports["flat"][0], tmp_path / "m.onnx", quantize="int8")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_edited_quantization_kind_is_one_line_naming_the_key(exports, tmp_path):
    _, _, int8 = exports["flat"]
    side = json.loads(int8[-1].read_text())
    side["quantization"]["kind"] = "int4-static"
    (tmp_path / "m.onnx").write_bytes(int8[0].read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"m\.json: key 'quantization\.kind': must be one of int8-static") as e:
        Predictor(tmp_path / "m.onnx")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, words", [
    ({"kind": "int4"}, "key 'quantization.kind': must be one of int8-static, int8-dynamic, got 'int4'"),
    ({"format": "QInt"}, "key 'quantization.format': must be one of QDQ, QOperator"),
    ({"calibration_images": -1}, "key 'quantization.calibration_images': must be a whole number ≥ 0"),
    ({"calibration_images": 0}, "key 'quantization.calibration_images': 0 for kind 'int8-static'"),
    ({"per_channel": "yes"}, "key 'quantization.per_channel': must be true or false"),
    ({"step_graph": "int8-dynamic"}, "key 'quantization.step_graph': must be absent"),
])
def test_quantization_key_is_checked(edit, words):
    side = sidecar(build("flat"), META)
    good = {"kind": "int8-static", "format": "QDQ", "calibration_images": 16, "per_channel": True}
    check_sidecar({**side, "quantization": good})
    check_sidecar({**side, "quantization": None})  # a float export
    with pytest.raises(ValueError, match="^sidecar: ") as e:
        check_sidecar({**side, "quantization": {**good, **edit}})
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, words", [
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    (["--quantize", "int8", "--calibration-images", "0"], "argument --calibration-images: must be ≥ 1, got 0"),
    (["--calibration-images", "8"], "--calibration-images: applies with --quantize int8 only"),
])
def test_bad_quantize_flags_are_one_line(capsys, tmp_path, flags, words):
    rc, line, _ = cli(capsys, "export", tmp_path, "--out", tmp_path / "m.onnx", *flags)
    assert rc in (1, 2) and words in line
    assert not list(tmp_path.iterdir())


def test_export_help_documents_quantize(capsys):
    rc, _, out = cli(capsys, "export", "--help")
    assert rc == 0 and "--quantize {int8}" in out and "--calibration-images N" in out and "static" in out


def test_sidecar_would_replace_a_run_file_is_refused(tmp_path):
    (tmp_path / "metrics.json").write_text('{"path_accuracy": 0.5}')
    for quantize in (None, "int8"):
        with pytest.raises(ValueError, match="would replace a file that is not an export's sidecar"):
            export_onnx(tmp_path, tmp_path / "metrics.onnx", quantize=quantize)
    assert (tmp_path / "metrics.json").read_text() == '{"path_accuracy": 0.5}'


@pytest.mark.slow
def test_quantize_benchmark_runs_on_a_tiny_run(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when run as a script: its neighbours import
    spec = importlib.util.spec_from_file_location("bench_quantize", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = exports["flat"][0]
    assert bench.main([str(run), "--out", str(tmp_path / "results"), "--repeats", "1", "--limit-test", "32"]) == 0
    result = json.loads((tmp_path / "results" / "quantize.json").read_text())
    (row,) = result["rows"]
    assert row["int8"]["bytes"] < row["fp32"]["bytes"] and row["int8"]["images_per_s"] > 0
    assert 0 <= row["int8"]["path_accuracy"] <= 1 and result["command"].startswith("python benchmarks/quantize.py")
    assert "## int8" in (tmp_path / "RESULTS.md").read_text() and "## int8" in capsys.readouterr().out
