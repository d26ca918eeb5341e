"""PyTorch-free prediction: an exported ``.onnx`` (plus its ``.json`` sidecar) → prediction records.

The ONNX graph holds only the tensor part of a model (per-node / per-step scores, or an encoder and
one decoder step); the tree decoding lives here, in numpy: exact search over whole-path scores,
each level's argmax, HierNet's routing, Koo et al.'s tree-restricted beam search and multi-label
thresholding. The same decoders serve ``hiervision predict`` on a PyTorch run (through
:func:`hiervision.export.torch_engine`), so there is one place that turns scores into records; the
tests hold them to :mod:`hiervision.decoding` (the PyTorch reference) image by image.

Needs numpy, Pillow and onnxruntime only (``pip install hiervision[export]``); never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hiervision.bayes import decide_records, decode_rule
from hiervision.checks import check_beam_width
from hiervision.imagefile import DEFAULT_MAX_PIXELS, read_array
from hiervision.marginals import (
    Temperature,
    apply_temperature,
    as_temperature,
    end_distribution,
    is_identity,
    node_marginals,
)
from hiervision.records import PAD, TreeView, error_record, mark_novel, prediction_record, top_k_ends
from hiervision.restrict import Allowed, restrict_q, restricted_marginals
from hiervision.rollup import Thresholds, rollup_record
from hiervision.sidecar import DECODER_KEY, SIDECAR_FORMAT, TREE_KEY, check_sidecar, check_width, load_sidecar

__all__ = ["Engine", "Predictor", "SIDECAR_FORMAT", "beam_search", "calibrate_batch", "decode_batch",
           "hedge_records", "load_sidecar", "read_image", "restrict_batch", "threshold_paths"]

EOS = 0

#: ``step(tokens, state) -> (logprob, state)``: ``tokens`` ``(B·k,)`` the last node of each beam (0 at
#: the start), ``logprob`` ``(B·k, N+1)`` over the next token (column 0 = end of path). A step that scores
#: asked tokens is called ``step(tokens, state, candidates)`` and returns raw logits ``(B·k, U)`` of those.
StepFn = Callable[..., tuple[np.ndarray, Any]]


class Engine(Protocol):
    """Where the tensors come from (onnxruntime here, or a PyTorch model in ``hiervision.export``).

    ``run(images)`` gives the graph's named outputs for a normalised ``(B, C, H, W)`` float32 batch;
    autoregressive models also ``step(tokens, state)`` (state: a tuple of arrays, batch first)."""

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...

    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...],
             candidates: np.ndarray | None = None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        ...


# ----------------------------------------------------------------------------- decoders
def _next_tokens(tree: TreeView, ends: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, valid)``, each ``last.shape + (F,)``: the tokens allowed after nodes ``last`` — EOS first
    where a path may stop there, then the children in id order (the dense columns' order, so a stable sort
    keeps the same beams) — read from the tree's children CSR; F is the most any of them allows. O(B·k·F)
    per step, not O(B·k·N): what keeps the search cheap on a tree of 10^5 nodes."""
    ptr, kids = tree.child_csr
    stop = ends[last].astype(np.int64)
    width = ptr[last + 1] - ptr[last] + stop
    j = np.arange(max(int(width.max()), 1))
    pos = (ptr[last] - stop)[..., None] + j
    tokens = kids[np.clip(pos, 0, max(len(kids) - 1, 0))] if len(kids) else np.zeros_like(pos)
    valid = j < width[..., None]
    return np.where(valid & ((j > 0) | (stop[..., None] == 0)), tokens, EOS), valid


def _asked_logprob(step: StepFn, last: np.ndarray, state: Any, tok: np.ndarray, valid: np.ndarray):
    """Call a step that scores asked tokens with every token some beam may take next, then normalise each
    row over its own allowed tokens: ``(log-probs (B, k, F), state)``."""
    asked = np.unique(tok[valid]) if valid.any() else np.zeros(1, dtype=np.int64)
    logits, state = step(last.reshape(-1), state, asked)
    at = np.minimum(np.searchsorted(asked, tok), len(asked) - 1)
    z = np.take_along_axis(np.asarray(logits).reshape(*last.shape, len(asked)), at, 2).astype(np.float64)
    z = np.where(valid, z, -np.inf)
    top = np.where(valid.any(2, keepdims=True), z.max(2, keepdims=True), 0.0)
    with np.errstate(divide="ignore"):
        lse = top + np.log(np.exp(z - top).sum(2, keepdims=True))
    return np.where(valid, z - lse, -np.inf), state


