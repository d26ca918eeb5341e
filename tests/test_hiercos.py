"""Hier-COS (Sani & Anand, CVPR 2026): the path-spread target, the projection-length scores and the size guard,
checked against the authors' numbers and a dense projector."""

from __future__ import annotations

import pytest
import torch

from hiervision import Taxonomy
from hiervision.models import create_model
from hiervision.models.hiercos import path_target

TREE = Taxonomy.from_paths(["a/c/x", "a/c/y", "a/d", "b"])
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 16, "backbone_kwargs": {"width": 0.25}}


def test_the_target_spreads_along_the_path_as_the_authors_do():
    # their util/hiercos_construction.py, printed: shares ∝ exp(2 / (L − ℓ)), the label the most
    t = path_target(torch.tensor([2, 3, 5, 1]), 5)
    assert t[0, :2].tolist() == pytest.approx([0.2689, 0.7311], abs=1e-4) and t[0, 2:].sum() == 0
    assert t[1, :3].tolist() == pytest.approx([0.1616, 0.2255, 0.6129], abs=1e-4)
    assert t[2].tolist() == pytest.approx([0.0982, 0.1085, 0.1282, 0.1789, 0.4863], abs=1e-4)
    assert t[3].tolist() == [1.0, 0, 0, 0, 0]


def test_scores_are_projection_lengths_onto_the_path_subspaces():
    torch.manual_seed(0)
    model = create_model("hiercos", TREE, **SMALL).eval()
    with torch.no_grad():
        out = model.forward_head(torch.randn(3, model.backbone.num_features))
    x = out["coords"]
    assert x.shape == (3, TREE.num_nodes - 1)
    for j, leaf in enumerate(model.classes.tolist()):
        path = list(TREE.path(leaf))
        projector = torch.zeros(TREE.num_nodes - 1, TREE.num_nodes - 1)
        projector[[n - 1 for n in path], [n - 1 for n in path]] = 1  # the path's directions
        assert out["logits"][:, j] == pytest.approx((x @ projector).norm(dim=1), rel=1e-5)
    frame = model.frame
    assert torch.allclose(frame @ frame.T, torch.eye(len(frame)), atol=1e-5)  # orthogonal, fixed
    assert "frame" not in model.state_dict()


def test_a_coarse_label_trains_its_known_prefix():
    torch.manual_seed(0)
    model = create_model("hiercos", TREE, **SMALL).train()
    feats = torch.randn(4, model.backbone.num_features, requires_grad=True)
    out = model.forward_head(feats)
    coarse = torch.full((4,), TREE.names.index("c"))  # "somewhere under c": x or y
    loss = model.loss(out, coarse)
    loss.backward()
    assert torch.isfinite(loss) and feats.grad.abs().sum() > 0
    # the known prefix only: the per-level term has no level below c, so it does not read x's and y's coordinates;
    # for a leaf label (x) it does
    no_aux = create_model("hiercos", TREE, aux_weight=0.0, **SMALL)
    below = [TREE.names.index("x") - 1, TREE.names.index("y") - 1]

    def aux(coords: torch.Tensor, target: torch.Tensor) -> float:
        o = {"coords": coords}
        return float(model.loss(o, target) - no_aux.loss(o, target))

    coords = out["coords"].detach()
    bumped = coords.clone()
    bumped[:, below] += 3.0
    assert aux(bumped, coarse) == pytest.approx(aux(coords, coarse), abs=1e-6)
    leaf = torch.full((4,), TREE.names.index("x"))
    assert abs(aux(bumped, leaf) - aux(coords, leaf)) > 1e-3


def test_a_tree_too_big_for_the_dense_frame_is_one_line(monkeypatch):
    import hiervision.models.hiercos as H

    monkeypatch.setattr(H, "MAX_FRAME_CLASSES", 4)
    with pytest.raises(ValueError, match="6 nodes; its frame and head are dense") as e:
        create_model("hiercos", TREE, **SMALL)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model.aux_weight must be ≥ 0"):
        create_model("hiercos", TREE, aux_weight=-1, **SMALL)
