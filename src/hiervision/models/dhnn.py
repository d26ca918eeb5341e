"""DHNN (Koo, Klabjan & Utke): CNN stage features read as a sequence by an RNN that emits the path.

Two heads on the same feature sequence ``u_1..u_T`` (:class:`~hiervision.models.conversion.StageSequence`):

* :class:`CnnRnn` — fixed path length (FPL, Sec. 3.1): an LSTM stack over ``u_t`` whose output
  ``o_t`` at step ``t`` scores *all* N tree nodes for level ``t``; loss ``Σ_t w_t·CE(y_t, softmax(o_t))``;
  optional residual arc. Needs every leaf at the same depth.
* :class:`CnnS2S` — general tree (Sec. 3.2): an LSTM encoder over ``u_1..u_T`` and a decoder started
  from its final state ``h_T`` that emits one node per level and then the end token, so paths may
  stop at inner nodes and have any length.

Both decode to valid tree paths only: exactly (one matrix product over the tree) where per-step
outputs do not depend on earlier predictions, or with Koo's Algorithm 1 (tree-restricted beam search).
Multi-label (Sec. 4.2): sigmoid outputs, a path is kept when all its nodes pass the threshold that
training tunes on validation data and stores in the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hiervision.checks import check_beam_width
from hiervision.decoding import (
    Prediction,
    beam_search,
    exact_best_path,
    feed_own,
    full_precision,
    last_node,
    multi_label_prediction,
    next_token_mask,
    no_autocast,
    prefix_logprob,
    prefix_scores,
    scheduled_feed,
    sequence_logprob,
    sequence_targets,
)
from hiervision.losses import check_loss_type, soft_label_targets
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.conversion import StageSequence, default_steps
from hiervision.models.registry import register_model
from hiervision.models.step_softmax import ChildrenSoftmax, resolve_step_softmax, resolve_width, used_steps
from hiervision.taxonomy import EOS, IGNORE, Taxonomy
from hiervision.tree.tables import sibling_log_softmax

__all__ = ["CnnRnn", "CnnS2S", "run_fp32"]


def run_fp32(lstm: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Run an LSTM in fp32 with autocast off. Under autocast cuDNN's RNN runs in half precision (and
    no gradient scaler guards it under bf16 autocast), and oneDNN's CPU LSTM cannot run under bf16
    autocast at all; the recurrence is a small part of the cost, so it keeps full precision."""
    with no_autocast(x.device):
        return lstm(x.float(), None if state is None else tuple(t.float() for t in state))


def _orthogonal_lstm(lstm: nn.LSTM) -> nn.LSTM:
    """Orthogonal random initialisation (the paper's choice for RNN and S2S weights); forget-gate bias 1."""
    for name, w in lstm.named_parameters():
        if name.startswith("weight"):
            for gate in w.data.chunk(4, 0):
                nn.init.orthogonal_(gate)
        else:
            nn.init.zeros_(w)
            w.data[lstm.hidden_size : 2 * lstm.hidden_size] = 0.5  # b_ih + b_hh: forget bias 1
    return lstm


