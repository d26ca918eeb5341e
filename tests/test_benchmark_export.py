"""benchmarks/export.py runs end to end at its --tiny budget and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export.py"


@pytest.mark.slow
def test_export_benchmark_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_export", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "export.json"
    assert bench.main(["--tiny", "--families", "flat", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["tiny"] and row["family"] == "flat"
    assert row["latency_ms"]["torch"] > 0 and row["latency_ms"]["onnxruntime"] > 0
    assert row["throughput_speedup"] > 0 and "flat" in capsys.readouterr().out