def _reorder(state: Any, index: np.ndarray) -> Any:
    if isinstance(state, tuple):
        return tuple(_reorder(s, index) for s in state)
    return state[index] if isinstance(state, np.ndarray) else state


def beam_search(
    tree: TreeView,
    step: StepFn,
    batch_size: int,
    beam_width: int,
    end_nodes: str,
    max_steps: int,
    state: Any = None,
    asked: bool = False,
    allowed: Allowed | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Koo et al.'s Algorithm 1 restricted to the tree, in numpy (the reference is
    :func:`hiervision.decoding.beam_search`; ``tests/test_runtime.py`` holds the two together).

    ``state`` is a tuple of arrays with ``B·k`` rows (or anything else, passed through untouched).
    ``asked``: ``step`` scores the tokens it is asked for (:data:`StepFn`), normalised here per row.
    ``allowed``: search only paths that end at an allowed end class (a child no allowed class lies under
    is never taken; :mod:`hiervision.restrict`).

    Returns:
        ``(paths, logprob, prefix)``: ``(B, k, D)`` node ids per level (PAD after the end), best beam
        first; ``(B, k)`` path log-probabilities (``-inf`` for beams that found no valid path);
        ``(B, k, D)`` the log-probability of each path's prefix ending at every position.
    """
    k = int(beam_width)
    if k < 1:
        raise ValueError(f"beam_width must be ≥ 1, got {beam_width}")
    n = tree.num_nodes
    ends = tree.end_mask(end_nodes)
    reach = None
    if allowed is not None:
        ends, reach = ends & allowed.ends, allowed.reach
    scores = np.full((batch_size, k), -np.inf)
    scores[:, 0] = 0  # one live beam at the start
    last = np.zeros((batch_size, k), dtype=np.int64)
    done = np.zeros((batch_size, k), dtype=bool)
    paths = np.empty((batch_size, k, 0), dtype=np.int64)
    prefix = np.empty((batch_size, k, 0))
    rows = np.arange(batch_size)[:, None]
    for _ in range(max_steps):
        tok, valid = _next_tokens(tree, ends, last)
        if reach is not None:  # a child with no allowed class below it is no way on
            valid &= (tok == EOS) | reach[tok]
        width = tok.shape[2]
        if asked:
            lp, state = _asked_logprob(step, last, state, tok, valid)
        else:
            lp, state = step(last.reshape(-1), state)
            lp = np.take_along_axis(np.asarray(lp).reshape(batch_size, k, n), tok, 2).astype(np.float64)
        cand = scores[:, :, None] + np.where(valid, lp, -np.inf)
        # a stopped beam has one continuation: itself (its column 0, read as the end token)
        stay = np.full_like(cand, -np.inf)
        stay[..., 0] = scores
        cand = np.where(done[:, :, None], stay, cand).reshape(batch_size, k * width)
        tok = np.where(done[:, :, None], EOS, tok).reshape(batch_size, k * width)
        flat = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(cand, flat, 1)
        beam, tok = flat // width, np.take_along_axis(tok, flat, 1)
        state = _reorder(state, (rows * k + beam).reshape(-1))
        stopped = tok == EOS
        prev_last = np.take_along_axis(last, beam, 1)
        paths = np.concatenate([paths[rows, beam], np.where(stopped, PAD, tok)[:, :, None]], axis=2)
        prefix = np.concatenate([prefix[rows, beam], scores[:, :, None]], axis=2)
        done = np.take_along_axis(done, beam, 1) | stopped
        last = np.where(stopped, prev_last, tok)
        if done.all():
            break
    scores = np.where(~done & ~ends[last], -np.inf, scores)  # cut off where a path may not end
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, 1)
    paths, prefix = paths[rows, order], prefix[rows, order]
    used = np.flatnonzero((paths != PAD).any(axis=(0, 1)))
    keep = int(used.max()) + 1 if used.size else 0
    return paths[..., :keep], scores, prefix[..., :keep]


def threshold_paths(tree: TreeView, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Multi-label: ``(B, N+1)`` sigmoid scores → ``(B, N+1)`` bool path ends, where a node is kept when
    it and every ancestor pass ``threshold`` (reference: :func:`hiervision.decoding.threshold_paths`)."""
    kept = np.asarray(scores) >= threshold
    kept[:, 0] = True
    for n in sorted(range(1, tree.num_nodes), key=lambda m: len(tree.path(m))):  # parents first
        kept[:, n] &= kept[:, tree.parents[n]]
    kept[:, 0] = False
    has_child = np.zeros_like(kept)
    for n in range(1, tree.num_nodes):
        has_child[:, tree.parents[n]] |= kept[:, n]
    return kept & ~has_child


