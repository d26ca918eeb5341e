"""benchmarks/serve_load.py --tiny: both server configurations answer every request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiervision.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_load_tiny(tmp_path):
    cfg = {"data": {"name": "synthetic", "n_train": 128, "n_test": 32, "size": 16},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
           "train": {"epochs": 1, "batch_size": 64, "amp": "none"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(tmp_path / "run"),
                           "--tiny", "--clients", "3", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"micro-batching", "no batching"}
    for r in rows.values():
        assert r["sent"] == r["ok"] == 3 * 6 and r["failed"] == 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert rows["no batching"]["mean_batch"] == 1.0
    assert "| micro-batching" in proc.stdout
