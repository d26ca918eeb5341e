"""Turning model scores into paths of the tree.

Every model ends in a :class:`Prediction`, so metrics, the CLI and serving never special-case a
method. Two decoders live here:

* :func:`exact_best_path` — for heads whose per-node scores do not depend on earlier predictions
  (flat softmax, per-level heads, Koo's FPL outputs): the best *valid* path is found exactly by
  summing log-probabilities along every root-to-node path, one level at a time (O(B·N)).
* :func:`beam_search` — Koo et al.'s Algorithm 1 for decoders whose next step depends on what was
  predicted before (a seq2seq decoder fed its previous label): keep the ``k`` best partial paths,
  extend each only by children of its last node (or the end token where a path may stop).
* :func:`threshold_paths` — multi-label: a node is kept when it and all its ancestors pass the
  threshold (Koo et al., Sec. 4.2).

Every function takes the tree as a :class:`~hiervision.taxonomy.Taxonomy` or as a model's
:class:`~hiervision.taxonomy.TreeTables` (its buffers, already on the model's device: nothing is
copied per call). Decoding sums log-probabilities of whole paths, so it runs in fp32 even inside
autocast: with bf16's 8 mantissa bits near-tied paths would flip (:func:`full_precision`).

Nothing here builds a (N+1)² table (trees reach 10^5 classes): "below a node" is a depth-first interval
and "a child of the last node" a comparison with the parent ids (:func:`next_token_mask`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hiervision.taxonomy import EOS, IGNORE, PAD, Taxonomy, TreeTables

__all__ = ["Prediction", "beam_search", "best_leaf_below", "end_mask", "exact_best_path", "feed_own", "full_precision",
           "last_node", "multi_label_prediction", "next_token_mask", "no_autocast", "prefix_logprob",
           "prefix_scores", "scheduled_feed", "sequence_logprob", "sequence_targets", "threshold_paths", "tree_tables"]

Tree = Taxonomy | TreeTables


@functools.lru_cache(maxsize=16)
def _cached_tables(taxonomy: Taxonomy, device: torch.device) -> TreeTables:
    return TreeTables(taxonomy).to(device)


def tree_tables(tree: Tree, device: torch.device | str | None = None) -> TreeTables:
    """The tables of ``tree`` on ``device``: a model's own :class:`TreeTables` as they are, or, for a
    plain :class:`Taxonomy` (callers without a model), tables built once per tree and device."""
    if isinstance(tree, TreeTables):
        return tree
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # tensors made while tracing are fake
        return TreeTables(tree).to(device)
    return _cached_tables(tree, device)


def no_autocast(device: torch.device | str):
    """A context that turns autocast off on ``device``'s type (a no-op where autocast does not exist)."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def full_precision(decode: Callable) -> Callable:
    """Decorate a model's ``decode(self, outputs, ...)``: it runs with autocast off and reads its
    outputs in fp32. Path log-probabilities are sums; in bf16 near-tied paths would flip, and a
    decoder network run during the search (beam search over an LSTM) would score in bf16 too."""

    @functools.wraps(decode)
    def wrapper(self, outputs: dict[str, torch.Tensor], *args, **kwargs):
        outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
        device = next((v.device for v in outputs.values() if torch.is_tensor(v)), torch.device("cpu"))
        with no_autocast(device):
            return decode(self, outputs, *args, **kwargs)

    return wrapper


