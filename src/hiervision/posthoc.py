"""The post-hoc step of a run, after training: calibrate on validation, then report the decision rules on test.

One call (:func:`posthoc_report`) from predictions the trainer already has, so ``train`` and the
benchmarks share it: it fits the temperature and the hedging multipliers on the validation split
(:func:`hiervision.decisions.fit_decisions`, written to ``decisions.json`` and into the model's
``temperature`` buffer), and measures on test ECE before/after, the hedged answers at each target
against the naive back-off baseline and split-conformal answers, and CRM against argmax decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from hiervision import metrics as M
from hiervision.decisions import (
    DECODE_RULES,
    calibrate,
    end_distribution,
    fit_decisions,
    hedged_evaluation,
    lca_heights,
)
from hiervision.decoding import Prediction
from hiervision.taxonomy import Taxonomy

__all__ = ["posthoc_report"]

_MISTAKE_KEYS = ("leaf_accuracy", "path_accuracy", "mistake_severity", "hdist@1", "hdist@5", "hdist@20")


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
) -> dict:
    """``{"temperature", "calibration": {"before", "after"}, "hedged": [...], "crm": {"argmax", "crm"},
    "test": <metrics report on the calibrated scores, decoded by decode>}`` — single-label only.

    ``val``/``test``: the model's raw predictions (temperature 1) with their node-id targets.
    """
    if decode not in DECODE_RULES:
        raise ValueError(f"eval.decode must be one of {list(DECODE_RULES)}, got {decode!r}")
    if val.labels is not None or test.labels is not None:
        raise ValueError("post-hoc calibration and hedging apply to single-label runs only")
    fitted = fit_decisions(model, val, val_targets, taxonomy, run_dir, targets)
    t = fitted["temperature"]
    q0, q1 = end_distribution(test, taxonomy), end_distribution(test, taxonomy, temperature=t)
    argmax = M.evaluate(calibrate(test, taxonomy, t, "argmax"), test_targets, taxonomy)
    crm = M.evaluate(calibrate(test, taxonomy, t, "crm"), test_targets, taxonomy)
    # CRM's hdist@k ranks by expected risk, as in Karthik et al.
    risk = q1 @ lca_heights(taxonomy, q1.device).to(q1.dtype)
    crm.update(M.hierarchical_distance_at_k(q1, test_targets, taxonomy, ranking=risk))
    return {
        "temperature": t,
        "calibration": {"before": M.calibration_report(q0, test_targets, taxonomy),
                        "after": M.calibration_report(q1, test_targets, taxonomy)},
        "hedged": [hedged_evaluation(val, val_targets, test, test_targets, taxonomy, a, t) for a in targets],
        "crm": {"argmax": {k: argmax[k] for k in _MISTAKE_KEYS}, "crm": {k: crm[k] for k in _MISTAKE_KEYS}},
        "test": crm if decode == "crm" else argmax,
    }
