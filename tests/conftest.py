"""Shared fixtures: tiny trees and a tiny, fast training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hiervision import Taxonomy
from hiervision.config import load_config

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

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
