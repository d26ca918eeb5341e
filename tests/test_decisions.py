"""Hand-computed checks of the post-hoc decision rules, calibration metrics and hierarchy-aware losses.

Tree (as in test_metrics): root/A,B; A→C,D; B→E,F,G; C→H. Leaves H, D, E, F, G (5); heights:
leaves 0, C and B 1, A 2, root 3. Rewards r(v) = log 5 − log|leaves(v)|: A log 5/2, B log 5/3, C and
the leaves log 5.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hiervision.decisions import (
    accuracy_specificity_curve,
    apply_temperature,
    backoff_nodes,
    calibrate,
    conformal_nodes,
    conformal_threshold,
    coverage_report,
    covers,
    crm_nodes,
    end_distribution,
    evaluate_hedging,
    expected_lca_height,
    fit_backoff,
    fit_decisions,
    fit_lambda,
    fit_temperature,
    hedge_nodes,
    hedge_records,
    hedger,
    load_decisions,
    node_marginals,
    rewards,
    save_decisions,
)
from hiervision.decoding import Prediction
from hiervision.losses import chmcnn_loss, hxe_loss, max_constraint, soft_label_loss, soft_label_targets
from hiervision.metrics import (
    calibration_report,
    evaluate,
    expected_calibration_error,
    hierarchical_distance_at_k,
)
from hiervision.report import plot_accuracy_specificity, plot_reliability
from hiervision.taxonomy import Taxonomy

A, B, C, D, E, F, G, H = range(1, 9)
LEAVES = (D, E, F, G, H)


@pytest.fixture
def tree() -> Taxonomy:
    t = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B", "H": "C"})
    assert t.leaves == LEAVES
    return t


def leaf_q(**probs: float) -> torch.Tensor:
    """One row of an end-class distribution from leaf letters."""
    q = torch.zeros(9, dtype=torch.float64)
    for name, p in probs.items():
        q["_ABCDEFGH".index(name)] = p
    return q


def test_rewards_and_marginals(tree):
    r = rewards(tree)
    assert r[0] == 0
    assert r[A] == pytest.approx(math.log(5 / 2)) and r[B] == pytest.approx(math.log(5 / 3))
    assert r[C] == pytest.approx(math.log(5)) and r[H] == pytest.approx(math.log(5))
    m = node_marginals(leaf_q(H=0.1, D=0.4, E=0.2, F=0.2, G=0.1).unsqueeze(0), tree)[0]
    assert m[[0, A, B, C, D]].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.1, 0.4])


def test_end_distribution_completes_partial_scores(tree):
    # flat-style marginals give the leaves back unchanged
    q = leaf_q(H=0.1, D=0.4, E=0.2, F=0.2, G=0.1).float().unsqueeze(0)
    scores = node_marginals(q, tree)
    assert end_distribution(scores, tree)[0].tolist() == pytest.approx(q[0].tolist())
    # a beam decoder scores only its own path B/E (0.8, 0.6): the unscored A gets the root's other 0.2
    # (split over C and D by their leaves), F and G share B's 0.8 − 0.6; every given score is kept
    path_only = torch.zeros(1, 9)
    path_only[0, [B, E]] = torch.tensor([0.8, 0.6])
    e = end_distribution(path_only, tree)[0]
    assert e[[D, E, F, G, H]].tolist() == pytest.approx([0.1, 0.6, 0.1, 0.1, 0.1])
    assert e[B] == 0 and node_marginals(e.unsqueeze(0), tree)[0, B] == pytest.approx(0.8)
    # independent per-level softmaxes lose mass to invalid paths: every child scored, so renormalised
    per_level = node_marginals(q, tree) * 0.5
    per_level[:, [A, B]] *= 2  # level 1 complete, deeper levels at half mass
    assert end_distribution(per_level, tree)[0].tolist() == pytest.approx(q[0].tolist(), abs=1e-6)
    # labels that stop at inner nodes: C keeps its own 0.2 (its 0.3 minus H's 0.1)
    q_all = leaf_q(H=0.1, D=0.3, E=0.4).float()
    q_all[C] = 0.2
    marg = node_marginals(q_all.unsqueeze(0), tree)
    assert end_distribution(marg, tree, ends="all")[0].tolist() == pytest.approx(q_all.tolist(), abs=1e-6)


def test_hedge_hand_cases(tree):
    q = torch.stack([leaf_q(H=0.1, D=0.4, E=0.2, F=0.2, G=0.1), leaf_q(E=0.3, F=0.3, G=0.2, D=0.1, H=0.1)])
    m = node_marginals(q, tree)
    # λ=0: D (log5·0.4 > log(5/2)·0.5) and E (ties with F, first id); λ=1: D stays, B (1.209) beats the
    # root (1) and E (0.783); λ=3: the root's λ·1 = 3 beats B's 2.809
    assert hedge_nodes(m, tree, 0.0).tolist() == [D, E]
    assert hedge_nodes(m, tree, 1.0).tolist() == [D, B]
    assert hedge_nodes(m, tree, 1.2).tolist() == [0, B]
    assert hedge_nodes(m, tree, 3.0).tolist() == [0, 0]
    # C's only child is H: same leaves, same reward, same probability — the deeper H is answered
    single = node_marginals(leaf_q(H=0.7, D=0.1, E=0.2).unsqueeze(0), tree)
    assert hedge_nodes(single, tree, 0.0).tolist() == [H]
    with pytest.raises(ValueError, match="λ"):
        hedge_nodes(m, tree, -1.0)


def test_the_hedger_answers_as_hedge_nodes_at_every_lambda_with_fewer_columns():
    """Bisection and sweeps use :func:`hedger`, which drops the nodes that cannot win at any λ: its answers must be
    hedge_nodes' own, ties (single-child chains, equal leaves) included, from flat to sharp distributions."""
    rng = np.random.default_rng(0)
    tax = Taxonomy([f"n{i}" for i in range(401)], [-1] + [int(rng.integers(0, i)) for i in range(1, 401)])
    leaf = torch.zeros(tax.num_nodes, dtype=torch.bool)
    leaf[list(tax.leaves)] = True
    for sharpness in (0.0, 0.3, 3.0, 30.0):
        logits = torch.from_numpy(rng.normal(size=(32, tax.num_nodes)) * sharpness).float()
        m = node_marginals(torch.softmax(logits.masked_fill(~leaf, -1e9), 1) * leaf, tax)
        hedge = hedger(m, tax)
        for lam in (0.0, 1e-3, 0.1, 0.7, 2.0, 10.0, 1e3, 1e6):
            assert torch.equal(hedge(lam), hedge_nodes(m, tax, lam)), (sharpness, lam)
    assert len(hedge.kept) < tax.num_nodes / 4  # sharp answers: few nodes can ever win
    with pytest.raises(ValueError, match="λ"):
        hedge(-1.0)


