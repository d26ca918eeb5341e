"""The numpy runtime decoders against the PyTorch reference (hiervision.decoding and model.predict).

The runtime's decoders are the one implementation the ONNX path and ``hiervision predict`` share;
here each is held to what the PyTorch model itself predicts, image by image, on real Fashion-MNIST.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hiervision.data.fashion_mnist import fashion_mnist_taxonomy, read_idx
from hiervision.decoding import beam_search as torch_beam_search
from hiervision.decoding import threshold_paths as torch_threshold_paths
from hiervision.export import sidecar, torch_engine
from hiervision.models.registry import create_model
from hiervision.records import TreeView
from hiervision.runtime import Predictor, beam_search, threshold_paths
from hiervision.taxonomy import PAD, Taxonomy

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
META = {"in_chans": 1, "image_size": [28, 28], "mean": [0.286], "std": [0.353]}
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 28, "backbone_kwargs": {"width": 0.25}}
DHNN = {"conversion": "pool", "pool_fallback": "project", "input_size": 16, "hidden_size": 16}

# every decoder kind of the runtime: (model name, config, multi-label)
VARIANTS = {
    "flat": ("flat", {}, False),
    "flat_multi_label": ("flat", {}, True),
    "dhnn_rnn_exact": ("dhnn_rnn", DHNN, False),
    "dhnn_rnn_beam": ("dhnn_rnn", {**DHNN, "decode": "beam", "beam_width": 2}, False),
    "dhnn_s2s_label": ("dhnn_s2s", DHNN, False),
    "dhnn_s2s_output_exact": ("dhnn_s2s", {**DHNN, "feed": "output"}, False),
    "dhnn_s2s_output_beam": ("dhnn_s2s", {**DHNN, "feed": "output", "decode": "beam"}, False),
    "guo_multihead_independent": ("guo_multihead", {}, False),
    "guo_multihead_exact": ("guo_multihead", {"decode": "exact"}, False),
    "guo_rnn_greedy": ("guo_rnn", {"embed_size": 8, "hidden_size": 16}, False),
    "guo_rnn_beam": ("guo_rnn", {"embed_size": 8, "hidden_size": 16, "decode": "beam"}, False),
    "hiernet_conditional": ("hiernet", {"split": [5, 7], "extra_blocks": 1}, False),
    "hiernet_routing": ("hiernet", {"split": [5, 7], "extra_blocks": 1, "eval_mode": "routing"}, False),
}


def fmnist_images(n: int) -> np.ndarray:
    """The first ``n`` real Fashion-MNIST test images, ``(n, 1, 28, 28)`` float32 in [0, 1]."""
    return read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:n, None].astype(np.float32) / 255


def build(variant: str, seed: int = 0):
    """A randomly initialised (fixed-seed) model of one variant on the Fashion-MNIST tree."""
    name, cfg, multi = VARIANTS[variant]
    torch.manual_seed(seed)
    return create_model(name, fashion_mnist_taxonomy(), multi_label=multi, **SMALL, **cfg).eval()


def reference(model, images: np.ndarray):
    """``model.predict`` on the same normalised batch the runtime feeds its engine."""
    x = (torch.from_numpy(images) - META["mean"][0]) / META["std"][0]
    return model.predict(x)


def assert_parity(records: list[dict], pred, in_tree: bool = True) -> None:
    """Same decoded path on ≥ 99.9 % of images, path probabilities within 1e-4, node probabilities
    equal to ``Prediction.scores`` on the path. ``in_tree``: the decoder only returns tree paths, so
    the best alternative is at least as probable (each level's own argmax may leave the tree)."""
    paths = [[int(n) for n in row if n != PAD] for row in pred.paths]
    same = np.mean([r["path_ids"] == p for r, p in zip(records, paths)])
    assert same >= 0.999, f"same path on {same:.4f} of images"
    for r, p, prob, scores in zip(records, paths, pred.path_prob.tolist(), pred.scores):
        if r["path_ids"] != p:
            continue
        assert abs(r["path_probability"] - prob) <= 1e-4
        assert np.allclose(r["node_probabilities"], scores[p].numpy(), atol=1e-4)
        assert r["top_k"]
        if in_tree:
            assert r["top_k"][0]["probability"] >= r["path_probability"] - 1e-4
    if pred.labels is not None:  # multi-label: the same thresholded set of paths
        tax = fashion_mnist_taxonomy()
        for r, labels in zip(records, pred.labels):
            want = [[tax.names[n] for n in tax.path(e)] for e in labels.nonzero().flatten().tolist()]
            assert r["paths"] == want


@needs_fmnist
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runtime_decoding_matches_model_predict(variant):
    model = build(variant)
    images = fmnist_images(1000)
    predictor = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), top_k=3, batch_size=500)
    records = predictor.predict_arrays(images)
    assert_parity(records, reference(model, images), in_tree=variant != "guo_multihead_independent")
    assert all(len(r["top_k"]) <= 3 for r in records)