def last_node(paths: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` padded paths → ``(B,)`` last non-PAD entry of each (PAD for an empty path)."""
    if paths.shape[1] == 0:
        return torch.full((len(paths),), PAD, dtype=torch.long, device=paths.device)
    pos = torch.arange(paths.shape[1], device=paths.device)
    last = torch.where(paths != PAD, pos, -1).max(1).values
    return torch.where(last >= 0, paths.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1), PAD)


@dataclass
class Prediction:
    """What every model's ``predict`` returns for a batch of B images.

    Attributes:
        paths: ``(B, D)`` node ids per level, :data:`~hiervision.taxonomy.PAD` after the end.
            Autoregressive heads may emit invalid paths; metrics report how often.
        scores: ``(B, N+1)`` per-node score in [0, 1] (marginal probability for softmax heads,
            sigmoid for multi-label heads); column 0 unused.
        path_prob: ``(B,)`` probability the model gives to the returned path.
        labels: multi-label only — ``(B, N+1)`` bool, the predicted path *ends* (a set of paths).
    """

    paths: torch.Tensor
    scores: torch.Tensor
    path_prob: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def nodes(self) -> torch.Tensor:
        """``(B,)`` the last node of each path (the predicted class)."""
        return last_node(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def cat(parts: list[Prediction]) -> Prediction:
        """Join per-batch predictions (paths are padded to the longest)."""
        d = max(p.paths.shape[1] for p in parts)
        paths = torch.cat([torch.nn.functional.pad(p.paths, (0, d - p.paths.shape[1]), value=PAD) for p in parts])
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        return Prediction(
            paths, torch.cat([p.scores for p in parts]), torch.cat([p.path_prob for p in parts]), labels
        )


def end_mask(taxonomy: Tree, end_nodes: torch.Tensor | str | None = None) -> torch.Tensor:
    """``(N+1,)`` bool: where a path may stop. ``None``/``"leaves"``: leaves only; ``"all"``: every node.
    On the device of ``taxonomy``'s tables (the CPU for a plain :class:`Taxonomy`)."""
    return tree_tables(taxonomy).end_mask(end_nodes)


def prefix_logprob(taxonomy: Tree, node_logprob: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)`` per-node log-probabilities → the summed log-probability of each root-to-node path
    (fp32, whatever autocast says; column 0, the root, is 0). Log-probabilities are floored at -1e4, so
    a path through a node of probability 0 scores about -1e4 per such node, not -inf."""
    lp = node_logprob.float().clamp(min=-1e4)
    with no_autocast(lp.device):
        return tree_tables(taxonomy, lp.device).path_sum(lp)


def exact_best_path(
    taxonomy: Tree,
    node_logprob: torch.Tensor,
    end_nodes: torch.Tensor | str | None = None,
    end_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best valid path under independent per-node log-probabilities.

    Args:
        node_logprob: ``(B, N+1)`` log-probability of each node *given its level* (column 0 ignored).
        end_nodes: where a path may end (see :func:`end_mask`; default leaves only, ``"all"`` for
            variable-length trees where inner nodes are labels).
        end_logprob: ``(B, N+1)`` optional log-probability of *stopping* after each node (a decoder's
            end token at the step after the node), added to the paths that end there.

    Returns:
        ``(nodes, logprob)``: the best end node per sample and its path's summed log-probability.
    """
    path_lp = prefix_logprob(taxonomy, node_logprob)
    if end_logprob is not None:
        path_lp = path_lp + end_logprob.float().clamp(min=-1e4)
    path_lp = path_lp.masked_fill(~tree_tables(taxonomy, path_lp.device).end_mask(end_nodes), float("-inf"))
    best_lp, nodes = path_lp.max(1)
    return nodes, best_lp


def best_leaf_below(
    taxonomy: Tree, path_logprob: torch.Tensor, given: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best leaf on a path through ``given`` ``(B,)`` (a node or the leaf itself), from ``(B, N+1)``
    log-probabilities of whole root-to-node paths: ``(nodes, logprob)``. What conditioning on a known
    coarse label (Guo et al.'s CNN-RNN*) means for heads that score every path at once."""
    tables = tree_tables(taxonomy, given.device)
    nodes = torch.arange(tables.taxonomy.num_nodes, device=given.device)
    below = tables.is_ancestor(given.unsqueeze(1), nodes) & tables.leaf_mask  # (B, N+1): a depth-first interval
    lp, nodes = path_logprob.masked_fill(~below, float("-inf")).max(1)
    return nodes, lp


def next_token_mask(tables: TreeTables, last: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``last.shape + (N+1,)`` bool: the tokens allowed after nodes ``last`` — their children (a comparison
    with the parent ids, O(N) per node, no table) and :data:`~hiervision.taxonomy.EOS` where ``ends``
    ``(N+1,)`` lets a path stop, for any tree size."""
    mask = tables.parent == last.unsqueeze(-1)
    mask[..., EOS] = ends[last]  # the root is its own parent in ``parent``: column 0 is set here instead
    return mask


def scheduled_feed(
    logits: torch.Tensor, allowed: torch.Tensor, teacher: torch.Tensor, p: float
) -> torch.Tensor:
    """The next token an autoregressive head reads in training under scheduled sampling (Bengio et al., 2015).

    Teacher forcing feeds the true previous node, so at test the head meets its own mistakes for the
    first time (exposure bias). Here each image reads, with probability ``p``, the head's own greedy
    choice from ``logits`` ``(B, N+1)`` instead — restricted to the tokens ``allowed`` ``(B, N+1)`` after
    the previous node (:func:`next_token_mask`), as decoding is, and detached (no gradient through it).
    ``p = 0`` is teacher forcing, ``p = 1`` feeds only the head's own choices.
    """
    return feed_own(logits.detach().float().masked_fill(~allowed, float("-inf")).argmax(-1), teacher, p)


def feed_own(own: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`scheduled_feed`'s draw, for a head that found its greedy choices ``own`` ``(B,)`` itself
    (a children softmax scores only the allowed tokens): ``own`` with probability ``p``, else ``teacher``."""
    if p >= 1:
        return own
    return torch.where(torch.rand(len(own), device=own.device) < p, own, teacher)


#: ``step(tokens, state) -> (logprob, state)``: ``tokens`` ``(B·k,)`` the last node of each beam (0 at
#: the start), ``logprob`` ``(B·k, N+1)`` over the next token (column 0 = end of path) — or, for a step
#: that scores only the allowed tokens (a children softmax), a pair ``(logprob, tokens)`` of ``(B·k, F)``
#: candidates padded with ``-inf``.
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], Any]]


def _reorder(state: Any, index: torch.Tensor) -> Any:
    """Select beams in a decoder state: tensors are indexed on their batch dim (dim 1 for LSTM
    ``(h, c)`` of shape ``(layers, B·k, H)``, else dim 0); tuples/lists recurse; ``None`` stays."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(_reorder(s, index) for s in state)
    if not isinstance(state, torch.Tensor):
        return state
    return state.index_select(1 if state.dim() == 3 else 0, index)


def _pick(x: torch.Tensor, beam: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, k, D)`` rows of the beams ``beam`` ``(B, k)`` keeps."""
    return x.gather(1, beam.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _step_scores(tables: TreeTables, out, last: torch.Tensor, ends: torch.Tensor):
    """A step's output as ``(logprob, tokens)`` ``(B, k, F)``: a step's own candidates as they are, or
    ``(B·k, N+1)`` dense log-probabilities masked to the allowed tokens (``tokens`` None: the column)."""
    b, k = last.shape
    if isinstance(out, tuple):
        return out[0].float().view(b, k, -1), out[1].view(b, k, -1)
    return out.float().view(b, k, -1).masked_fill(~next_token_mask(tables, last, ends), float("-inf")), None


def beam_search(
    taxonomy: Tree,
    step: StepFn,
    batch_size: int,
    beam_width: int = 3,
    end_nodes: torch.Tensor | str | None = None,
    max_steps: int | None = None,
    state: Any = None,
    device: torch.device | str = "cpu",
    start: torch.Tensor | None = None,
    with_prefix: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Koo et al.'s Algorithm 1: beam search restricted to the tree.

    Each step keeps the ``beam_width`` best partial paths by summed log-probability; a beam may only
    continue to a child of its last node, or stop (token 0) where ``end_nodes`` allows it, so every
    returned path is valid. A stopped beam stays a candidate with its score. ``state`` (e.g. the
    decoder's LSTM state, batch ``B·k``) is reordered with the beams. With ``beam_width=1`` this is
    the greedy decoder of the slides' worked example. A step that returns its allowed candidates
    (:data:`StepFn`) costs O(B·k·F) here instead of O(B·k·N).

    ``start`` ``(B,)`` begins each search below a given node instead of the root (Guo et al.'s
    CNN-RNN*, where the coarse label is known): the first step reads that node and the returned
    paths hold only the continuation below it.

    Returns:
        ``(paths, logprob)``: ``(B, k, D)`` node ids per level, PAD after the end, best beam first;
        ``(B, k)`` their log-probabilities (``-inf`` for beams that found no valid path); with
        ``with_prefix`` also ``(B, k, D)`` the log-probability of each path's prefix ending at every
        position (what :func:`prefix_scores` turns into node scores without a second decoder pass).
    """
    k = int(beam_width)
    if k < 1:
        raise ValueError(f"beam_width must be ≥ 1, got {beam_width}")
    tables = tree_tables(taxonomy, device)
    steps = max_steps if max_steps is not None else tables.taxonomy.max_depth + 1
    ends = tables.end_mask(end_nodes).to(device)
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0  # one live beam at the start: no duplicates
    last = torch.zeros(batch_size, k, dtype=torch.long, device=device)
    if start is not None:
        last[:] = start.to(device).view(batch_size, 1)
    done = torch.zeros(batch_size, k, dtype=torch.bool, device=device)
    paths = torch.empty(batch_size, k, 0, dtype=torch.long, device=device)
    prefix = torch.empty(batch_size, k, 0, device=device)
    rows = torch.arange(batch_size, device=device).unsqueeze(1)
    for _ in range(steps):
        out, state = step(last.reshape(-1), state)
        lp, cand_tok = _step_scores(tables, out, last, ends)
        width = lp.shape[2]
        cand = scores.unsqueeze(2) + lp
        # a stopped beam has exactly one continuation: itself, unchanged (column 0, read as the end token)
        stay = torch.full_like(cand, float("-inf"))
        stay[..., 0] = scores
        cand = torch.where(done.unsqueeze(2), stay, cand)
        scores, flat = cand.view(batch_size, k * width).topk(k, dim=1)
        beam, col = flat // width, flat % width
        if cand_tok is None:
            tok = col
        else:  # a stopped beam's column 0 is its end token, whatever its last node's candidates were
            tok = torch.where(done.unsqueeze(2), EOS, cand_tok).view(batch_size, -1).gather(1, flat)
        state = _reorder(state, (rows * k + beam).reshape(-1))
        stopped = tok == EOS
        prev_last = last.gather(1, beam)
        paths = torch.cat([_pick(paths, beam), torch.where(stopped, PAD, tok).unsqueeze(2)], dim=2)
        prefix = torch.cat([_pick(prefix, beam), scores.unsqueeze(2)], dim=2)
        done = done.gather(1, beam) | stopped
        last = torch.where(stopped, prev_last, tok)
        if bool(done.all()):
            break
    # beams cut off by max_steps count only where they may end (fixed-depth heads stop at leaves)
    scores = scores.masked_fill(~done & ~ends[last], float("-inf"))
    scores, order = scores.sort(dim=1, descending=True)
    paths = _pick(paths, order)
    # trim the all-PAD tail left by the final end tokens
    keep = int((paths != PAD).any(0).any(0).nonzero().max()) + 1 if bool((paths != PAD).any()) else 0
    if not with_prefix:
        return paths[..., :keep], scores
    return paths[..., :keep], scores, _pick(prefix, order)[..., :keep]


def prefix_scores(taxonomy: Tree, paths: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``(B, N+1)`` per-node scores of decoded ``paths`` ``(B, D)`` from their prefixes' log-probabilities
    ``(B, D)`` (:func:`beam_search` ``with_prefix``): each node of the path gets the probability of the
    prefix ending at it, nodes off the path 0 (what autoregressive heads put in ``Prediction.scores``),
    read off the search instead of a second pass of the decoder."""
    idx = paths.clamp(min=0)
    scores = torch.zeros(len(paths), tree_tables(taxonomy).taxonomy.num_nodes, device=paths.device)
    scores.scatter_(1, idx, torch.where(paths == PAD, 0.0, prefix[:, : paths.shape[1]].float().exp()))
    scores[:, 0] = 0
    return scores


def sequence_logprob(taxonomy: Tree, paths: torch.Tensor, step_logprob: torch.Tensor, end: bool = True
                     ) -> torch.Tensor:
    """``(B,)`` log-probability of ``paths`` ``(B, D)`` (PAD after the end), then the end token when
    ``end``, read from a decoder's ``(B, S, N+1)`` per-step log-probabilities: the sum a tree-restricted
    beam search ranks paths by, so a true path and a decoded one can be compared on the search's scale."""
    seq = sequence_targets(taxonomy, paths, end, step_logprob.shape[1])
    lp = step_logprob.float().gather(2, seq.clamp(min=EOS).unsqueeze(2)).squeeze(2)
    return lp.masked_fill(seq == IGNORE, 0).sum(1)


def sequence_targets(taxonomy: Tree, paths: torch.Tensor, end: bool, steps: int) -> torch.Tensor:
    """``(B, steps)`` what a decoder emits for ``paths`` ``(B, D)``: the nodes, then :data:`EOS` when ``end``,
    then :data:`IGNORE` (the terms :func:`sequence_logprob` sums)."""
    nodes = last_node(paths)
    tax = tree_tables(taxonomy, paths.device)
    return (tax.encode_sequence(nodes) if end else tax.encode_levels(nodes))[:, :steps]


def multi_label_prediction(taxonomy: Tree, scores: torch.Tensor, threshold: float) -> Prediction:
    """Multi-label heads' :class:`Prediction` from ``(B, N+1)`` sigmoid node scores: the thresholded
    set of paths, plus the single most likely root-to-leaf path (sum of log-sigmoids along it)."""
    labels = threshold_paths(taxonomy, scores, threshold)
    nodes, lp = exact_best_path(taxonomy, torch.log(scores.clamp_min(1e-12)))
    return Prediction(tree_tables(taxonomy, scores.device).paths[nodes], scores, lp.exp(), labels)


def threshold_paths(taxonomy: Tree, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Multi-label decoding: ``(B, N+1)`` sigmoid scores → ``(B, N+1)`` bool set of kept path ends.

    A node is kept when it and every ancestor pass ``threshold``; the kept paths are the kept
    nodes that have no kept child (the deepest points reached).
    """
    tables = tree_tables(taxonomy, scores.device)
    kept = scores >= threshold
    kept[:, 0] = True  # the root passes, so depth-1 nodes only need themselves
    for _ in range(tables.taxonomy.max_depth - 1):  # each round: a node stays only if its parent stayed
        kept = kept & kept[:, tables.parent]
    kept[:, 0] = False
    # the ends: kept nodes with no kept child
    has_child = torch.zeros(kept.shape, dtype=torch.int32, device=kept.device)
    has_child.index_add_(1, tables.parent[1:], kept[:, 1:].to(torch.int32))
    return kept & (has_child == 0)
