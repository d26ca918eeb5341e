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

import torch

from hiervision import metrics as M
from hiervision.bayes import decode_rule
from hiervision.decisions import (
    calibrate,
    evaluate_hedging,
    expected_lca_height,
    fit_decisions,
    load_decisions,
    save_decisions,
)
from hiervision.decoding import Prediction
from hiervision.distributions import EndDistribution
from hiervision.evaluation import predict_dataset
from hiervision.marginals import Temperature, as_temperature
from hiervision.taxonomy import Taxonomy

__all__ = ["evaluate_decisions", "posthoc_report"]

_MISTAKE_KEYS = ("leaf_accuracy", "path_accuracy", "hierarchical_f1", "hierarchical_f1_macro", "mistake_severity",
                 "depth_severity", "hdist@1", "hdist@5", "hdist@20")
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
) -> dict:
    """``{"temperature", "calibration": {"before", "after"}, "hedged": [...], "crm": {"argmax", "crm",
    "bayes:hf1", "bayes:hf1:inner"}, "test": <metrics report on the calibrated scores, decoded by decode>}``
    — single-label only. The ``crm`` entry (named when CRM was the one rule) holds every rule of
    :data:`RULES` beside argmax on the same calibrated scores.

    ``val``/``test``: the model's raw predictions (temperature 1) with their node-id targets;
    ``per_level``: one temperature per tree level (``eval.calibrate: per_level``).
    """
    decode_rule(decode)  # a bad rule fails before anything is fitted
    if val.labels is not None or test.labels is not None:
        raise ValueError("post-hoc calibration and hedging apply to single-label runs only")
    val_d, test_d = EndDistribution(val, taxonomy), EndDistribution(test, taxonomy)  # once per split
    fitted = fit_decisions(model, val_d, val_targets, taxonomy, run_dir, targets, per_level)
    t = fitted["temperature"]
    q0, q1 = test_d.q(), test_d.q(t)
    reports = _rule_reports(test_d, test_targets, taxonomy, t, dict.fromkeys(("argmax", *RULES, decode)))
    # CRM's hdist@k ranks by expected risk, as in Karthik et al.
    risk = expected_lca_height(q1, taxonomy)
    reports["crm"].update(M.hierarchical_distance_at_k(q1, test_targets, taxonomy, ranking=risk))
    return {
        "temperature": t,
        "calibration": {"before": M.calibration_report(q0, test_targets, taxonomy),
                        "after": M.calibration_report(q1, test_targets, taxonomy)},
        "hedged": [evaluate_hedging(val_d, val_targets, test_d, test_targets, taxonomy, a, t) for a in targets],
        "crm": {rule: {k: reports[rule][k] for k in _MISTAKE_KEYS} for rule in ("argmax", *RULES)},
        "test": reports[decode],
    }


def _rule_reports(test: EndDistribution, targets: torch.Tensor, taxonomy: Taxonomy, temperature: Temperature,
                  rules: Sequence[str]) -> dict[str, dict]:
    """``{rule: metrics report}`` of each decision rule's answers on the calibrated scores.

    Every rule calibrated from ``test`` carries the same scores (its calibrated node marginals, one
    tensor), and the report reads the end-class distribution back from them: it is built once and
    shared, not once per rule. (It equals ``test.q(temperature)`` up to float32 rounding of the
    marginals; reading it back keeps the reports as ``evaluate`` gives them for a calibrated prediction.)
    """
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(scores) -> (scores, their q)
    reports = {}
    for rule in rules:
        pred = calibrate(test, taxonomy, temperature, rule)
        if id(pred.scores) not in shared:
            shared[id(pred.scores)] = (pred.scores, EndDistribution(pred, taxonomy).q())
        reports[rule] = M.evaluate(pred, targets, taxonomy, q=shared[id(pred.scores)][1])
    return reports


def evaluate_decisions(run_dir: str | os.PathLike, model, data, split: str, batch_size: int, amp,
                       accuracy: float | None = None, decode: str = "argmax",
                       device: torch.device | None = None, given_level: int | None = None):
    """``(report, calibrated prediction, targets)`` of a split on the run's calibrated scores (``decode``:
    argmax | crm | bayes:METRIC[:inner]), plus, with an ``accuracy`` target, the ``hedged`` entry (λ fitted
    on the val split; :func:`evaluate_hedging`), whose λ is also stored in the run's ``decisions.json``
    (``Predictor.hedger`` reads it: predict, serve and an export hedge with it)."""
    if accuracy is not None and not 0 < accuracy < 1:
        raise ValueError(f"--accuracy must lie in (0, 1), got {accuracy}")
    if data.multi_label:
        raise ValueError("--accuracy and --decode crm/bayes apply to single-label runs only")
    device = device or torch.device("cpu")
    sets = {"train": data.train, "val": data.val, "test": data.test}
    t0 = time.perf_counter()
    pred, targets = predict_dataset(model, data, sets[split], batch_size, device, amp, given_level)
    seconds = time.perf_counter() - t0
    temperature = as_temperature(model.temperature)
    dist = EndDistribution(pred, data.taxonomy)  # shared by the calibrated report and the hedged entry
    calibrated = calibrate(dist, data.taxonomy, temperature, decode)
    result = {**M.evaluate(calibrated, targets, data.taxonomy),
              "eval_images_per_s": len(targets) / max(seconds, 1e-9), "decode": decode, "temperature": temperature}
    if accuracy is not None:
        if data.val is None or len(data.val) == 0:
            raise ValueError(f"{run_dir}: --accuracy needs a validation split to fit λ (data.val_fraction is 0)")
        val, val_targets = (dist, targets) if split == "val" else predict_dataset(model, data, data.val, batch_size,
                                                                                  device, amp)
        result["hedged"] = evaluate_hedging(val, val_targets, dist, targets, data.taxonomy, accuracy, temperature)
        # keep λ for the server's hedged answers (Predictor.hedger)
        fitted = load_decisions(run_dir).get("hedge", {})
        save_decisions(run_dir, hedge={**fitted, str(accuracy): result["hedged"]["lambda"]})
    return result, calibrated, targets
