"""benchmarks/decisions.py --tiny: trains two tiny runs and writes every table, JSON and plot."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "decisions.py"


@pytest.mark.slow
def test_decisions_benchmark_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_decisions", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--results", str(tmp_path), "--targets", "0.9", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "### Calibration" in out and "### Hedged answers" in out and "### CRM vs argmax" in out
    assert "### One temperature per tree level" in out
    saved = json.loads((tmp_path / "decisions-tiny.json").read_text())
    flat = saved["results"]["flat"][0]
    assert [h["target"] for h in flat["hedged"]] == [0.9, 0.99]
    assert flat["calibration"]["after"]["ece"] <= flat["calibration"]["before"]["ece"] + 1e-9
    assert len(flat["curve"]) == len(bench.CURVE_TARGETS)
    nll = flat["per_level"]["nll"]  # fitted on val, so on test only roughly ordered: both beat no calibration
    assert len(flat["per_level"]["temperature"]) == len(flat["calibration"]["after"]["ece_per_level"])
    assert nll["per_level"] <= nll["raw"] + 0.05
    assert [r["target"] for r in flat["same_distribution"]] == [0.9, 0.99]
    assert all(0 <= r["darts_accuracy"] <= 1 and 0 <= r["conformal_accuracy"] <= 1 for r in flat["same_distribution"])
    for f in ("decisions-tiny-curve.png", "decisions-tiny-flat-reliability.png", "decisions-tiny.md"):
        assert (tmp_path / f).stat().st_size > 0