def _path_of(tree: TreeView, node: int) -> list[int]:
    return list(tree.path(node)) if node > 0 else []


def decode_batch(
    tree: TreeView, decoder: dict, outputs: dict[str, np.ndarray], engine: Engine | None = None, top_k: int = 3,
    allowed: Allowed | None = None,
) -> list[dict]:
    """One batch of graph outputs → per image ``{"path_ids", "path_probability", "node_scores",
    "top_k", "paths"?}`` (what :func:`~hiervision.records.prediction_record` takes), decoded the
    way the model's own ``predict`` decodes (``decoder["kind"]``, from the sidecar). ``allowed``: the
    beam searches search only allowed paths (the other kinds are restricted by :func:`restrict_batch`)."""
    kind = decoder["kind"]
    if kind == "beam":
        return _decode_autoregressive(tree, decoder, outputs, engine, top_k, allowed)
    scores = outputs["scores"].astype(np.float64)
    path_lp = outputs["path_logprob"].astype(np.float64)
    end = tree.end_mask(decoder.get("end_nodes", "leaves"))
    if allowed is not None:
        end = end & allowed.ends
    ranked = np.where(end, path_lp, -np.inf)
    alt_nodes, alt_probs = top_k_ends(np.exp(ranked), top_k)
    b = len(scores)
    if kind in ("exact", "multi_label"):
        best = np.argmax(ranked, axis=1)
        paths = [_path_of(tree, int(n)) for n in best]
        probs = np.exp(ranked[np.arange(b), best])
    elif kind == "independent":  # each level's argmax (guo_multihead's default): may leave the tree
        paths, probs = [], np.ones(b)
        deepest = np.zeros(b, dtype=np.int64)
        picks = []
        for nodes in decoder["levels"]:
            nodes = np.asarray(nodes)
            i = np.argmax(scores[:, nodes], axis=1)
            picks.append(nodes[i])
            probs = probs * scores[np.arange(b), nodes[i]]
            deepest = nodes[i]
        depth = decoder["depth"]
        for r in range(b):
            implied = _path_of(tree, int(deepest[r]))[:depth]
            row = {lv: int(p[r]) for lv, p in zip(decoder["level_depths"], picks)}
            paths.append([row.get(d + 1, implied[d] if d < len(implied) else PAD) for d in range(depth)])
    elif kind == "routing":  # HierNet's Algorithm 1: follow each router's best child down to a leaf
        children = tree.children
        paths, probs = [], np.zeros(b)
        for r in range(b):
            node, path = 0, []
            while children[node]:
                kids = np.asarray(children[node])
                node = int(kids[np.argmax(path_lp[r, kids])])
                path.append(node)
            paths.append(path)
            probs[r] = np.exp(path_lp[r, node])
        scores = np.exp(path_lp)
    elif kind == "beam_steps":  # steps that do not depend on the prefix: look them up
        paths_k, lp, _ = _beam_over(tree, decoder, outputs["step_logprob"], decoder["beam_width"], allowed)
        paths = [[int(n) for n in p if n != PAD] for p in paths_k[:, 0]]
        probs = np.exp(lp[:, 0])
    else:
        raise ValueError(f"decoder kind {kind!r} is not known to this runtime")
    results = []
    for r in range(b):
        res = {"path_ids": paths[r], "path_probability": float(probs[r]), "node_scores": scores[r],
               "top_k": [(_path_of(tree, int(n)), float(p)) for n, p in zip(alt_nodes[r], alt_probs[r]) if n > 0]}
        if kind == "multi_label":
            ends = threshold_paths(tree, scores[r : r + 1], float(decoder["threshold"]))[0]
            res["paths"] = [_path_of(tree, int(e)) for e in np.flatnonzero(ends)]
        results.append(res)
    return results