@needs_fmnist
@pytest.mark.parametrize("variant", ["guo_rnn_greedy", "dhnn_rnn_beam"])
def test_a_beam_width_given_to_the_predictor_decodes_as_the_model_set_to_it(variant):
    # a width tuned on val after training/export: the sidecar's width is replaced, the graph is the same
    model = build(variant)
    images = fmnist_images(300)
    records = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), beam_width=4).predict_arrays(images)
    model.set_beam_width(4)
    assert_parity(records, reference(model, images))
    flat = build("flat")
    with pytest.raises(ValueError, match=r"FlatClassifier: its decoder \(exact\) has no beam search"):
        Predictor(sidecar=sidecar(flat, META), engine=torch_engine(flat), beam_width=4)
    with pytest.raises(ValueError, match="beam width must be an integer >= 1"):
        Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), beam_width=0)


def _random_tree(seed: int) -> Taxonomy:
    rng = random.Random(seed)
    parent_of: dict[str, str | None] = {}
    for i in range(30):
        parent_of[f"n{i}"] = None if i < 3 or rng.random() < 0.1 else f"n{rng.randrange(i)}"
    return Taxonomy.from_parent_map(parent_of)


@pytest.mark.parametrize(("width", "end_nodes"), [(1, "leaves"), (3, "leaves"), (4, "all")])
def test_numpy_beam_search_matches_torch(width, end_nodes):
    tax = _random_tree(1)
    tree = TreeView(tuple(tax.names), tuple(tax.parents))
    torch.manual_seed(0)
    b, steps = 32, tax.max_depth + 1
    step_lp = torch.log_softmax(torch.randn(b, steps, tax.num_nodes) * 3, -1)
    rep = step_lp.repeat_interleave(width, 0)
    want_paths, want_lp = torch_beam_search(tax, lambda tok, t: (rep[:, t], t + 1), b, width, end_nodes, steps, 0)
    rep_np = rep.numpy()
    paths, lp, prefix = beam_search(tree, lambda tok, t: (rep_np[:, t], t + 1), b, width, end_nodes, steps, 0)
    assert np.array_equal(paths, want_paths.numpy())
    assert np.allclose(lp, want_lp.numpy(), atol=1e-5)
    # the prefix log-probabilities of the best beam add up to its path log-probability
    finite = np.isfinite(lp[:, 0])
    depth = (paths[:, 0] != PAD).sum(1)
    last = prefix[np.arange(b), 0, np.maximum(depth - 1, 0)]
    assert np.all(last[finite] >= lp[finite, 0] - 1e-6)


@pytest.mark.parametrize(("width", "end_nodes"), [(1, "leaves"), (3, "all")])
def test_a_step_asked_for_its_candidates_searches_as_the_dense_step(width, end_nodes):
    """A step that returns raw logits of the tokens it is asked for (a children-softmax export), normalised
    per beam over the tokens allowed after its node, finds what a step over all N+1 columns finds."""
    tax = _random_tree(3)
    tree = TreeView(tuple(tax.names), tuple(tax.parents))
    rng = np.random.default_rng(0)
    b, steps = 16, tax.max_depth + 1
    logits = rng.normal(size=(steps, b * width, tax.num_nodes)) * 3
    ends = tree.end_mask(end_nodes)
    asked_sizes = []

    def dense(tokens, t):
        allowed = (tree.parent[None, :] == tokens[:, None]) & (np.arange(tax.num_nodes) > 0)
        allowed[:, 0] = ends[tokens]
        z = np.where(allowed, logits[t], -np.inf)
        return z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True), t + 1

    def asked(tokens, t, candidates):
        asked_sizes.append(len(candidates))
        return logits[t][:, candidates], t + 1

    want = beam_search(tree, dense, b, width, end_nodes, steps, 0)
    got = beam_search(tree, asked, b, width, end_nodes, steps, 0, asked=True)
    assert np.array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-9)
    assert max(asked_sizes) < tax.num_nodes  # asked only for what some beam may take next


