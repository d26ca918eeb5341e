"""The output softmax of a tree-restricted decoder step: over all N nodes, or over the current node's children.

Guo's CNN-RNN and Koo's CNN-S2S decoders emit one node per step and only ever follow tree edges. Their
papers score each step over every node (``"full"``: a softmax over N+1 columns). On a tree of 10^4–10^5
nodes that is most of a training step's time and memory: (B, T, N) logits, one (H × N) product per step.
``"children"`` is a hierarchical softmax: step ``t`` normalises only over the tokens allowed after the
node it reads — that node's children, plus the end token where a path may stop there — so a step's
log-probability for node ``n`` is its logit minus the log-sum-exp over its siblings (and the end token),
and a path's probability is the product along it, summing to 1 over the valid paths. Training then costs
O(Σ fan-out·H) per batch, not O(B·T·N·H): only the output rows of those candidates are gathered, and the
normaliser is a segment log-sum-exp (:func:`~hiervision.tree.tables.segment_logsumexp`).

``"auto"`` (the default) keeps the papers' full softmax up to :data:`AUTO_CHILDREN_ABOVE` nodes — their
tables and configs reproduce unchanged, and on such trees the dense product is cheap — and switches to
the children softmax above, where the full one dominates the cost.
"""

from __future__ import annotations

import torch
from torch import nn

from hiervision.taxonomy import EOS, IGNORE, TreeTables
from hiervision.tree.tables import segment_logsumexp, step_candidates, step_csr

__all__ = ["AUTO_CHILDREN_ABOVE", "AUTO_NARROW_ABOVE", "STEP_SOFTMAX", "ChildrenSoftmax", "resolve_step_softmax",
           "resolve_width", "used_steps"]

STEP_SOFTMAX = ("full", "children", "auto")
#: ``step_softmax="auto"`` uses the children softmax on trees with more nodes than this
AUTO_CHILDREN_ABOVE = 1000
#: a context whose rows bring at least this many candidates (rows × its fan-out) is scored by one matrix
#: product for all its rows instead of a gathered weight row per candidate (see ``ChildrenSoftmax._blocks``)
SHARE_ABOVE = 2048
#: at most this many contexts per call get their own product (the largest first; a Python loop runs over them)
MAX_SHARED = 32
#: widths left at ``"auto"`` (a decoder's label embedding and hidden state) are halved on trees with more
#: nodes than this (see :func:`resolve_width`)
AUTO_NARROW_ABOVE = 10_000


def resolve_step_softmax(value: str, num_nodes: int) -> str:
    """``"full"`` or ``"children"`` for a tree of ``num_nodes`` nodes (``"auto"`` decided by size)."""
    if value not in STEP_SOFTMAX:
        raise ValueError(f"model.step_softmax must be 'full', 'children' or 'auto', got {value!r}")
    if value == "auto":
        return "children" if num_nodes > AUTO_CHILDREN_ABOVE else "full"
    return value


def resolve_width(key: str, value: int | str, default: int, num_nodes: int) -> int:
    """A decoder width: ``value`` itself, or for ``"auto"`` ``default`` up to :data:`AUTO_NARROW_ABOVE` nodes
    and half of it above. Why: the label embedding and the output layer are N × width tables that the
    optimizer updates densely every step (momentum touches every row, not only the few a batch reads); at
    45,000 nodes and the paper-sized 256 + 512 they are 35M parameters, 12× flat's whole model, and zeroing
    and updating them made a train step 1.9× flat's (``benchmarks/scale.py``). Half the width keeps a step
    within 1.5× — and the recipes already train these decoders at 128 / 256 on every tree."""
    if value == "auto":
        return default if num_nodes <= AUTO_NARROW_ABOVE else default // 2
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{key} must be a whole number ≥ 1 or 'auto', got {value!r}")
    return value


def used_steps(seq: torch.Tensor) -> int:
    """How many leading steps of ``(B, T)`` targets hold any term (1 at least): on a deep tree a batch's
    paths rarely reach its deepest level, and a decoder step past every path's end teaches nothing."""
    used = (seq != IGNORE).any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


