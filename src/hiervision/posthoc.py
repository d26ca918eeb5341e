"""The post-hoc step of a run, after training: calibrate on validation, then report the decision rules on test.

One call (:func:`posthoc_report`) from predictions the trainer already has, so ``train`` and the
benchmarks share it: it fits the temperature and the hedging multipliers on the validation split
(:func:`hiervision.decisions.fit_decisions`, written to ``decisions.json`` and into the model's
``temperature`` buffer), and measures on test ECE before/after, the hedged answers at each target
against the naive back-off baseline and split-conformal answers, and the decision rules (CRM, the
Bayes-optimal answers for hierarchical F1, end classes only and inner nodes allowed) against argmax.

Every one of those reads the end-class distribution of the validation or the test predictions at
temperature 1 or the fitted one: each split's is pushed down the tree once
(:class:`~hiervision.distributions.EndDistribution`, which keeps its tempered copies) and handed to
the rules and the metrics, instead of each rebuilding it from the raw prediction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hiervision import marginals
from hiervision import metrics as M
from hiervision import novelty as N
from hiervision import selective as S
from hiervision.bayes import decode_rule
from hiervision.decisions import (
    calibrate,
    coverage_report,
    evaluate_hedging,
    expected_lca_height,
    fit_decisions,
    hedger,
    load_decisions,
    restrict_prediction,
    rule_nodes,
    save_decisions,
)
from hiervision.decoding import Prediction, last_node
from hiervision.distributions import EndDistribution, rewards
from hiervision.evaluation import predict_dataset
from hiervision.marginals import Temperature, as_temperature, end_distribution
from hiervision.restrict import Allowed
from hiervision.rollup import Thresholds, climb
from hiervision.taxonomy import Taxonomy

__all__ = ["Answers", "evaluate_decisions", "guaranteed_report", "open_world_report", "posthoc_report",
           "rollup_report", "selective_report"]

_MISTAKE_KEYS = ("leaf_accuracy", "path_accuracy", "hierarchical_f1", "hierarchical_f1_macro", "mistake_severity",
                 "depth_severity", "hdist@1", "hdist@5", "hdist@20", "hops")
#: the rules every post-hoc report shows beside argmax (``crm`` entry of metrics.json); Bayes hF1 maximises
#: the per-image F1, i.e. ``hierarchical_f1_macro``
RULES = ("crm", "bayes:hf1", "bayes:hf1:inner")


def posthoc_report(
    model: torch.nn.Module,
    val: Prediction,
    val_targets: torch.Tensor,
    test: Prediction,
    test_targets: torch.Tensor,
    taxonomy: Taxonomy,
    run_dir: str | os.PathLike | None = None,
    targets: Sequence[float] = (0.9, 0.95, 0.99),
    decode: str = "argmax",
    per_level: bool = False,
    novel: torch.Tensor | None = None,
    progress: bool = False,
) -> dict:
    """``{"temperature", "calibration": {"before", "after"}, "hedged": [...], "crm": {"argmax", "crm",
    "bayes:hf1", "bayes:hf1:inner"}, "selective": {rule: risk–coverage curve and hAURC},
    "test": <metrics report on the calibrated scores, decoded by decode>}``
    — single-label only. The ``crm`` entry (named when CRM was the one rule) holds every rule of
    :data:`RULES` beside argmax on the same calibrated scores.

    ``val``/``test``: the model's raw predictions (temperature 1) with their node-id targets;
    ``per_level``: one temperature per tree level (``eval.calibrate: per_level``); ``novel``: which test images
    belong to classes held out of training (``data.holdout_leaves``), adding ``open_world``. ``progress``: a bar
    over the steps (seconds each on a 10⁵-node tree).
    """
    decode_rule(decode)  # a bad rule fails before anything is fitted
    if val.labels is not None or test.labels is not None:
        raise ValueError("post-hoc calibration and hedging apply to single-label runs only")
    total = 3 + len(targets) + (novel is not None)
    with tqdm(total=total, desc="after training", unit="step", disable=not progress, leave=False) as bar:
        def step(done: str) -> None:
            bar.update(1)
            bar.set_postfix_str(done, refresh=True)

        val_d, test_d = EndDistribution(val, taxonomy), EndDistribution(test, taxonomy)  # once per split
        fitted = fit_decisions(model, val_d, val_targets, taxonomy, run_dir, targets, per_level)
        t = fitted["temperature"]
        step("temperature, hedging and conformal thresholds on val")
        q0, q1 = test_d.q(), test_d.q(t)
        reports = _rule_reports(test_d, test_targets, taxonomy, t, dict.fromkeys(("argmax", *RULES, decode)))
        # CRM's hdist@k and HOPS rank by expected risk, as in Karthik et al.
        risk = expected_lca_height(test_d, taxonomy, t)
        reports["crm"].update(M.hierarchical_distance_at_k(q1, test_targets, taxonomy, ranking=risk),
                              hops=M.hops(q1, test_targets, taxonomy, ranking=risk)["hops"])
        step("argmax, CRM and Bayes answers")
        hedged = []
        for a in targets:
            hedged.append(evaluate_hedging(val_d, val_targets, test_d, test_targets, taxonomy, a, t, fitted))
            step(f"hedged answers at {a}")
        out = {
            "temperature": t,
            "calibration": {"before": M.calibration_report(q0, test_targets, taxonomy, m=test_d.node_marginals()),
                            "after": M.calibration_report(q1, test_targets, taxonomy, m=test_d.node_marginals(t))},
            "hedged": hedged,
            "crm": {rule: {k: reports[rule][k] for k in _MISTAKE_KEYS} for rule in ("argmax", *RULES)},
            "selective": selective_report(test_d, test_targets, taxonomy, t),
            "test": reports[decode],
        }
        step("risk-coverage curves")
        if novel is not None:
            out["open_world"] = open_world_report(test_d, test_targets, novel, taxonomy, t, _novel_classes(model))
            step("open world")
    return out


def _rule_reports(test: EndDistribution, targets: torch.Tensor, taxonomy: Taxonomy, temperature: Temperature,
                  rules: Sequence[str]) -> dict[str, dict]:
    """``{rule: metrics report}`` of each decision rule's answers on the calibrated scores.

    Every rule's answers come with the same calibrated scores, whose end-class distribution is ``test``'s at
    ``temperature``: it and the metrics of the scores alone (:func:`~hiervision.metrics.score_metrics`) are
    read once and shared, not once per rule.
    """
    q = test.q(temperature)
    targets = torch.as_tensor(targets)
    end = last_node(M.target_paths(targets, taxonomy) if targets.dim() == 1 else targets.long())
    scored = M.score_metrics(q, end.to(q.device), taxonomy, test.node_marginals(temperature)) if len(end) else None
    return {rule: M.evaluate(calibrate(test, taxonomy, temperature, rule), targets, taxonomy, q=q, scored=scored)
            for rule in rules}


@dataclass
class Answers:
    """What ``evaluate`` is asked to do beyond the model's own answers, all on the calibrated scores:
    ``decode`` (argmax | crm | bayes:METRIC[:inner]), hedging at ``accuracy`` (DARTS), the roll-up at
    ``thresholds``, answers restricted to ``allowed``, and a climbing threshold guaranteed to reach
    ``target`` = (accuracy, confidence)."""

    decode: str = "argmax"
    accuracy: float | None = None
    thresholds: Thresholds | None = None
    allowed: Allowed | None = None
    target: tuple[float, float] | None = None


def evaluate_decisions(run_dir: str | os.PathLike, model, data, split: str, batch_size: int, amp,
                       answers: Answers, device: torch.device | None = None, given_level: int | None = None):
    """``(report, calibrated prediction, targets)`` of a split on the run's calibrated scores, answered as
    ``answers`` asks (:class:`Answers`): with an ``accuracy`` target the ``hedged`` entry (λ fitted on the val
    split; :func:`evaluate_hedging`, λ also stored in the run's ``decisions.json`` for ``Predictor.hedger``),
    with ``thresholds`` the ``rollup`` entry, with ``allowed`` only the images of allowed classes (``allowed``
    says how many), with ``target`` the ``guaranteed`` entry; ``selective`` always holds each rule's hAURC."""
    if answers.accuracy is not None and not 0 < answers.accuracy < 1:
        raise ValueError(f"--accuracy must lie in (0, 1), got {answers.accuracy}")
    if data.multi_label:
        raise ValueError("--accuracy, --decode crm/bayes, --min-prob and --within apply to single-label runs only")
    device = device or torch.device("cpu")
    sets = {"train": data.train, "val": data.val, "test": data.test}
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, sets[split], batch_size, device, amp, given_level)
    seconds = time.perf_counter() - t0
    temperature = as_temperature(model.temperature)
    val = None
    if answers.accuracy is not None or answers.target is not None:
        if data.val is None or len(data.val) == 0:
            raise ValueError(f"{run_dir}: --accuracy and --target-accuracy need a validation split to fit on "
                             "(data.val_fraction is 0)")
        val = (pred, targets) if split == "val" else predict_dataset(model, data, data.val, batch_size, device, amp)
    result: dict = {}
    if answers.allowed is not None:
        (pred, targets), val, result["allowed"] = _restrict_to(answers.allowed, (pred, targets), val, model)
    dist = EndDistribution(pred, data.taxonomy)  # shared by the calibrated report and every rule
    calibrated = calibrate(dist, data.taxonomy, temperature, answers.decode, answers.allowed)
    result = {**M.evaluate(calibrated, targets, data.taxonomy), **result,
              "eval_images_per_s": len(targets) / max(seconds, 1e-9), "decode": answers.decode,
              "temperature": temperature}
    result["selective"] = selective_report(dist, targets, data.taxonomy, temperature, answers.allowed)
    if data.novel is not None and split == "test" and answers.allowed is None:
        result["open_world"] = open_world_report(dist, targets, data.novel, data.taxonomy, temperature,
                                                 _novel_classes(model))
    if answers.thresholds is not None:
        result["rollup"] = rollup_report(calibrated, targets, data.taxonomy, answers.thresholds)
    if val is not None:
        val_d = EndDistribution(val[0], data.taxonomy)
        if answers.accuracy is not None:
            result["hedged"] = evaluate_hedging(val_d, val[1], dist, targets, data.taxonomy, answers.accuracy,
                                                temperature)
            fitted = load_decisions(run_dir).get("hedge", {})  # keep λ for the server's hedged answers
            save_decisions(run_dir, hedge={**fitted, str(answers.accuracy): result["hedged"]["lambda"]})
        if answers.target is not None:
            result["guaranteed"] = guaranteed_report(val_d, val[1], calibrated, targets, data.taxonomy, temperature,
                                                     answers)
    return result, calibrated, targets


