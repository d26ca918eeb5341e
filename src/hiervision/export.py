"""``hiervision export``: a trained run → ONNX graph(s) + a JSON sidecar for :mod:`hiervision.runtime`.

Only the tensor part goes into the graph, for every family:

* heads that score every path at once (flat, DHNN CNN-RNN and CNN-S2S fed their outputs, Guo's
  multi-head, HierNet's conditional output) export ``scores`` ``(B, N+1)`` (``Prediction.scores``)
  and ``path_logprob`` ``(B, N+1)`` (the log-probability of the path ending at each node; a matrix
  product with the ancestor matrix, :func:`~hiervision.decoding.prefix_logprob`), plus
  ``step_logprob`` where the model decodes by beam search over precomputed steps;
* autoregressive decoders (DHNN CNN-S2S fed its labels, Guo's CNN-RNN) export two graphs: the
  encoder (image → decoder start state) and ONE decoder step (tokens, state → next-token
  log-probabilities, state). An unrolled fixed-depth graph cannot hold a beam search without putting
  the search itself in the graph; one step keeps every search (greedy, beam of any width, top-k)
  outside, in numpy, and costs one small graph call per tree level.

The search (argmax over allowed ends, each level's argmax, routing, beam search, thresholds) runs in
:mod:`hiervision.runtime`; :func:`torch_engine` feeds the same modules to it eagerly, which is how
``hiervision predict`` decodes a PyTorch run, so both paths share one decoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hiervision.bayes import decode_rule
from hiervision.checkpoint import CheckpointError
from hiervision.decoding import prefix_logprob
from hiervision.marginals import as_temperature
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.dhnn import CnnRnn, CnnS2S
from hiervision.models.flat import FlatClassifier
from hiervision.models.guo import CnnRnnGenerator, MultiHeadGenerator
from hiervision.models.hiernet import HierNet
from hiervision.runtime import SIDECAR_FORMAT, Predictor
from hiervision.taxonomy import EOS

__all__ = ["export_onnx", "export_parts", "run_predictor", "torch_engine"]

OPSET = 18


class _Scores(nn.Module):
    """images → (scores, path_logprob[, step_logprob]) for the heads that score every path at once."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model
        tax = model.taxonomy
        self.register_buffer("anc_t", tax.ancestor_matrix.T.float().contiguous(), persistent=False)
        self.register_buffer("depth", tax.depth_tensor.clone(), persistent=False)

    def _prefix(self, node_lp: torch.Tensor) -> torch.Tensor:
        return prefix_logprob(self.model.taxonomy, node_lp)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if isinstance(m, HierNet):
            lp = m._node_logprob(images)  # already whole-path log-probabilities
            return lp.exp(), lp
        outputs = m(images)
        if isinstance(m, FlatClassifier):
            logits = outputs["logits"].float()
            if m.multi_label:
                return self._multi(F.pad(torch.sigmoid(logits), (1, 0)))
            probs = logits.softmax(1)
            onehot = F.one_hot(m.classes, m.taxonomy.num_nodes).float()  # class c → its node
            return probs @ m.class_paths.T.float(), torch.log(probs @ onehot)
        if isinstance(m, MultiHeadGenerator):
            node_lp = m._node_logprob(outputs)
            return node_lp.exp(), self._prefix(node_lp)
        if isinstance(m, (CnnRnn, CnnS2S)):
            logits = outputs["logits"].float()
            if m.multi_label:
                return self._multi(m._node_view(torch.sigmoid(logits)))
            step_lp = logits.log_softmax(-1)
            prefix = self._prefix(m._node_view(step_lp))
            path_lp = prefix
            if isinstance(m, CnnS2S):  # + stopping right after each node (the end token)
                path_lp = prefix + step_lp[:, self.depth.clamp(max=m.num_out_steps - 1), EOS].clamp(min=-1e4)
            out = (prefix.exp(), path_lp)
            return (*out, step_lp) if m.decode_mode == "beam" else out
        raise ValueError(f"export: model {type(m).__name__} has no export adapter")

    def _multi(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scores, self._prefix(torch.log(scores.clamp_min(1e-12)))


class _Encoder(nn.Module):
    """images → the autoregressive decoder's start state (every tensor batch-first)."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if isinstance(m, CnnRnnGenerator):
            vg = m.cell.visual(m.backbone(images))
            h = vg.new_zeros(len(vg), m.cell.hidden_size)
            return h, h.clone(), vg
        h, c = m.encode(images)  # (layers, B, W) → (B, layers, W)
        return h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()


class _Step(nn.Module):
    """One decoder step: (tokens, state...) → (next-token log-probabilities, state...)."""

    def __init__(self, model: HierarchicalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if isinstance(m, CnnRnnGenerator):
            h, c, vg = state
            h, c = m.cell(m.embed(tokens), (h, c), vg)
            return m.out(h).float().log_softmax(-1), h, c, vg
        h, c = (s.transpose(0, 1).contiguous() for s in state)
        out, (h, c) = m.decoder(m.embed(tokens).unsqueeze(1), (h, c))
        return (m.out(out[:, 0]).float().log_softmax(-1), h.transpose(0, 1).contiguous(),
                c.transpose(0, 1).contiguous())


def _autoregressive(model: HierarchicalClassifier) -> bool:
    return isinstance(model, CnnRnnGenerator) or (isinstance(model, CnnS2S) and model.feed == "label"
                                                  and not model.multi_label)


def decoder_settings(model: HierarchicalClassifier) -> dict:
    """How :mod:`hiervision.runtime` decodes this model's graph outputs the way ``model.predict`` does."""
    tax = model.taxonomy
    if model.multi_label:
        return {"kind": "multi_label", "end_nodes": "leaves", "threshold": float(model.threshold)}
    if isinstance(model, CnnRnnGenerator):
        k = model.beam_width if model.decode_mode == "beam" else 1
        return {"kind": "beam", "end_nodes": model.end_nodes, "beam_width": k, "max_steps": model.num_steps,
                "state": ["state0", "state1", "state2"]}
    if isinstance(model, CnnS2S) and model.feed == "label":
        return {"kind": "beam", "end_nodes": model.end_nodes, "beam_width": model.beam_width,
                "max_steps": model.num_out_steps, "state": ["state0", "state1"]}
    if isinstance(model, (CnnRnn, CnnS2S)):
        ends = "leaves" if isinstance(model, CnnRnn) else model.end_nodes
        if model.decode_mode == "beam":
            return {"kind": "beam_steps", "end_nodes": ends, "beam_width": model.beam_width}
        return {"kind": "exact", "end_nodes": ends}
    if isinstance(model, FlatClassifier):
        return {"kind": "exact", "end_nodes": model.end_nodes}
    if isinstance(model, MultiHeadGenerator):
        if model.decode_mode == "exact":
            return {"kind": "exact", "end_nodes": "leaves"}
        return {"kind": "independent", "end_nodes": "leaves", "level_depths": list(model.levels),
                "levels": [list(tax.levels[lv - 1]) for lv in model.levels], "depth": model.levels[-1]}
    if isinstance(model, HierNet):
        return {"kind": "routing" if model.eval_mode == "routing" else "exact", "end_nodes": "leaves"}
    raise ValueError(f"export: model {type(model).__name__} has no export adapter")


def export_parts(model: HierarchicalClassifier) -> tuple[nn.Module, nn.Module | None, list[str]]:
    """``(graph, step_graph or None, output names)``: the modules that become the ONNX graph(s)."""
    if _autoregressive(model):
        names = decoder_settings(model)["state"]
        return _Encoder(model).eval(), _Step(model).eval(), names
    names = ["scores", "path_logprob"]
    if not model.multi_label and isinstance(model, (CnnRnn, CnnS2S)) and model.decode_mode == "beam":
        names.append("step_logprob")
    return _Scores(model).eval(), None, names


class _TorchEngine:
    """:class:`hiervision.runtime.Engine` on the PyTorch modules (eager): ``hiervision predict`` on a run."""

    def __init__(self, model: HierarchicalClassifier, device: torch.device) -> None:
        self.graph, self.step_graph, self.names = export_parts(model.to(device).eval())
        self.device = device

    @torch.no_grad()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.graph(torch.from_numpy(images).to(self.device))
        return {name: t.float().cpu().numpy() for name, t in zip(self.names, out)}

    @torch.no_grad()
    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        ts = [torch.from_numpy(np.ascontiguousarray(s)).to(self.device) for s in state]
        lp, *new = self.step_graph(torch.from_numpy(np.ascontiguousarray(tokens)).to(self.device), *ts)
        return lp.float().cpu().numpy(), tuple(t.cpu().numpy() for t in new)


def torch_engine(model: HierarchicalClassifier, device: str | torch.device = "cpu") -> _TorchEngine:
    return _TorchEngine(model, torch.device(device))


def sidecar(model: HierarchicalClassifier, meta: dict, step_graph: str | None = None, decode: str = "argmax") -> dict:
    """Everything the runtime needs besides the graph: tree, image size, normalisation, decoder, the
    calibration temperature the runtime applies to the graph's probabilities (the checkpoint's) and the
    decision rule it answers by (``decode``: argmax | crm | bayes:METRIC[:inner], :mod:`hiervision.bayes`)."""
    decode_rule(decode)
    in_chans = int(meta.get("in_chans", 3))
    size = meta.get("image_size")
    size = [int(size), int(size)] if isinstance(size, int) else ([int(s) for s in size] if size else None)
    return {"format": SIDECAR_FORMAT, "version": 1, "model": type(model).__name__, "in_chans": in_chans,
            "image_size": size, "resize": meta.get("resize"),
            "mean": [float(v) for v in meta.get("mean", [0.0] * in_chans)],
            "std": [float(v) for v in meta.get("std", [1.0] * in_chans)], "decoder": decoder_settings(model),
            "step_graph": step_graph, "temperature": as_temperature(getattr(model, "temperature", 1.0)),
            "decode": decode,
            "taxonomy": model.taxonomy.to_dict()}


def _onnx_export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # one dynamic batch axis on every input; a step's state arrives as one *args tuple
    shapes = ({0: batch},) if len(args) == 1 else ({0: batch}, tuple({0: batch} for _ in args[1:]))
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
    prog.save(str(path))


@torch.no_grad()
def export_model(model: HierarchicalClassifier, meta: dict, out: str | os.PathLike,
                 decode: str = "argmax") -> list[Path]:
    """Write ``out`` (.onnx), its step graph where the model has one, and the ``.json`` sidecar."""
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: the file name must end in .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    graph, step, names = export_parts(model)
    side = sidecar(model, meta, decode=decode)
    c = side["in_chans"]
    h, w = side["image_size"] or (32, 32)
    images = torch.zeros(2, c, h, w)
    _onnx_export(graph, (images,), ["images"], names, out)
    written = [out]
    if step is not None:
        state = graph(images)
        step_path = out.with_name(out.stem + ".step.onnx")
        state_names = [f"state{i}" for i in range(len(state))]
        _onnx_export(step, (torch.zeros(2, dtype=torch.long), *state), ["tokens", *state_names],
                     ["logprob", *[f"next_{n}" for n in state_names]], step_path)
        side["step_graph"] = step_path.name
        written.append(step_path)
    side_path = out.with_suffix(".json")
    side_path.write_text(json.dumps(side, indent=1, ensure_ascii=False), encoding="utf-8")
    return [*written, side_path]


def _load(run_dir: str | os.PathLike, which: str, device: str | torch.device, beam_width: int | None):
    from hiervision.training import load_run

    _, _, model, meta = load_run(run_dir, which=which, device=device)
    if beam_width is not None:  # a width tuned on val (`evaluate --beam-width`) instead of the config's
        model.set_beam_width(beam_width)
    return model, meta


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best",
                beam_width: int | None = None, decode: str | None = None) -> list[Path]:
    """``hiervision export RUN --out model.onnx``: the run's checkpoint → the files written; the sidecar
    keeps ``beam_width`` when given (heads with a beam search) and the decision rule ``decode``."""
    return export_model(*_load(run_dir, which, "cpu", beam_width), out, decode or "argmax")


def run_predictor(run_dir: str | os.PathLike, top_k: int = 3, batch_size: int = 64, device: str | torch.device = "cpu",
                  which: str = "best", beam_width: int | None = None, decode: str | None = None) -> Predictor:
    """A :class:`~hiervision.runtime.Predictor` over a run folder's checkpoint, run eagerly in PyTorch
    (``hiervision predict`` / ``serve`` on a run): the decoding an exported graph would get, answering
    by the decision rule ``decode`` (default argmax)."""
    model, meta = _load(run_dir, which, device, beam_width)
    return Predictor(sidecar=sidecar(model, meta, decode=decode or "argmax"), engine=torch_engine(model, device),
                     top_k=top_k, batch_size=batch_size)