class ChildrenSoftmax(nn.Module):
    """A decoder step's softmax over the tokens allowed after its context node, read off an ``nn.Linear``.

    The layer ``out`` (``H → N+1``, column 0 the end token) stays the model's own parameter (checkpoints
    keep their keys); this module holds only the tree's ragged table of allowed tokens
    (:func:`~hiervision.tree.tables.step_csr`) as non-persistent buffers. Every method takes hidden states
    ``h`` ``(M, H)`` and the node each row has just read, ``contexts`` ``(M,)`` (0 at the start).
    ``offset=1`` reads a layer with no end token's column (``H → N``, column ``j`` = node ``j + 1``), for
    trees whose paths stop by depth (``ends`` all false).
    """

    def __init__(self, tables: TreeTables, ends: torch.Tensor, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset  # output column of node n: n - offset (1 for a layer without the end token's column)
        ptr, tokens, slot = step_csr(tables.parent, ends)
        for name, t in {"ptr": ptr, "tokens": tokens, "slot": slot, "parent": tables.parent.clone(),
                        "ends": ends.clone()}.items():
            self.register_buffer(name, t, persistent=False)

    def _ragged(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor):
        """Ragged ``(S,)`` log-probabilities of every candidate of every row, with the candidates' rows,
        tokens and where each row starts: only those S output rows are read (one gathered per candidate)."""
        seg, pos, start = step_candidates(self.ptr, contexts)
        tok = self.tokens[pos]
        col = tok - self.offset
        logit = ((h[seg] * out.weight[col]).sum(-1) + out.bias[col]).float()
        return logit - segment_logsumexp(logit, seg, len(contexts))[seg], seg, tok, start

    def _blocks(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor):
        """``(narrow, blocks)``: the rows left to :meth:`_ragged` (``None``: all of them) and, for each wide
        context, ``(its rows, its candidate tokens (k,), their log-probabilities (r, k))``.

        Gathering a weight row per candidate reads S × H values: cheap while contexts are narrow, but a context
        read by many rows (a WordNet root with ~7,700 children, read by every row at step one) brings its whole
        fan-out once per row — 500 MB at batch 64, and as many ragged entries. Such contexts (those whose rows
        bring at least :data:`SHARE_ABOVE` candidates, at most :data:`MAX_SHARED` of them, largest first) are
        scored as one dense block, ``log_softmax(h[rows] @ W[its candidates]ᵀ + b)``: each weight row read once."""
        width = self.ptr[contexts + 1] - self.ptr[contexts]
        if int(width.sum()) < SHARE_ABOVE:
            return None, []
        uniq, inverse = contexts.unique(return_inverse=True)
        count = torch.bincount(inverse, minlength=len(uniq))
        brings = (self.ptr[uniq + 1] - self.ptr[uniq]) * count
        order = brings.argsort(descending=True)[:MAX_SHARED]
        order = order[(brings[order] >= SHARE_ABOVE) & (count[order] > 1)]
        if not len(order):
            return None, []
        chosen = torch.zeros(len(uniq), dtype=torch.bool, device=contexts.device)
        chosen[order] = True
        blocks = []
        for c in uniq[order].tolist():
            rows = (contexts == c).nonzero().squeeze(1)
            tok = self.tokens[self.ptr[c]: self.ptr[c + 1]]
            col = tok - self.offset
            blocks.append((rows, tok, (h[rows] @ out.weight[col].T + out.bias[col]).float().log_softmax(1)))
        return (~chosen[inverse]).nonzero().squeeze(1), blocks

    def allowed(self, contexts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(M,)`` bool: ``targets`` may follow ``contexts`` (a child, or the end token where a path may stop)."""
        return torch.where(targets == EOS, self.ends[contexts],
                           (targets > 0) & (self.parent[targets.clamp(min=0)] == contexts))

    def target_logprob(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
        """Log-probability of ``targets`` after ``contexts`` (any shape ``S``; ``h`` is ``S + (H,)``):
        ``-inf`` where a target may not follow, :data:`~hiervision.taxonomy.IGNORE` included (those rows
        cost nothing). Teacher forcing's loss terms, and a path's terms in ``path_logprob``."""
        shape, h = targets.shape, h.reshape(-1, h.shape[-1])
        contexts, targets = contexts.reshape(-1), targets.reshape(-1)
        ok = self.allowed(contexts, targets)
        result = torch.full((len(contexts),), float("-inf"), device=h.device)
        if not bool(ok.any()):
            return result.view(shape)
        where, ctx, tgt, h = ok.nonzero().squeeze(1), contexts[ok], targets[ok], h[ok]
        # a target's place among its context's candidates (the end token is the first where it is one)
        slot = torch.where(tgt == EOS, self.ptr[ctx], self.slot[tgt.clamp(min=0)]) - self.ptr[ctx]
        narrow, blocks = self._blocks(out, h, ctx)
        rows = narrow if narrow is not None else torch.arange(len(ctx), device=h.device)
        lp, _, _, start = self._ragged(out, h[rows], ctx[rows])
        at, values = [where[rows]], [lp[start + slot[rows]]]
        for r, _, block in blocks:
            at.append(where[r])
            values.append(block.gather(1, slot[r].unsqueeze(1)).squeeze(1))
        return result.index_put((torch.cat(at),), torch.cat(values)).view(shape)

    def sequence_logprob(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor,
                         seq: torch.Tensor) -> torch.Tensor:
        """``(B,)`` a path's log-probability from its steps' ``h`` ``(B, T, H)``, the nodes read ``(B, T)``
        and what is emitted ``seq`` (:func:`~hiervision.decoding.sequence_targets`; IGNORE terms count 0)."""
        return self.target_logprob(out, h, contexts, seq).masked_fill(seq == IGNORE, 0).sum(1)

    def candidates(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprob, tokens)``, each ``(M, F)`` (F = the widest row's candidate count), padded with
        ``-inf`` / :data:`EOS`: what a search step hands :func:`~hiervision.decoding.beam_search`."""
        width = max(int((self.ptr[contexts + 1] - self.ptr[contexts]).max()) if len(contexts) else 1, 1)
        logprob = torch.full((len(contexts), width), float("-inf"), device=h.device)
        tokens = torch.full((len(contexts), width), EOS, dtype=torch.long, device=h.device)
        narrow, blocks = self._blocks(out, h, contexts)
        rows = narrow if narrow is not None else torch.arange(len(contexts), device=h.device)
        lp, seg, tok, start = self._ragged(out, h[rows], contexts[rows])
        col = torch.arange(len(seg), device=h.device) - start[seg]
        logprob, tokens = logprob.index_put((rows[seg], col), lp), tokens.index_put((rows[seg], col), tok)
        for r, block_tokens, block in blocks:
            logprob[r, : len(block_tokens)] = block
            tokens[r, : len(block_tokens)] = block_tokens
        return logprob, tokens

    def greedy(self, out: nn.Linear, h: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """``(M,)`` the most likely allowed token after each context (scheduled sampling's own choice)."""
        with torch.no_grad():
            lp, tokens = self.candidates(out, h, contexts)
        return tokens.gather(1, lp.argmax(1, keepdim=True)).squeeze(1)

    def logits(self, out: nn.Linear, h: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, U)`` raw logits of the tokens ``candidates`` ``(U,)`` (all N+1 columns when ``None``): the
        exported decoder step's output. The runtime asks for the tokens any of its beams may take next and
        normalises each row over those allowed after its own node, so a step costs O(M·U·H), not O(M·N·H)."""
        if candidates is None:
            return torch.nn.functional.pad(out(h).float(), (self.offset, 0), value=float("-inf"))
        col = candidates - self.offset
        return (h @ out.weight[col].T + out.bias[col]).float()