class _DHNN(HierarchicalClassifier):
    """Shared part: backbone stage maps → ``u`` ``(B, T, p)``, step weights, decoding helpers.

    ``input_size`` (p) and ``hidden_size`` left at ``"auto"`` are 256 and 512, halved on trees of more than
    10,000 nodes, whose N-row output layer (and label embedding) the optimizer updates densely every step
    (:func:`~hiervision.models.step_softmax.resolve_width`)."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        conversion: str = "pool",
        input_size: int | str = "auto",
        hidden_size: int | str = "auto",
        num_layers: int = 1,
        bidirectional: bool = False,
        steps: Sequence[Sequence[int]] | None = None,
        level_weights: Sequence[float] | None = None,
        linear_shape: Sequence[int] | None = None,
        conv_out_size: int | None = None,
        pool_mode: str = "max",
        pool_fallback: str = "error",
        norm: bool = True,
        dropout: float = 0.0,
        decode: str | None = None,
        beam_width: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(taxonomy, **kwargs)
        input_size = resolve_width("input_size", input_size, 256, taxonomy.num_nodes)
        hidden_size = resolve_width("hidden_size", hidden_size, 512, taxonomy.num_nodes)
        shapes = self._stage_shapes(self.in_chans)
        steps = steps if steps is not None else default_steps(len(shapes), self._default_num_steps(len(shapes)))
        self.features = StageSequence(shapes, steps, input_size, conversion, linear_shape, conv_out_size,
                                      pool_mode, pool_fallback, norm)
        self.num_layers, self.hidden_size, self.bidirectional = num_layers, hidden_size, bidirectional
        self.dropout = nn.Dropout(dropout)
        if decode not in (None, "exact", "beam"):
            raise ValueError(f"model.decode must be 'exact' or 'beam', got {decode!r}")
        self.decode_mode = decode or "exact"
        self.beam_width = int(beam_width)
        n = self.num_out_steps
        weights = [1.0] * n if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != n:
            raise ValueError(f"model.level_weights: {n} output steps need {n} weights, got {len(weights)}")
        self.register_buffer("level_weights", torch.tensor(weights), persistent=False)

    def set_beam_width(self, width: int) -> None:
        if self.multi_label:
            raise ValueError(f"model {type(self).__name__}: multi-label paths are thresholded, not searched")
        self.decode_mode, self.beam_width = "beam", check_beam_width(width)

    def _decoder_logits(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        """``(B, S, N+1)`` per-step logits when the decoder reads ``paths`` (a head that reads its
        own outputs ignores them)."""
        return outputs["logits"]

    @full_precision
    def path_logprob(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            raise ValueError(f"model {type(self).__name__}: multi-label paths are thresholded, not searched")
        end = self.num_out_steps > self.taxonomy.max_depth  # a step past the deepest level emits the end token
        return sequence_logprob(self.tables, paths, self._decoder_logits(outputs, paths).float().log_softmax(-1), end)

    # subclasses say how many RNN input steps they read by default and how many outputs they emit
    def _default_num_steps(self, num_stages: int) -> int:
        raise NotImplementedError

    @property
    def num_out_steps(self) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def _stage_shapes(self, in_chans: int) -> list[tuple[int, int, int]]:
        """``(D, H, W)`` of every stage map at the training image size (a dry run; BN stats untouched)."""
        h, w = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        was = self.backbone.training
        self.backbone.eval()
        maps = self.backbone.forward_features(torch.zeros(1, in_chans, h, w))
        self.backbone.train(was)
        return [tuple(m.shape[1:]) for m in maps]

    def sequence(self, images: torch.Tensor) -> torch.Tensor:
        """The RNN input ``u`` ``(B, T, p)`` for a batch of images."""
        return self.features(self.backbone.forward_features(images))

    def _rnn(self, input_size: int) -> nn.LSTM:
        return _orthogonal_lstm(nn.LSTM(input_size, self.hidden_size, self.num_layers, batch_first=True,
                                        bidirectional=self.bidirectional,
                                        dropout=self.dropout.p if self.num_layers > 1 else 0.0))

    def _weighted(self, per_step: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``Σ_t w_t · mean(loss at step t over the samples that have a step t)``."""
        per_step = (per_step * valid).sum(0) / valid.sum(0).clamp(min=1)
        return (self.level_weights[: len(per_step)] * per_step).sum()

    def _node_view(self, step_scores: torch.Tensor) -> torch.Tensor:
        """``(B, S, N+1)`` per-step scores → ``(B, N+1)``: node ``n`` read at the step of its level."""
        depth = self.tables.depth
        out = step_scores[:, (depth - 1).clamp(min=0), torch.arange(len(depth), device=depth.device)]
        out[:, 0] = 0
        return out

    def _best_path(self, node_lp: torch.Tensor, end_nodes: str, end_lp: torch.Tensor | None = None):
        nodes, lp = exact_best_path(self.tables, node_lp, end_nodes, end_lp)
        return self.tables.paths[nodes], lp

    def _beam_precomputed(self, step_lp: torch.Tensor, end_nodes: str):
        """Algorithm 1 over per-step log-probabilities that do not depend on the prefix."""
        k = self.beam_width
        rep = step_lp.repeat_interleave(k, 0)

        def step(tokens: torch.Tensor, t: int):
            return rep[:, t], t + 1

        paths, lp = beam_search(self.tables, step, len(step_lp), k, end_nodes, step_lp.shape[1], 0,
                                step_lp.device)
        return paths[:, 0], lp[:, 0]

    def decoder_settings(self) -> dict:
        if self.multi_label:
            return super().decoder_settings()
        if self.decode_mode == "beam":
            return {"kind": "beam_steps", "end_nodes": self.end_nodes, "beam_width": self.beam_width}
        return {"kind": "exact", "end_nodes": self.end_nodes}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(images)["logits"].float()
        if self.multi_label:
            return self._multi_label_outputs(self._node_view(torch.sigmoid(logits)))
        step_lp = logits.log_softmax(-1)
        prefix = prefix_logprob(self.tables, self._node_view(step_lp))
        out = {"scores": prefix.exp(), "path_logprob": prefix + self._end_logprob(step_lp)}
        return {**out, "step_logprob": step_lp} if self.decode_mode == "beam" else out

    def _end_logprob(self, step_lp: torch.Tensor) -> torch.Tensor | float:
        """``(B, N+1)`` log-probability of stopping right after each node (0 where paths stop by depth)."""
        return 0.0

    def _multi_label_targets(self, targets: torch.Tensor, num_steps: int) -> torch.Tensor:
        """``(B, N+1)`` path-end marks → ``(B, S, N+1)`` per-level multi-hot of the closed label set."""
        closed = self.tables.close_upwards(targets).float()
        depth = self.tables.depth
        levels = torch.arange(1, num_steps + 1, device=targets.device)
        return closed.unsqueeze(1) * (depth.unsqueeze(0) == levels.unsqueeze(1)).float().unsqueeze(0)


