"""ONNX export of every family: onnxruntime + the numpy decoders give what ``model.predict`` gives,
on 1000 real Fashion-MNIST test images (randomly initialised models with a fixed seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the [export] extra is not installed")
pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
pytest.importorskip("onnxscript", reason="the [export] extra is not installed")

from hiervision.export import export_model  # noqa: E402
from hiervision.runtime import Predictor  # noqa: E402
from test_runtime import META, assert_parity, build, fmnist_images, needs_fmnist, reference  # noqa: E402

# one variant per family; the other decoder kinds are held to model.predict in test_runtime.py
FAMILIES = ["flat", "dhnn_rnn_exact", "dhnn_s2s_label", "guo_multihead_independent", "guo_rnn_beam",
            "hiernet_conditional"]


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("variant", FAMILIES)
def test_onnx_runtime_matches_model_predict(variant, tmp_path):
    model = build(variant)
    written = export_model(model, META, tmp_path / "m.onnx")
    side = json.loads((tmp_path / "m.json").read_text())
    assert written[0].name == "m.onnx" and written[-1].name == "m.json"
    assert side["image_size"] == [28, 28] and side["decoder"]["kind"]
    # dynamic batch axis on every graph input
    for path in written[:-1]:
        graph = onnx.load(str(path)).graph
        assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input), path.name
    assert (len(written) == 3) == (side["step_graph"] is not None)  # encoder + one step for autoregressive heads
    images = fmnist_images(1000)
    predictor = Predictor(tmp_path / "m.onnx", top_k=3, batch_size=256, threads=1)
    records = predictor.predict_arrays(images)
    assert_parity(records, reference(model, images), in_tree=variant != "guo_multihead_independent")
    # batch of one through the same graph
    one = predictor.predict_arrays(images[:1])[0]
    assert one["path_ids"] == records[0]["path_ids"]
    assert abs(one["path_probability"] - records[0]["path_probability"]) < 1e-5


def test_export_refuses_a_name_without_onnx_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        export_model(build("flat"), META, tmp_path / "m.bin")
    assert not np.any([p.exists() for p in tmp_path.iterdir()])
