"""benchmarks/gpu_check.sh runs every code path on a CPU with a tiny budget (the GPU run is the real one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~90 s in a full run on a shared 2-core CPU: room for a busier one
def test_gpu_check_runs_on_cpu_with_a_tiny_budget(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "HIERVISION_FASHION_MNIST": os.environ.get("HIERVISION_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--budget", "tiny",
                           "--runs", str(tmp_path / "runs"), "--json", str(report)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(report.read_text())
    fm = r["throughput"]["Fashion-MNIST 28×28"]
    assert set(fm) >= {"flat", "DHNN CNN-RNN-Resi", "DHNN CNN-S2S-Linear", "Guo CNN-RNN", "HierNet (given tree)"}
    assert fm["flat"]["ratio_to_flat"] == 1.0 and all(v["images_per_s"] > 0 for v in fm.values())
    assert all(0 <= v["path_accuracy"] <= 1 for v in r["training"].values())