def test_fit_lambda_meets_target_on_constructed_case(tree):
    q = torch.stack([leaf_q(H=0.1, D=0.4, E=0.2, F=0.2, G=0.1), leaf_q(E=0.3, F=0.3, G=0.2, D=0.1, H=0.1)])
    m = node_marginals(q, tree)
    targets = torch.tensor([D, F])
    assert fit_lambda(m, targets, tree, 0.5) == 0.0  # already met by the leaf answers
    lam = fit_lambda(m, targets, tree, 1.0)
    # B overtakes E when 0.8·(log 5/3 + λ) > 0.3·(log 5 + λ)
    expected = (0.3 * math.log(5) - 0.8 * math.log(5 / 3)) / 0.5
    assert lam == pytest.approx(expected, abs=1e-5)  # up to the near-tie tolerance
    nodes = hedge_nodes(m, tree, lam)
    assert nodes.tolist() == [D, B]
    report = coverage_report(nodes, targets, tree)
    assert report["accuracy"] == 1.0
    assert report["information_gain"] == pytest.approx((math.log(5) + math.log(5 / 3)) / 2)
    assert report["specificity"] == pytest.approx(report["information_gain"] / math.log(5))
    assert report["depths"] == {1: 0.5, 2: 0.5}
    json.dumps(report)


def test_covers_and_report_count_wrong_answers_as_zero_gain(tree):
    nodes = torch.tensor([0, A, C, E])
    targets = torch.tensor([E, H, D, E])
    assert covers(nodes, targets, tree).tolist() == [True, True, False, True]
    rep = coverage_report(nodes, targets, tree)
    assert rep["accuracy"] == 0.75
    assert rep["information_gain"] == pytest.approx((0 + math.log(5 / 2) + 0 + math.log(5)) / 4)
    assert rep["depths"] == {0: 0.25, 1: 0.25, 2: 0.5}


