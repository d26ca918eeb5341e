"""benchmarks/pipeline.py runs end to end on its --tiny budget and writes its JSON and RESULTS.md section."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import SHARED

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
TINY_IMAGENET = SHARED / "tiny-imagenet-200"


@pytest.mark.skipif(not (TINY_IMAGENET / "train").is_dir(), reason=f"Tiny-ImageNet not found at {TINY_IMAGENET}")
def test_pipeline_benchmark_tiny(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: its neighbours import
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "RESULTS.md").write_text("# Results\n\n## pipeline\nold\n\n## other\nkept\n", encoding="utf-8")
    out = tmp_path / "results"
    assert mod.main(["--tiny", "--root", str(TINY_IMAGENET), "--out", str(out), "--write-results"]) == 0
    result = json.loads((out / "pipeline.json").read_text())
    assert set(result["pipeline_images_per_s"]) == {"0", "1"} and result["images"] == 24
    assert result["model_images_per_s"] > 0 and all(r > 0 for r in result["ratio"].values())
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.count("## pipeline") == 1 and "old" not in md and "## other\nkept" in md
    assert "| 1 |" in md and "--tiny" in md
