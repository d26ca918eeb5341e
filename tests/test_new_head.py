"""The acid test of the model contract: a head that exists only in one file outside the package (named by
``HIERVISION_MODELS``) passes the contract tests, is a ``train FOLDER --method``, trains, exports, predicts
through the runtime and serves, with no other file edited."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, post_image
from test_recipe import TINY, _folder

ROOT = Path(__file__).resolve().parents[1]

#: a cosine-prototype head written against the public contract alone, as a newcomer would
HEAD = textwrap.dedent('''
    """Cosine prototypes: one unit vector per end class, logits = scale × cosine with the image's features."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from hiervision.decoding import Prediction
    from hiervision.models import HierarchicalClassifier, register_model


    class CosinePrototypes(HierarchicalClassifier):
        def __init__(self, taxonomy, scale: float = 10.0, **kwargs):
            if kwargs.get("multi_label"):
                raise ValueError("model cosine_proto is single-label (one softmax over the leaves)")
            super().__init__(taxonomy, **kwargs)
            self.scale = scale
            self.register_buffer("leaves", torch.tensor(taxonomy.leaves), persistent=False)
            self.prototypes = nn.Parameter(torch.randn(len(taxonomy.leaves), self.backbone.num_features))

        def forward(self, images):
            z = F.normalize(self.backbone(images).float(), dim=1)
            return {"logits": self.scale * z @ F.normalize(self.prototypes, dim=1).T}

        def loss(self, outputs, targets):
            below = self.tables.is_ancestor(targets.unsqueeze(1), self.leaves)  # coarse labels by their marginal
            logp = outputs["logits"].float().log_softmax(1).masked_fill(~below, float("-inf"))
            return -torch.logsumexp(logp, 1).mean()

        def _scores(self, logits):
            probs = logits.float().softmax(1)
            scores = self.tables.scatter_subtree_sum(probs, self.leaves)
            scores[:, 0] = 0  # the root is no answer
            return probs, scores

        def decode(self, outputs):
            probs, scores = self._scores(outputs["logits"])
            best_prob, best = probs.max(1)
            return Prediction(self.tables.paths[self.leaves[best]], scores, best_prob)

        def decoder_settings(self):
            return {"kind": "exact", "end_nodes": "leaves"}

        def export_outputs(self, images):
            probs, scores = self._scores(self(images)["logits"])
            rows = probs.new_zeros(self.taxonomy.num_nodes, len(probs)).index_copy_(0, self.leaves, probs.T)
            return {"scores": scores, "path_logprob": torch.log(rows).T}


    @register_model("cosine_proto", multi_label=False, given=False, method={"train": {"lr": 0.05}})
    def cosine_proto(taxonomy, **kwargs):
        return CosinePrototypes(taxonomy, **kwargs)
''')


def _run(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def head_env(tmp_path) -> dict:
    head = tmp_path / "cosine_head.py"
    head.write_text(HEAD)
    return {**os.environ, "HIERVISION_MODELS": str(head), "PYTHONPATH": str(ROOT / "tests")}


@pytest.mark.slow  # subprocesses: the contract tests, then train → export → predict → serve
@pytest.mark.timeout(600)
def test_a_head_in_one_file_passes_the_contract_trains_exports_predicts_and_serves(head_env, tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    tests = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cosine_proto",
                  "tests/test_models.py", "tests/test_model_contract.py"], head_env)
    assert tests.returncode == 0, tests.stdout[-3000:]
    passed = re.search(r"(\d+) passed", tests.stdout)
    assert passed and int(passed.group(1)) >= 8, tests.stdout[-3000:]  # the contract's tests picked the head up

    hv = [sys.executable, "-m", "hiervision"]
    photos, run = _folder(tmp_path / "photos"), tmp_path / "run"
    sets = [a for s in [*TINY, "train.epochs=1"] for a in ("--set", s)]
    trained = _run([*hv, "train", str(photos), "--method", "cosine_proto", "--out", str(run), *sets], head_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "cosine_proto" and cfg["train"]["lr"] == 0.05  # the head's own --method options

    image = next(photos.rglob("*.png"))
    exported = _run([*hv, "export", str(run), "--out", str(tmp_path / "m.onnx")], head_env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    by_run, by_onnx = ([json.loads(line) for line in _run([*hv, "predict", str(src), str(image)], head_env)
                        .stdout.splitlines() if line.startswith("{")] for src in (run, tmp_path / "m.onnx"))
    assert by_run and [r["path"] for r in by_run] == [r["path"] for r in by_onnx]

    port = free_port()
    server = subprocess.Popen([*hv, "serve", str(run), "--port", str(port)], env=head_env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.2)
        record = post_image(f"http://127.0.0.1:{port}", image)
    finally:
        server.terminate()
        server.wait(10)
    assert record["path"] == by_run[0]["path"]


def test_a_missing_head_file_is_one_line(tmp_path) -> None:
    from hiervision.models import load_plugins

    with pytest.raises(FileNotFoundError, match=r"HIERVISION_MODELS: .*nope\.py: no such head file"):
        load_plugins(str(tmp_path / "nope.py"))
    with pytest.raises(ValueError, match="HIERVISION_MODELS: no_such_module_xyz: no such module"):
        load_plugins("no_such_module_xyz")