def test_backoff_baseline(tree):
    m = node_marginals(leaf_q(H=0.12, D=0.4, E=0.25, F=0.15, G=0.08).unsqueeze(0), tree)
    assert backoff_nodes(m, tree, 0.3).tolist() == [D]
    assert backoff_nodes(m, tree, 0.45).tolist() == [A]  # D 0.4 < 0.45, A 0.52
    assert backoff_nodes(m, tree, 0.6).tolist() == [0]
    # fitted: the smallest threshold at which D (wrong for target H) backs off to A
    t = fit_backoff(m, torch.tensor([H]), tree, 1.0)
    assert 0.4 < t <= 0.4 + 1e-6


def test_conformal_hand_case(tree):
    q = torch.stack([
        leaf_q(D=0.4, E=0.25, F=0.15, H=0.12, G=0.08),  # target D: top-1 covers, score 0
        leaf_q(E=0.35, F=0.3, G=0.2, D=0.1, H=0.05),  # target F: LCA(E, F) = B at rank 2, score 0.35
        leaf_q(E=0.5, G=0.2, F=0.15, H=0.1, D=0.05),  # target H: only the root (rank 4) covers, score 0.85
    ])
    targets = torch.tensor([D, F, H])
    assert conformal_threshold(q, targets, tree, 0.5) == pytest.approx(0.35)  # ⌈4·0.5⌉ = 2nd smallest
    assert conformal_threshold(q, targets, tree, 0.3) == pytest.approx(0.85)  # ⌈4·0.7⌉ = 3rd
    assert conformal_threshold(q, targets, tree, 0.1) == float("inf")  # ⌈3.6⌉ = 4 > n
    assert conformal_nodes(q, tree, 0.35).tolist() == [D, B, E]  # 3rd: E alone has mass before it ≤ 0.35
    assert conformal_nodes(q, tree, 0.85).tolist() == [0, 0, 0]
    assert conformal_nodes(q, tree, float("inf")).tolist() == [0, 0, 0]


def test_conformal_answers_do_not_depend_on_how_many_ranks_a_pass_takes(tree, monkeypatch):
    """The LCAs of the top-k classes are found a block of ranks at a time (stopping once every row is answered):
    blocks of 1 and 2 ranks give what one block of all ranks gives."""
    import hiervision.decisions as D_

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 9, generator=gen) * 2
    logits[:, [0, A, B, C]] = float("-inf")
    q, truth = logits.softmax(1), torch.multinomial(logits.softmax(1), 1, generator=gen).squeeze(1)
    whole = [(conformal_threshold(q, truth, tree, a), conformal_nodes(q, tree, tau).tolist())
             for a, tau in ((0.1, 0.3), (0.3, 0.6), (0.5, 0.0))]
    for ranks in (1, 2):
        monkeypatch.setattr(D_, "_RANKS", ranks)
        assert [(conformal_threshold(q, truth, tree, a), conformal_nodes(q, tree, tau).tolist())
                for a, tau in ((0.1, 0.3), (0.3, 0.6), (0.5, 0.0))] == whole


def test_conformal_coverage_on_random_exchangeable_data(tree):
    gen = torch.Generator().manual_seed(0)
    n = 4000
    logits = torch.randn(n, 9, generator=gen) * 2
    logits[:, [0, A, B, C]] = float("-inf")
    q = logits.softmax(1)
    # truth drawn from a *different* (miscalibrated) distribution: coverage must still hold
    truth = torch.multinomial((logits / 3).softmax(1), 1, generator=gen).squeeze(1)
    tau = conformal_threshold(q[:2000], truth[:2000], tree, 0.1)
    coverage = covers(conformal_nodes(q[2000:], tree, tau), truth[2000:], tree).float().mean()
    assert coverage >= 0.9 - 0.02  # the guarantee, up to sampling noise over 2000 test samples


def test_temperature_known_optimum(tree):
    # four samples at q(D)=0.9, q(E)=0.1 with D right 3 times out of 4: the calibrated 0.75 needs T = log 9 / log 3 = 2
    q = leaf_q(D=0.9, E=0.1).float().repeat(4, 1)
    t = fit_temperature(q, torch.tensor([D, D, D, E]), tree)
    assert t == pytest.approx(2.0, rel=1e-3)
    assert apply_temperature(q, t)[0, D] == pytest.approx(0.75, abs=1e-3)
    assert apply_temperature(q, 1.0) is q
    assert torch.equal(apply_temperature(q, 5.0).argmax(1), q.argmax(1))  # never changes the argmax
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(q, 0.0)