class CnnRnn(_DHNN):
    """Koo's CNN-RNN for fixed-length paths (FPL, Sec. 3.1).

    Step ``t`` (one per tree level) reads ``u_t``; the LSTM stack (``num_layers``, ``hidden_size``,
    ``bidirectional``; the paper's real-data setting is 3 layers) gives ``h_t`` and ``o_t = r_o(h_t)``
    over the N tree nodes.

    Residual arc (``residual=True``): ``o_t^res = u_t + z(o_t)``. The paper leaves the projection
    back to the N classes implicit; our reading: ``z: R^N → R^p`` is linear, and a second linear map
    ``c: R^p → R^N`` turns ``o_t^res`` into the logits the loss and decoding use, so the converted CNN
    features reach the classifier directly, as He et al.'s identity shortcuts intend.

    Decoding: outputs do not depend on earlier predictions, so ``decode="exact"`` (default) finds the
    best valid path exactly; ``decode="beam"`` runs Algorithm 1 with ``beam_width``.

    ``loss_type="soft_labels"`` (Bertinetto et al., ``loss_beta``): each step's target is spread over the
    nodes of its level by LCA height (:func:`hiervision.losses.soft_label_targets`), as for Guo's
    per-level heads; nodes of other levels get none.

    ``step_softmax`` (:mod:`hiervision.models.step_softmax`): ``"full"`` — each step's softmax over all N
    nodes, the paper's; ``"children"`` — node ``n`` is scored only at its own level's step and normalised
    among its siblings (a hierarchical softmax: a path's probability is the product of its branch
    choices, each node's score its exact marginal), so training costs O(Σ fan-out) and decoding one
    score per node instead of one per node and step; ``"auto"`` (default) — full up to 1,000 nodes,
    children above. The residual arc, soft labels and multi-label sigmoids read every node's score at
    every step, so they keep the full softmax.
    """

    end_nodes = "leaves"  # fixed-depth paths: every path ends at a leaf

    def __init__(self, taxonomy: Taxonomy, residual: bool = False, loss_type: str = "ce", loss_beta: float = 10.0,
                 step_softmax: str = "auto", **kwargs) -> None:
        if not taxonomy.is_fixed_depth:
            depths = sorted({taxonomy.depth(n) for n in taxonomy.leaves})
            raise ValueError(f"model dhnn_rnn needs every leaf at the same depth (this tree has leaves at depths "
                             f"{depths}); use dhnn_s2s for variable-length paths")
        self._depth = taxonomy.max_depth
        super().__init__(taxonomy, **kwargs)
        if len(self.features.steps) != self._depth:
            raise ValueError(f"model.steps: dhnn_rnn needs one step per level ({self._depth}), "
                             f"got {len(self.features.steps)}")
        self.loss_type = check_loss_type(loss_type, ("ce",) if self.multi_label else ("ce", "soft_labels"),
                                         "multi-label dhnn_rnn" if self.multi_label else "dhnn_rnn")
        self.loss_beta = float(loss_beta)
        for t, nodes in enumerate(taxonomy.levels):  # the classes of step t's soft labels
            self.register_buffer(f"level_nodes{t}", torch.tensor(nodes), persistent=False)
        n = taxonomy.num_nodes - 1
        out = self.hidden_size * (2 if self.bidirectional else 1)
        self.rnn = self._rnn(self.features.p)
        self.out = nn.Linear(out, n)
        self.residual = residual
        if residual:
            self.z = nn.Linear(n, self.features.p)
            self.classify = nn.Linear(self.features.p, n)
        self.step_softmax = resolve_step_softmax(step_softmax, taxonomy.num_nodes)
        dense = "residual" if residual else "multi_label" if self.multi_label else (
            "loss_type soft_labels" if self.loss_type == "soft_labels" else None)
        if dense and step_softmax == "children":
            raise ValueError(f"model.step_softmax: children is not available with {dense} (it reads every node's "
                             f"score at every step)")
        self.step_softmax = "full" if dense else self.step_softmax
        # paths stop by depth: no end token (and the output layer has no column for it)
        self.children_softmax = (ChildrenSoftmax(self.tables, torch.zeros_like(self.tables.leaf_mask), offset=1)
                                 if self.step_softmax == "children" else None)

    def _default_num_steps(self, num_stages: int) -> int:
        return self._depth

    @property
    def num_out_steps(self) -> int:
        return self._depth

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        u = self.sequence(images)
        h, _ = run_fp32(self.rnn, u)
        if self.children_softmax is not None:  # scored where needed: the loss's siblings, decoding's own levels
            return {"h": self.dropout(h)}
        o = self.out(self.dropout(h))
        if self.residual:
            o = self.classify(u + self.z(o))
        return {"logits": F.pad(o, (1, 0), value=float("-inf"))}  # (B, T, N+1): column 0 (EOS) unused

    def _children_node_logprob(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` each node's log-probability among its siblings, scored at its own level's step:
        one output row per node, O(B·N·H) — not every node at every step."""
        z = h.new_full((len(h), self.taxonomy.num_nodes), float("-inf"), dtype=torch.float32)
        for t in range(self._depth):
            nodes = getattr(self, f"level_nodes{t}")
            z[:, nodes] = F.linear(h[:, t], self.out.weight[nodes - 1], self.out.bias[nodes - 1]).float()
        return sibling_log_softmax(z, self.tables.parent)

    def _children_steps(self, node_lp: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` node log-probabilities → ``(B, T, N+1)`` per-step ones (a node at its level's step,
        ``-inf`` elsewhere): what the beam search over precomputed steps reads."""
        depth = self.tables.depth
        steps = torch.arange(1, self._depth + 1, device=depth.device)
        return node_lp.unsqueeze(1).masked_fill(depth.unsqueeze(0) != steps.unsqueeze(1), float("-inf"))

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if self.children_softmax is not None:  # O(Σ fan-out): each level's target among its siblings only
            levels = self.tables.encode_levels(targets)
            parents = torch.cat([torch.zeros_like(levels[:, :1]), levels[:, :-1].clamp(min=0)], 1)
            lp = self.children_softmax.target_logprob(self.out, outputs["h"], parents, levels)
            valid = levels != IGNORE
            return self._weighted(torch.where(valid, -lp, 0.0), valid.float())
        logits = outputs["logits"].float()
        if self.multi_label:
            y = self._multi_label_targets(targets, self._depth)[..., 1:]
            per = F.binary_cross_entropy_with_logits(logits[..., 1:], y, reduction="none").mean(2)
            return self._weighted(per, torch.ones_like(per))
        levels = self.tables.encode_levels(targets)  # (B, T) node ids, IGNORE past a coarse label's end
        valid = levels != IGNORE
        if self.loss_type == "soft_labels":
            logp = logits[..., 1:].log_softmax(-1)  # (B, T, N) over the N nodes (column 0 is unused)
            per = logp.new_zeros(levels.shape)
            for t in range(self._depth):
                has, nodes = valid[:, t], getattr(self, f"level_nodes{t}")
                y = soft_label_targets(self.taxonomy, levels[has, t], nodes, self.loss_beta)
                per[has, t] = -(y * logp[has, t][:, nodes - 1]).sum(1)
            return self._weighted(per, valid.float())
        per = F.cross_entropy(logits.transpose(1, 2), levels, ignore_index=IGNORE, reduction="none")
        return self._weighted(per, valid.float())

    @full_precision
    def path_logprob(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        if self.children_softmax is None:
            return super().path_logprob(outputs, paths)
        path_lp = prefix_logprob(self.tables, self._children_node_logprob(outputs["h"]))
        return path_lp.gather(1, last_node(paths).clamp(min=0).unsqueeze(1)).squeeze(1)

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.children_softmax is None:
            return super().export_outputs(images)
        node_lp = self._children_node_logprob(self(images)["h"].float())
        prefix = prefix_logprob(self.tables, node_lp)
        out = {"scores": prefix.exp(), "path_logprob": prefix}
        return {**out, "step_logprob": self._children_steps(node_lp)} if self.decode_mode == "beam" else out

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        if self.children_softmax is not None:
            node_lp = self._children_node_logprob(outputs["h"])
            step_lp = self._children_steps(node_lp) if self.decode_mode == "beam" else None
        else:
            logits = outputs["logits"].float()
            if self.multi_label:
                return multi_label_prediction(self.tables, self._node_view(torch.sigmoid(logits)),
                                              float(self.threshold))
            step_lp = logits.log_softmax(-1)
            node_lp = self._node_view(step_lp)
        if self.decode_mode == "beam":
            paths, lp = self._beam_precomputed(step_lp, "leaves")
        else:
            paths, lp = self._best_path(node_lp, "leaves")
        return Prediction(paths, prefix_logprob(self.tables, node_lp).exp(), lp.exp())


class CnnS2S(_DHNN):
    """Koo's CNN-S2S for general trees (Sec. 3.2): encoder over ``u_1..u_T``, decoder from ``h_T``.

    The decoder emits one node per level and then the end token (column 0), so targets may end at
    inner nodes. ``feed`` chooses what the decoder reads at each step:

    * ``"label"`` (single-label default): the embedding of the previous node (teacher forcing in
      training, the model's own choice at inference) — decoded with Algorithm 1 (``beam_width``);
    * ``"output"``: the paper's literal ``h̄_t = r̄_h(ō_{t-1}, h̄_{t-1})`` — the previous output
      distribution (softmax, or sigmoid for multi-label), so steps do not depend on discrete
      choices and the best path is found exactly (``decode="exact"``) or by beam search.

    ``end_nodes``: ``"all"`` (a path may stop at any node) or ``"leaves"``. ``steps`` default: one
    encoder step per backbone stage. A bidirectional encoder hands the decoder both directions'
    final states concatenated (decoder width ``2·hidden_size``).

    Training options for deep variable-length trees: ``end_weight`` multiplies the end token's loss
    terms; ``scheduled_sampling`` (``feed: label`` only) is the probability that a decoder step reads
    its own greedy choice instead of the true previous node (Bengio et al., 2015; 0 = teacher forcing).

    ``step_softmax`` (``feed: label``): what each decoder step's softmax runs over
    (:mod:`hiervision.models.step_softmax`): ``"full"`` — all N+1 columns, the paper's; ``"children"`` —
    a hierarchical softmax over the tokens allowed after the node the step reads (its children, and the
    end token where a path may stop), whose training cost grows with the fan-out, not with N; ``"auto"``
    (default) — full up to 1,000 nodes (the paper's results reproduce unchanged), children above. A
    decoder fed its previous output distribution (``feed: output``) reads all N+1 columns anyway and
    keeps the full softmax. Under the children softmax a scheduled-sampling step whose own choice left
    the true path teaches nothing (the true node has probability 0 there).
    """

    def __init__(self, taxonomy: Taxonomy, feed: str | None = None, embed_size: int | str | None = None,
                 end_nodes: str = "all", end_weight: float = 1.0, scheduled_sampling: float = 0.0,
                 step_softmax: str = "auto", **kwargs) -> None:
        multi = kwargs.get("multi_label", False)
        feed = feed or ("output" if multi else "label")
        if feed not in ("label", "output"):
            raise ValueError(f"model.feed must be 'label' or 'output', got {feed!r}")
        if multi and feed == "label":
            raise ValueError("model.feed: multi-label dhnn_s2s reads its previous outputs (feed: output); "
                             "a single previous label does not exist when an image has several paths")
        if end_nodes not in ("all", "leaves"):
            raise ValueError(f"model.end_nodes must be 'all' or 'leaves', got {end_nodes!r}")
        if feed == "label" and kwargs.get("decode") == "exact":
            raise ValueError("model.decode: exact search needs steps that do not depend on earlier predictions; "
                             "use decode: beam, or feed: output")
        if not 0.0 <= float(scheduled_sampling) <= 1.0:
            raise ValueError(f"model.scheduled_sampling must be a probability in [0, 1], got {scheduled_sampling}")
        if scheduled_sampling and feed != "label":
            raise ValueError("model.scheduled_sampling: only a decoder fed its previous label (feed: label) can be "
                             "fed its own choices")
        if float(end_weight) < 0:
            raise ValueError(f"model.end_weight must be >= 0, got {end_weight}")
        self.step_softmax = resolve_step_softmax(step_softmax, taxonomy.num_nodes)
        if feed != "label":  # a decoder fed its previous output distribution reads all N+1 columns anyway
            if step_softmax == "children":
                raise ValueError("model.step_softmax: the children softmax needs a decoder fed its previous label "
                                 "(feed: label)")
            self.step_softmax = "full"
        self.feed, self.end_nodes = feed, end_nodes
        self.end_weight, self.scheduled_sampling = float(end_weight), float(scheduled_sampling)
        self._out_steps = taxonomy.max_depth + (0 if multi else 1)  # the path, then the end token
        kwargs.setdefault("decode", "beam" if feed == "label" else "exact")
        super().__init__(taxonomy, **kwargs)
        v = taxonomy.num_nodes  # column 0 = end token
        width = self.hidden_size * (2 if self.bidirectional else 1)
        self.encoder = self._rnn(self.features.p)
        if feed == "label":
            embed_width = self.features.p if embed_size in (None, "auto") else embed_size
            self.embed = nn.Embedding(v, embed_width)  # row 0: the start (root)
            dec_in = self.embed.embedding_dim
        else:
            dec_in = v
        self.decoder = _orthogonal_lstm(nn.LSTM(dec_in, width, self.num_layers, batch_first=True,
                                                dropout=self.dropout.p if self.num_layers > 1 else 0.0))
        self.out = nn.Linear(width, v)
        self.register_buffer("ends", self.tables.end_mask(end_nodes), persistent=False)  # where paths may stop
        self.children_softmax = ChildrenSoftmax(self.tables, self.ends) if self.step_softmax == "children" else None

    def _default_num_steps(self, num_stages: int) -> int:
        return num_stages

    @property
    def num_out_steps(self) -> int:
        return self._out_steps

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder final state ``(h_T, c_T)``, each ``(layers, B, width)``: the decoder's start."""
        _, (h, c) = run_fp32(self.encoder, self.sequence(images))
        if self.bidirectional:
            h, c = (x.view(self.num_layers, 2, *x.shape[1:]).transpose(1, 2).flatten(2) for x in (h, c))
        return h.contiguous(), c.contiguous()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h, c = self.encode(images)
        if self.feed == "label":
            return {"h": h, "c": c}  # the decoder runs in loss (teacher forcing) and decode (beam search)
        prev = torch.zeros(images.shape[0], 1, self.taxonomy.num_nodes, device=images.device, dtype=h.dtype)
        prev[..., 0] = 1  # start: the root
        state, logits = (h, c), []
        for _ in range(self._out_steps):
            out, state = run_fp32(self.decoder, prev, state)
            o = self.out(self.dropout(out))
            logits.append(o)
            prev = torch.sigmoid(o) if self.multi_label else o.softmax(-1)
        return {"logits": torch.cat(logits, 1)}

    def _tokens(self, paths: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``(B, D)`` paths: the start token, then the path (0 where it has ended)."""
        return torch.cat([torch.zeros_like(paths[:, :1]), paths.clamp(min=0)], 1)[:, : self._out_steps]

    def _teacher_forced(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        """Decoder logits ``(B, D+1, N+1)`` when fed the given paths ``(B, D)`` (PAD after the end)."""
        return self.out(self._hidden(outputs, self._tokens(paths)))

    def _hidden(self, outputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """The output layer's input ``(B, T, W)`` when step ``t`` reads ``tokens[:, t]`` (teacher forcing)."""
        out, _ = run_fp32(self.decoder, self.embed(tokens), (outputs["h"], outputs["c"]))
        return self.dropout(out)

    def sampled(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor, p: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`_teacher_forced`, but each step after the first reads the decoder's own greedy
        choice with probability ``p`` (:func:`~hiervision.decoding.scheduled_feed`); also returns the
        tokens read ``(B, D+1)``. Under the children softmax the first tensor is the steps' output-layer
        input ``(B, D+1, W)`` (as :meth:`_hidden`): its loss never forms ``(B, D+1, N+1)`` logits."""
        tokens = self._tokens(paths)
        state, out, fed = (outputs["h"], outputs["c"]), [], [tokens[:, 0]]
        children = self.children_softmax
        for t in range(tokens.shape[1]):
            if t and children is None:
                fed.append(scheduled_feed(out[-1], next_token_mask(self.tables, fed[-1], self.ends), tokens[:, t], p))
            elif t:
                fed.append(feed_own(children.greedy(self.out, out[-1], fed[-1]), tokens[:, t], p))
            o, state = self.decoder(self.embed(fed[-1]).unsqueeze(1), state)
            h = self.dropout(o[:, 0])
            out.append(h if children is not None else self.out(h))
        return torch.stack(out, 1), torch.stack(fed, 1)

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            logits = outputs["logits"].float()[..., 1:]
            y = self._multi_label_targets(targets, self._out_steps)[..., 1:]
            per = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(2)
            return self._weighted(per, torch.ones_like(per))
        seq = self.tables.encode_sequence(targets)  # (B, D+1): path, EOS, IGNORE
        paths, children = self.tables.encode_paths(targets), self.children_softmax
        if children is not None:  # the decoder runs only as far as the batch's paths go
            seq = seq[:, : used_steps(seq)]
            paths = paths[:, : seq.shape[1] - 1]
        if self.feed == "label" and self.training and self.scheduled_sampling > 0:
            out, tokens = self.sampled(outputs, paths, self.scheduled_sampling)
        elif children is not None:
            tokens = self._tokens(paths)
            out = self._hidden(outputs, tokens)
        elif self.feed == "label":
            out = self._teacher_forced(outputs, paths)
        else:
            out = outputs["logits"]
        if children is not None:  # O(Σ fan-out): only the allowed tokens' output rows
            # a token the step may not emit (the end after an inner node with end_nodes "leaves"; a node off the
            # path scheduled sampling fed) has probability 0 here: such a term teaches nothing and is left out
            seq = seq.masked_fill(~children.allowed(tokens, seq), IGNORE)
            per = (-children.target_logprob(self.out, out, tokens, seq)).masked_fill(seq == IGNORE, 0)
        else:
            per = F.cross_entropy(out.float().transpose(1, 2), seq, ignore_index=IGNORE, reduction="none")
        if self.end_weight != 1.0:
            per = torch.where(seq == EOS, per * self.end_weight, per)
        return self._weighted(per, (seq != IGNORE).float())

    def _decoder_logits(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        return self._teacher_forced(outputs, paths) if self.feed == "label" else outputs["logits"]

    @full_precision
    def path_logprob(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        if self.children_softmax is None:
            return super().path_logprob(outputs, paths)
        tokens = self._tokens(paths)
        seq = sequence_targets(self.tables, paths, True, tokens.shape[1])
        return self.children_softmax.sequence_logprob(self.out, self._hidden(outputs, tokens), tokens, seq)

    def _end_logprob(self, step_lp: torch.Tensor) -> torch.Tensor:
        return step_lp[:, self.tables.depth.clamp(max=self._out_steps - 1), EOS].clamp(min=-1e4)

    def decoder_settings(self) -> dict:
        if self.feed != "label" or self.multi_label:
            return super().decoder_settings()
        return {"kind": "beam", "end_nodes": self.end_nodes, "beam_width": self.beam_width,
                "max_steps": self._out_steps, "state": ["state0", "state1"],
                "candidates": self.children_softmax is not None}

    def export_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, c = self.encode(images)  # (layers, B, W) → (B, layers, W): every exported tensor is batch-first
        return h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()

    def export_step(self, tokens: torch.Tensor, *state: torch.Tensor,
                    candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h, c = (s.transpose(0, 1).contiguous() for s in state)
        out, (h, c) = self.decoder(self.embed(tokens).unsqueeze(1), (h, c))
        lp = (self.out(out[:, 0]).float().log_softmax(-1) if self.children_softmax is None
              else self.children_softmax.logits(self.out, out[:, 0], candidates))  # the runtime normalises these
        return lp, h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        tax = self.tables
        if self.multi_label:
            return multi_label_prediction(tax, self._node_view(torch.sigmoid(outputs["logits"].float())),
                                          float(self.threshold))
        if self.feed == "output":
            step_lp = outputs["logits"].float().log_softmax(-1)
            node_lp = self._node_view(step_lp)
            depth = tax.depth
            end_lp = step_lp[:, depth.clamp(max=self._out_steps - 1), EOS]  # stopping right after node n
            if self.decode_mode == "beam":
                paths, lp = self._beam_precomputed(step_lp, self.end_nodes)
            else:
                paths, lp = self._best_path(node_lp, self.end_nodes, end_lp)
            return Prediction(paths, prefix_logprob(tax, node_lp).exp(), lp.exp())
        h, c = outputs["h"], outputs["c"]
        k = self.beam_width

        def step(tokens: torch.Tensor, state):
            out, state = run_fp32(self.decoder, self.embed(tokens).unsqueeze(1), state)
            if self.children_softmax is not None:
                return self.children_softmax.candidates(self.out, out[:, 0], tokens), state
            return self.out(out[:, 0]).float().log_softmax(-1), state

        start = (h.repeat_interleave(k, 1), c.repeat_interleave(k, 1))
        beams, lp, cum = beam_search(tax, step, h.shape[1], k, self.end_nodes, self._out_steps, start, h.device,
                                     with_prefix=True)
        paths = beams[:, 0]  # node scores from the prefixes the search summed: no second pass of the decoder
        return Prediction(paths, prefix_scores(tax, paths, cum[:, 0]), lp[:, 0].exp())


#: ``--method`` options (the comparison's: pooled conversion, the LSTM's sizes and gradient clip) and tiny sizes
_METHOD = {"model": {"conversion": "pool", "pool_fallback": "project", "input_size": 128, "hidden_size": 256},
           "train": {"grad_clip": 5.0}}
_TINY = {"input_size": 16, "hidden_size": 16, "pool_fallback": "project"}


@register_model("dhnn_rnn", fixed_depth=True, given=False, tiny=_TINY,
                method={**_METHOD, "model": {**_METHOD["model"], "residual": True}})
def dhnn_rnn(taxonomy: Taxonomy, **kwargs) -> CnnRnn:
    """Koo's CNN-RNN (fixed-depth trees); ``residual=True`` adds the residual arc."""
    return CnnRnn(taxonomy, **kwargs)


@register_model("dhnn_s2s", given=False, tiny=_TINY,
                method={**_METHOD, "model": {**_METHOD["model"], "beam_width": 3}})
def dhnn_s2s(taxonomy: Taxonomy, **kwargs) -> CnnS2S:
    """Koo's CNN-S2S (any tree; paths may end at inner nodes)."""
    return CnnS2S(taxonomy, **kwargs)