def calibrate_batch(tree: TreeView, decoder: dict, decoded: list[dict], temperature: Temperature) -> list[dict]:
    """Apply a run's calibration temperature (fitted on validation after training, carried in the
    checkpoint and the sidecar) to :func:`decode_batch`'s records, as ``evaluate`` does
    (:func:`hiervision.decisions.calibrate`): the end-class distribution ``q`` the node scores imply
    becomes ``q^(1/T)`` renormalised; ``node_scores`` become its node marginals, and every path
    probability ``p`` (the answer's and the alternatives') becomes ``p^(1/T)`` over the same
    normaliser. With one temperature per level, ``q`` is tempered level by level
    (:func:`hiervision.marginals.apply_temperature`) and a path's ``p`` is scaled as its end class's
    mass was, ``p·q'(end)/q(end)``. Paths and their order never change. Multi-label records keep their
    sigmoids."""
    if is_identity(temperature) or decoder["kind"] == "multi_label" or not decoded:
        return decoded
    t, ends = as_temperature(temperature), decoder.get("end_nodes", "leaves")
    q = end_distribution(np.stack([np.asarray(d["node_scores"]) for d in decoded]), tree, ends)
    if isinstance(t, tuple):
        qt = apply_temperature(q, t, tree, ends)
        marg = node_marginals(qt, tree)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(q > 0, qt / q, 0.0)

        def scaled(r: int, path, p: float) -> float:
            return float(p * ratio[r, path[-1]]) if path else float(p)

        return [{**d, "path_probability": scaled(r, d["path_ids"], d["path_probability"]), "node_scores": marg[r],
                 "top_k": [(path, scaled(r, path, p)) for path, p in d["top_k"]]}
                for r, d in enumerate(decoded)]
    qt = q ** (1 / t)  # apply_temperature's q^(1/T), with its normaliser z kept for the path probabilities
    z = qt.sum(1)
    marg = node_marginals(qt / z[:, None], tree)
    return [{**d, "path_probability": float(d["path_probability"] ** (1 / t) / z[r]), "node_scores": marg[r],
             "top_k": [(path, float(p ** (1 / t) / z[r])) for path, p in d["top_k"]]}
            for r, d in enumerate(decoded)]


def restrict_batch(tree: TreeView, decoder: dict, decoded: list[dict], allowed: Allowed | None,
                   ranked: bool = True) -> list[dict]:
    """Answers restricted to the allowed end classes (:mod:`hiervision.restrict`): each record's end-class
    distribution is renormalised over them, ``node_scores`` become its node marginals (read on demand:
    :class:`~hiervision.restrict.RestrictedMarginals`), and the answer and the alternatives are the most
    probable allowed classes with their renormalised probabilities. The beam searches already searched
    allowed paths only (:func:`decode_batch`): they keep their paths, and their probabilities are the
    decoder's own over those paths. ``ranked``: :func:`decode_batch`'s order of the allowed classes is still
    the distribution's (no temperature per level since), so an exact decoder's answers are kept."""
    if allowed is None or not decoded:
        return decoded
    kind, ends = decoder["kind"], decoder.get("end_nodes", "leaves")
    if kind == "multi_label":
        raise ValueError("answers restricted to classes (within, classes) apply to single-label models only")
    first = np.asarray(decoded[0]["node_scores"])
    coherent = abs(float(first[tree.leaf_mask].sum()) - 1.0) < 1e-4  # the leaves hold all the mass (not SMM's)
    if kind == "exact" and ends == "leaves" and coherent and ranked and all(d["path_ids"] for d in decoded):
        # an exact decoder whose node scores are its leaves' marginals (a leaf's is its probability), and
        # decode_batch ranked the allowed leaves already: only the renormaliser is new
        marg = restricted_marginals(np.stack([np.asarray(d["node_scores"])[allowed.order] for d in decoded]), allowed)
        return [{**d, "path_probability": float(m[d["path_ids"][-1]]), "node_scores": m,
                 "top_k": [(path, float(m[path[-1]])) for path, _ in d["top_k"]]} for d, m in zip(decoded, marg)]
    q = end_distribution(np.stack([np.asarray(d["node_scores"]) for d in decoded]), tree, ends)
    marg = restricted_marginals(q[:, allowed.order], allowed)
    if kind in ("beam", "beam_steps"):
        return [{**d, "node_scores": m} for d, m in zip(decoded, marg)]
    k = max(len(d["top_k"]) for d in decoded) or 1
    alt_nodes, alt_probs = top_k_ends(restrict_q(q, allowed), k)
    return [{**d, "path_ids": _path_of(tree, int(alt_nodes[r, 0])), "path_probability": float(alt_probs[r, 0]),
             "node_scores": marg[r],
             "top_k": [(_path_of(tree, int(n)), float(p)) for n, p in zip(alt_nodes[r], alt_probs[r]) if n > 0]}
            for r, d in enumerate(decoded)]


def _beam_over(tree: TreeView, decoder: dict, step_lp: np.ndarray, k: int, allowed: Allowed | None = None):
    rep = np.repeat(step_lp, k, axis=0)
    return beam_search(tree, lambda tokens, t: (rep[:, t], t + 1), len(step_lp), k, decoder["end_nodes"],
                       step_lp.shape[1], 0, allowed=allowed)


