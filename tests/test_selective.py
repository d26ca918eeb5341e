"""Hierarchical selective classification (hiervision.selective): the event-based curves against a brute-force
loop over thresholds with rollup.climb, hand cases, tight scores, and the threshold guarantee on
calibrated synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hiervision import selective
from hiervision.marginals import node_marginals
from hiervision.records import TreeView
from hiervision.rollup import Thresholds, climb

# root → A, B; A → A1, A2; A1 → a, b; A2 → c; B → B1; B1 → d, e
TREE = TreeView(names=("", "A", "B", "A1", "A2", "a", "b", "c", "B1", "d", "e"),
                parents=(-1, 0, 0, 1, 1, 3, 3, 4, 2, 8, 8))
LEAVES = np.flatnonzero(TREE.end_mask("leaves"))
A, B, A1, A2, a, b, c, B1, d, e = range(1, 11)


def brute(m, start, targets, theta: float, tree: TreeView = TREE) -> tuple[float, float]:
    """(coverage, risk) of climbing at one θ, from rollup.climb's answers."""
    answers = climb(m, start, tree, Thresholds((0.0,) + (theta,) * tree.max_depth))
    v = selective.coverage_values(tree)
    return float(v[answers].mean()), 1.0 - float(tree.is_ancestor(answers, targets).mean())