def _restrict_to(allowed: Allowed, test: tuple[Prediction, torch.Tensor], val, model):
    """Keep the images whose truth is an allowed class (or above one: a coarse label), in both splits; a path
    decoder's search is restricted only in the runtime, so such heads are refused here in one line."""
    kind = model.decoder_settings().get("kind")
    if kind in ("beam", "beam_steps"):
        raise ValueError(f"--within/--classes: {type(model).__name__} searches paths (beam search); evaluate "
                         "restricts heads that score every class — predict and serve restrict it by a masked search")

    def keep(split):
        pred, targets = split
        rows = torch.from_numpy(allowed.reach[targets.cpu().numpy()]).to(targets.device)
        kept = Prediction(pred.paths[rows], pred.scores[rows], pred.path_prob[rows], None)
        return restrict_prediction(kept, model.taxonomy, allowed), targets[rows]

    kept = keep(test)
    if not len(kept[1]):
        raise ValueError(f"{allowed.description}: no image of the split belongs to those classes")
    info = {**allowed.as_dict(), "images": len(kept[1]), "skipped": len(test[1]) - len(kept[1])}
    return kept, (keep(val) if val is not None else None), info


def rollup_report(calibrated: Prediction, targets: torch.Tensor, taxonomy: Taxonomy, thresholds: Thresholds) -> dict:
    """The roll-up's answers on a split (:func:`hiervision.rollup.climb` from each calibrated answer):
    accuracy (the answer covers the truth), specificity and the share of answers at each depth."""
    m = calibrated.scores.detach().cpu().double().numpy()
    nodes = climb(m, calibrated.nodes.cpu().numpy(), taxonomy.view, thresholds)
    return {"thresholds": thresholds.as_dict(), **coverage_report(torch.from_numpy(nodes), targets, taxonomy)}


