"""DDP through torchrun (gloo, 2 CPU processes): every method trains, shards add up, one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FMNIST
from hiervision.config import load_config
from hiervision.data import BatchLoader, TensorImageDataset
from hiervision.distributed import DistEnv, gather_rows, interleave, shard_indices
from hiervision.training import train

HAVE_FMNIST = any(FMNIST.glob("train-images-idx3-ubyte*"))
TINY = ["train.progress=false", "train.amp=none", "train.augment={pad: 0, flip: false}", "eval.batch_size=256",
        "train.batch_size=64"]
SYN = "data={name: synthetic, n_train: 128, n_test: 64, size: 16}"
SYN_VAR = "data={name: synthetic_var, n_train: 128, n_test: 64, size: 16}"
SMALL = "backbone: resnet20, backbone_kwargs: {width: 0.25}"
# every method, as the DDP job trains it (one epoch each, tiny)
METHODS: dict[str, list[str]] = {
    "flat": [SYN, f"model={{name: flat, {SMALL}}}"],
    "dhnn_rnn": [SYN, f"model={{name: dhnn_rnn, {SMALL}, conversion: pool, pool_fallback: project, input_size: 16, "
                      "hidden_size: 16, residual: true}"],
    "dhnn_s2s": [SYN_VAR, f"model={{name: dhnn_s2s, {SMALL}, conversion: linear, input_size: 16, hidden_size: 16}}"],
    "guo_multihead": [SYN, f"model={{name: guo_multihead, {SMALL}, strategy: coarse_to_fine}}"],
    "guo_rnn": [SYN_VAR, f"model={{name: guo_rnn, {SMALL}, embed_size: 8, hidden_size: 16}}"],
    "hiernet": [SYN, f"model={{name: hiernet, {SMALL}, split: [5, 7], extra_blocks: 1}}"],
    "guo_rnn_features": [SYN, f"model={{name: guo_rnn, {SMALL}, embed_size: 8, hidden_size: 16}}",
                         "train.precompute_features=true"],
    "guo_rnn_pseudo": ["data={name: synthetic, n_train: 128, n_test: 64, size: 16, fine_fraction: 0.5, "
                       "coarse_fraction: 0.5, coarse_level: 2, coarse_labels: coarse}",
                       f"model={{name: guo_rnn, {SMALL}, embed_size: 8, hidden_size: 16}}", "train.pseudo_labels=true"],
}


def torchrun(spec: list[dict], tmp: Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).with_name("ddp_worker.py")), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_rank_slices_add_up_to_the_single_process_batches(koo_tree):
    ids = torch.arange(203, dtype=torch.uint8)  # each image holds its own index
    ds = TensorImageDataset(ids.view(-1, 1, 1, 1), torch.full((203,), koo_tree.leaves[0]), koo_tree)

    def batches(**kw) -> list[torch.Tensor]:
        return [(x.flatten() * 255).round().long() for x, _ in BatchLoader(ds, 32, shuffle=True, seed=3, **kw)
                .set_epoch(1)]

    one = batches()
    ranks = [batches(rank=r, world_size=3) for r in range(3)]
    assert all(len(r) == len(one) for r in ranks)  # the same number of steps on every rank
    for step, whole in enumerate(one):
        parts = [r[step] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)  # rank slices are contiguous pieces of the global batch
    # mid-epoch resume: the remaining steps are the same slices
    rest = [(x.flatten() * 255).round().long()
            for x, _ in BatchLoader(ds, 32, shuffle=True, seed=3, rank=1, world_size=3).set_epoch(1, 4)]
    assert all(torch.equal(a, b) for a, b in zip(rest, ranks[1][4:]))


def test_shards_cover_every_sample_once_and_gather_restores_order():
    n, world = 11, 3
    shards = [shard_indices(n, DistEnv(r, world, r, torch.device("cpu"))) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    # what each rank holds after scoring its shard, padded as gather_rows pads it, put back in order
    values = torch.arange(n) * 10
    longest = -(-n // world)
    padded = [torch.cat([values[s], torch.full((longest - len(s),), -1)]) for s in shards]
    assert torch.equal(interleave(padded, n), values)
    assert gather_rows(torch.arange(5), 5, DistEnv(0, 1, 0, torch.device("cpu"))).tolist() == list(range(5))


@pytest.mark.slow
def test_every_method_trains_under_ddp(tmp_path):
    spec = [{"out": str(tmp_path / name), "overrides": [*TINY, "train.epochs=1", *extra]}
            for name, extra in METHODS.items()]
    torchrun(spec, tmp_path)
    for name in METHODS:
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["world_size"] == 2, name
        assert m["num_samples"] == 64, name  # every test image counted exactly once after the gather
        assert 0.0 <= m["path_accuracy"] <= 1.0
    assert (tmp_path / "guo_rnn_pseudo" / "round1" / "pseudo_labels.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="real Fashion-MNIST not installed")
def test_two_processes_match_one_process_on_real_data(tmp_path):
    """2 gloo ranks × global batch 128 vs 1 process × batch 128 in 2 micro-batches (so batch norm sees the same
    64-image slices as each rank): same sample order, same weights within float tolerance after 8 steps."""
    over = ["data={name: fashion_mnist, limit_train: 1100, limit_test: 200, val_fraction: 0.07}",
            "model={name: flat, backbone: resnet20, backbone_kwargs: {width: 0.5}}", "train.epochs=1",
            "train.progress=false", "train.amp=none", "train.batch_size=128", "train.lr=0.05",
            "train.augment={pad: 0, flip: false}"]  # augmentation draws are per rank: off for the comparison
    torchrun([{"out": str(tmp_path / "ddp"), "overrides": over}], tmp_path)
    one = train(load_config(overrides=[*over, "train.accumulate=2"]), tmp_path / "one")
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 0 and a["epoch"] == b["epoch"] == 1
    params = [k for k in a["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    diff = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in params)
    assert diff < 1e-4, diff
    assert ddp["num_samples"] == one["num_samples"] == 200