def quantised_case(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marginals from coarse q (exact ties), starts anywhere (leaves, inner nodes, the root), truths anywhere."""
    q = np.zeros((rows, TREE.num_nodes))
    q[:, LEAVES] = rng.integers(0, 4, (rows, len(LEAVES)))
    q[q.sum(1) == 0, LEAVES[0]] = 1.0
    q /= q.sum(1, keepdims=True)
    m = node_marginals(q, TREE)
    start = np.where(rng.random(rows) < 0.6, LEAVES[q[:, LEAVES].argmax(1)], rng.integers(0, TREE.num_nodes, rows))
    return m, start, rng.integers(0, TREE.num_nodes, rows)


def test_coverage_values_hand() -> None:
    v = selective.coverage_values(TREE)
    l5 = math.log(5)
    assert v[0] == 0.0 and np.allclose(v[LEAVES], 1.0) and v[A2] == pytest.approx(1.0)
    assert v[A] == pytest.approx(1 - math.log(3) / l5) and v[A1] == pytest.approx(1 - math.log(2) / l5)
    assert v[B] == pytest.approx(1 - math.log(2) / l5) == v[B1]
    everything = selective.coverage_values(TREE, ends="all")
    assert everything[0] == 0.0 and everything[A] == pytest.approx(1 - math.log(6) / math.log(10))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_climbing_curve_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, start, targets = quantised_case(rng, 60)
    curve = selective.climbing_curve(m, start, targets, TREE)
    assert np.all(np.diff(curve.thresholds) > 0) and np.all(np.diff(curve.coverage) <= 1e-12)
    assert curve.thresholds[-1] > 1 and curve.coverage[-1] == 0 and curve.risk[-1] == 0
    pts = np.array([brute(m, start, targets, th) for th in curve.thresholds])
    assert np.allclose(curve.coverage, pts[:, 0]) and np.allclose(curve.risk, pts[:, 1])
    # between events the answers do not move: any θ reads the first event at or above it (past the
    # last event, the all-root end)
    for th in np.linspace(0.0, 1.01, 102):
        i = min(np.searchsorted(curve.thresholds, th), len(curve.thresholds) - 1)
        assert np.allclose((curve.coverage[i], curve.risk[i]), brute(m, start, targets, th))
    area = np.sum((pts[:-1, 0] - pts[1:, 0]) * (pts[:-1, 1] + pts[1:, 1]) / 2)
    assert curve.area == pytest.approx(area)
    # the most specific end: the start nodes themselves
    v = selective.coverage_values(TREE)
    assert curve.coverage[0] == pytest.approx(v[start].mean())
    assert curve.risk[0] == pytest.approx(1 - TREE.is_ancestor(start, targets).mean())


def test_selective_curve_hand() -> None:
    q = np.zeros((3, TREE.num_nodes))
    q[0, [a, b]] = 0.9, 0.1  # right, sure
    q[1, [d, e]] = 0.6, 0.4  # wrong (truth e), fairly sure
    q[2, [c, a]] = 0.3, 0.7  # right, unsure
    m = node_marginals(q, TREE)
    curve = selective.selective_curve(m, [a, d, c], [a, e, c], TREE)
    assert np.allclose(curve.thresholds[:3], [0.3, 0.6, 0.9]) and curve.thresholds[3] > 1
    assert np.allclose(curve.coverage, [1, 2 / 3, 1 / 3, 0]) and np.allclose(curve.risk, [1 / 3, 1 / 3, 0, 0])
    assert curve.area == pytest.approx(1 / 6)
    out = curve.as_dict()
    assert json.loads(json.dumps(out))["area"] == pytest.approx(1 / 6) and out["points"] == 4


def test_selective_curve_endpoints_and_brute_force() -> None:
    rng = np.random.default_rng(5)
    m, start, targets = quantised_case(rng, 50)
    curve = selective.selective_curve(m, start, targets, TREE)
    v = selective.coverage_values(TREE)
    assert curve.coverage[0] == pytest.approx(v[start].mean())
    assert curve.risk[0] == pytest.approx(1 - TREE.is_ancestor(start, targets).mean())
    assert curve.coverage[-1] == 0 and curve.risk[-1] == 0 and curve.thresholds[-1] > 1
    for th in curve.thresholds:
        answers = np.where(m[np.arange(len(start)), start] >= th, start, 0)
        assert curve.coverage[np.searchsorted(curve.thresholds, th)] == pytest.approx(v[answers].mean())


def test_lambda_curve_through_the_climbing_rule() -> None:
    rng = np.random.default_rng(3)
    m, start, targets = quantised_case(rng, 40)
    grid = [0.0, 0.25, 0.5, 0.75, 0.95]
    curve = selective.lambda_curve(
        lambda t: climb(m, start, TREE, Thresholds((0.0,) + (t,) * TREE.max_depth)), grid, targets, TREE)
    assert curve.thresholds[-1] == math.inf and curve.coverage[-1] == 0 and curve.risk[-1] == 0
    for t, cov, risk in zip(curve.thresholds[:-1], curve.coverage[:-1], curve.risk[:-1]):
        assert np.allclose((cov, risk), brute(m, start, targets, t))
    assert json.dumps(curve.as_dict())  # the inf threshold becomes null


def test_as_dict_thins_and_keeps_both_ends() -> None:
    rng = np.random.default_rng(4)
    m, start, targets = quantised_case(rng, 400)
    curve = selective.climbing_curve(m, start, targets, TREE)
    out = curve.as_dict(max_points=5)
    assert len(out["coverage"]) <= 5 < out["points"]
    assert out["coverage"][0] == curve.coverage[0] and out["coverage"][-1] == 0.0
    assert out["area"] == curve.area


def test_tight_thresholds() -> None:
    rng = np.random.default_rng(7)
    m, start, targets = quantised_case(rng, 80)
    s = selective.tight_thresholds(m, start, targets, TREE)
    covers = TREE.is_ancestor(start, targets)
    assert np.all(np.isneginf(s[covers])) and np.all(np.isfinite(s[~covers]))
    for i in np.flatnonzero(~covers):
        above, at = np.nextafter(s[i], np.inf), s[i]
        for theta, right in ((above, True), (at, False)):
            answer = climb(m[i:i + 1], start[i:i + 1], TREE, Thresholds((0.0,) + (theta,) * TREE.max_depth))
            assert bool(TREE.is_ancestor(answer, targets[i:i + 1])[0]) is right
    # hand: start a, truth b → the first node off the truth's path is a itself
    q = np.zeros((1, TREE.num_nodes))
    q[0, [a, b, d]] = 0.5, 0.3, 0.2
    mm = node_marginals(q, TREE)
    assert selective.tight_thresholds(mm, [a], [b], TREE)[0] == pytest.approx(0.5)
    assert selective.tight_thresholds(mm, [a], [d], TREE)[0] == pytest.approx(0.8)  # A is off the path to d
    assert selective.tight_thresholds(mm, [a], [A1], TREE)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("n,p", [(1, 0.3), (5, 0.5), (12, 0.9), (30, 0.97)])
def test_binomial_tails_against_a_direct_sum(n: int, p: float) -> None:
    direct = [sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)) for k in range(n + 1)]
    assert np.allclose(selective.binomial_tails(n, p), direct, rtol=1e-10, atol=1e-15)
    assert np.all(np.isfinite(selective.binomial_tails(50_000, 0.9)))


def calibrated(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calibrated model: q from a Dirichlet, the truth drawn from q, the start its argmax leaf."""
    q = np.zeros((rows, TREE.num_nodes))
    q[:, LEAVES] = rng.dirichlet(np.full(len(LEAVES), 0.5), size=rows)
    cum = q[:, LEAVES].cumsum(1)
    truth = LEAVES[np.minimum((rng.random((rows, 1)) > cum).sum(1), len(LEAVES) - 1)]
    return node_marginals(q, TREE), LEAVES[q[:, LEAVES].argmax(1)], truth


def test_guaranteed_threshold_holds_on_calibrated_data() -> None:
    rng = np.random.default_rng(11)
    m, start, targets = calibrated(rng, 40_000)
    fit = selective.guaranteed_threshold(m[:2000], start[:2000], targets[:2000], TREE, 0.9, 0.9)
    assert fit["feasible"] and fit["n"] == 2000 and 0 < fit["threshold"] <= 1
    assert fit["calibration_accuracy"] >= fit["k"] / 2000 >= 0.9
    assert set(fit) == {"threshold", "target_accuracy", "confidence", "n", "k", "feasible", "calibration_accuracy",
                        "test_size"}
    # 2,000 calibration images, 38,000 test images: the test set's own noise is small beside the calibration's
    out = selective.threshold_misses(m, start, targets, TREE, 0.9, 0.9, repeats=200, seed=1,
                                     calibration_fraction=0.05)
    assert out["repeats"] == 200 and out["miss_rate"] <= 0.1 + 0.05
    assert out["accuracy_mean"] >= 0.9 and out["coverage_mean"] > 0.2
    assert out["test_set"]["miss_rate"] <= 0.1 + 0.05 and out["test_size"] == 38_000
    # the check has teeth: asking for 50% confidence misses about half the time
    coin = selective.threshold_misses(m, start, targets, TREE, 0.9, 0.5, repeats=200, seed=1,
                                      calibration_fraction=0.05)
    assert 0.3 <= coin["miss_rate"] <= 0.7
    again = selective.threshold_misses(m, start, targets, TREE, 0.9, 0.9, repeats=200, seed=1,
                                       calibration_fraction=0.05)
    assert again == out


def test_guaranteed_threshold_infeasible_answers_the_root() -> None:
    rng = np.random.default_rng(2)
    m, start, targets = calibrated(rng, 3)
    fit = selective.guaranteed_threshold(m, start, targets, TREE, 0.9, 0.9)
    assert fit["feasible"] is False and fit["k"] is None and fit["threshold"] > 1
    answers = climb(m, start, TREE, Thresholds((0.0,) + (fit["threshold"],) * TREE.max_depth))
    assert np.all(answers == 0) and fit["calibration_accuracy"] == 1.0


def test_guaranteed_threshold_zero_when_the_starts_are_right() -> None:
    m, start, _ = calibrated(np.random.default_rng(3), 200)
    fit = selective.guaranteed_threshold(m, start, start, TREE, 0.9, 0.9)
    assert fit["feasible"] and fit["threshold"] == 0.0 and fit["calibration_accuracy"] == 1.0


@pytest.mark.parametrize("call, word", [
    (lambda m, s, t: selective.guaranteed_threshold(m, s, t, TREE, 1.0, 0.9), "target_accuracy"),
    (lambda m, s, t: selective.guaranteed_threshold(m, s, t, TREE, 0.9, 0), "confidence"),
    (lambda m, s, t: selective.climbing_curve(m[:, :4], s, t, TREE), "marginals"),
    (lambda m, s, t: selective.climbing_curve(m, s + 99, t, TREE), "start"),
    (lambda m, s, t: selective.selective_curve(m, s, t[:2], TREE), "length"),
    (lambda m, s, t: selective.threshold_misses(m, s, t, TREE, 0.9, 0.9, calibration_fraction=1.5),
     "calibration_fraction"),
    (lambda m, s, t: selective.climbing_curve(m, s, t, TREE).as_dict(max_points=1), "max_points"),
    (lambda m, s, t: selective.lambda_curve(lambda x: s, [], t, TREE), "lambdas"),
])
def test_bad_inputs_say_one_line(call, word: str) -> None:
    m, s, t = calibrated(np.random.default_rng(0), 10)
    with pytest.raises(ValueError) as err:
        call(m, s, t)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_the_test_set_bound_keeps_a_finite_test_sets_miss_rate_within_the_confidence():
    """With exchangeable scores, a threshold bounded for a test set of m images misses its target on such a set
    with probability ≤ 1 − confidence (the population bound may miss more: the set's own sampling noise)."""
    from hiervision.selective import _order_index, _order_index_for

    rng = np.random.default_rng(0)
    n, m, a, c = 400, 400, 0.9, 0.9
    k_set, k_pop = _order_index_for(n, m, a, c), _order_index(n, a, c)
    assert k_set >= k_pop
    misses = {"set": 0, "population": 0}
    for _ in range(2000):
        cal, test = np.sort(rng.random(n)), rng.random(m)
        misses["set"] += np.mean(test < cal[k_set - 1]) < a
        misses["population"] += np.mean(test < cal[k_pop - 1]) < a
    assert misses["set"] / 2000 <= 1 - c + 0.02
    assert misses["population"] > misses["set"]
