"""The flat baseline every table compares against: one softmax over the end classes (or sigmoids).

Its single prediction becomes a path through the taxonomy (the ancestors of the predicted class),
so every hierarchical metric applies; that implied path is Koo et al.'s Remark 1 convention.

No table here grows with nodes × classes (trees reach 10^5 classes): node marginals are the class
probabilities summed up the tree level by level, and "the classes below a node" is the depth-first
interval of that node, compared with each class's preorder position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.decoding import Prediction, full_precision, multi_label_prediction
from hiervision.losses import check_loss_type, chmcnn_loss, hxe_loss, max_constraint, soft_label_loss
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy, TreeTables

__all__ = ["FlatClassifier", "best_class", "class_loss", "class_marginals", "class_rows", "classes_below",
           "single_label_leaves"]


def single_label_leaves(name: str, softmax: str, kwargs: dict) -> None:
    """Take the flat head's ``multi_label`` and ``end_nodes`` out of ``kwargs``, refusing the modes a method
    built on one softmax over the leaves cannot have (the subclasses' shared guard)."""
    if kwargs.pop("multi_label", False):
        raise ValueError(f"model {name} is single-label ({softmax})")
    if kwargs.pop("end_nodes", "leaves") != "leaves":
        raise ValueError(f"model {name} answers leaves (model.end_nodes: leaves)")


def class_rows(num_nodes: int, classes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` class values → ``(N+1, B)``: row n holds class n's values, 0 where n is no class.
    Nodes first, so placing the classes and summing them up the tree move whole rows (no column scatter)."""
    rows = probs.new_zeros(num_nodes, len(probs))
    return rows.index_copy_(0, classes, probs.T.contiguous())


def class_marginals(tables: TreeTables, classes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` class probabilities → ``(B, N+1)`` marginal probability of every node (column 0: 0),
    summed up the tree one level at a time: O(B·N), no (N+1)×C product."""
    scores = tables.scatter_subtree_sum(probs, classes)
    scores[:, 0] = 0
    return scores


def classes_below(tables: TreeTables, classes: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """``(B,)`` node ids → ``(B, C)`` bool: class c lies at or below the node (its depth-first interval)."""
    return tables.is_ancestor(nodes.unsqueeze(1), classes)


def best_class(tables: TreeTables, classes: torch.Tensor, probs: torch.Tensor,
               allowed: torch.Tensor | None = None) -> Prediction:
    """The most probable (allowed) class's path, with every node's marginal as its score."""
    scores = class_marginals(tables, classes, probs)
    best_prob, best = (probs if allowed is None else probs.masked_fill(~allowed, 0)).max(1)
    return Prediction(tables.paths[classes[best]], scores, best_prob)


def class_loss(logp: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor, tables: TreeTables, *,
               loss_type: str = "ce", beta: float = 10.0, alpha: float = 0.1, end_nodes: str = "leaves"
               ) -> torch.Tensor:
    """The single-label loss from the classes' log-probabilities ``(B, C)``: ``ce`` trains an inner-node target
    by its marginal (``-log Σ p(class)`` over the classes below it), ``soft_labels`` / ``hxe`` as
    :mod:`hiervision.losses` defines them."""
    if loss_type == "soft_labels":
        return soft_label_loss(logp, targets, classes, tables.taxonomy, beta)
    if loss_type == "hxe":
        return hxe_loss(logp, targets, classes, tables.taxonomy, alpha)
    if end_nodes == "all":
        # every node is its own class: an inner target means "the path ends here"
        return F.nll_loss(logp, targets - 1)
    allowed = classes_below(tables, classes, targets)  # (B, C): leaves below (or equal to) the target
    return -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1).mean()


class FlatClassifier(HierarchicalClassifier):
    """Backbone + linear layer.

    Single-label: softmax over the *end classes* — the leaves (``end_nodes="leaves"``) or every
    node (``"all"``, for trees whose labels may stop at inner nodes). With leaves as classes, a
    target that is an inner node (a coarse-only label) is trained by its marginal: the loss is
    ``-log Σ p(leaf)`` over the leaves below it, so partially labelled data needs no special case.

    Multi-label: one sigmoid per node, trained with binary cross-entropy on the ancestor-closed
    label set; decoding keeps paths whose nodes all pass the stored threshold.

    ``loss_type`` (:mod:`hiervision.losses`): single-label ``ce`` | ``soft_labels`` (``loss_beta``) |
    ``hxe`` (``loss_alpha``); multi-label ``ce`` | ``chmcnn`` (whose max-constraint module also shapes
    the decoded scores, so thresholded outputs are coherent).
    """

    extendable = True  # fc: one row per class (hiervision.extend)

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        end_nodes: str = "leaves",
        dropout: float = 0.0,
        loss_type: str = "ce",
        loss_beta: float = 10.0,
        loss_alpha: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(taxonomy, **kwargs)
        multi_label = self.multi_label
        supported = ("ce", "chmcnn") if multi_label else ("ce", "soft_labels", "hxe")
        self.loss_type = check_loss_type(loss_type, supported, "multi-label flat" if multi_label else "flat")
        self.loss_beta, self.loss_alpha = float(loss_beta), float(loss_alpha)
        if end_nodes not in ("leaves", "all"):
            raise ValueError(f"model.end_nodes must be 'leaves' or 'all', got {end_nodes!r}")
        self.end_nodes = end_nodes
        classes = list(range(1, taxonomy.num_nodes)) if end_nodes == "all" or multi_label else list(taxonomy.leaves)
        self.register_buffer("classes", torch.tensor(classes), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.num_features, len(classes))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.dropout(features))}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"].float()
        if self.multi_label:
            closed = self.tables.close_upwards(targets).float()
            if self.loss_type == "chmcnn":
                return chmcnn_loss(F.pad(logits, (1, 0)), closed, self.taxonomy)
            return F.binary_cross_entropy_with_logits(logits, closed[:, 1:])
        return self.class_loss(F.log_softmax(logits, dim=1), targets)

    def class_loss(self, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The single-label loss from the classes' log-probabilities ``(B, C)`` (HAF reads them again)."""
        return class_loss(logp, targets, self.classes, self.tables, loss_type=self.loss_type, beta=self.loss_beta,
                          alpha=self.loss_alpha, end_nodes=self.end_nodes)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits every prediction reads (decode, decode_given, export): the trained ones here; a head may
        shift them (hnd's bias on its novel classes) without touching what the loss sees."""
        return logits

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        logits = self.prediction_logits(outputs["logits"].float())
        if self.multi_label:
            scores = F.pad(torch.sigmoid(logits), (1, 0))
            if self.loss_type == "chmcnn":
                scores = max_constraint(scores, self.taxonomy)
            return multi_label_prediction(self.tables, scores, float(self.threshold))
        return self._best_class(logits.softmax(1))

    @full_precision
    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        """The most probable class on a path through ``given`` (its descendants, or itself)."""
        if self.multi_label:
            return super().decode_given(outputs, given)
        allowed = self._below(given)  # (B, C): classes whose path passes through the given node
        return self._best_class(self.prediction_logits(outputs["logits"].float()).softmax(1), allowed)

    def decoder_settings(self) -> dict:
        return super().decoder_settings() if self.multi_label else {"kind": "exact", "end_nodes": self.end_nodes}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.prediction_logits(self(images)["logits"].float())
        if self.multi_label:
            return self._multi_label_outputs(F.pad(torch.sigmoid(logits), (1, 0)))
        probs = logits.softmax(1)
        return {"scores": self._marginals(probs),
                "path_logprob": torch.log(class_rows(self.taxonomy.num_nodes, self.classes, probs)).T}

    def _marginals(self, probs: torch.Tensor) -> torch.Tensor:
        return class_marginals(self.tables, self.classes, probs)

    def _below(self, nodes: torch.Tensor) -> torch.Tensor:
        return classes_below(self.tables, self.classes, nodes)

    def _best_class(self, probs: torch.Tensor, allowed: torch.Tensor | None = None) -> Prediction:
        return best_class(self.tables, self.classes, probs, allowed)


@register_model("flat")
def flat(taxonomy: Taxonomy, **kwargs) -> FlatClassifier:
    """Flat softmax (or sigmoid, ``multi_label=True``) baseline."""
    return FlatClassifier(taxonomy, **kwargs)
