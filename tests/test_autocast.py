"""Precision under autocast, and the tree tables models keep as buffers (GPU audit items 1, 2, 8).

What a CPU can show: bf16 autocast on the CPU lowers the same ops (matmul, linear) that CUDA
autocast lowers, so a decode that sums path log-probabilities in bf16, or an LSTM left to
autocast, shows here too.
"""

from __future__ import annotations

import pytest
import torch

from hiervision.decoding import exact_best_path, prefix_logprob, threshold_paths, tree_tables
from hiervision.models import create_model
from hiervision.models.dhnn import run_fp32
from hiervision.taxonomy import Taxonomy, TreeTables

TREE = Taxonomy.from_paths(["a/c", "a/d", "b/e", "b/f"])
VAR = Taxonomy.from_paths(["a/c/x", "a/c/y", "a/d", "b"])
SMALL = {"backbone": "resnet20", "in_chans": 1, "image_size": 16, "backbone_kwargs": {"width": 0.25}}
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def near_tie() -> torch.Tensor:
    """Node log-probabilities where path a/d beats a/c by 0.003 nats: below bf16's resolution at 1."""
    lp = torch.full((2, TREE.num_nodes), -20.0)
    a, c, d = TREE.index("a"), TREE.index("c"), TREE.index("d")
    lp[:, a], lp[:, c], lp[:, d] = -0.1, -1.003, -1.0
    return lp


def test_the_near_tie_is_lost_in_bf16() -> None:
    """The premise: the same sums in bf16 cannot tell the two paths apart."""
    lp = near_tie()
    c, d = TREE.index("c"), TREE.index("d")
    assert torch.equal(lp[:, c].bfloat16(), lp[:, d].bfloat16())


def test_exact_search_in_bf16_autocast_finds_the_fp32_path() -> None:
    lp = near_tie()
    nodes32, lp32 = exact_best_path(TREE, lp)
    with torch.autocast(**BF16):
        nodes16, lp16 = exact_best_path(TREE, lp)
        prefix = prefix_logprob(TREE, lp)
    assert nodes32.tolist() == [TREE.index("d")] * 2
    assert torch.equal(nodes16, nodes32)
    assert prefix.dtype == lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32)


def test_model_decode_in_bf16_autocast_matches_fp32_on_a_near_tie() -> None:
    torch.manual_seed(0)
    m = create_model("guo_multihead", TREE, decode="exact", **SMALL).eval()
    lp = near_tie()
    outputs = {"level1": lp[:, list(TREE.levels[0])], "level2": lp[:, list(TREE.levels[1])]}
    ref = m.decode(outputs)
    with torch.autocast(**BF16):
        got = m.decode(outputs)
    assert torch.equal(got.paths, ref.paths)
    assert got.scores.dtype == got.path_prob.dtype == torch.float32
    torch.testing.assert_close(got.path_prob, ref.path_prob)


def test_flat_scores_stay_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    m = create_model("flat", TREE, **SMALL).eval()
    logits = torch.tensor([[0.0, 1e-3, -5.0, -5.0]])
    ref = m.decode({"logits": logits})
    with torch.autocast(**BF16):
        got = m.decode({"logits": logits.bfloat16()})
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.paths, ref.paths)


@pytest.mark.parametrize("name", ["dhnn_rnn", "dhnn_s2s"])
def test_dhnn_lstms_run_in_fp32_under_autocast(name: str) -> None:
    torch.manual_seed(0)
    m = create_model(name, TREE, input_size=16, hidden_size=16, pool_fallback="project", **SMALL).train()
    seen: list[torch.dtype] = []
    for lstm in (mod for mod in m.modules() if isinstance(mod, torch.nn.LSTM)):
        lstm.register_forward_hook(lambda mod, inp, out: seen.append(out[0].dtype))
    x = torch.randn(4, 1, 16, 16)
    with torch.autocast(**BF16):
        loss = m.loss(m(x), torch.tensor(TREE.leaves))
    assert seen and set(seen) == {torch.float32}
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_run_fp32_takes_low_precision_inputs() -> None:
    lstm = torch.nn.LSTM(4, 8, batch_first=True)
    x = torch.randn(2, 3, 4).bfloat16()
    state = (torch.zeros(1, 2, 8).bfloat16(), torch.zeros(1, 2, 8).bfloat16())
    with torch.autocast(**BF16):
        out, (h, c) = run_fp32(lstm, x, state)
    assert out.dtype == h.dtype == c.dtype == torch.float32


