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

``export --quantize int8`` (:func:`export_int8`) exports the float graphs into a temporary folder and
writes only their int8 versions where ``--out`` says: static quantisation (onnxruntime's QDQ format,
per-channel weights) calibrated on the run's validation images for a graph with an image input, dynamic
quantisation for a decoder step graph (no image input) or a run without validation images.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hiervision.bayes import decode_rule
from hiervision.checkpoint import CheckpointError
from hiervision.config import ConfigError
from hiervision.decisions import load_decisions
from hiervision.experiment import RunError, load_run, run_data
from hiervision.marginals import as_temperature
from hiervision.models.base import HierarchicalClassifier
from hiervision.restrict import Allowed, read_class_file
from hiervision.rollup import Thresholds
from hiervision.runtime import Predictor
from hiervision.sidecar import DECODER_KEY, SIDECAR_FORMAT, SIDECAR_VERSION, TREE_KEY, file_sha256

__all__ = ["QUANTIZE_CHOICES", "export_int8", "export_onnx", "export_parts", "run_predictor", "torch_engine",
           "validation_images"]

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


def answer_defaults(cfg: dict) -> dict:
    """The run's default answers (``eval.within``, ``eval.classes`` read from its file, ``eval.min_prob``,
    ``eval.min_prob_at``) and the names of its levels (``data.ranks``) as sidecar keys, so an exported model
    restricts and rolls up as the run does, and takes thresholds by rank."""
    ev = cfg.get("eval", {})
    out = {k: ev[k] for k in ("within", "min_prob") if ev.get(k) is not None}
    if cfg.get("data", {}).get("ranks"):
        out["ranks"] = list(cfg["data"]["ranks"])
    if ev.get("min_prob_at"):
        out["min_prob_at"] = {str(k): float(v) for k, v in ev["min_prob_at"].items()}
    if ev.get("classes"):
        out["classes"] = read_class_file(ev["classes"])
    return out


def sidecar(model: HierarchicalClassifier, meta: dict, step_graph: str | None = None,
            decisions: dict | None = None, decode: str = "argmax", answers: dict | None = None) -> dict:
    """Everything the runtime needs besides the graph (:mod:`hiervision.sidecar` checks it on load): tree and
    its fingerprint, image size, the normalisation the run was trained with (``meta``: the checkpoint's, never
    recomputed), decoder, the calibration temperature, the hedging λ table fitted on validation
    (``decisions``: the run's ``decisions.json``), so an exported model hedges as the run does, and the
    decision rule it answers by (``decode``: argmax | crm | bayes:METRIC[:inner], :mod:`hiervision.bayes`),
    and the default restriction and roll-up (``answers``: :func:`answer_defaults`)."""
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
            **(answers or {}), "taxonomy": model.taxonomy.to_dict()}


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
                 verbose: bool = False, decode: str = "argmax", answers: dict | None = None) -> list[Path]:
    """Write ``out`` (.onnx), its step graph where the model has one, and the ``.json`` sidecar with the
    sha256 of each graph (checked on load). ``verbose``: let the exporter's own messages and warnings
    through (quiet by default: they say nothing about the model)."""
    out = _checked_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    graph, step = export_parts(model)
    side = sidecar(model, meta, decisions=decisions, decode=decode, answers=answers)
    c = side["in_chans"]
    h, w = side["image_size"] or (32, 32)
    images = torch.zeros(2, c, h, w)
    names = side["decoder"].get("state") or list(model.export_outputs(images).keys())
    # the graph itself names its tree and its decoder: a sidecar whose tree (fingerprint and all) or decoder was
    # edited is still refused
    tree = {TREE_KEY: side["taxonomy"]["fingerprint"], DECODER_KEY: json.dumps(side["decoder"], sort_keys=True)}
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


