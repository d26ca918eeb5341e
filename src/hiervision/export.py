"""``hiervision export``: a trained run → ONNX graph(s) + a JSON sidecar for :mod:`hiervision.runtime`.

Only the tensor part goes into the graph, and the model says which (the export half of the
:class:`~hiervision.models.HierarchicalClassifier` contract; this module knows no concrete head):

* heads that score every path at once (flat, DHNN CNN-RNN and CNN-S2S fed their outputs, Guo's
  multi-head, HierNet's conditional output) export :meth:`~HierarchicalClassifier.export_outputs`:
  ``scores`` ``(B, N+1)`` (``Prediction.scores``) and ``path_logprob`` ``(B, N+1)`` (the
  log-probability of the path ending at each node), plus ``step_logprob`` where the model decodes by
  beam search over precomputed steps;
* autoregressive decoders (DHNN CNN-S2S fed its labels, Guo's CNN-RNN; their decoder settings carry
  ``state``) export two graphs: the encoder (image → decoder start state) and ONE decoder step
  (tokens, state → next-token log-probabilities, state). An unrolled fixed-depth graph cannot hold
  a beam search without putting the search itself in the graph; one step keeps every search (greedy,
  beam of any width, top-k) outside, in numpy, and costs one small graph call per tree level.

The search (argmax over allowed ends, each level's argmax, routing, beam search, thresholds) runs in
:mod:`hiervision.runtime`, as :meth:`~HierarchicalClassifier.decoder_settings` tells it;
:func:`torch_engine` feeds the same methods to it eagerly, which is how
``hiervision predict`` decodes a PyTorch run, so both paths share one decoder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hiervision.bayes import decode_rule
from hiervision.checkpoint import CheckpointError
from hiervision.decisions import load_decisions
from hiervision.experiment import load_run
from hiervision.marginals import as_temperature
from hiervision.models.base import HierarchicalClassifier
from hiervision.runtime import Predictor
from hiervision.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, TREE_KEY, file_sha256

__all__ = ["export_onnx", "export_parts", "run_predictor", "torch_engine"]

OPSET = 18


class _Graph(nn.Module):
    """images → the head's exported outputs (:meth:`HierarchicalClassifier.export_outputs`), as a tuple."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.export_outputs(images).values())


class _Encoder(nn.Module):
    """images → the autoregressive decoder's start state (:meth:`HierarchicalClassifier.export_encoder`)."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.export_encoder(images)


class _Step(nn.Module):
    """One decoder step (:meth:`HierarchicalClassifier.export_step`)."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.export_step(tokens, *state)


class _CandidateStep(_Step):
    """A decoder step that scores the tokens it is asked for (``decoder_settings()["candidates"]``)."""

    def forward(self, tokens: torch.Tensor, candidates: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.export_step(tokens, *state, candidates=candidates)


def export_parts(model: HierarchicalClassifier) -> tuple[nn.Module, nn.Module | None]:
    """``(graph, step graph or None)``: the modules that become the ONNX graph(s), as the model's contract
    declares them (a decoder that carries ``state`` exports an encoder and one step)."""
    dec = model.decoder_settings()
    if dec.get("state"):
        return _Encoder(model).eval(), (_CandidateStep if dec.get("candidates") else _Step)(model).eval()
    return _Graph(model).eval(), None


class _TorchEngine:
    """:class:`hiervision.runtime.Engine` on the model itself (eager): ``hiervision predict`` on a run."""

    def __init__(self, model: HierarchicalClassifier, device: torch.device) -> None:
        self.model, self.device = model.to(device).eval(), device
        self.state = model.decoder_settings().get("state")

    @torch.no_grad()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images).to(self.device)
        out = dict(zip(self.state, self.model.export_encoder(x))) if self.state else self.model.export_outputs(x)
        return {name: t.float().cpu().numpy() for name, t in out.items()}

    @torch.no_grad()
    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...],
             candidates: np.ndarray | None = None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        asked = {"candidates": tensor(candidates)} if candidates is not None else {}
        lp, *new = self.model.export_step(tensor(tokens), *(tensor(s) for s in state), **asked)
        return lp.float().cpu().numpy(), tuple(t.cpu().numpy() for t in new)


def torch_engine(model: HierarchicalClassifier, device: str | torch.device = "cpu") -> _TorchEngine:
    """A PyTorch model behind the engine interface of :mod:`hiervision.runtime` (the ONNX graph's outputs)."""
    return _TorchEngine(model, torch.device(device))


def sidecar(model: HierarchicalClassifier, meta: dict, step_graph: str | None = None,
            decisions: dict | None = None, decode: str = "argmax") -> dict:
    """Everything the runtime needs besides the graph (:mod:`hiervision.sidecar` checks it on load): tree and
    its fingerprint, image size, the normalisation the run was trained with (``meta``: the checkpoint's, never
    recomputed), decoder, the calibration temperature, the hedging λ table fitted on validation
    (``decisions``: the run's ``decisions.json``), so an exported model hedges as the run does, and the
    decision rule it answers by (``decode``: argmax | crm | bayes:METRIC[:inner], :mod:`hiervision.bayes`)."""
    decode_rule(decode)
    in_chans = int(meta.get("in_chans", 3))
    size = meta.get("image_size")
    size = [int(size), int(size)] if isinstance(size, int) else ([int(s) for s in size] if size else None)
    hedge = (decisions or {}).get("hedge") or {}
    return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "model": type(model).__name__,
            "in_chans": in_chans, "image_size": size, "resize": meta.get("resize"),
            "mean": [float(v) for v in meta.get("mean", [0.0] * in_chans)],
            "std": [float(v) for v in meta.get("std", [1.0] * in_chans)], "decoder": model.decoder_settings(),
            "step_graph": step_graph, "temperature": as_temperature(getattr(model, "temperature", 1.0)),
            "decisions": {"hedge": {str(k): float(v) for k, v in hedge.items()}}, "decode": decode,
            "taxonomy": model.taxonomy.to_dict()}


