"""Cost of hiervision.bayes.bayes_nodes: Tiny-ImageNet's WordNet tree (10,000 images), then a random
100,001-node tree of depth ~128 (per image). Dirichlet end-class distributions; one core.

    PYTHONPATH=src python benchmarks/bayes_cost.py
"""

from __future__ import annotations

import time

import numpy as np

from hiervision.bayes import bayes_nodes
from hiervision.data.tiny_imagenet import tiny_imagenet_taxonomy
from hiervision.records import TreeView


def seconds(q: np.ndarray, tree, metric: str, inner: bool) -> float:
    t0 = time.perf_counter()
    bayes_nodes(q, tree, metric, inner)
    return time.perf_counter() - t0


def main() -> None:
    rng = np.random.default_rng(0)
    tiny = tiny_imagenet_taxonomy()
    q = np.zeros((10000, tiny.num_nodes))
    q[:, list(tiny.leaves)] = rng.dirichlet(np.full(len(tiny.leaves), 0.05), size=10000)
    for metric in ("hf1", "severity", "path_accuracy"):
        for inner in (False, True):
            print(f"Tiny-ImageNet, 10000 images, {metric}, inner {inner}: {seconds(q, tiny, metric, inner):.2f} s")
    n = 100_000
    parents = [-1, 0] + [int(rng.integers(max(0, i - 2000), i)) for i in range(2, n + 1)]
    tree = TreeView(tuple(f"n{i}" for i in range(n + 1)), tuple(parents))
    leaves = np.flatnonzero(tree.end_mask("leaves"))
    q = np.zeros((8, n + 1))
    q[:, leaves] = rng.dirichlet(np.full(len(leaves), 0.05), size=8)
    for metric in ("hf1", "severity"):
        bayes_nodes(q[:1], tree, metric, True)  # builds the tree's tables once
        print(f"{n + 1} nodes, depth {tree.max_depth}, {metric}: {seconds(q, tree, metric, True) / 8 * 1000:.0f} ms "
              "per image")


if __name__ == "__main__":
    main()
