"""The contract every registered model keeps, checked for all of ``list_models()`` (as timm's test_models.py).

Each model is built on a tiny fixed-depth tree and, where it supports one, a variable-depth tree:
forward → loss → backward (finite gradients on every trainable parameter) → decode → predict
(valid root paths, scores and path probabilities in [0, 1]), predict_given where implemented,
a state_dict round trip that predicts identically, and decoding in fp32 under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch

from hiervision.decoding import Prediction
from hiervision.models import create_model, list_models, model_info
from hiervision.taxonomy import PAD, Taxonomy

FIXED = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f", "b/g"])
VARIABLE = Taxonomy.from_paths(["a/c/x", "a/c/y", "a/d", "b"])
BATCH, SIZE = 4, 16
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": SIZE, "backbone_kwargs": {"width": 0.25}}
# every head's own test sizes and capabilities, as it registered them (a new head needs no entry here)
EXTRA = {name: model_info(name).tiny for name in list_models()}


def supports(name: str, tax: Taxonomy, multi_label: bool = False) -> bool:
    info = model_info(name)
    return not ((tax is VARIABLE and info.fixed_depth) or (multi_label and not info.multi_label))


def build(name: str, tax: Taxonomy, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, tax, **SMALL, **EXTRA.get(name, {}), **kwargs)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def leaf_targets(tax: Taxonomy) -> torch.Tensor:
    return torch.tensor([tax.leaves[i % len(tax.leaves)] for i in range(BATCH)])


def assert_valid(tax: Taxonomy, pred: Prediction) -> None:
    assert len(pred) == BATCH
    for row in pred.paths.tolist():
        path = [n for n in row if n != PAD]
        assert path and tax.is_valid_path(path), f"invalid path {row}"
        assert row[: len(path)] == path, f"PAD inside path {row}"
    assert pred.scores.shape == (BATCH, tax.num_nodes)
    assert pred.scores.dtype == pred.path_prob.dtype == torch.float32
    assert bool(((pred.scores >= 0) & (pred.scores <= 1)).all())
    assert bool(((pred.path_prob >= 0) & (pred.path_prob <= 1 + 1e-6)).all())


# every (model, tree) pair the model supports; the pairs it refuses are checked on their own below
PAIRS = [pytest.param(name, tax, id=f"{name}-{tid}") for name in list_models()
         for tax, tid in ((FIXED, "fixed"), (VARIABLE, "variable")) if supports(name, tax)]
REFUSED = [pytest.param(name, tax, multi, id=f"{name}-{'multi_label' if multi else 'variable'}")
           for name in list_models() for tax, multi in ((VARIABLE, False), (FIXED, True))
           if not supports(name, tax, multi)]


@pytest.mark.parametrize("name,tax,multi_label", REFUSED)
def test_a_head_refuses_what_it_declares_it_cannot_do_in_one_line(name: str, tax: Taxonomy, multi_label: bool):
    why = "single-label|one path per image" if multi_label else "needs every leaf at the same depth"
    with pytest.raises(ValueError, match=why) as refused:  # a clear refusal when built, not a crash later
        build(name, tax, multi_label=multi_label)
    assert "\n" not in str(refused.value) and f"model {name}" in str(refused.value)


@pytest.mark.parametrize("name,tax", PAIRS)
def test_forward_loss_backward_decode_predict(name: str, tax: Taxonomy) -> None:
    model = build(name, tax).train()
    targets = leaf_targets(tax)
    targets[-1] = tax.children[0][0]  # a coarse-only label: every model trains it by the part it has
    loss = model.loss(model(images()), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
    model.eval()
    with torch.no_grad():
        assert_valid(tax, model.decode(model(images())))
    assert_valid(tax, model.predict(images()))
    for mode in getattr(model, "eval_modes", ()):  # HierNet: conditional and routing
        model.set_eval_mode(mode)
        assert_valid(tax, model.predict(images()))


@pytest.mark.parametrize("name,tax", PAIRS)
def test_a_beam_width_is_set_or_refused_in_one_line_and_its_score_is_readable(name: str, tax: Taxonomy) -> None:
    model = build(name, tax).eval()
    with torch.no_grad():
        outputs = model(images())
    true_paths = model.tables.paths[leaf_targets(tax)]
    try:
        model.set_beam_width(1)
    except ValueError as e:  # no search in this head: a clear refusal, and the model predicts as before
        assert "\n" not in str(e) and "beam" in str(e)
        assert_valid(tax, model.predict(images()))
        with pytest.raises(ValueError, match="searched|beam search") as refused:  # and no search score to read
            model.path_logprob(outputs, true_paths)
        assert "\n" not in str(refused.value)
        return
    greedy = model.predict(images())
    assert_valid(tax, greedy)
    model.set_beam_width(len(tax.names))  # wide enough to keep every path: the best one is found
    wide = model.predict(images())
    assert_valid(tax, wide)
    assert bool((wide.path_prob >= greedy.path_prob - 1e-6).all())
    # path_logprob is the score the search ranks by: the decoded path's own, and no path scores higher
    with torch.no_grad():
        found = model.path_logprob(outputs, wide.paths)
        torch.testing.assert_close(found.exp(), wide.path_prob, atol=1e-5, rtol=1e-4)
        assert bool((model.path_logprob(outputs, true_paths) <= found + 1e-5).all())
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="beam width"):
            model.set_beam_width(bad)


@pytest.mark.parametrize("name,tax", PAIRS)
def test_predict_given_stays_below_the_given_node(name: str, tax: Taxonomy) -> None:
    model = build(name, tax).eval()
    given = torch.tensor([tax.path(int(t))[0] for t in leaf_targets(tax)])
    if not model_info(name).given:
        with pytest.raises(NotImplementedError, match="cannot condition"):
            model.predict_given(images(), given)
        return
    pred = model.predict_given(images(), given)
    assert_valid(tax, pred)
    assert (pred.paths == given.unsqueeze(1)).any(1).all()


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip_predicts_identically(name: str) -> None:
    a = build(name, FIXED, seed=0).eval()
    b = build(name, FIXED, seed=1).eval()
    b.load_state_dict(a.state_dict())
    pa, pb = a.predict(images()), b.predict(images())
    assert torch.equal(pa.paths, pb.paths)
    torch.testing.assert_close(pa.scores, pb.scores)
    torch.testing.assert_close(pa.path_prob, pb.path_prob)
    assert not any(k.startswith("tables.") for k in a.state_dict()), "tree tables must not be saved"


@pytest.mark.parametrize("name", list_models())
def test_bf16_autocast_trains_finite_and_decodes_in_fp32(name: str) -> None:
    model = build(name, VARIABLE if name not in ("dhnn_rnn", "guo_multihead") else FIXED)
    tax = model.taxonomy
    with torch.autocast("cpu", torch.bfloat16):
        loss = model.train().loss(model(images()), leaf_targets(tax))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.autocast("cpu", torch.bfloat16):
        pred = model.predict(images())
    assert_valid(tax, pred)  # fp32 scores and path probabilities, valid paths


@pytest.mark.parametrize("name", [n for n in list_models() if supports(n, FIXED, multi_label=True)])
def test_multi_label_models_keep_the_contract(name: str) -> None:
    model = build(name, FIXED, multi_label=True)
    marks = torch.zeros(BATCH, FIXED.num_nodes)
    marks[torch.arange(BATCH), leaf_targets(FIXED)] = 1
    marks[0, FIXED.leaves[-1]] = 1  # two paths for the first image
    loss = model.train().loss(model(images()), marks)
    assert torch.isfinite(loss)
    loss.backward()
    pred = model.predict(images())
    assert_valid(FIXED, pred)
    assert pred.labels is not None and pred.labels.shape == (BATCH, FIXED.num_nodes)


@pytest.mark.parametrize("name", list_models())
def test_tree_tables_are_buffers_that_follow_the_model(name: str) -> None:
    model = build(name, FIXED)
    buffers = dict(model.named_buffers())
    for table in ("paths", "depth", "parent", "leaf_mask", "tin", "tout", "lift"):
        assert f"tables.{table}" in buffers
    n = FIXED.num_nodes  # no dense (N+1)² table among them (trees reach 10^5 classes)
    assert all(v.numel() < n * n for k, v in buffers.items() if k.startswith("tables."))
    before = {k: v.dtype for k, v in buffers.items() if k.startswith("tables.")}
    model.to(torch.float64)  # integer and bool tables keep their dtype; they move with the model
    assert {k: v.dtype for k, v in model.named_buffers() if k.startswith("tables.")} == before
    assert torch.equal(model.tables.paths, FIXED.path_matrix)


# ----------------------------------------------------------------------------- every head on a pretrained encoder
@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``hf:<folder>`` of a tiny randomly initialised DINOv2 (saved once per session; nothing is downloaded)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    return f"hf:{folder}"


def build_on_encoder(name: str, encoder: str) -> torch.nn.Module | None:
    """The head on the encoder, or ``None`` after checking its one-line refusal: a head that needs what an
    encoder's pooled vector and hidden-state maps cannot give (HierNet: a CNN's blocks to cut) says so when built."""
    torch.manual_seed(0)
    try:
        return create_model(name, FIXED, backbone=encoder, in_chans=3, image_size=32, **EXTRA.get(name, {}))
    except ValueError as e:
        assert "\n" not in str(e) and "backbone" in str(e), f"{name}: {e}"
        return None


@pytest.mark.parametrize("name", list_models())
def test_every_head_fine_tunes_an_hf_encoder_or_refuses_in_one_line(name: str, hf_encoder: str) -> None:
    model = build_on_encoder(name, hf_encoder)
    if model is None:
        return
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model.train().loss(model(x), leaf_targets(FIXED))
    assert torch.isfinite(loss)
    loss.backward()
    encoders = {id(p) for p in model.param_groups()["backbone"]}
    assert encoders, f"{name}: no encoder parameters"
    for pname, p in model.named_parameters():
        if p.requires_grad:  # the encoder's included: it is fine-tuned with the head
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} has no finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.param_groups()["backbone"]), f"{name}: the encoder never learns"
    assert_valid(FIXED, model.predict(x))


@pytest.mark.parametrize("name", list_models())
def test_every_head_trains_on_frozen_hf_features_or_refuses_in_one_line(name: str, hf_encoder: str) -> None:
    model = build_on_encoder(name, hf_encoder)
    if model is None:
        return
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.backbone(x)
    assert features.shape == (BATCH, model.backbone.num_features)
    model.train()
    try:
        outputs = model.forward_head(features)
    except NotImplementedError as e:  # two encoders (HiE) or stage maps (DHNN): it needs the images
        assert "\n" not in str(e) and "does not run on one backbone's pooled features" in str(e)
        return
    model.loss(outputs, leaf_targets(FIXED)).backward()
    for p in model.param_groups()["backbone"]:
        assert p.grad is None  # the encoder's features were computed without a graph
    for p in model.param_groups()["head"]:
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()
    model.eval()
    with torch.no_grad():
        assert_valid(FIXED, model.decode(model.forward_head(features)))
