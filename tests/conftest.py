"""Shared fixtures: tiny trees and a tiny, fast training config."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hiervision import Taxonomy
from hiervision.config import load_config

if "OMP_NUM_THREADS" not in os.environ:
    # under pytest-xdist (`-n auto`) the workers share the cores: torch threads beyond a worker's share only
    # contend (on 2 cores, 2 workers of 1 thread run the suite in ~8 min against ~14 for 1 process of 2)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    if workers > 1:  # and the runs a test starts in a subprocess (CLI, torchrun) take the same share
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

SHARED = Path(os.environ.get("HIERVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FMNIST = Path(os.environ.get("HIERVISION_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture
def koo_tree() -> Taxonomy:
    """The tree of Koo et al.'s slides: Root; A, B; A -> C, D; B -> E, F, G."""
    return Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B"})


@pytest.fixture
def tiny_cfg() -> dict:
    """A config that trains in about a second: synthetic images, a narrow ResNet-8-like net."""
    return load_config(
        overrides=[
            "data={name: synthetic, n_train: 320, n_test: 128, size: 16}",
            "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}",
            "train.epochs=2",
            "train.batch_size=64",
            "train.progress=false",
            "train.amp=none",
            "eval.batch_size=256",
        ]
    )


# ----------------------------------------------------------------------------- a real server on 127.0.0.1
def training_losses(model, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """The loss of each of ``steps`` optimizer steps on one fixed batch: a head that learns drives it down."""
    losses = []
    for _ in range(steps):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, **config) -> Iterator[int]:
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port (yielded) until the block ends."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def post_image(base: str, image: Path, query: str = "") -> dict:
    """``POST base/predict?query`` with one image as the multipart field ``file``: its record."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/predict{'?' + query if query else ''}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.load(urllib.request.urlopen(req, timeout=30))["results"][0]