def selective_report(test: EndDistribution, targets: torch.Tensor, taxonomy: Taxonomy, temperature: Temperature,
                     allowed: Allowed | None = None, max_points: int = 50) -> dict:
    """Each rule's hierarchical risk–coverage curve and its area (hAURC, lower is better; Goren et al.) on the
    same images: ``argmax`` (the model's answer or nothing), ``climbing`` (with the run's temperature and,
    as ``climbing_t1``, without), ``crm`` and ``bayes:hf1`` (climbing from their end-class answers) and ``darts``
    (Deng et al.'s λ swept over a grid). A restricted run passes its restricted prediction
    (:func:`hiervision.decisions.restrict_prediction`) and ``allowed``, which CRM and Bayes answer within."""
    tree, t = taxonomy.view, targets.cpu().numpy()
    m = test.node_marginals(temperature)
    m_np, start = m.double().cpu().numpy(), test.prediction.nodes.cpu().numpy()
    m1 = m_np if marginals.is_identity(temperature) else test.node_marginals(1.0).double().cpu().numpy()
    r_max, hedge = float(rewards(taxonomy).max()), hedger(m, taxonomy)
    curves = {
        "argmax": S.selective_curve(m_np, start, t, tree),
        "climbing": S.climbing_curve(m_np, start, t, tree),
        "climbing_t1": S.climbing_curve(m1, start, t, tree),
        **{rule: S.climbing_curve(m_np, rule_nodes(test, taxonomy, temperature, rule, allowed).cpu().numpy(), t, tree)
           for rule in ("crm", "bayes:hf1")},
        # λ = 0 already hedges where an inner node's reward outweighs its lost probability: the curve starts
        # from the model's own answers (λ = −inf, as every other rule starts) so that areas span equal coverage
        "darts": S.lambda_curve(lambda lam: start if lam == -np.inf else hedge(lam).cpu().numpy(),
                                [-np.inf, 0.0, *(r_max * np.logspace(-3, 4, 29))], t, tree),
    }
    return {rule: c.as_dict(max_points) for rule, c in curves.items()}


