"""Hierarchical novelty detection (Lee, Lee, Min, Zhang, Shin & Lee, CVPR 2018, "Hierarchical Novelty Detection
for Visual Object Recognition"): the *flatten* model trained with the *leave-one-out* loss.

An image of a class the model never saw should be answered at its closest known ancestor: "an unknown kind of
Dogs", not a wrong breed. The flatten model gives every inner node a class of its own, "novel under this
node", beside the known leaves, in one softmax. Novel images never occur in training, so the novel classes are
taught by pretending: for each training image and each node ``a`` on its path (below depth 1), ``a``'s whole
subtree is left out of the softmax and the image counts as novel under ``a``'s parent — the authors'
``LOOLoss`` (``kibok90/cvpr2018-hnd``: ``models.py``, the "relevant" sets of ``utils.update_taxonomy``). The
known classes keep the usual cross-entropy. The authors weight the two losses equally, on fixed features; end to
end from pixels that weight stalled the known classes (a 2-epoch, 2,000-image Fashion-MNIST smoke run: known
accuracy 12.5 % at ``loo=1``, 68 % at 0.3 and 66 % at 0.1, flat 52 %), so ``loo`` defaults to 0.3. At test
time the answer is the most probable class; adding a bias to the novel classes' logits trades known accuracy for
novel accuracy (the authors' known–novel curve sweeps it: ``novel_bias`` here, and
:func:`hiervision.posthoc.open_world_report`).

In hiervision terms the head is a flat softmax over every node (``end_nodes="all"``): an inner answer is "novel
under it", so the runtime, the server and the page say so (``"novel": true, "under": "Animals > Dogs"``;
the decoder's ``novel`` flag). The root has no novel class (an image unlike every depth-1 node is answered at
the closest of them). A coarse training label (an inner node) is trained by its marginal, the sum over its
subtree, as the flat head trains one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hiervision.models.flat import FlatClassifier, class_marginals, class_rows, classes_below
from hiervision.models.registry import register_model
from hiervision.taxonomy import PAD, Taxonomy

__all__ = ["NoveltyClassifier"]


class NoveltyClassifier(FlatClassifier):
    """Backbone + one linear layer over every node (leaves: known classes; inner nodes: novel under them),
    trained with cross-entropy plus ``loo`` × the leave-one-out loss (the mean over the nodes on the target's
    path below depth 1). ``novel_bias``: added to the novel classes' logits when predicting (0: the model's
    own trade-off; > 0 answers "novel" more often)."""

    def __init__(self, taxonomy: Taxonomy, loo: float = 0.3, novel_bias: float = 0.0, **kwargs) -> None:
        if kwargs.get("multi_label"):
            raise ValueError("model hnd: single-label only (one known class, or novel under one node, per image)")
        if kwargs.pop("end_nodes", "all") != "all":
            raise ValueError("model hnd: scores every node (leaves known, inner nodes novel); "
                             "leave out model.end_nodes")
        if kwargs.get("loss_type", "ce") != "ce":
            raise ValueError("model hnd: trains with cross-entropy and its leave-one-out loss (model.loss_type: ce)")
        if loo < 0:
            raise ValueError(f"model.loo must be ≥ 0, got {loo}")
        super().__init__(taxonomy, end_nodes="all", **kwargs)
        self.loo = float(loo)
        self.register_buffer("novel_bias", torch.tensor(float(novel_bias)), persistent=False)  # the config's
        self.register_buffer("novel_class", ~self.tables.leaf_mask[self.classes], persistent=False)

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with ``novel_bias`` on the novel (inner-node) classes: what every prediction reads."""
        return logits + self.novel_bias * self.novel_class

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"].float()
        logp = F.log_softmax(logits, dim=1)
        below = classes_below(self.tables, self.classes, targets)  # a coarse target: its subtree's mass
        known = -torch.logsumexp(logp.masked_fill(~below, float("-inf")), dim=1).mean()
        if self.loo == 0:
            return known
        return known + self.loo * self.leave_one_out(F.log_softmax(logits.double(), dim=1), targets)

    def leave_one_out(self, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the mean over nodes ``a`` on each target's path below depth 1 of
        ``−log p(novel under parent(a) | a's subtree left out)``: the softmax without ``a``'s subtree is the
        full one divided by ``1 − P(a's subtree)``, so no softmax is recomputed (float64: the complement of
        a confident subtree stays exact)."""
        probs = logp.exp()
        marg = class_marginals(self.tables, self.classes, probs)  # (B, N+1): P(subtree of each node)
        own = class_rows(self.taxonomy.num_nodes, self.classes, logp).T  # (B, N+1): log p(node's own class)
        path = self.tables.encode_paths(targets)  # (B, D)
        a, parent = path[:, 1:], path[:, :-1]
        valid = a != PAD
        if not valid.any():  # every target at depth 1: nothing to leave out
            return logp.new_zeros(())
        a, parent = a.clamp(min=0), parent.clamp(min=0)
        rest = (1 - marg.gather(1, a)).clamp(min=1e-12).log()
        terms = (rest - own.gather(1, parent)) * valid
        per_image = terms.sum(1) / valid.sum(1).clamp(min=1)
        return per_image[valid.any(1)].mean().float()

    def decoder_settings(self) -> dict:
        return {**super().decoder_settings(), "novel": True}  # an inner answer means "novel under it"


@register_model("hnd", multi_label=False)
def hnd(taxonomy: Taxonomy, **kwargs) -> NoveltyClassifier:
    """Hierarchical novelty detection: flatten + leave-one-out (Lee et al., CVPR 2018)."""
    return NoveltyClassifier(taxonomy, **kwargs)
