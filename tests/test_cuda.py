"""The CUDA path (run by benchmarks/gpu_check.sh on a GPU machine; skipped without CUDA).

What only a GPU shows: autocast dtypes of the LSTMs and of decoding, the fp16 gradient scaler,
evaluation on the device reproducing the run's metrics, torch.compile, and training every method.
"""

from __future__ import annotations

import json

import pytest
import torch

from hiervision.cli import main
from hiervision.config import load_config
from hiervision.distributed import autocast_dtype
from hiervision.models import create_model, list_models
from hiervision.training import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
TINY = ["data={name: synthetic, n_train: 512, n_test: 128, size: 16}", "train.epochs=2", "train.batch_size=64",
        "train.progress=false", "train.device=cuda", "eval.batch_size=256"]
SMALL = "backbone: resnet20, backbone_kwargs: {width: 0.5}"


def test_amp_auto_picks_native_bf16_on_ampere_and_later():
    major, _ = torch.cuda.get_device_capability(CUDA)
    assert autocast_dtype("auto", CUDA) == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_on_cuda_then_evaluate_reproduces_metrics(tmp_path, capsys, amp):
    cfg = load_config(overrides=[*TINY, f"train.amp={amp}", f"model={{name: flat, {SMALL}}}"])
    metrics = train(cfg, tmp_path)
    assert metrics["device"].startswith("cuda") and metrics["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert 0 <= metrics["path_accuracy"] <= 1
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path), "--device", "cuda"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["path_accuracy"] == metrics["path_accuracy"]  # evaluate runs where training ran


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_and_decodes_in_fp32_under_bf16_autocast(name, fmnist_like_trees):
    tree = fmnist_like_trees[name]
    kwargs = {"backbone": "resnet20", "backbone_kwargs": {"width": 0.25}, "in_chans": 1, "image_size": 16}
    if name in ("dhnn_rnn", "dhnn_s2s"):
        kwargs.update(conversion="linear", input_size=16, hidden_size=16)
    if name == "hiernet":
        kwargs.update(split=[5, 7])
    model = create_model(name, tree, **kwargs).to(CUDA)
    x = torch.randn(8, 1, 16, 16, device=CUDA)
    targets = torch.tensor(tree.leaves, device=CUDA)[torch.arange(8, device=CUDA) % len(tree.leaves)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(x), targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model.predict(x)
    assert pred.scores.dtype == torch.float32 and pred.path_prob.dtype == torch.float32


def test_compiled_training_runs(tmp_path):
    cfg = load_config(overrides=[*TINY, "train.epochs=1", "train.compile=true", f"model={{name: flat, {SMALL}}}"])
    assert 0 <= train(cfg, tmp_path)["path_accuracy"] <= 1


@pytest.fixture
def fmnist_like_trees():
    from hiervision.data.fashion_mnist import fashion_mnist_taxonomy

    fixed, var = fashion_mnist_taxonomy(), fashion_mnist_taxonomy(variable_depth=True)
    return {name: (var if name in ("dhnn_s2s", "guo_rnn") else fixed) for name in list_models()}
