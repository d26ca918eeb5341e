"""Guo et al.'s CNN-RNN framework: one CNN feature ``v``, read by an LSTM that writes the label path.

* :class:`CnnRnnGenerator` (``guo_rnn``, the paper's strategy 4): every tree node is one of the
  "super categories" (the C+F coarse and fine classes merged); an LSTM whose gates read the
  previous level's label embedding ``x_t``, its hidden state and the image feature ``v`` at every
  step (eqs. 2–7) emits one node per level — and then an end token on trees whose paths have
  different lengths. Trained with teacher forcing (eq. 8); at inference the previous prediction is
  fed back (greedy, or Koo et al.'s tree-restricted beam search: :func:`~hiervision.decoding.beam_search`).
* :class:`MultiHeadGenerator` (``guo_multihead``, strategies 1–3): the CNN's last layer replaced by
  one classification layer per level, in series coarse-to-fine, in series fine-to-coarse, or in
  parallel, trained with the summed softmax losses (eq. 1). ``levels=[1]`` is the paper's
  coarse-specific network; the fine-specific one is the ``flat`` model.

Both read only the pooled feature, so they train end to end or on pre-computed features
(``train.precompute_features``), and both answer :meth:`predict_given` — CNN-RNN* when fed the
true coarse label, and the pseudo-labelling step of the coarse-only protocols (Sec. 4.2).
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
    best_leaf_below,
    end_mask,
    exact_best_path,
    feed_own,
    full_precision,
    next_token_mask,
    prefix_logprob,
    prefix_scores,
    scheduled_feed,
    sequence_logprob,
    sequence_targets,
)
from hiervision.losses import check_loss_type, soft_label_targets
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.registry import register_model
from hiervision.models.step_softmax import ChildrenSoftmax, resolve_step_softmax, resolve_width, used_steps
from hiervision.taxonomy import EOS, IGNORE, PAD, Taxonomy

__all__ = ["CnnRnnGenerator", "MultiHeadGenerator", "VisualLSTMCell"]


class VisualLSTMCell(nn.Module):
    """The LSTM of eqs. 2–7: every gate reads the input ``x_t``, ``h_{t-1}`` *and* the image feature ``v``.

    ``W_v·v`` does not change over the steps, so :meth:`visual` computes it once per image and each
    step only adds it (the same arithmetic as concatenating ``[x_t; v]``, at a quarter of the cost).
    Initialisation: orthogonal recurrent weights per gate, forget-gate bias 1.
    """

    def __init__(self, input_size: int, visual_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.x2g = nn.Linear(input_size, 4 * hidden_size)  # W_xi, W_xf, W_xo, W_xc and the biases b_*
        self.h2g = nn.Linear(hidden_size, 4 * hidden_size, bias=False)  # W_h*
        self.v2g = nn.Linear(visual_size, 4 * hidden_size, bias=False)  # W_v*
        for gate in self.h2g.weight.data.chunk(4, 0):
            nn.init.orthogonal_(gate)
        nn.init.zeros_(self.x2g.bias)
        self.x2g.bias.data[hidden_size : 2 * hidden_size] = 1.0

    def visual(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, visual_size) → (B, 4H)``: the image's contribution to all four gates."""
        return self.v2g(v)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], v_gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(self.x2g(x), state, v_gates)

    def step(
        self, x_gates: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], v_gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the input's gate contribution ``x2g(x_t)``: teacher forcing knows every
        ``x_t`` in advance and computes them all in one product (:meth:`CnnRnnGenerator.unroll`)."""
        h, c = state
        i, f, o, g = (x_gates + self.h2g(h) + v_gates).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # eq. 6
        return torch.sigmoid(o) * torch.tanh(c), c  # eq. 7


class CnnRnnGenerator(HierarchicalClassifier):
    """Guo et al.'s CNN-RNN generator.

    Step ``t`` reads the embedding of the level-``t-1`` node (a start token at ``t=1``) and predicts
    the level-``t`` node over all tree nodes. Fixed-depth trees take one step per level, as the paper's
    two-level CIFAR-100 model; on trees with leaves at several depths, or ``end_nodes="all"`` (labels
    may stop at inner nodes), one more step predicts the end token (column 0).

    Coarse-only labels (an inner node where the tree goes deeper) train only the levels they have —
    the loss is masked, not filled in; with ``end_nodes="leaves"`` such a label never teaches the end
    token either.

    Args:
        embed_size: label embedding width (the paper: 1000 on ImageNet); ``"auto"``: 256, or 128 on trees of
            more than 10,000 nodes (:func:`~hiervision.models.step_softmax.resolve_width` says why).
        hidden_size: LSTM memory width (the paper: 1000 on ImageNet); ``"auto"``: 512, or 256 above 10,000 nodes.
        dropout: on ``v`` and on ``h_t`` before the output layer.
        end_nodes: ``"leaves"`` (paths end at leaves) or ``"all"``.
        decode: ``"greedy"`` (the paper's: feed back the most likely label) or ``"beam"``; both only
            follow tree edges, so every prediction is a valid path.
        beam_width: for ``decode="beam"``.
        level_weights: one loss weight per step (the end token's step included), as DHNN's ``w_t``.
        end_weight: extra factor on the end token's loss terms — on deep variable-length trees the
            end decision is where greedy decoding stops too early or too late.
        scheduled_sampling: probability that a training step reads the head's own greedy choice
            instead of the true previous node (Bengio et al., 2015; 0 = teacher forcing, eq. 8).
        step_softmax: what each step's softmax runs over (:mod:`hiervision.models.step_softmax`):
            ``"full"`` — all N+1 columns, the paper's; ``"children"`` — only the tokens allowed after the
            node the step reads (its children, and the end token where a path may stop), a hierarchical
            softmax whose training cost grows with the fan-out, not with N; ``"auto"`` (default) — full up
            to 1,000 nodes (the paper's results reproduce unchanged), children above, where the (B, T, N)
            logits of the full softmax dominate a step's time and memory. Under the children softmax a
            scheduled-sampling step whose own choice left the true path (the true next node is no child
            of what it read) teaches nothing: that node has probability 0 there.
    """

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        embed_size: int | str = "auto",
        hidden_size: int | str = "auto",
        dropout: float = 0.0,
        end_nodes: str = "leaves",
        decode: str = "greedy",
        beam_width: int = 3,
        level_weights: Sequence[float] | None = None,
        end_weight: float = 1.0,
        scheduled_sampling: float = 0.0,
        step_softmax: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(taxonomy, **kwargs)
        self.step_softmax = resolve_step_softmax(step_softmax, taxonomy.num_nodes)
        if not 0.0 <= float(scheduled_sampling) <= 1.0:
            raise ValueError(f"model.scheduled_sampling must be a probability in [0, 1], got {scheduled_sampling}")
        if float(end_weight) < 0:
            raise ValueError(f"model.end_weight must be >= 0, got {end_weight}")
        self.scheduled_sampling, self.end_weight = float(scheduled_sampling), float(end_weight)
        if self.multi_label:
            raise ValueError("model guo_rnn writes one path per image; multi-label data needs flat or dhnn_s2s")
        if end_nodes not in ("leaves", "all"):
            raise ValueError(f"model.end_nodes must be 'leaves' or 'all', got {end_nodes!r}")
        if decode not in ("greedy", "beam"):
            raise ValueError(f"model.decode must be 'greedy' or 'beam', got {decode!r}")
        self.end_nodes, self.decode_mode, self.beam_width = end_nodes, decode, int(beam_width)
        self.end_token = end_nodes == "all" or not taxonomy.is_fixed_depth
        self.num_steps = taxonomy.max_depth + int(self.end_token)
        n = taxonomy.num_nodes
        embed_size = resolve_width("embed_size", embed_size, 256, n)
        hidden_size = resolve_width("hidden_size", hidden_size, 512, n)
        self.embed = nn.Embedding(n, embed_size)  # row 0: the start token
        self.cell = VisualLSTMCell(embed_size, self.backbone.num_features, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, n)  # the super categories; column 0 = end token
        self.register_buffer("leaf_mask", end_mask(taxonomy, "leaves"), persistent=False)
        weights = [1.0] * self.num_steps if level_weights is None else [float(w) for w in level_weights]
        if len(weights) != self.num_steps:
            raise ValueError(f"model.level_weights: {self.num_steps} steps need {self.num_steps} weights, "
                             f"got {len(weights)}")
        self.register_buffer("level_weights", torch.tensor(weights), persistent=False)
        self.register_buffer("ends", self.tables.end_mask(end_nodes), persistent=False)  # where paths may stop
        self.children_softmax = ChildrenSoftmax(self.tables, self.ends) if self.step_softmax == "children" else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": features}  # the LSTM runs in loss (teacher forcing) and decode (fed its own labels)

    def _zero_state(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = like.new_zeros(rows, self.cell.hidden_size)
        return h, h.clone()

    def unroll(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, N+1)`` when step ``t`` reads ``tokens[:, t]`` (teacher forcing)."""
        return self.out(self.hidden(v, tokens))

    def hidden(self, v: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The output layer's input ``(B, T, H)`` when step ``t`` reads ``tokens[:, t]`` (teacher forcing)."""
        vg = self.cell.visual(self.dropout(v))
        # the inputs are known in advance: their gate parts, and the output layer, run once for all steps
        xg = self.cell.x2g(self.embed(tokens))
        state, hs = self._zero_state(len(v), vg), []
        for t in range(tokens.shape[1]):
            state = self.cell.step(xg[:, t], state, vg)
            hs.append(state[0])
        return self.dropout(torch.stack(hs, 1))

    def unroll_sampled(self, v: torch.Tensor, tokens: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`unroll`, but each step after the first reads the head's own greedy choice with
        probability ``p`` (:func:`~hiervision.decoding.scheduled_feed`); also returns the tokens read.
        Under the children softmax the first tensor is the steps' output-layer input ``(B, T, H)`` (as
        :meth:`hidden`), not ``(B, T, N+1)`` logits: its loss never forms those."""
        vg = self.cell.visual(self.dropout(v))
        state, out, fed = self._zero_state(len(v), vg), [], [tokens[:, 0]]
        children = self.children_softmax
        for t in range(tokens.shape[1]):
            if t and children is None:
                fed.append(scheduled_feed(out[-1], next_token_mask(self.tables, fed[-1], self.ends), tokens[:, t], p))
            elif t:
                fed.append(feed_own(children.greedy(self.out, out[-1], fed[-1]), tokens[:, t], p))
            state = self.cell(self.embed(fed[-1]), state, vg)
            h = self.dropout(state[0])
            out.append(h if children is not None else self.out(h))
        return torch.stack(out, 1), torch.stack(fed, 1)

    def _tokens(self, paths: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``(B, D)`` paths: the start token, then the path (0 where it has ended)."""
        return torch.cat([torch.zeros_like(paths[:, :1]), paths.clamp(min=0)], 1)[:, : self.num_steps]

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        tax = self.tables
        if self.end_token:
            seq = tax.encode_sequence(targets)
            if self.end_nodes == "leaves":  # an inner label here is a coarse-only one: it does not end the path
                inner = ~self.leaf_mask[targets]
                seq = seq.masked_fill((seq == EOS) & inner.unsqueeze(1), IGNORE)
        else:
            seq = tax.encode_levels(targets)
        tokens = self._tokens(tax.encode_paths(targets))
        if self.children_softmax is not None:  # the decoder runs only as far as the batch's paths go
            seq = seq[:, : used_steps(seq)]
            tokens = tokens[:, : seq.shape[1]]
        if self.training and self.scheduled_sampling > 0:
            out, tokens = self.unroll_sampled(outputs["v"], tokens, self.scheduled_sampling)
        else:
            out = self.hidden(outputs["v"], tokens) if self.children_softmax is not None else None
        if self.children_softmax is not None:  # O(Σ fan-out): only the allowed tokens' output rows
            lp = self.children_softmax.target_logprob(self.out, out, tokens, seq)
            per = torch.where(self.children_softmax.allowed(tokens, seq), -lp, 0.0)
        else:
            logits = (out if out is not None else self.unroll(outputs["v"], tokens)).float()
            per = F.cross_entropy(logits.transpose(1, 2), seq, ignore_index=IGNORE, reduction="none")
        weights = self.level_weights[: seq.shape[1]].expand_as(per)
        if self.end_weight != 1.0:
            weights = torch.where(seq == EOS, weights * self.end_weight, weights)
        return (per * weights).sum(1).mean()  # eq. 8: summed over the steps, averaged over the images

    def _step_logprob(self, h: torch.Tensor, tokens: torch.Tensor):
        """One search step's scores after reading ``tokens``: ``(B·k, N+1)`` log-probabilities, or the
        children softmax's ``(logprob, tokens)`` candidates (see :data:`~hiervision.decoding.StepFn`)."""
        if self.children_softmax is not None:
            return self.children_softmax.candidates(self.out, h, tokens)
        return self.out(h).float().log_softmax(-1)

    def _token_logprob(self, h: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-probability of ``targets`` after ``tokens`` (``-inf`` for PAD)."""
        if self.children_softmax is not None:
            return self.children_softmax.target_logprob(self.out, h, tokens, targets)
        return self.out(h).float().log_softmax(-1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)

    def _search(self, v: torch.Tensor, given: torch.Tensor | None) -> Prediction:
        tax, k = self.tables, (self.beam_width if self.decode_mode == "beam" else 1)
        b, dev = len(v), v.device
        vg = self.cell.visual(v)
        if given is None:
            state, skip, prefix = self._zero_state(b, vg), 0, None
        else:
            # feed start, p_1 .. p_{d-1}; the search's first step then reads p_d = the given node
            prefix = tax.paths[given]
            depth = tax.depth[given]
            tokens = self._tokens(prefix)
            states, given_lp = [self._zero_state(b, vg)], torch.zeros(prefix.shape, device=dev)
            for t in range(int(depth.max())):
                states.append(self.cell(self.embed(tokens[:, t]), states[-1], vg))
                given_lp[:, t] = self._token_logprob(states[-1][0], tokens[:, t], prefix[:, t])
            given_lp = given_lp.masked_fill(prefix == PAD, 0).cumsum(1)  # the given prefix's own log-probabilities
            rows = torch.arange(b, device=dev)
            state = tuple(torch.stack([s[i] for s in states])[depth, rows] for i in range(2))
            skip = int(depth.min())
        vg = vg.repeat_interleave(k, 0)

        def step(tokens: torch.Tensor, state):
            h, c = self.cell(self.embed(tokens), state, vg)
            return self._step_logprob(h, tokens), (h, c)

        start = tuple(s.repeat_interleave(k, 0) for s in state)
        beams, lp, cum = beam_search(tax, step, b, k, self.end_nodes, self.num_steps - skip, start, dev, given,
                                     with_prefix=True)
        paths, cum = beams[:, 0], cum[:, 0]
        if prefix is not None:  # the given prefix, then the continuation written after it
            cols = depth.unsqueeze(1) + torch.arange(paths.shape[1], device=dev)
            width = tax.paths.shape[1]
            paths = F.pad(prefix, (0, paths.shape[1]), value=PAD).scatter(1, cols, paths)[:, :width]
            below = cum + given_lp.gather(1, (depth - 1).clamp(min=0).unsqueeze(1))
            cum = F.pad(given_lp, (0, cum.shape[1])).scatter(1, cols, below)[:, :width]
        # node scores from the prefixes the search summed: no second pass of the decoder
        return Prediction(paths, prefix_scores(tax, paths, cum), lp[:, 0].exp())

    def set_beam_width(self, width: int) -> None:
        self.decode_mode, self.beam_width = "beam", check_beam_width(width)

    @full_precision
    def path_logprob(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens(paths)
        if self.children_softmax is not None:
            seq = sequence_targets(self.tables, paths, self.end_token, tokens.shape[1])
            return self.children_softmax.sequence_logprob(self.out, self.hidden(outputs["v"], tokens), tokens, seq)
        step_lp = self.unroll(outputs["v"], tokens).float().log_softmax(-1)
        return sequence_logprob(self.tables, paths, step_lp, self.end_token)

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        return self._search(outputs["v"], None)

    def decoder_settings(self) -> dict:
        k = self.beam_width if self.decode_mode == "beam" else 1
        return {"kind": "beam", "end_nodes": self.end_nodes, "beam_width": k, "max_steps": self.num_steps,
                "state": ["state0", "state1", "state2"], "candidates": self.children_softmax is not None}

    def export_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vg = self.cell.visual(self.backbone(images))  # the image's gate input, carried as state for every step
        h, c = self._zero_state(len(vg), vg)
        return h, c, vg

    def export_step(self, tokens: torch.Tensor, *state: torch.Tensor,
                    candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h, c, vg = state
        h, c = self.cell(self.embed(tokens), (h, c), vg)
        if self.children_softmax is not None:  # raw logits of the asked tokens; the runtime normalises
            return self.children_softmax.logits(self.out, h, candidates), h, c, vg
        return self.out(h).float().log_softmax(-1), h, c, vg

    @full_precision
    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        return self._search(outputs["v"], given)


STRATEGIES = ("coarse_to_fine", "fine_to_coarse", "parallel")


class MultiHeadGenerator(HierarchicalClassifier):
    """Guo et al.'s CNN-based generators: one softmax classification layer per level.

    ``strategy`` (Fig. 2): ``"parallel"`` — every head reads the CNN feature; ``"coarse_to_fine"``
    — layers in series, the coarsest reads the feature and each finer one reads the previous
    layer's output; ``"fine_to_coarse"`` — the reverse. The paper stacks the layers without saying
    more; we read them as plain linear layers (no non-linearity between), so a series layer sees
    only the scores of the level before it. Loss: the levels' cross-entropies summed (eq. 1);
    levels a coarse-only label does not reach are left out.

    ``levels``: which depths get a head (default all); ``[1]`` is the coarse-specific network.
    Levels above the deepest head that have no head of their own are read off the tree.
    ``decode``: ``"independent"`` — each level's argmax, as the paper reads the heads (the levels
    may disagree with the tree; ``valid_path_rate`` reports how often) — or ``"exact"``, the best
    path the tree allows under the heads' summed log-probabilities (needs every level).
    """

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        strategy: str = "parallel",
        levels: Sequence[int] | None = None,
        dropout: float = 0.0,
        decode: str = "independent",
        loss_type: str = "ce",
        loss_beta: float = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(taxonomy, **kwargs)
        # soft labels per level (Bertinetto et al.): each head's target spread over its level by LCA height
        self.loss_type = check_loss_type(loss_type, ("ce", "soft_labels"), "guo_multihead")
        self.loss_beta = float(loss_beta)
        depth = taxonomy.max_depth
        if self.multi_label:
            raise ValueError("model guo_multihead is single-label; multi-label data needs flat or dhnn_s2s")
        if not taxonomy.is_fixed_depth:
            raise ValueError("model guo_multihead needs every leaf at the same depth (one head per level); "
                             "use guo_rnn for paths of different lengths")
        if strategy not in STRATEGIES:
            raise ValueError(f"model.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        levels = list(range(1, depth + 1)) if levels is None else sorted({int(lv) for lv in levels})
        if not levels or levels[0] < 1 or levels[-1] > depth:
            raise ValueError(f"model.levels: depths must lie in 1..{depth}, got {levels}")
        if decode not in ("independent", "exact"):
            raise ValueError(f"model.decode must be 'independent' or 'exact', got {decode!r}")
        if decode == "exact" and len(levels) < depth:
            raise ValueError("model.decode: exact path search needs a head on every level")
        self.strategy, self.levels, self.decode_mode = strategy, levels, decode
        sizes = [len(taxonomy.levels[lv - 1]) for lv in levels]
        feat = self.backbone.num_features
        if strategy == "parallel":
            ins = [feat] * len(sizes)
        elif strategy == "coarse_to_fine":
            ins = [feat, *sizes[:-1]]
        else:
            ins = [*sizes[1:], feat]
        self.heads = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, sizes))
        self.dropout = nn.Dropout(dropout)
        for lv in levels:
            self.register_buffer(f"nodes{lv}", torch.tensor(taxonomy.levels[lv - 1]), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.dropout(features)
        order = range(len(self.heads))
        if self.strategy == "parallel":
            outs = [h(v) for h in self.heads]
        else:
            outs, x = [None] * len(self.heads), v
            for i in order if self.strategy == "coarse_to_fine" else reversed(order):
                x = outs[i] = self.heads[i](x)
        return {f"level{lv}": o for lv, o in zip(self.levels, outs)}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "soft_labels":
            paths = self.tables.encode_paths(targets)
            total = outputs[f"level{self.levels[0]}"].new_zeros((), dtype=torch.float32)
            for lv in self.levels:
                has = paths[:, lv - 1] != PAD
                y = soft_label_targets(self.taxonomy, paths[has, lv - 1], getattr(self, f"nodes{lv}"), self.loss_beta)
                total = total - (y * outputs[f"level{lv}"].float()[has].log_softmax(1)).sum()
            return total / len(targets)
        pos = self.tables.encode_level_positions(targets)  # (B, D) index within each level, IGNORE past the end
        total = sum(F.cross_entropy(outputs[f"level{lv}"].float(), pos[:, lv - 1], ignore_index=IGNORE,
                                    reduction="sum") for lv in self.levels)
        return total / len(targets)  # eq. 1

    def _node_logprob(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, N+1)``: each node's log-probability within its level (``-inf`` where no head scores it)."""
        first = outputs[f"level{self.levels[0]}"]
        lp = first.new_full((len(first), self.taxonomy.num_nodes), float("-inf"), dtype=torch.float32)
        for lv in self.levels:
            lp[:, getattr(self, f"nodes{lv}")] = outputs[f"level{lv}"].float().log_softmax(1)
        return lp

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        node_lp = self._node_logprob(outputs)
        if self.decode_mode == "exact":
            nodes, lp = exact_best_path(self.tables, node_lp)
            return Prediction(self.tables.paths[nodes], node_lp.exp(), lp.exp())
        paths = torch.full((len(node_lp), self.levels[-1]), PAD, dtype=torch.long, device=node_lp.device)
        lp = torch.zeros(len(node_lp), device=node_lp.device)
        for lv in self.levels:
            best_lp, best = outputs[f"level{lv}"].float().log_softmax(1).max(1)
            paths[:, lv - 1] = getattr(self, f"nodes{lv}")[best]
            lp = lp + best_lp
        # levels without a head take the ancestors of the deepest head's choice (a coarse-specific
        # network on level 2 implies level 1, as a flat prediction implies its path)
        implied = self.tables.paths[paths[:, -1], : paths.shape[1]]
        return Prediction(torch.where(paths == PAD, implied, paths), node_lp.exp(), lp.exp())

    def decoder_settings(self) -> dict:
        if self.decode_mode == "exact":
            return {"kind": "exact", "end_nodes": "leaves"}
        return {"kind": "independent", "end_nodes": "leaves", "level_depths": list(self.levels),
                "levels": [list(self.taxonomy.levels[lv - 1]) for lv in self.levels], "depth": self.levels[-1]}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        node_lp = self._node_logprob(self(images))
        return {"scores": node_lp.exp(), "path_logprob": prefix_logprob(self.tables, node_lp)}

    @full_precision
    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        """The best tree path through ``given`` under the heads' summed log-probabilities."""
        if len(self.levels) < self.taxonomy.max_depth:
            return super().decode_given(outputs, given)
        tax = self.tables
        node_lp = self._node_logprob(outputs)
        nodes, lp = best_leaf_below(tax, prefix_logprob(tax, node_lp), given)
        return Prediction(tax.paths[nodes], node_lp.exp(), lp.exp())


@register_model("guo_rnn", multi_label=False, method={"model": {"embed_size": 128, "hidden_size": 256},
                                                      "train": {"grad_clip": 5.0}},
                tiny={"embed_size": 16, "hidden_size": 16})
def guo_rnn(taxonomy: Taxonomy, **kwargs) -> CnnRnnGenerator:
    """Guo et al.'s CNN-RNN generator (any tree; variable-length paths end with an end token)."""
    return CnnRnnGenerator(taxonomy, **kwargs)


# tiny: the tree's best path (the default, "independent", reads each level's argmax and may leave the tree)
@register_model("guo_multihead", multi_label=False, fixed_depth=True, tiny={"decode": "exact"})
def guo_multihead(taxonomy: Taxonomy, **kwargs) -> MultiHeadGenerator:
    """Guo et al.'s CNN-based generators (strategies 1–3) and the coarse-specific network (``levels=[1]``)."""
    return MultiHeadGenerator(taxonomy, **kwargs)