def _onnx_export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # one dynamic batch axis on every input; a step's state arrives as one *args tuple, after the tokens and
    # (a step scoring asked tokens) the candidates, whose count is dynamic too
    asked = ({0: torch.export.Dim("candidates", min=1, max=2**31 - 1)},) if isinstance(module, _CandidateStep) else ()
    fixed = 1 + len(asked)
    shapes = ({0: batch},) if len(args) == 1 else ({0: batch}, *asked, tuple({0: batch} for _ in args[fixed:]))
    try:
        try:
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except torch._dynamo.exc.UserError:
            # heads that size a tensor with len(x) pin the batch in non-strict tracing; strict (dynamo)
            # tracing keeps it symbolic, at several times the tracing cost
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=True)
        prog = torch.onnx.export(program, args, dynamo=True, input_names=inputs, output_names=outputs,
                                 opset_version=OPSET, verbose=False, optimize=True)
    except ImportError as e:
        raise CheckpointError(f"export needs the [export] extra (onnx, onnxscript): {e}") from None
    prog.model.metadata_props.update(metadata or {})
    prog.save(str(path))


@torch.no_grad()
def export_model(model: HierarchicalClassifier, meta: dict, out: str | os.PathLike, decisions: dict | None = None,
                 verbose: bool = False, decode: str = "argmax") -> list[Path]:
    """Write ``out`` (.onnx), its step graph where the model has one, and the ``.json`` sidecar with the
    sha256 of each graph (checked on load). ``verbose``: let the exporter's own messages and warnings
    through (quiet by default: they say nothing about the model)."""
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: the file name must end in .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    graph, step = export_parts(model)
    side = sidecar(model, meta, decisions=decisions, decode=decode)
    c = side["in_chans"]
    h, w = side["image_size"] or (32, 32)
    images = torch.zeros(2, c, h, w)
    names = side["decoder"].get("state") or list(model.export_outputs(images).keys())
    # the graph itself names its tree: a sidecar whose tree was edited, fingerprint and all, is still refused
    tree = {TREE_KEY: side["taxonomy"]["fingerprint"]}
    with _quiet(verbose):
        _onnx_export(graph, (images,), ["images"], names, out, tree)
        written = [out]
        if step is not None:
            state = graph(images)
            step_path = out.with_name(out.stem + ".step.onnx")
            state_names = [f"state{i}" for i in range(len(state))]
            asks = isinstance(step, _CandidateStep)  # an example of asked tokens, and the input's name
            asked_args, asked_names = ([torch.arange(3)], ["candidates"]) if asks else ([], [])
            _onnx_export(step, (torch.zeros(2, dtype=torch.long), *asked_args, *state),
                         ["tokens", *asked_names, *state_names], ["logprob", *[f"next_{n}" for n in state_names]],
                         step_path, tree)
            side["step_graph"] = step_path.name
            written.append(step_path)
    side["sha256"] = {"graph": file_sha256(out), **({"step_graph": file_sha256(written[1])} if step else {})}
    side_path = out.with_suffix(".json")
    side_path.write_text(json.dumps(side, indent=1, ensure_ascii=False), encoding="utf-8")
    return [*written, side_path]


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Silence the exporter's warnings and its prints to stdout/stderr unless ``verbose``."""
    if verbose:
        yield
        return
    sink, logger = io.StringIO(), logging.getLogger("torch.onnx")  # torchvision-missing notes come by logging
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load(run_dir: str | os.PathLike, which: str, device: str | torch.device, beam_width: int | None,
          decode: str | None):
    """``(model, meta, rule)``: the rule is ``decode`` or else the run's own ``eval.decode``, so a run trained
    to answer by CRM (configs/recommended-fmnist.yaml) predicts, serves and exports that way without a flag."""
    cfg, _, model, meta = load_run(run_dir, which=which, device=device)
    if beam_width is not None:  # a width tuned on val (`evaluate --beam-width`) instead of the config's
        model.set_beam_width(beam_width)
    return model, meta, decode or cfg["eval"]["decode"]


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best",
                beam_width: int | None = None, verbose: bool = False, decode: str | None = None) -> list[Path]:
    """``hiervision export RUN --out model.onnx``: the run's checkpoint → the files written; the sidecar
    keeps ``beam_width`` when given (heads with a beam search), the run's fitted hedging λs and the decision
    rule ``decode`` (default: the run's ``eval.decode``)."""
    model, meta, rule = _load(run_dir, which, "cpu", beam_width, decode)
    return export_model(model, meta, out, decisions=load_decisions(run_dir), verbose=verbose, decode=rule)


def run_predictor(run_dir: str | os.PathLike, top_k: int = 3, batch_size: int = 64, device: str | torch.device = "cpu",
                  which: str = "best", beam_width: int | None = None, decode: str | None = None) -> Predictor:
    """A :class:`~hiervision.runtime.Predictor` over a run folder's checkpoint, run eagerly in PyTorch
    (``hiervision predict`` / ``serve`` on a run): the decoding (and hedging) an exported graph would get,
    answering by the decision rule ``decode`` (default: the run's ``eval.decode``)."""
    model, meta, rule = _load(run_dir, which, device, beam_width, decode)
    side = sidecar(model, meta, decisions=load_decisions(run_dir), decode=rule)
    return Predictor(run_dir, sidecar=side, engine=torch_engine(model, device), top_k=top_k, batch_size=batch_size)