def _novel_classes(model: torch.nn.Module) -> bool:
    """Whether the model's inner answers mean "novel under this node" (its decoder's ``novel`` flag: hnd)."""
    return bool(model.decoder_settings().get("novel")) if hasattr(model, "decoder_settings") else False


def open_world_report(test: EndDistribution, targets: torch.Tensor, novel: torch.Tensor, taxonomy: Taxonomy,
                      temperature: Temperature, novel_classes: bool = False) -> dict:
    """How each rule answers classes held out of training (``data.holdout_leaves``): a known image is right at
    its end class, a novel one at exactly its nearest ancestor in the tree (Lee et al.). ``argmax`` is the
    model's own answer (never right on a novel image); ``climbing`` (the roll-up from it, every threshold) and
    ``darts`` (λ swept) trace known–novel curves (:func:`hiervision.novelty.curve_summary`: area, novel accuracy
    at 50 % known and at argmax's known accuracy); ``bayes:hf1:inner`` answers once; ``min_prob_0.5`` is the
    roll-up at 0.5, with the tree distance of its novel answers from the right ancestor; ``novel_bias`` (a head
    whose inner nodes are "novel" classes, ``hnd``) sweeps the bias on those classes' logits."""
    tree, t, nv = taxonomy.view, targets.cpu().numpy(), novel.cpu().numpy().astype(bool)
    m = test.node_marginals(temperature)
    m_np, start = m.double().cpu().numpy(), test.prediction.nodes.cpu().numpy()
    own = N.accuracies(start, t, nv, tree)
    r_max, hedge = float(rewards(taxonomy).max()), hedger(m, taxonomy)
    half = climb(m_np, start, tree, Thresholds((0.0,) + (0.5,) * tree.max_depth))
    biased = {}
    if novel_classes:  # inner nodes are "novel under it" classes (hnd): Lee et al.'s curve, their bias swept
        q_all = end_distribution(test.prediction.scores.double().cpu().numpy(), tree, "all")
        biased["novel_bias"] = N.points_curve(lambda b: N.novel_bias_answers(q_all, b, tree), N.NOVEL_BIASES, t, nv,
                                              tree, at=own["known"])
    return {
        "known_images": int((~nv).sum()), "novel_images": int(nv.sum()), "argmax": own,
        "climbing": N.climbing_curve(m_np, start, t, nv, tree, at=own["known"]),
        "darts": N.points_curve(lambda lam: hedge(lam).cpu().numpy(),
                                [0.0, *(r_max * np.logspace(-3, 4, 29))], t, nv, tree, at=own["known"]),
        "bayes:hf1:inner": N.accuracies(rule_nodes(test, taxonomy, temperature, "bayes:hf1:inner").cpu().numpy(), t,
                                        nv, tree),
        "min_prob_0.5": N.accuracies(half, t, nv, tree), **biased,
    }


def guaranteed_report(val: EndDistribution, val_targets: torch.Tensor, calibrated: Prediction,
                      targets: torch.Tensor, taxonomy: Taxonomy, temperature: Temperature, answers: Answers) -> dict:
    """A climbing threshold fitted on validation to reach ``answers.target`` = (accuracy, confidence)
    (:func:`hiervision.selective.guaranteed_threshold`), what it reached on this split, and how often such a
    threshold misses over 100 random calibration/test halves of this split."""
    accuracy, confidence = answers.target
    tree = taxonomy.view
    vm = val.node_marginals(temperature).double().cpu().numpy()
    v_start = calibrate(val, taxonomy, temperature, answers.decode, answers.allowed).nodes.cpu().numpy()
    # bounded for a set the size of the split it is measured on (the population bound is looser by that set's noise)
    fit = S.guaranteed_threshold(vm, v_start, val_targets.cpu().numpy(), tree, accuracy, confidence, len(targets))
    m, start = calibrated.scores.double().cpu().numpy(), calibrated.nodes.cpu().numpy()
    nodes = climb(m, start, tree, Thresholds((0.0,) + (fit["threshold"],) * tree.max_depth))
    reached = coverage_report(torch.from_numpy(nodes), targets, taxonomy)
    misses = S.threshold_misses(m, start, targets.cpu().numpy(), tree, accuracy, confidence)
    return {**fit, "reached": reached["accuracy"], "specificity": reached["specificity"], "misses": misses}
