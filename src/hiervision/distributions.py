"""End-class distributions, temperature and node marginals as tensors: the torch side of :mod:`hiervision.marginals`.

:mod:`hiervision.metrics` and :mod:`hiervision.decisions` both read a model's scores as an end-class
distribution ``q`` ``(B, N+1)`` (column 0 = 0, rows sum to 1); this module sits below both so that neither
imports the other for it. The arithmetic is :mod:`hiervision.marginals`' numpy code (shared with the torch-free
runtime, so a probability means the same thing in ``evaluate`` and in a prediction record); these functions
wrap it for tensors.

Pushing a prediction's scores down the tree is the costly step and does not depend on the temperature, so an
:class:`EndDistribution` does it once per prediction and keeps every tempered copy asked of it: the post-hoc
step (:mod:`hiervision.posthoc`) builds one per split and hands it to every rule and metric.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
import torch

from hiervision import marginals
from hiervision.decoding import Prediction, end_mask, tree_tables
from hiervision.marginals import Temperature
from hiervision.taxonomy import Taxonomy

T = TypeVar("T")

__all__ = ["EndDistribution", "apply_temperature", "distribution_of", "end_distribution", "node_marginals", "rewards"]


def end_distribution(
    scores: torch.Tensor | Prediction, taxonomy: Taxonomy, ends: str = "leaves", temperature: Temperature = 1.0
) -> torch.Tensor:
    """``(B, N+1)`` probability that each end class is the truth, from a model's node scores, with the
    temperature applied: :func:`hiervision.marginals.end_distribution` (the numpy implementation the
    runtime shares), as a float32 tensor on the scores' device. Callers that need it more than once, or at
    several temperatures, keep an :class:`EndDistribution` instead."""
    s = scores.scores if isinstance(scores, Prediction) else scores
    q = marginals.end_distribution(s.detach().float().cpu().numpy(), taxonomy, ends, temperature)
    return torch.from_numpy(q).float().to(s.device)


def apply_temperature(q: torch.Tensor, temperature: Temperature | torch.Tensor, taxonomy: Taxonomy | None = None,
                      ends: str = "leaves") -> torch.Tensor:
    """``q ∝ q^(1/T)`` row-wise, or per level along the tree (``taxonomy`` needed); zeros stay zero
    (:func:`hiervision.marginals.apply_temperature`)."""
    if marginals.is_identity(temperature):
        return q
    t = marginals.as_temperature(temperature)
    return torch.from_numpy(marginals.apply_temperature(q.detach().cpu().numpy(), t, taxonomy, ends)).to(q)


def node_marginals(q: torch.Tensor, taxonomy: Taxonomy) -> torch.Tensor:
    """``(B, N+1)`` probability that the truth lies under (or at) each node; the root's column is 1.
    Coherent by construction: a parent is never below its child."""
    return torch.from_numpy(marginals.node_marginals(q.detach().cpu().numpy(), taxonomy)).to(q)


def rewards(taxonomy: Taxonomy, ends: str = "leaves") -> torch.Tensor:
    """``(N+1,)`` Deng et al.'s reward ``r(v) = log|ends| − log|ends under v|``: 0 at the root, largest
    at an end class (information gained by the answer when it is right). Computed once per tree (a copy each
    call): hedging's bisection asks for it hundreds of times."""
    return _rewards(taxonomy, ends).clone()


@functools.lru_cache(maxsize=16)
def _rewards(taxonomy: Taxonomy, ends: str) -> torch.Tensor:
    mask = end_mask(taxonomy, ends).float()
    under = tree_tables(taxonomy, mask.device).subtree_sum(mask.unsqueeze(0))[0]  # end classes at or below
    return torch.log(mask.sum()) - torch.log(under.clamp(min=1))


class EndDistribution:
    """One prediction's end-class distribution, pushed down the tree once, with its tempered copies and their
    node marginals made on first use and kept, so that rules and metrics reading the same prediction at the
    same temperature share one tensor instead of each rebuilding it (torch → numpy → torch).

    :meth:`q` is bit for bit :func:`end_distribution` of the prediction at that temperature, and
    :meth:`node_marginals` :func:`node_marginals` of it. Holds the untempered float64 distribution
    ``(B, N+1)`` for as long as it lives.
    """

    def __init__(self, prediction: Prediction, taxonomy: Taxonomy, ends: str = "leaves") -> None:
        self.prediction, self.taxonomy, self.ends = prediction, taxonomy, ends
        s = prediction.scores
        self.device = s.device
        # temperature 1: the push-down alone; every temperature is applied to this float64 array, as
        # marginals.end_distribution itself does
        self._base = marginals.end_distribution(s.detach().float().cpu().numpy(), taxonomy, ends)
        self._q: dict[Temperature, torch.Tensor] = {}
        self._m: dict[Temperature, torch.Tensor] = {}
        self._made: dict[Hashable, object] = {}

    def __len__(self) -> int:
        return len(self._base)

    def q(self, temperature: Temperature = 1.0) -> torch.Tensor:
        """``(B, N+1)`` float32 end-class distribution at ``temperature``, on the scores' device."""
        key = marginals.as_temperature(temperature)
        if key not in self._q:
            q = marginals.apply_temperature(self._base, key, self.taxonomy, self.ends)
            self._q[key] = torch.from_numpy(np.asarray(q)).float().to(self.device)
        return self._q[key]

    def node_marginals(self, temperature: Temperature = 1.0) -> torch.Tensor:
        """``(B, N+1)`` node marginals of :meth:`q` at ``temperature`` (the truth lies under each node)."""
        key = marginals.as_temperature(temperature)
        if key not in self._m:
            self._m[key] = node_marginals(self.q(key), self.taxonomy)
        return self._m[key]

    def cached(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, made once per ``key`` and kept: what the rules derive from this distribution (a rule's
        expected scores, its answers) is asked for by several reports of one post-hoc step, and on a 10⁵-node
        tree each costs seconds."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]  # type: ignore[return-value]


def distribution_of(prediction: Prediction | EndDistribution, taxonomy: Taxonomy) -> EndDistribution:
    """``prediction``'s :class:`EndDistribution` (end classes: the leaves), built unless it already is one: what
    lets the rules take either a raw prediction (one-off callers) or the post-hoc step's shared distribution."""
    return prediction if isinstance(prediction, EndDistribution) else EndDistribution(prediction, taxonomy)
