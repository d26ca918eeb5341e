"""The deploy half of the model contract: every registered model decodes through the runtime as it
predicts, and a head written in this file alone exports, runtime-predicts and serves (no edit to
``export.py``, ``runtime.py`` or the server: a new head is one file plus ``@register_model``)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hiervision.decoding import Prediction, exact_best_path, prefix_logprob
from hiervision.export import sidecar, torch_engine
from hiervision.models import HierarchicalClassifier, create_model, list_models, register_model
from hiervision.models.hiernet import HierNet
from hiervision.models.registry import _MODELS
from hiervision.runtime import Predictor
from hiervision.taxonomy import PAD, Taxonomy
from test_models import EXTRA, SMALL

TREE = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f", "b/g"])
SIZE = SMALL["image_size"]
META = {"in_chans": 1, "image_size": [SIZE, SIZE], "mean": [0.5], "std": [0.25]}
#: every registered model, plus variants that take another code path (HierNet with branch_depth=1: the whole
#: tree scored by one sub-tree classifier, as on big trees; conditional and routing)
CASES = [pytest.param(name, EXTRA.get(name, {}), id=name) for name in list_models()] + [
    pytest.param("hiernet", {"branch_depth": 1, "eval_mode": mode}, id=f"hiernet-branch_depth-1-{mode}")
    for mode in HierNet.eval_modes]


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, SIZE, SIZE), dtype=np.float32)


def predicted_paths(model: nn.Module, x: np.ndarray) -> list[list[int]]:
    pred = model.predict((torch.from_numpy(x) - META["mean"][0]) / META["std"][0])
    return [[n for n in row if n != PAD] for row in pred.paths.tolist()]


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_every_registered_model_decodes_through_the_runtime_as_it_predicts(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, TREE, **SMALL, **kwargs).eval()
    settings = model.decoder_settings()
    assert isinstance(settings["kind"], str) and settings["end_nodes"] in ("leaves", "all")
    predictor = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), top_k=2)
    x = images()
    records = predictor.predict_arrays(x)
    assert [r["path_ids"] for r in records] == predicted_paths(model, x)


# the decoders' children (hierarchical) step softmax: the exported step hands the runtime N+1 columns
CHILDREN = [("guo_rnn", {"step_softmax": "children"}), ("guo_rnn", {"step_softmax": "children", "decode": "beam"}),
            ("dhnn_s2s", {"step_softmax": "children"}), ("dhnn_rnn", {"step_softmax": "children"}),
            ("dhnn_rnn", {"step_softmax": "children", "decode": "beam"})]


@pytest.mark.parametrize("name,kwargs", CHILDREN)
def test_children_softmax_decoders_decode_through_the_runtime_as_they_predict(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, TREE, **SMALL, **EXTRA.get(name, {}), **kwargs).eval()
    predictor = Predictor(sidecar=sidecar(model, META), engine=torch_engine(model), top_k=2)
    x = images()
    assert [r["path_ids"] for r in predictor.predict_arrays(x)] == predicted_paths(model, x)


def assert_onnx_runtime_decodes_as_predicted(model: HierarchicalClassifier, tmp_path) -> None:
    """Export ``model``; the ONNX runtime finds the paths it predicts, with their probabilities."""
    from hiervision.export import export_model

    export_model(model, META, tmp_path / "m.onnx")
    x = images()
    records = Predictor(tmp_path / "m.onnx", top_k=2).predict_arrays(x)
    assert [r["path_ids"] for r in records] == predicted_paths(model, x)
    want = model.predict((torch.from_numpy(x) - META["mean"][0]) / META["std"][0]).path_prob
    np.testing.assert_allclose([r["path_probability"] for r in records], want.numpy(), rtol=1e-4)
    side_path = tmp_path / "m.json"
    side = json.loads(side_path.read_text())
    if side["decoder"].get("candidates"):  # the step graph scores asked tokens: a sidecar saying otherwise is refused
        side["decoder"]["candidates"] = False
        side_path.write_text(json.dumps(side))
        with pytest.raises(ValueError, match="is not the decoder the graph was exported with"):
            Predictor(tmp_path / "m.onnx")  # the graph's own record of its decoder refuses it first


@pytest.mark.slow  # one ONNX export per registered model (the exporter traces each: seconds apiece)
@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_every_registered_model_exports_and_the_onnx_runtime_decodes_as_it_predicts(name: str, kwargs: dict,
                                                                                    tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [export] extra is not installed")
    torch.manual_seed(0)
    model = create_model(name, TREE, **SMALL, **kwargs).eval()
    assert_onnx_runtime_decodes_as_predicted(model, tmp_path)


@pytest.mark.slow  # an ONNX export apiece
@pytest.mark.parametrize("name,kwargs", CHILDREN[::2])
def test_children_softmax_decoders_export_and_the_onnx_runtime_decodes_as_they_predict(name: str, kwargs: dict,
                                                                                      tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [export] extra is not installed")
    torch.manual_seed(0)
    model = create_model(name, TREE, **SMALL, **EXTRA.get(name, {}), **kwargs).eval()
    assert_onnx_runtime_decodes_as_predicted(model, tmp_path)


class LocalSoftmax(HierarchicalClassifier):
    """A toy head: one softmax over each inner node's children (a local classifier per parent node)."""

    def __init__(self, taxonomy: Taxonomy, **kwargs) -> None:
        super().__init__(taxonomy, **kwargs)
        self.fc = nn.Linear(self.backbone.num_features, taxonomy.num_nodes)
        parent = torch.tensor(taxonomy.parents[1:])
        self.register_buffer("sibling", (parent[:, None] == parent[None, :]), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.backbone(images))}

    def _node_logprob(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-softmax among siblings (column 0, the root, is 0)."""
        z = logits[:, 1:].float()
        masked = z[:, None, :].masked_fill(~self.sibling, float("-inf"))  # (B, N, N): tiny trees only
        return F.pad(z - torch.logsumexp(masked, dim=2), (1, 0))

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        path_lp = prefix_logprob(self.taxonomy, self._node_logprob(outputs["logits"]))
        return -path_lp.gather(1, targets[:, None]).mean()

    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        node_lp = self._node_logprob(outputs["logits"])
        nodes, lp = exact_best_path(self.tables, node_lp)
        return Prediction(self.tables.paths[nodes], prefix_logprob(self.taxonomy, node_lp).exp(), lp.exp())

    def decoder_settings(self) -> dict:
        return {"kind": "exact", "end_nodes": "leaves"}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        path_lp = prefix_logprob(self.taxonomy, self._node_logprob(self(images)["logits"]))
        return {"scores": path_lp.exp(), "path_logprob": path_lp}


@pytest.fixture
def toy_registered():
    register_model("toy_local_softmax")(lambda taxonomy, **kw: LocalSoftmax(taxonomy, **kw))
    yield "toy_local_softmax"
    _MODELS.pop("toy_local_softmax")


def test_a_head_defined_in_one_file_exports_runtime_predicts_and_serves(toy_registered, tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [export] extra is not installed")
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from hiervision.export import export_model
    from hiervision.serve import create_app
    from hiervision.serve.predictor import RuntimePredictor

    torch.manual_seed(0)
    model = create_model(toy_registered, TREE, **SMALL).eval()
    x = images(8)
    want = predicted_paths(model, x)
    export_model(model, META, tmp_path / "toy.onnx")
    onnx_predictor = Predictor(tmp_path / "toy.onnx", top_k=2)
    assert [r["path_ids"] for r in onnx_predictor.predict_arrays(x)] == want

    buf = io.BytesIO()
    Image.fromarray((x[0, 0] * 255).round().astype(np.uint8)).save(buf, "PNG")
    with TestClient(create_app(RuntimePredictor(onnx_predictor))) as client:
        answer = client.post("/predict", files=[("file", ("a.png", buf.getvalue(), "image/png"))])
    assert answer.status_code == 200, answer.text
    record = answer.json()["results"][0]
    assert record["path"] == [TREE.names[n] for n in record["path_ids"]] and record["path_ids"] in (
        [[TREE.parents[leaf], leaf] for leaf in TREE.leaves])
