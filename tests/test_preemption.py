"""Preemption: SIGTERM/SIGKILL inside epoch 2 of 3, rerun the command, end with the same weights as one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hiervision.config import load_config
from hiervision.training import train

OVERRIDES = [
    "data={name: synthetic, n_train: 720, n_test: 64, size: 16}",
    "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}",
    "train.epochs=3", "train.batch_size=32", "train.progress=false", "train.amp=none",
    "train.checkpoint_every=2", "train.threads=1",
]


def _state(path: Path) -> dict | None:
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # not written yet, or being replaced right now
        return None


def _start(cfg_file: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hiervision", "train", str(cfg_file), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_inside_epoch_2(proc: subprocess.Popen, last: Path, timeout: float = 120) -> None:
    """Until last.pt is a mid-epoch checkpoint of epoch 2 (1 epoch done, some steps of the next)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        s = _state(last) if last.exists() else None
        if s is not None and s["epoch"] == 1 and s["step"] >= 2:
            return
        time.sleep(0.02)
    raise AssertionError("the run never reached epoch 2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ref")
    cfg = load_config(overrides=OVERRIDES)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    train(cfg, tmp / "run")
    return tmp / "cfg.yaml", torch.load(tmp / "run" / "last.pt", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kill_inside_epoch_2_then_resume_is_bit_identical(reference, tmp_path, sig):
    cfg_file, ref = reference
    out = tmp_path / "run"
    proc = _start(cfg_file, out)
    _wait_inside_epoch_2(proc, out / "last.pt")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["step"], (saved["epoch"], saved["step"])  # stopped inside epoch 2
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "checkpoint saved" in err and "resume" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    again = _start(cfg_file, out)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    final = torch.load(out / "last.pt", weights_only=True)
    _assert_same_weights(final["model"], ref["model"])
    assert [r["epoch"] for r in final["history"]] == [1, 2, 3]
    assert (out / "metrics.json").is_file()


def test_accumulated_micro_batches_match_one_batch_without_batch_norm(tmp_path):
    """train.accumulate splits the step's batch; with a BN-free head (frozen backbone features) the update is
    the same as one full batch, up to float rounding."""
    base = ["data={name: synthetic, n_train: 256, n_test: 64, size: 16}",
            "model={name: guo_multihead, backbone: resnet20, backbone_kwargs: {width: 0.25}, strategy: parallel}",
            "train.epochs=1", "train.batch_size=64", "train.progress=false", "train.amp=none",
            "train.precompute_features=true"]
    train(load_config(overrides=base), tmp_path / "one")
    train(load_config(overrides=[*base, "train.accumulate=4"]), tmp_path / "four")
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "four" / "last.pt", weights_only=True)["model"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


def test_exploding_loss_stops_with_a_clear_message(tmp_path):
    from hiervision.training import TrainingError

    cfg = load_config(overrides=[*OVERRIDES[:2], "train.epochs=1", "train.batch_size=32", "train.progress=false",
                                 "train.amp=none", "train.max_loss=0.5"])
    with pytest.raises(TrainingError, match=r"loss .* exceeds train.max_loss=0.5 at epoch 1, step 1"):
        train(cfg, tmp_path)