def _decode_autoregressive(tree: TreeView, decoder: dict, outputs: dict[str, np.ndarray], engine: Engine | None,
                           top_k: int, allowed: Allowed | None = None) -> list[dict]:
    """Beam search driven by the exported decoder step; alternatives from a wider beam when ``top_k``
    exceeds the model's own width (the best path stays the one the model's width finds)."""
    if engine is None:
        raise ValueError("an autoregressive decoder needs the engine's step function")
    state0 = tuple(outputs[name] for name in decoder["state"])
    b = len(state0[0])

    def search(k: int):
        start = tuple(np.repeat(s, k, axis=0) for s in state0)
        return beam_search(tree, engine.step, b, k, decoder["end_nodes"], decoder["max_steps"], start,
                           bool(decoder.get("candidates")), allowed)

    width = int(decoder["beam_width"])
    paths, lp, prefix = search(width)
    alt_paths, alt_lp = (paths, lp) if top_k <= width else search(top_k)[:2]
    results = []
    for r in range(b):
        ids = [int(n) for n in paths[r, 0] if n != PAD]
        scores = np.zeros(tree.num_nodes)
        scores[ids] = np.exp(prefix[r, 0, : len(ids)])
        alts = [([int(n) for n in p if n != PAD], float(np.exp(s)))
                for p, s in zip(alt_paths[r, :top_k], alt_lp[r, :top_k]) if np.isfinite(s)]
        results.append({"path_ids": ids, "path_probability": float(np.exp(lp[r, 0])), "node_scores": scores,
                        "top_k": alts})
    return results


# ----------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike, in_chans: int, size: Sequence[int] | None, resize: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One file → float32 ``(C, H, W)`` in [0, 1], converted by training's rules (:mod:`hiervision.imagefile`:
    EXIF, 16-bit, transparency, the pixel limit; a pipeline run's centre crop when ``resize`` is set)."""
    return read_array(path, in_chans, tuple(size) if size else None, max_pixels, resize).astype(np.float32) / 255


# ----------------------------------------------------------------------------- hedging
def _rewards(tree: TreeView) -> np.ndarray:
    """``(N+1,)`` Deng et al.'s ``r(v) = log|leaves| − log|leaves under v|`` (the numpy twin of
    :func:`hiervision.distributions.rewards`): the leaves under each node are the view's subtree sums."""
    leaves = tree.end_mask("leaves").astype(np.float64)
    under = tree.subtree_sum(leaves[None])[0]  # the root's column holds every leaf
    return np.log(leaves.sum()) - np.log(np.maximum(under, 1))


def hedge_records(tree: TreeView, node_scores: np.ndarray, lam: float) -> list[dict]:
    """DARTS (Deng et al.): per row of ``(B, N+1)`` calibrated node scores, the node maximising
    ``(r(v) + λ)·p(v)`` (the root included, ties to the deepest) as ``{"node", "path", "probability"}``:
    the numpy twin of :func:`hiervision.decisions.hedge_records` (``tests/test_runtime.py`` holds them
    equal), so an exported model hedges without PyTorch."""
    m = node_marginals(end_distribution(np.atleast_2d(node_scores), tree, "leaves"), tree)
    m[:, 0] = 1.0
    score = (_rewards(tree) + lam) * m
    best = score.max(1, keepdims=True)
    near = score >= best - 1e-6 * np.maximum(np.abs(best), 1)
    nodes = np.where(near, tree.depths, -1).argmax(1)
    return [{"node": tree.names[n], "path": [tree.names[p] for p in tree.path(int(n))],
             "probability": round(float(m[i, n]), 6)} for i, n in enumerate(nodes)]