# ----------------------------------------------------------------------------- the tables as buffers
@pytest.mark.parametrize("tax", [TREE, VAR], ids=["fixed", "variable"])
def test_tree_tables_encode_as_the_taxonomy_does(tax: Taxonomy) -> None:
    t = TreeTables(tax)
    nodes = torch.arange(1, tax.num_nodes)
    assert torch.equal(t.encode_paths(nodes), tax.encode_paths(nodes))
    assert torch.equal(t.encode_levels(nodes), tax.encode_levels(nodes))
    assert torch.equal(t.encode_level_positions(nodes), tax.encode_level_positions(nodes))
    assert torch.equal(t.encode_sequence(nodes), tax.encode_sequence(nodes))
    marks = torch.rand(6, tax.num_nodes, generator=torch.Generator().manual_seed(0)) > 0.7
    assert torch.equal(t.close_upwards(marks), tax.close_upwards(marks))


def test_threshold_paths_keeps_nodes_whose_ancestors_all_pass() -> None:
    scores = torch.rand(20, VAR.num_nodes, generator=torch.Generator().manual_seed(1))
    ends = threshold_paths(VAR, scores, 0.4)
    for row, s in zip(ends.tolist(), scores.tolist()):
        kept = {n for n in range(1, VAR.num_nodes) if all(s[a] >= 0.4 for a in VAR.path(n))}
        want = {n for n in kept if not any(c in kept for c in VAR.children[n])}
        assert {n for n, e in enumerate(row) if e} == want


def test_tables_are_not_state_and_a_plain_taxonomy_gets_cached_tables() -> None:
    t = TreeTables(TREE)
    assert t.state_dict() == {}
    assert tree_tables(TREE) is tree_tables(TREE)  # built once per tree and device, not per call
    assert tree_tables(t) is t
    t.paths[1, 0] = 99  # a buffer is a copy: editing it leaves the tree's own table alone
    assert TREE.path_matrix[1, 0] == 1


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["dhnn_rnn", "dhnn_s2s"])
def test_cuda_dhnn_lstms_run_in_fp32_under_autocast(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = create_model(name, TREE, input_size=16, hidden_size=16, pool_fallback="project", **SMALL).cuda().train()
    seen: list[torch.dtype] = []
    for lstm in (mod for mod in m.modules() if isinstance(mod, torch.nn.LSTM)):
        lstm.register_forward_hook(lambda mod, inp, out: seen.append(out[0].dtype))
    x = torch.randn(4, 1, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype):
        loss = m.loss(m(x), torch.tensor(TREE.leaves, device="cuda"))
    assert seen and set(seen) == {torch.float32}
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@cuda
@pytest.mark.parametrize("name", ["flat", "dhnn_rnn", "dhnn_s2s", "guo_rnn", "guo_multihead", "hiernet"])
def test_cuda_decode_under_autocast_matches_fp32(name: str) -> None:
    torch.manual_seed(0)
    tax = VAR if name in ("dhnn_s2s", "guo_rnn", "flat", "hiernet") else TREE
    extra = {"input_size": 16, "hidden_size": 16, "pool_fallback": "project"} if name.startswith("dhnn") else {}
    m = create_model(name, tax, **SMALL, **extra).cuda().eval()
    x = torch.randn(8, 1, 16, 16, device="cuda")
    with torch.no_grad():
        out = m(x)
        ref = m.decode(out)
        with torch.autocast("cuda", torch.bfloat16):
            got = m.decode(out)
    assert torch.equal(got.paths, ref.paths)
    assert got.scores.dtype == got.path_prob.dtype == torch.float32
    assert got.paths.device.type == "cuda"


@cuda
@pytest.mark.parametrize("name", ["flat", "dhnn_rnn", "dhnn_s2s", "guo_rnn", "guo_multihead", "hiernet"])
def test_cuda_training_step_does_not_wait_on_the_device(name: str) -> None:
    """forward + loss + backward queue their work without a host sync: tables are buffers on the
    device, targets are encoded there, no label check reads a value back."""
    torch.manual_seed(0)
    extra = {"input_size": 16, "hidden_size": 16, "pool_fallback": "project"} if name.startswith("dhnn") else {}
    m = create_model(name, TREE, **SMALL, **extra).cuda().train()
    x = torch.randn(8, 1, 16, 16, device="cuda")
    t = torch.tensor(TREE.leaves * 2, device="cuda")
    m.loss(m(x), t).backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m.loss(m(x), t).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