def _checked_out(out: str | os.PathLike) -> Path:
    """``--out`` as a path, refused when it does not end in .onnx or when its sidecar (same name, .json) would
    replace a file that is not an export's sidecar (a run's ``metrics.json`` next to ``--out RUN/metrics.onnx``):
    export writes the files the user named and their companions, never anything else."""
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: the file name must end in .onnx")
    side = out.with_suffix(".json")
    if side.exists():
        try:
            ours = json.loads(side.read_text(encoding="utf-8")).get("format") == SIDECAR_FORMAT
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {out}: its sidecar {side} would replace a file that is not an export's sidecar; "
                             "choose another name")
    return out


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
    """``(cfg, model, meta, rule)``: the rule is ``decode`` or else the run's own ``eval.decode``, so a run trained
    to answer by CRM (``eval.decode: crm``) predicts, serves and exports that way without a flag."""
    cfg, _, model, meta = load_run(run_dir, which=which, device=device)
    if beam_width is not None:  # a width tuned on val (`evaluate --beam-width`) instead of the config's
        model.set_beam_width(beam_width)
    return cfg, model, meta, decode or cfg["eval"]["decode"]


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best",
                beam_width: int | None = None, verbose: bool = False, decode: str | None = None,
                quantize: str | None = None, calibration_images: int = 128,
                note: Callable[[str], None] | None = None) -> list[Path]:
    """``hiervision export RUN --out model.onnx``: the run's checkpoint → the files written; the sidecar
    keeps ``beam_width`` when given (heads with a beam search), the run's fitted hedging λs and the decision
    rule ``decode`` (default: the run's ``eval.decode``). ``quantize="int8"``: write the int8 model instead
    (:func:`export_int8`), calibrated on up to ``calibration_images`` of the run's validation images;
    ``note(line)`` hears what it did (default: stderr)."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize}: must be one of {', '.join(QUANTIZE_CHOICES)}")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise ValueError(f"--calibration-images {calibration_images}: must be a whole number ≥ 1")
    out = _checked_out(out)  # before the run's weights and data load
    cfg, model, meta, rule = _load(run_dir, which, "cpu", beam_width, decode)
    decisions, answers = load_decisions(run_dir), answer_defaults(cfg)
    if quantize is None:
        return export_model(model, meta, out, decisions=decisions, verbose=verbose, decode=rule, answers=answers)
    images, why = validation_images(cfg, run_dir, meta, calibration_images)
    return export_int8(model, meta, out, images, decisions=decisions, verbose=verbose, decode=rule,
                       note=note or _say, why_dynamic=why, answers=answers)


def run_predictor(run_dir: str | os.PathLike, top_k: int = 3, batch_size: int = 64, device: str | torch.device = "cpu",
                  which: str = "best", beam_width: int | None = None, decode: str | None = None,
                  allowed: Allowed | None = None, thresholds: Thresholds | None = None) -> Predictor:
    """A :class:`~hiervision.runtime.Predictor` over a run folder's checkpoint, run eagerly in PyTorch
    (``hiervision predict`` / ``serve`` on a run): the decoding (and hedging) an exported graph would get,
    answering by the decision rule ``decode`` (default: the run's ``eval.decode``), restricted to ``allowed``
    and rolled up at ``thresholds`` (default: the run's ``eval.within``/``classes``/``min_prob``)."""
    cfg, model, meta, rule = _load(run_dir, which, device, beam_width, decode)
    side = sidecar(model, meta, decisions=load_decisions(run_dir), decode=rule, answers=answer_defaults(cfg))
    return Predictor(run_dir, sidecar=side, engine=torch_engine(model, device), top_k=top_k, batch_size=batch_size,
                     allowed=allowed, thresholds=thresholds)


# ----------------------------------------------------------------------------- int8
#: what ``export --quantize`` accepts
QUANTIZE_CHOICES = ("int8",)
#: the ops static int8 quantises (weights per channel, their input activations scaled from calibration): where
#: the compute is. The decoding math after them (softmax, log, sums over the tree) stays float: 8-bit steps
#: there would turn small probabilities into log(0)
STATIC_OPS = ["Conv", "Gemm", "MatMul"]
#: the ops dynamic int8 quantises (onnxruntime has integer kernels for these; a Gemm becomes MatMul + Add first)
DYNAMIC_OPS = ["Conv", "MatMul", "LSTM", "Attention"]
#: images per calibration (and check) batch
CALIBRATION_BATCH = 16


def _say(line: str) -> None:
    print(f"hiervision: {line}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def validation_images(cfg: dict, run_dir: str | os.PathLike, meta: dict, n: int) -> tuple[list[np.ndarray], str]:
    """Up to ``n`` images of the run's validation split, spread evenly over it (a split is often ordered by
    class), as the runtime has them before normalising: float32 ``(C, H, W)`` in [0, 1], resized and cropped by
    the data's own evaluation transform. ``([], why)`` where there are none to calibrate on."""
    try:  # calibration only needs images like the run's: a changed split is a warning, not a refusal
        data = run_data(cfg, run_dir, allow_changed=True, meta=meta)
    except (OSError, ConfigError, RunError, ValueError) as e:  # data moved away: dynamic int8 still works
        return [], f"the run's data cannot be read ({_one_line(e)})"
    if data.features:
        return [], "the run's data holds cached backbone features, not images"
    if not len(data.val):
        return [], "the run's validation split is empty"
    pick = np.unique(np.linspace(0, len(data.val) - 1, min(n, len(data.val))).round().astype(np.int64))
    return [data.val[int(i)][0].numpy().astype(np.float32) for i in pick], ""


def _batches(images: list[np.ndarray]) -> list[np.ndarray]:
    """Stacks of up to ``CALIBRATION_BATCH`` images, one image per stack when their sizes differ."""
    step = CALIBRATION_BATCH if len({a.shape for a in images}) == 1 else 1
    return [np.stack(images[i : i + step]) for i in range(0, len(images), step)]


class _Calibration:
    """onnxruntime's ``CalibrationDataReader`` (the protocol: ``get_next`` → one input feed, ``None`` at the end)
    over normalised image batches for the graph's ``images`` input."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": np.ascontiguousarray(batch, dtype=np.float32)}


def _pre_process(src: Path, dst: Path, verbose: bool, note: Callable[[str], None]) -> Path:
    """onnxruntime's recommended step before quantising (shape inference, graph optimisation): ``dst``, or
    ``src`` unchanged, said in one line, where it fails on a graph (quantising still works without it)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet(verbose):
            quant_pre_process(str(src), str(dst))
        return dst
    except Exception as e:  # noqa: BLE001 - its symbolic shape inference fails on some graphs: go on without it
        note(f"int8: {src.name}: pre-processing failed, quantising the graph as exported ({type(e).__name__}: "
             f"{_one_line(e)})")
        return src


def _gemm_as_matmul(path: Path) -> bool:
    """Rewrite in place each plain ``Gemm`` whose weight is a constant used by it alone as ``MatMul`` (+ ``Add``
    of the bias): dynamic int8 has integer kernels for MatMul but none for Gemm. True where it has one."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, changed = [], False
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = weights.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if w is None or not plain or uses[w.name] != 1:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}__matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w.name], [product], name=f"{node.name}__matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}__bias"))
        changed = True
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
    return changed


def _quantize_graph(src: Path, dst: Path, batches: list[np.ndarray], verbose: bool,
                    note: Callable[[str], None]) -> str:
    """One float graph → its int8 version at ``dst``: static (QDQ, per-channel weights) calibrated on
    ``batches``, or dynamic where there are none. Returns the kind written (the sidecar's ``quantization``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    graph = _pre_process(src, src.with_name(src.stem + ".pre.onnx"), verbose, note)
    try:
        with _quiet(verbose):
            if batches:
                quantize_static(str(graph), str(dst), _Calibration(batches), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=STATIC_OPS, per_channel=True,
                                calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8)
                return "int8-static"
            if graph == src:  # never edit the float export itself
                graph = Path(shutil.copy(src, src.with_name(src.stem + ".pre.onnx")))
            _gemm_as_matmul(graph)
            import onnx

            convs = any(n.op_type == "Conv" for n in onnx.load(str(graph), load_external_data=False).graph.node)
            # onnxruntime's ConvInteger kernel takes uint8 weights only; MatMulInteger takes either
            quantize_dynamic(str(graph), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=False,
                             weight_type=QuantType.QUInt8 if convs else QuantType.QInt8)
            return "int8-dynamic"
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime's quantiser trips on is one line
        raise ValueError(f"{src.name}: onnxruntime could not quantise the graph ({type(e).__name__}: "
                         f"{_one_line(e)}); export without --quantize") from None


def export_int8(model: HierarchicalClassifier, meta: dict, out: str | os.PathLike, images: list[np.ndarray],
                decisions: dict | None = None, verbose: bool = False, decode: str = "argmax",
                note: Callable[[str], None] = _say, why_dynamic: str = "", answers: dict | None = None) -> list[Path]:
    """``export --quantize int8``: the float export goes to a temporary folder; its int8 version (graph, step
    graph, sidecar with ``quantization``) is written to ``out`` once it gives finite answers (:func:`_check_int8`).

    ``images``: calibration images (:func:`validation_images`); the graph with the image input is quantised
    statically on them, or dynamically where there are none (``why_dynamic`` says why). A step graph
    (tokens and state in, no image) is always quantised dynamically."""
    out = _checked_out(out)
    with tempfile.TemporaryDirectory(prefix="hiervision-int8-") as tmp:
        floats, q_dir = Path(tmp, "float"), Path(tmp, "int8")
        q_dir.mkdir()
        written = export_model(model, meta, floats / out.name, decisions=decisions, verbose=verbose, decode=decode,
                               answers=answers)
        side = json.loads(written[-1].read_text(encoding="utf-8"))
        reference = Predictor(written[0])
        x = [((a[None] - reference.mean) / reference.std)[0].astype(np.float32) for a in images]
        if images:
            note(f"int8: static quantisation of {out.name} (QDQ, per-channel weights), calibrated on {len(images)} "
                 "validation image(s)")
        else:
            note(f"int8: {why_dynamic or 'no calibration images'}: dynamic quantisation of {out.name} instead "
                 "(int8 weights, activations scaled per batch at run time)")
        kinds = [_quantize_graph(g, q_dir / g.name, _batches(x) if i == 0 and x else [], verbose, note)
                 for i, g in enumerate(written[:-1])]
        if len(kinds) > 1:
            note(f"int8: dynamic quantisation of {written[1].name} (a decoder step has no image input to calibrate)")
        side["quantization"] = {"kind": kinds[0], "format": "QDQ" if kinds[0] == "int8-static" else "QOperator",
                                "calibration_images": len(images) if kinds[0] == "int8-static" else 0,
                                "per_channel": kinds[0] == "int8-static",
                                **({"step_graph": kinds[1]} if len(kinds) > 1 else {})}
        graphs = [q_dir / g.name for g in written[:-1]]
        side["sha256"] = {"graph": file_sha256(graphs[0]), **({"step_graph": file_sha256(graphs[1])}
                                                               if len(graphs) > 1 else {})}
        q_side = q_dir / written[-1].name
        q_side.write_text(json.dumps(side, indent=1, ensure_ascii=False), encoding="utf-8")
        _check_int8(reference, Predictor(graphs[0]), images or _noise(side), out, note, calibrated=bool(images))
        out.parent.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.move(str(f), str(out.parent / f.name))) for f in [*graphs, q_side]]  # sidecar last


def _noise(side: dict) -> list[np.ndarray]:
    """Eight fixed noise images of the graph's size: what the check runs without calibration images."""
    h, w = side["image_size"] or (32, 32)
    return list(np.random.default_rng(0).random((8, side["in_chans"], h, w), dtype=np.float32))


def _check_int8(reference: Predictor, quantized: Predictor, images: list[np.ndarray], out: Path,
                note: Callable[[str], None], calibrated: bool) -> None:
    """Refuse, in one line and before anything is written, an int8 model whose outputs are not finite where the
    float model's are, or whose answers' probabilities leave [0, 1]; say how often it answers as the float model."""
    same = 0
    for batch in _batches(images):
        x = ((batch - reference.mean) / reference.std).astype(np.float32)
        want, got = reference.engine.run(x), quantized.engine.run(x)
        for name, values in got.items():
            if (~np.isfinite(values) & np.isfinite(want[name])).any():
                raise ValueError(f"--out {out}: int8 quantisation gives non-finite values in the graph's output "
                                 f"{name!r}; nothing written (export without --quantize)")
        for a, b in zip(reference.predict_arrays(batch), quantized.predict_arrays(batch)):
            probs = [b["path_probability"], *b["node_probabilities"], *(t["probability"] for t in b["top_k"])]
            if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                raise ValueError(f"--out {out}: the int8 model's answers hold probabilities outside [0, 1] or not "
                                 "finite; nothing written (export without --quantize)")
            same += a["path_ids"] == b["path_ids"]
    where = "calibration images" if calibrated else "fixed noise images (no calibration images)"
    note(f"int8: same answer as the float model on {same}/{len(images)} {where}")