def test_numpy_threshold_paths_matches_torch():
    tax = _random_tree(2)
    tree = TreeView(tuple(tax.names), tuple(tax.parents))
    torch.manual_seed(1)
    scores = torch.rand(64, tax.num_nodes)
    want = torch_threshold_paths(tax, scores, 0.4).numpy()
    assert np.array_equal(threshold_paths(tree, scores.numpy(), 0.4), want)


def test_runtime_imports_and_predicts_without_torch(tmp_path):
    """A stub engine stands in for onnxruntime, in an interpreter that cannot import torch or yaml: the
    runtime (and the sidecar checks, and the server's predictor adapter) need numpy, Pillow and onnxruntime only."""
    tax = fashion_mnist_taxonomy()
    side = {"taxonomy": tax.to_dict(), "in_chans": 1, "image_size": [28, 28], "mean": [0.0], "std": [1.0],
            "decoder": {"kind": "exact", "end_nodes": "leaves"}}
    from PIL import Image

    Image.fromarray((fmnist_images(1)[0, 0] * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    code = f"""
import json, sys
class Block:  # torch and yaml cannot be imported at all
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "yaml"):
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import numpy as np
import hiervision.serve.predictor, hiervision.sidecar
from hiervision.runtime import Predictor
class Stub:
    def run(self, images):
        lp = np.log(np.full((len(images), {tax.num_nodes}), 0.5))
        return {{"scores": np.exp(lp), "path_logprob": lp}}
p = Predictor(sidecar=json.loads({str(side)!r}.replace("'", '"').replace("None", "null")), engine=Stub())
recs = p.predict([{str(tmp_path / 'a.png')!r}, {str(tmp_path / 'b.png')!r}])
assert "path" in recs[0] and "error" in recs[1], recs
assert not {{"torch", "yaml"}} & {{m.split(".")[0] for m in sys.modules}}, "torch or yaml was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_engine_predicts_a_single_image_of_every_family():
    """``hiervision predict RUN one.png`` (and a folder whose last batch holds one image) works for
    every family, HierNet included (its eager conditional pass refuses a batch of one)."""
    image = fmnist_images(2)
    for variant in ("flat", "dhnn_s2s_label", "hiernet_conditional"):
        model = build(variant)
        predictor = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), top_k=2)
        one = predictor.predict_arrays(image[:1])[0]
        two = predictor.predict_arrays(image)[0]
        assert one["path_ids"] == two["path_ids"] and len(one["top_k"]) == 2
        assert abs(one["path_probability"] - two["path_probability"]) < 1e-5


def test_numpy_hedged_answers_match_torch():
    """The runtime's DARTS (hedging from an .onnx, no PyTorch) answers as hiervision.decisions does."""
    from hiervision import decisions, runtime
    from hiervision.decoding import Prediction

    tax = fashion_mnist_taxonomy()
    tree = TreeView(tuple(tax.names), tuple(tax.parents))
    rng = np.random.default_rng(0)
    leaves = list(tax.leaves)
    q = rng.dirichlet(np.full(len(leaves), 0.3), size=64)
    scores = np.zeros((64, tax.num_nodes))
    scores[:, leaves] = q
    for leaf in leaves:  # inner nodes: the mass of their leaves (complete scores, as a flat softmax gives)
        for node in tax.path(leaf)[:-1]:
            scores[:, node] += scores[:, leaf]
    scores = np.round(scores, 6)
    pred = Prediction(torch.zeros(64, 1, dtype=torch.long), torch.from_numpy(scores).float(), torch.ones(64))
    for lam in (0.0, 0.5, 3.0, 1e6):
        want = decisions.hedge_records(pred, tax, lam)
        got = runtime.hedge_records(tree, scores, lam)
        assert [g["node"] for g in got] == [w["node"] for w in want]
        assert [g["path"] for g in got] == [w["path"] for w in want]
        assert np.allclose([g["probability"] for g in got], [w["probability"] for w in want], atol=1e-5)
    assert {g["node"] for g in runtime.hedge_records(tree, scores, 1e6)} == {"root"}