def test_per_level_temperature_hand_case(tree):
    q = leaf_q(D=0.2, E=0.3, F=0.1, H=0.4).unsqueeze(0)
    # level 2's conditionals: under A (C 2/3, D 1/3), under B (E 3/4, F 1/4, G 0); √ then renormalise
    cd, ef = math.sqrt(2 / 3) + math.sqrt(1 / 3), math.sqrt(0.75) + math.sqrt(0.25)
    expected = leaf_q(D=0.6 * math.sqrt(1 / 3) / cd, H=0.6 * math.sqrt(2 / 3) / cd, E=0.4 * math.sqrt(0.75) / ef,
                      F=0.4 * math.sqrt(0.25) / ef)
    assert apply_temperature(q, (1.0, 2.0, 1.0), tree)[0].tolist() == pytest.approx(expected.tolist(), abs=1e-9)
    assert apply_temperature(q, (1.0, 1.0, 1.0), tree) is q
    with pytest.raises(ValueError, match="one value per level"):
        apply_temperature(q, (1.0, 2.0), tree)
    # labels may stop at A: its "stop here" share joins level 2's softmax under A
    q = leaf_q(D=0.1, H=0.3, E=0.4)
    q[A] = 0.2
    out = apply_temperature(q.unsqueeze(0), (1.0, 2.0, 1.0), tree, "all")[0]
    z = math.sqrt(1 / 3) + math.sqrt(1 / 2) + math.sqrt(1 / 6)  # stop, C, D given A (0.6)
    assert [float(out[n]) for n in (A, H, D, E)] == pytest.approx(
        [0.6 * math.sqrt(1 / 3) / z, 0.6 * math.sqrt(1 / 2) / z, 0.6 * math.sqrt(1 / 6) / z, 0.4], abs=1e-9)