# ----------------------------------------------------------------------------- predictor
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class _OnnxEngine:
    """onnxruntime sessions over the graph (and step graph), their inputs and outputs checked against the
    sidecar before the first image: the input channels and image size, and every per-node output's width."""

    def __init__(self, graph: Path, step_graph: Path | None, threads: int | None, sidecar: dict,
                 tree: TreeView) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{graph}: running an exported model needs onnxruntime "
                             "(pip install 'hiervision[export]')") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # onnxruntime's own warnings would follow our one-line error

        def session(path: Path):
            try:
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any load failure of an untrusted file is one line
                raise ValueError(f"{path}: not a loadable ONNX graph ({type(e).__name__}: {_one_line(e)})") from None

        self.session = session(graph)
        self.names = [o.name for o in self.session.get_outputs()]
        self.step_session = session(step_graph) if step_graph else None
        self._check(graph, sidecar, tree)

    def _check(self, graph: Path, side: dict, tree: TreeView) -> None:
        step = graph.with_name(str(side.get("step_graph")))
        for path, sess in ((graph, self.session), (step, self.step_session)):
            meta = sess.get_modelmeta().custom_metadata_map if sess is not None else {}
            exported_for = meta.get(TREE_KEY)
            if exported_for is not None and exported_for != tree.fingerprint:
                raise ValueError(f"{path}: the graph was exported for another tree (fingerprint {exported_for}) than "
                                 f"its sidecar's key 'taxonomy' holds ({tree.fingerprint}); export the run again")
            decoder = meta.get(DECODER_KEY)
            if decoder is not None and json.loads(decoder) != side["decoder"]:
                raise ValueError(f"{path}: the sidecar's key 'decoder' ({side['decoder']}) is not the decoder the "
                                 f"graph was exported with ({json.loads(decoder)}); export the run again")
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        shape = inputs.get("images")
        if shape is None or len(shape) != 4:
            raise ValueError(f"{graph}: the graph has no 'images' input of shape (B, C, H, W) (inputs: {list(inputs)})")
        want = [side["in_chans"], *(side.get("image_size") or [None, None])]
        for dim, (got, exp, key) in enumerate(zip(shape[1:], want, ["in_chans", "image_size", "image_size"])):
            if isinstance(got, int) and exp is not None and got != exp:
                raise ValueError(f"{graph}: the graph's input has {got} at dimension {dim + 1} but the sidecar's "
                                 f"key {key!r} says {exp}")
        dec = side["decoder"]
        needed = list(dec["state"]) if dec["kind"] == "beam" else ["scores", "path_logprob"]
        needed += ["step_logprob"] if dec["kind"] == "beam_steps" else []
        missing = [n for n in needed if n not in self.names]
        if missing:
            raise ValueError(f"{graph}: the graph lacks the output(s) {missing} that the sidecar's decoder "
                             f"({dec['kind']}) reads (outputs: {self.names})")
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        for name in ("scores", "path_logprob", "step_logprob"):
            if name in needed:
                check_width(str(graph), name, outputs[name][-1], tree)
        if self.step_session is not None:
            asked = "candidates" in {i.name for i in self.step_session.get_inputs()}
            if asked != bool(dec.get("candidates")):
                raise ValueError(f"{step}: the step graph {'takes' if asked else 'has no'} 'candidates' input but "
                                 f"the sidecar's key 'decoder.candidates' says {bool(dec.get('candidates'))}")
            if not asked:  # a step scoring asked tokens is as wide as what it is asked
                check_width(str(step), "logprob", self.step_session.get_outputs()[0].shape[-1], tree)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {"images": images})))

    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...],
             candidates: np.ndarray | None = None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        feeds = {"tokens": tokens.astype(np.int64), **{f"state{i}": s for i, s in enumerate(state)}}
        if candidates is not None:
            feeds["candidates"] = candidates.astype(np.int64)
        lp, *new = self.step_session.run(None, feeds)
        return lp, tuple(new)


class Predictor:
    """``Predictor("model.onnx").predict(files)`` → one record per file (see :mod:`hiervision.records`).

    Args:
        path: the exported ``.onnx``; its sidecar ``.json`` (same stem) holds the tree, image size,
            normalisation and decoder settings, checked on load (:mod:`hiervision.sidecar`).
        top_k: alternatives per image.
        batch_size: images per graph call.
        threads: onnxruntime intra-op threads (default: its own choice).
        engine, sidecar: used by ``hiervision predict`` on a PyTorch run (same decoding, other engine).
        beam_width: search with this width instead of the sidecar's (decoders with a beam search; a
            width tuned on val after export).
        decode: answer by this decision rule instead of the sidecar's ``decode`` (argmax | crm |
            bayes:METRIC[:inner], :func:`hiervision.bayes.decide_records`).
        allowed: answer only these end classes (:class:`hiervision.restrict.Allowed`) instead of the
            sidecar's ``within``/``classes`` default.
        thresholds: roll each answer up to the deepest node meeting its threshold
            (:class:`hiervision.rollup.Thresholds`, the record's ``rollup``) instead of the sidecar's
            ``min_prob``/``min_prob_at`` default.
    """

    def __init__(self, path: str | os.PathLike | None = None, top_k: int = 3, batch_size: int = 64,
                 threads: int | None = None, engine: Engine | None = None, sidecar: dict | None = None,
                 beam_width: int | None = None, decode: str | None = None, allowed: Allowed | None = None,
                 thresholds: Thresholds | None = None) -> None:
        if top_k < 1 or batch_size < 1:
            raise ValueError(f"top_k and batch_size must be ≥ 1, got {top_k} and {batch_size}")
        if sidecar is None:
            if path is None:
                raise ValueError("Predictor needs an exported .onnx path")
            sidecar = load_sidecar(path)
        else:
            sidecar = check_sidecar(sidecar, str(path or "sidecar"))
        self.name = str(path or sidecar.get("model", "model"))
        if beam_width is not None:
            kind = sidecar["decoder"]["kind"]
            if kind not in ("beam", "beam_steps"):
                hint = " (export the run with --beam-width)" if sidecar.get("model") in ("CnnRnn", "CnnS2S") else ""
                raise ValueError(f"{self.name}: its decoder ({kind}) has no beam search to set a "
                                 f"width for{hint}")
            sidecar = {**sidecar, "decoder": {**sidecar["decoder"], "beam_width": check_beam_width(beam_width)}}
        self.sidecar = sidecar
        #: the decision rule of every answer (hiervision.bayes): the model's own decoding unless named
        self.decode = decode or sidecar.get("decode", "argmax")
        where = path or sidecar.get("model", "the model")
        if decode_rule(self.decode, "decode" if decode else f"{where}: sidecar key 'decode'")[0] != "argmax" \
                and sidecar["decoder"]["kind"] == "multi_label":
            raise ValueError(f"{where}: decision rules apply to single-label models only")
        self.tree = TreeView.from_dict(sidecar["taxonomy"], source=str(path))
        ends = sidecar["decoder"].get("end_nodes", "leaves")
        #: the end classes every answer is restricted to (None: all) and the roll-up thresholds (None: none)
        keys = [f"{where}: sidecar key '{k}'" for k in ("within", "classes", "min_prob", "min_prob_at")]
        self.allowed = allowed or Allowed.of(self.tree, sidecar.get("within"), class_names=sidecar.get("classes"),
                                             end_nodes=ends, where=(keys[0], keys[1]))
        #: the names of the tree's levels (depth 1 first; ``data.ranks``): thresholds may name them
        self.ranks: tuple[str, ...] = tuple(sidecar.get("ranks") or ())
        self.thresholds = thresholds or Thresholds.of(self.tree, sidecar.get("min_prob"), sidecar.get("min_prob_at"),
                                                      where=(keys[2], keys[3]), ranks=self.ranks)
        if self.allowed is not None and sidecar["decoder"]["kind"] == "multi_label":
            raise ValueError(f"{where}: answers restricted to classes apply to single-label models only")
        self.in_chans = int(sidecar["in_chans"])
        self.image_size = tuple(sidecar["image_size"]) if sidecar.get("image_size") else None
        self.resize = sidecar.get("resize")  # data.pipeline runs: evaluation's shorter-side resize before the crop
        self.mean = np.asarray(sidecar["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(sidecar["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.top_k, self.batch_size = int(top_k), int(batch_size)
        #: the run's calibration temperature (1 = the model's raw probabilities; :func:`calibrate_batch`)
        self.temperature = as_temperature(sidecar.get("temperature", 1.0))
        if engine is None:
            p = Path(path)
            step = p.with_name(sidecar["step_graph"]) if sidecar.get("step_graph") else None
            engine = _OnnxEngine(p, step, threads, sidecar, self.tree)
        self.engine = engine

    def hedger(self, accuracy: float) -> Callable[[dict], dict]:
        """``hedge(record)`` → the record's hedged answer (:func:`hedge_records`) at an accuracy target whose
        λ was fitted on validation (the sidecar's ``decisions``; a run folder's ``decisions.json``). Reads
        the record's ``node_scores`` (``predict(..., node_scores=True)``), already calibrated."""
        if not 0 < accuracy < 1:
            raise ValueError(f"accuracy target {accuracy}: must lie in (0, 1)")
        table = (self.sidecar.get("decisions") or {}).get("hedge", {})
        lam = next((float(v) for k, v in table.items() if abs(float(k) - accuracy) < 1e-9), None)
        if lam is None:
            have = ", ".join(sorted(table)) or "none"
            raise ValueError(f"{self.name}: no hedging λ for accuracy {accuracy} (fitted: {have}); run "
                             f"`hiervision evaluate RUN --accuracy {accuracy}` first (and export the run again)")
        return lambda record: hedge_records(self.tree, np.asarray(record["node_scores"]), lam)[0]

    def predict_arrays(self, images: np.ndarray, files: Sequence[str] | None = None,
                       node_scores: bool = False, allowed: Allowed | None = None,
                       thresholds: Thresholds | None = None) -> list[dict]:
        """Records for a ``(B, C, H, W)`` batch in [0, 1] (not yet normalised); ``node_scores`` also keeps
        every node's score in each record (to draw the tree, or to hedge: :meth:`Predictor.hedger`).
        ``allowed``/``thresholds``: this call's restriction and roll-up instead of the predictor's.

        The order is the one every front end keeps: decode (a beam search searches allowed paths only),
        calibrate (temperature), restrict (renormalise over the allowed classes), decide (CRM, Bayes),
        then roll up along the answer's path."""
        allowed = allowed or self.allowed
        thresholds = thresholds or self.thresholds
        dec = self.sidecar["decoder"]
        x = ((np.asarray(images, dtype=np.float32) - self.mean) / self.std).astype(np.float32)
        outputs = self.engine.run(np.ascontiguousarray(x))
        # a NaN never leaves as an answer (a diverged model, a broken graph): that image's record says so
        broken = np.zeros(len(x), dtype=bool)
        for value in outputs.values():
            broken |= np.isnan(value.reshape(len(x), -1)).any(1) if len(value) == len(x) else False
        decoded = decode_batch(self.tree, dec, outputs, self.engine, self.top_k, allowed)
        decoded = calibrate_batch(self.tree, dec, decoded, self.temperature)
        decoded = restrict_batch(self.tree, dec, decoded, allowed, not isinstance(self.temperature, tuple))
        decoded = decide_records(self.tree, dec.get("end_nodes", "leaves"), decoded, self.decode, allowed)
        files = files if files is not None else [f"#{i}" for i in range(len(decoded))]
        records = [{**prediction_record(f, self.tree, d["path_ids"], d["path_probability"], d["node_scores"],
                                        d["top_k"], d.get("paths")), "decode": self.decode}  # the rule that answered
                   for f, d in zip(files, decoded)]
        if dec.get("novel") and decode_rule(self.decode)[0] == "argmax":  # the head's own answers: inner = novel
            records = [mark_novel(rec, self.tree) for rec in records]
        if thresholds is not None and dec["kind"] != "multi_label" and decoded:
            # restricted scores already are the node marginals of the renormalised distribution
            marg = [d["node_scores"] for d in decoded] if allowed is not None else node_marginals(end_distribution(
                np.stack([np.asarray(d["node_scores"]) for d in decoded]), self.tree, dec.get("end_nodes", "leaves")),
                self.tree)
            records = [rollup_record(rec, marg[r], self.tree, thresholds) for r, rec in enumerate(records)]
        if allowed is not None:
            for rec in records:
                rec["allowed"] = allowed.as_dict()
        if node_scores:
            for rec, d in zip(records, decoded):
                rec["node_scores"] = [round(float(s), 6) for s in np.asarray(d["node_scores"]).reshape(-1)]
        if broken.any():
            records = [error_record(r["file"], "the model's output for this image is not a number (NaN): the graph "
                                    "or its weights are broken") if b else r for r, b in zip(records, broken)]
        return records

    def predict(self, image_files: Sequence[str | os.PathLike],
                progress: Callable[[int], None] | None = None, node_scores: bool = False) -> list[dict]:
        """One record per file, in order; a file that cannot be read gets an error record and the
        others are still predicted. ``progress(n)`` is called after each batch with its size."""
        records: list[dict] = []
        for start in range(0, len(image_files), self.batch_size):
            chunk = [str(f) for f in image_files[start : start + self.batch_size]]
            arrays, good, out = [], [], {}
            for f in chunk:
                try:
                    arrays.append(read_image(f, self.in_chans, self.image_size, self.resize))
                    good.append(f)
                except (ValueError, OSError) as e:
                    out[f] = error_record(f, str(e))
            if arrays:
                if len({a.shape for a in arrays}) > 1:  # no fixed training size: one image at a time
                    recs = [r for a, f in zip(arrays, good) for r in self.predict_arrays(a[None], [f], node_scores)]
                else:
                    recs = self.predict_arrays(np.stack(arrays), good, node_scores)
                out.update((r["file"], r) for r in recs)
            records.extend(out[f] for f in chunk)
            if progress is not None:
                progress(len(chunk))
        return records