def test_per_level_temperature_fit_undoes_one_levels_sharpening(tree):
    """Level 1 calibrated, level 2 sharpened ×3 (logits), level 3 an only child: T ≈ (1, 3, 1)."""
    gen = torch.Generator().manual_seed(0)
    n = 6000
    top, under_a, under_b = (torch.randn(n, k, generator=gen) * 1.5 for k in (2, 2, 3))

    def draw(p: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(p, 1, generator=gen).squeeze(1)

    first, a_kid, b_kid = draw(top.softmax(1)), draw(under_a.softmax(1)), draw(under_b.softmax(1))
    truth = torch.where(first == 0, torch.tensor([H, D])[a_kid], torch.tensor([E, F, G])[b_kid])
    q = torch.zeros(n, 9, dtype=torch.float64)
    p1, pa, pb = top.softmax(1), (3 * under_a).softmax(1), (3 * under_b).softmax(1)
    q[:, [H, D]] = (p1[:, :1] * pa).double()
    q[:, [E, F, G]] = (p1[:, 1:] * pb).double()
    t = fit_temperature(q, truth, tree, per_level=True)
    assert t[0] == pytest.approx(1.0, abs=0.1) and t[1] == pytest.approx(3.0, rel=0.1) and t[2] == 1.0

    def nll(temperature) -> float:
        p = apply_temperature(q, temperature, tree)[torch.arange(n), truth]
        return float(-torch.log(p).mean())

    one = fit_temperature(q, truth, tree)
    assert nll(t) < nll(one) < nll(1.0)  # the per-level fit beats the best single temperature here
    for d in range(2):  # and is each level's optimum: moving one level's T only costs likelihood
        for f in (0.9, 1.1):
            assert nll(t) <= nll(tuple(x * f if i == d else x for i, x in enumerate(t)))


def test_ece_known_case():
    conf, ok = torch.tensor([0.9, 0.9, 0.6, 0.6]), torch.tensor([1, 0, 1, 1])
    # width bins: bin 0.9 has accuracy 0.5 (gap 0.4), bin 0.6 accuracy 1 (gap 0.4): 0.5·0.4 + 0.5·0.4
    assert expected_calibration_error(conf, ok, 10, "width") == pytest.approx(0.4)
    assert expected_calibration_error(conf, ok, 2, "mass") == pytest.approx(0.4)
    assert expected_calibration_error(conf, ok, 1, "mass") == pytest.approx(0.0)  # 0.75 vs 0.75
    with pytest.raises(ValueError, match="width"):
        expected_calibration_error(conf, ok, 10, "bogus")


def test_calibration_report_per_level(tree):
    q = torch.stack([leaf_q(D=0.9, E=0.1), leaf_q(E=0.6, F=0.4)]).float()
    rep = calibration_report(q, torch.tensor([D, F]), tree, bins=10)
    # end class: (0.9, right), (0.6, wrong) → 0.5·0.1 + 0.5·0.6
    assert rep["ece"] == pytest.approx(0.35)
    # level 1: A 0.9 right, B 1.0 right → 0.5·0.1 + 0.5·0; level 2: D 0.9 right, E 0.6 wrong; level 3: no target
    assert rep["ece_per_level"][0] == pytest.approx(0.05)
    assert rep["ece_per_level"][1] == pytest.approx(0.35)
    assert rep["ece_per_level"][2] == 0.0


def test_crm_and_hdist_hand_case(tree):
    h = lambda a, b: tree.heights[tree.lca(a, b)]  # noqa: E731
    assert h(H, D) == 2 and h(H, E) == 3 and h(E, F) == 1 and h(D, D) == 0
    q = leaf_q(H=0.35, E=0.25, F=0.21, G=0.19).float().unsqueeze(0)
    # risk(H) = 3·0.65 = 1.95, risk(E) = 3·0.35 + 1·0.40 = 1.45, risk(F) = 3·0.35 + 1·0.44 = 1.49
    assert expected_lca_height(q, tree)[0, [H, E, F]].tolist() == pytest.approx([1.95, 1.45, 1.49])
    assert q.argmax(1).tolist() == [H]
    assert crm_nodes(q, tree).tolist() == [E]
    # ranking H, E, F, G, D against target F: distances 3, 1, 0, 1, 3
    d = hierarchical_distance_at_k(q, torch.tensor([F]), tree, ks=(1, 2, 5, 20))
    assert d == pytest.approx({"hdist@1": 3.0, "hdist@2": 2.0, "hdist@5": 1.6, "hdist@20": 1.6})


def test_evaluate_reports_ece_and_hdist(tree):
    q = torch.stack([leaf_q(D=0.9, E=0.1), leaf_q(E=0.6, F=0.4)]).float()
    pred = Prediction(tree.encode_paths([D, E]), node_marginals(q, tree), torch.tensor([0.9, 0.6]))
    rep = evaluate(pred, torch.tensor([D, F]), tree)
    direct = calibration_report(q, torch.tensor([D, F]), tree)
    assert rep["ece_per_level"] == pytest.approx(direct["ece_per_level"]) and rep["ece"] == pytest.approx(0.35)
    assert rep["hdist@1"] == pytest.approx((0 + 1) / 2)  # D right; E vs F meet at B (height 1)
    json.dumps(rep)


def test_hedge_records_and_decisions_file(tree, tmp_path):
    q = leaf_q(E=0.3, F=0.3, G=0.2, D=0.1, H=0.1).float().unsqueeze(0)
    pred = Prediction(tree.encode_paths([E]), node_marginals(q, tree), torch.tensor([0.3]))
    (rec,) = hedge_records(pred, tree, lam=1.0)
    assert rec == {"node": "B", "path": ["B"], "probability": pytest.approx(0.8)}
    assert load_decisions(tmp_path) == {}
    save_decisions(tmp_path, temperature=1.5)
    save_decisions(tmp_path, hedge={"0.99": 2.0})
    assert load_decisions(tmp_path) == {"temperature": 1.5, "hedge": {"0.99": 2.0}}
    save_decisions(tmp_path, temperature=[1.2, 0.8, 1.0])  # one per level
    assert load_decisions(tmp_path)["temperature"] == (1.2, 0.8, 1.0)
    (tmp_path / "decisions.json").write_text("{oops")
    with pytest.raises(ValueError, match="decisions.json"):
        load_decisions(tmp_path)
    for bad in ("hot", -1.0, [1.0, None]):
        (tmp_path / "decisions.json").write_text(json.dumps({"temperature": bad}))
        with pytest.raises(ValueError, match=r"decisions.json: 'temperature' must be a positive number"):
            load_decisions(tmp_path)


# ---------------------------------------------------------------------- losses
def test_soft_labels_hand_case(tree):
    classes = torch.tensor(LEAVES)  # D E F G H
    y = soft_label_targets(tree, torch.tensor([D]), classes, beta=1.0)[0]
    # distances to D over the root height 3: D 0, E/F/G 3/3, H 2/3
    w = torch.tensor([1.0, math.exp(-1), math.exp(-1), math.exp(-1), math.exp(-2 / 3)])
    assert y.tolist() == pytest.approx((w / w.sum()).tolist())
    logp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    assert float(soft_label_loss(logp, torch.tensor([D]), classes, tree, 1.0)) == pytest.approx(
        float(-(y * logp[0]).sum()))
    # β → ∞ is plain cross-entropy
    assert float(soft_label_loss(logp, torch.tensor([D]), classes, tree, 1e4)) == pytest.approx(-math.log(0.4))


def test_hxe_hand_case(tree):
    classes = torch.tensor(LEAVES)  # D E F G H
    logp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    # target D: path A (height 2), D (height 0): −[log(0.4/0.5) + e^(−0.5·2)·log 0.5]
    expected = -(math.log(0.4 / 0.5) + math.exp(-1.0) * math.log(0.5))
    assert float(hxe_loss(logp, torch.tensor([D]), classes, tree, 0.5)) == pytest.approx(expected, rel=1e-5)
    # α = 0 telescopes to cross-entropy; a coarse target A sums its own path only
    assert float(hxe_loss(logp, torch.tensor([D]), classes, tree, 0.0)) == pytest.approx(-math.log(0.4), rel=1e-5)
    assert float(hxe_loss(logp, torch.tensor([A]), classes, tree, 0.5)) == pytest.approx(
        -math.exp(-1.0) * math.log(0.5), rel=1e-5)


def test_max_constraint_and_chmcnn_loss_hand_case(tree):
    h = torch.tensor([[0.0, 0.2, 0.7, 0.6, 0.1, 0.3, 0.4, 0.9, 0.8]])  # root A B C D E F G H
    mcm = max_constraint(h, tree)[0]
    # A: max(A, C, D, H) = 0.8; C: max(C, H) = 0.8; B: max(B, E, F, G) = 0.9; leaves unchanged
    assert mcm.tolist()[1:] == pytest.approx([0.8, 0.9, 0.8, 0.1, 0.3, 0.4, 0.9, 0.8])
    # coherent: every node is at least its children, so thresholding never keeps a child without its parent
    for child in range(1, 9):
        parent = tree.parents[child]
        if parent:
            assert mcm[parent] >= mcm[child]
    # truth {A, D}: positives A, D scored by MCM(y·h): A max(0.2, 0.1) = 0.2, D 0.1; negatives by MCM(h)
    y = torch.zeros(1, 9)
    y[0, [A, D]] = 1
    logits = torch.logit(h.clamp(1e-6, 1 - 1e-6))
    expected = -(math.log(0.2) + math.log(1 - 0.9) + math.log(1 - 0.8) + math.log(0.1)
                 + math.log(1 - 0.3) + math.log(1 - 0.4) + math.log(1 - 0.9) + math.log(1 - 0.8)) / 8
    assert float(chmcnn_loss(logits, y, tree)) == pytest.approx(expected, rel=1e-4)


def _toy_predictions(tree: Taxonomy, n: int, seed: int) -> tuple[Prediction, torch.Tensor]:
    """Overconfident flat-style predictions: leaf logits sharpened ×3 against truth drawn from the unsharpened ones."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 9, generator=gen) * 1.5
    logits[:, [0, A, B, C]] = float("-inf")
    truth = torch.multinomial(logits.softmax(1), 1, generator=gen).squeeze(1)
    q = (logits * 3).softmax(1)
    return Prediction(tree.encode_paths(q.argmax(1)), node_marginals(q, tree), q.max(1).values), truth


def test_calibrate_and_crm_prediction(tree):
    q = leaf_q(H=0.35, E=0.25, F=0.21, G=0.19).float().unsqueeze(0)
    pred = Prediction(tree.encode_paths([H]), node_marginals(q, tree), torch.tensor([0.35]))
    assert calibrate(pred, tree) is pred
    crm = calibrate(pred, tree, decode="crm")
    assert crm.nodes.tolist() == [E] and crm.path_prob.tolist() == pytest.approx([0.25])
    soft = calibrate(pred, tree, temperature=4.0)
    assert soft.nodes.tolist() == [H] and float(soft.path_prob[0]) < 0.35  # softer, same answer
    with pytest.raises(ValueError, match="eval.decode"):
        calibrate(pred, tree, decode="mode")


def test_fit_decisions_and_evaluate_hedging(tree, tmp_path):
    val, val_t = _toy_predictions(tree, 3000, 1)
    test, test_t = _toy_predictions(tree, 3000, 2)
    model = torch.nn.Module()
    model.register_buffer("temperature", torch.tensor(1.0))
    fitted = fit_decisions(model, val, val_t, tree, tmp_path, targets=(0.9,))
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.1)  # undoes the ×3 sharpening
    assert float(model.temperature) == pytest.approx(fitted["temperature"])
    assert load_decisions(tmp_path)["hedge"]["0.9"] == fitted["hedge"]["0.9"]
    before = calibration_report(end_distribution(test, tree), test_t, tree)["ece"]
    after = calibration_report(end_distribution(test, tree, temperature=fitted["temperature"]), test_t, tree)["ece"]
    assert after < before / 2
    rep = evaluate_hedging(val, val_t, test, test_t, tree, 0.9, fitted["temperature"])
    assert rep["accuracy"] >= 0.9 - 0.02 and rep["conformal"]["accuracy"] >= 0.9 - 0.02
    assert 0 < rep["information_gain"] < math.log(5)
    assert rep["baseline"]["accuracy"] >= 0.9 - 0.02
    json.dumps(rep)


def test_plots_are_written(tree, tmp_path):
    val, val_t = _toy_predictions(tree, 400, 1)
    test, test_t = _toy_predictions(tree, 400, 2)
    mv = node_marginals(end_distribution(val, tree), tree)
    mt = node_marginals(end_distribution(test, tree), tree)
    rows = accuracy_specificity_curve(mv, val_t, mt, test_t, tree, targets=(0.8, 0.95))
    assert [r["target"] for r in rows] == [0.8, 0.95]
    assert rows[0]["information_gain"] >= rows[1]["information_gain"]  # a higher target buys less
    plot_accuracy_specificity({"toy": rows}, tmp_path / "curve.png")
    q = end_distribution(test, tree)
    plot_reliability({"T=1": (q.max(1).values, q.argmax(1) == test_t)}, tmp_path / "rel.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000 and (tmp_path / "rel.png").stat().st_size > 1000


def test_losses_backpropagate(tree):
    classes = torch.tensor(LEAVES)
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.tensor([D, A, G])  # a coarse target among them
    for loss in (hxe_loss(logits.log_softmax(1), targets, classes, tree, 0.3),
                 soft_label_loss(logits.log_softmax(1), targets, classes, tree, 4.0)):
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    node_logits = torch.randn(3, 9, requires_grad=True)
    y = tree.close_upwards(torch.nn.functional.one_hot(torch.tensor([D, E, H]), 9).bool())
    (grad,) = torch.autograd.grad(chmcnn_loss(node_logits, y, tree), node_logits)
    assert torch.isfinite(grad).all() and grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("per_level", [False, True])
def test_posthoc_report(tree, tmp_path, per_level):
    from hiervision.posthoc import posthoc_report

    val, val_t = _toy_predictions(tree, 2000, 1)
    test, test_t = _toy_predictions(tree, 2000, 2)
    model = torch.nn.Module()
    model.register_buffer("temperature", torch.tensor(1.0))
    rep = posthoc_report(model, val, val_t, test, test_t, tree, tmp_path, targets=(0.9, 0.99), decode="crm",
                         per_level=per_level)
    assert model.temperature.shape == ((3,) if per_level else ())  # the checkpoint carries what was fitted
    assert json.loads((tmp_path / "decisions.json").read_text())["temperature"] == pytest.approx(
        model.temperature.tolist(), rel=1e-6)
    assert rep["calibration"]["after"]["ece"] < rep["calibration"]["before"]["ece"]
    assert [h["target"] for h in rep["hedged"]] == [0.9, 0.99]
    assert rep["hedged"][1]["accuracy"] >= rep["hedged"][0]["accuracy"]
    assert set(rep["crm"]) == {"argmax", "crm", "bayes:hf1", "bayes:hf1:inner"}
    assert set(rep["crm"]["crm"]) == {"leaf_accuracy", "path_accuracy", "hierarchical_f1", "hierarchical_f1_macro",
                                      "mistake_severity", "depth_severity", "hdist@1", "hdist@5", "hdist@20",
                                      "hops"}
    assert rep["test"]["hdist@1"] == rep["crm"]["crm"]["hdist@1"]
    # each rule wins on the metric it optimises (in expectation; here on 2000 samples of a calibrated toy)
    f1 = {rule: r["hierarchical_f1_macro"] for rule, r in rep["crm"].items()}
    assert f1["bayes:hf1:inner"] >= f1["bayes:hf1"] >= f1["argmax"] - 0.005
    assert (tmp_path / "decisions.json").is_file()
    json.dumps(rep)


def test_guo_multihead_soft_labels_per_level():
    from hiervision.models import create_model

    tree = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B"})
    torch.manual_seed(0)
    kw = {"backbone": "resnet20", "backbone_kwargs": {"width": 0.25}, "in_chans": 1, "image_size": 16}
    ce = create_model("guo_multihead", tree, **kw).eval()
    soft = create_model("guo_multihead", tree, loss_type="soft_labels", loss_beta=1e4, **kw).eval()
    soft.load_state_dict(ce.state_dict())
    with torch.no_grad():
        out = ce(torch.randn(4, 1, 16, 16))
    targets = torch.tensor([3, 4, 6, 2])  # C, D, F and the coarse-only B
    # β → ∞: every level's soft label is one-hot, so the loss is the summed cross-entropy (eq. 1)
    assert float(soft.loss(out, targets)) == pytest.approx(float(ce.loss(out, targets)), rel=1e-5)
    # β = 1 by hand: target C = A/C; level 1 over [A, B]: d = [0, 1]; level 2 over [C, D, E, F, G]:
    # d = [0, h(A)/h(root) = 1/2, 1, 1, 1]. The coarse-only B has the level-1 term alone: d = [1, 0]
    soft.loss_beta = 1.0
    lp1, lp2 = out["level1"].log_softmax(1), out["level2"].log_softmax(1)
    e = math.exp
    y1 = torch.tensor([1, e(-1)]) / (1 + e(-1))
    y2 = torch.tensor([1, e(-0.5), e(-1), e(-1), e(-1)]) / (1 + e(-0.5) + 3 * e(-1))
    y1b = torch.tensor([e(-1), 1]) / (1 + e(-1))
    expected = -((y1 * lp1[0]).sum() + (y2 * lp2[0]).sum() + (y1b * lp1[3]).sum()) / 2
    assert float(soft.loss({k: v[[0, 3]] for k, v in out.items()}, torch.tensor([3, 2]))) == pytest.approx(
        float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="model.loss_type 'hxe'"):
        create_model("guo_multihead", tree, loss_type="hxe", **kw)


def test_dhnn_rnn_soft_labels_per_step():
    """DHNN CNN-RNN's step t is a softmax over every node; soft labels spread step t's target over the
    nodes of level t (by LCA height) and give the other levels' nodes none."""
    from hiervision.models import create_model

    tree = Taxonomy.from_parent_map({"A": None, "B": None, "C": "A", "D": "A", "E": "B", "F": "B", "G": "B"})
    torch.manual_seed(0)
    kw = {"backbone": "resnet20", "backbone_kwargs": {"width": 0.25}, "in_chans": 1, "image_size": 16,
          "input_size": 16, "hidden_size": 16, "pool_fallback": "project"}
    ce = create_model("dhnn_rnn", tree, **kw).eval()
    soft = create_model("dhnn_rnn", tree, loss_type="soft_labels", loss_beta=1e4, **kw).eval()
    soft.load_state_dict(ce.state_dict())
    with torch.no_grad():
        out = ce(torch.randn(3, 1, 16, 16))
    targets = torch.tensor([3, 6, 2])  # C, F and the coarse-only B
    assert float(soft.loss(out, targets)) == pytest.approx(float(ce.loss(out, targets)), rel=1e-5)  # β → ∞: CE
    soft.loss_beta = 1.0
    lp = out["logits"][0, :, 1:].log_softmax(-1)  # (steps, N): node n in column n − 1
    e = math.exp
    y1 = torch.tensor([1, e(-1)]) / (1 + e(-1))
    y2 = torch.tensor([1, e(-0.5), e(-1), e(-1), e(-1)]) / (1 + e(-0.5) + 3 * e(-1))
    expected = -((y1 * lp[0, :2]).sum() + (y2 * lp[1, 2:]).sum())
    assert float(soft.loss({"logits": out["logits"][:1]}, targets[:1])) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="model.loss_type 'hxe' is not available for dhnn_rnn"):
        create_model("dhnn_rnn", tree, loss_type="hxe", **kw)
