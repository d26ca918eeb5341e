"""The ``.json`` sidecar of an exported ``.onnx``: its versioned schema, checked before a graph runs.

An exported model is a graph that outputs numbers per node and a sidecar that says what they mean
(the tree's names and parents, the input normalisation, the decoder). A sidecar edited by hand,
damaged, or paired with another graph would still predict — with the wrong names or nan
probabilities — so every value is checked on load, and every failure is one line naming the file
and the key:

* types and ranges: ``in_chans`` 1 or 3, ``mean``/``std`` one finite number per channel with
  ``std > 0``, ``temperature > 0``, ``image_size``/``resize``, every decoder setting;
* the tree: its fingerprint (:attr:`hiervision.records.TreeView.fingerprint`, written at export)
  is recomputed, so a renamed, swapped, moved or dropped class is refused;
* the graph files: a sha256 of each ``.onnx`` is written at export and compared, so a truncated,
  replaced or edited graph is refused before onnxruntime reads it;
* ``quantization`` (optional, written by ``hiervision export --quantize int8``): how the graphs were
  quantised — ``kind`` ``int8-static`` (calibrated on ``calibration_images`` validation images) or
  ``int8-dynamic``, the ``format`` of the quantised operators and, with a step graph, its own
  ``step_graph`` kind. The runtime runs a quantised graph like any other; the key says what it is
  (a reader that predates it ignores it, so the version stays 3).

When the session is built (:class:`hiervision.runtime.Predictor`), the graph's input channels, image
size and output widths are compared with the sidecar, and so is the tree fingerprint the graph
itself carries in its metadata (``TREE_KEY``): a tree edited together with its stored fingerprint
is refused too.

Versions: 2 is the checked format above. Version 1 sidecars (written before these checks) are
refused with a line saying to export the run again: they carry no content hash, and a model that
cannot be checked is not served silently.

Needs the standard library and :mod:`hiervision.records` (numpy) only: no torch, no yaml.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hiervision.records import TreeView
from hiervision.restrict import Allowed
from hiervision.rollup import Thresholds, check_ranks

__all__ = ["DECODER_KEY", "QUANTIZATION_KINDS", "SIDECAR_FORMAT", "SIDECAR_VERSION", "TREE_KEY", "check_sidecar",
           "check_width", "file_sha256", "load_sidecar"]

SIDECAR_FORMAT = "hiervision-onnx"
SIDECAR_VERSION = 3
#: versions this one reads: 2 is 3 without ``decoder.candidates`` (a step graph scoring asked tokens)
READS_VERSIONS = (2, 3)
#: the graph's own metadata entry holding the fingerprint of the tree it was exported for
TREE_KEY = "hiervision.taxonomy_fingerprint"
#: the graph's own metadata entry holding the decoder settings it was exported with (JSON, sorted keys)
DECODER_KEY = "hiervision.decoder"
#: decoder kinds :func:`hiervision.runtime.decode_batch` knows, with the keys each needs besides ``kind``
DECODER_KEYS: dict[str, tuple[str, ...]] = {
    "exact": (),
    "multi_label": ("threshold",),
    "independent": ("levels", "level_depths", "depth"),
    "routing": (),
    "beam_steps": ("beam_width",),
    "beam": ("beam_width", "max_steps", "state"),
}
#: ``quantization.kind`` values: int8 weights, activations scaled from calibration images or per batch
QUANTIZATION_KINDS = ("int8-static", "int8-dynamic")
#: ``quantization.format``: quantise/dequantise pairs around float operators, or integer operators
QUANTIZATION_FORMATS = ("QDQ", "QOperator")


class _Check:
    """One sidecar's checks: every failure is ``ValueError("<file>: key '<key>': <what is wrong>")``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, what: str) -> ValueError:
        return ValueError(f"{self.source}: key {key!r}: {what}")

    def integer(self, key: str, value: Any, lo: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.fail(key, f"must be a whole number ≥ {lo}, got {value!r}")
        return value

    def number(self, key: str, value: Any, positive: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise self.fail(key, f"must be a finite number{' > 0' if positive else ''}, got {value!r}")
        return float(value)

    def numbers(self, key: str, value: Any, length: int, positive: bool = False) -> list[float]:
        if not isinstance(value, list) or len(value) != length:
            raise self.fail(key, f"must be a list of {length} number(s), one per input channel, got {value!r}")
        return [self.number(key, v, positive) for v in value]


def check_sidecar(data: Any, source: str = "sidecar") -> dict:
    """``data`` with every value checked (see the module's docstring); returns it unchanged.

    Checks the content only; :func:`load_sidecar` adds the file-level checks (format, version,
    fingerprint present, content hashes)."""
    c = _Check(source)
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: not a hiervision export sidecar (expected a JSON object)")
    for key in ("taxonomy", "in_chans", "mean", "std", "decoder"):
        if key not in data:
            raise c.fail(key, "missing")
    tree = TreeView.from_dict(data["taxonomy"], source=f"{source}: key 'taxonomy'")
    stored = data["taxonomy"].get("fingerprint") if isinstance(data["taxonomy"], Mapping) else None
    if stored is not None and stored != tree.fingerprint:
        raise c.fail("taxonomy", f"the tree was edited after export (fingerprint {stored} stored, "
                                 f"{tree.fingerprint} recomputed: a renamed, moved or dropped class would give "
                                 "wrong answers); export the run again")
    in_chans = data["in_chans"]
    if type(in_chans) is not int or in_chans not in (1, 3):
        raise c.fail("in_chans", f"must be 1 or 3, got {in_chans!r}")
    c.numbers("mean", data["mean"], in_chans)
    c.numbers("std", data["std"], in_chans, positive=True)
    size = data.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2):
        raise c.fail("image_size", f"must be [height, width] or null, got {size!r}")
    for v in size or ():
        c.integer("image_size", v)
    if data.get("resize") is not None:
        c.integer("resize", data["resize"])
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, (list, tuple)):
        if len(temperature) != tree.max_depth:
            raise c.fail("temperature", f"one per tree level: must hold {tree.max_depth} numbers, got {temperature!r}")
        for t in temperature:
            c.number("temperature", t, positive=True)
    else:
        c.number("temperature", temperature, positive=True)
    _check_decoder(c, data["decoder"], tree)
    step = data.get("step_graph")
    if step is not None and (not isinstance(step, str) or not step or Path(step).name != step):
        raise c.fail("step_graph", f"must be a file name next to the .onnx, got {step!r}")
    _check_decisions(c, data.get("decisions"))
    _check_quantization(c, data.get("quantization"), step is not None)
    _check_answers(c, data, tree)
    return dict(data)


def _check_answers(c: _Check, data: Mapping, tree: TreeView) -> None:
    """The default restriction (``within``, ``classes``: node names), roll-up (``min_prob``,
    ``min_prob_at``: probabilities per level) and level names (``ranks``) resolve against the sidecar's own tree."""
    for key in ("within", "classes"):
        names = data.get(key)
        if names is not None and (not isinstance(names, list) or not names
                                  or not all(isinstance(n, str) for n in names)):
            raise c.fail(key, f"must be a non-empty list of node names, got {names!r}")
    try:
        Allowed.of(tree, data.get("within"), class_names=data.get("classes"),
                   end_nodes=data["decoder"].get("end_nodes", "leaves"),
                   where=(f"{c.source}: key 'within'", f"{c.source}: key 'classes'"))
        Thresholds.of(tree, data.get("min_prob"), data.get("min_prob_at"),
                      where=(f"{c.source}: key 'min_prob'", f"{c.source}: key 'min_prob_at'"),
                      ranks=check_ranks(data.get("ranks"), tree, f"{c.source}: key 'ranks'"))
    except (TypeError, AttributeError):
        raise c.fail("min_prob_at", f"must map levels to probabilities, got {data.get('min_prob_at')!r}") from None


def _check_decoder(c: _Check, dec: Any, tree: TreeView) -> None:
    if not isinstance(dec, Mapping) or dec.get("kind") not in DECODER_KEYS:
        kind = dec.get("kind") if isinstance(dec, Mapping) else dec
        raise c.fail("decoder", f"kind must be one of {', '.join(DECODER_KEYS)}, got {kind!r}")
    kind = dec["kind"]
    for key in DECODER_KEYS[kind]:
        if key not in dec:
            raise c.fail(f"decoder.{key}", f"missing (needed by the {kind!r} decoder)")
    if dec.get("end_nodes", "leaves") not in ("leaves", "all"):
        raise c.fail("decoder.end_nodes", f"must be 'leaves' or 'all', got {dec['end_nodes']!r}")
    for key in ("beam_width", "max_steps", "depth"):
        if key in dec:
            c.integer(f"decoder.{key}", dec[key])
    if "threshold" in dec and not 0 <= c.number("decoder.threshold", dec["threshold"]) <= 1:
        raise c.fail("decoder.threshold", f"must lie in [0, 1], got {dec['threshold']!r}")
    if not isinstance(dec.get("candidates", False), bool):
        raise c.fail("decoder.candidates", f"must be true or false, got {dec['candidates']!r}")
    if kind == "beam" and not (isinstance(dec["state"], list) and dec["state"]
                               and all(isinstance(s, str) for s in dec["state"])):
        raise c.fail("decoder.state", f"must be a list of output names, got {dec['state']!r}")
    if kind == "independent":
        levels, depths = dec["levels"], dec["level_depths"]
        ok = (isinstance(levels, list) and isinstance(depths, list) and len(levels) == len(depths) and levels
              and all(isinstance(lv, list) and lv and all(isinstance(n, int) and 0 < n < tree.num_nodes for n in lv)
                      for lv in levels)
              and all(isinstance(d, int) and 1 <= d <= tree.max_depth for d in depths))
        if not ok:
            raise c.fail("decoder.levels", "must be one list of node ids of the tree per level in 'level_depths'")


def _check_decisions(c: _Check, decisions: Any) -> None:
    """``decisions``: what ``fit_decisions`` fitted on validation (``{"hedge": {"0.9": λ, ...}}``)."""
    if decisions is None:
        return
    table = decisions.get("hedge", {}) if isinstance(decisions, Mapping) else None
    if not isinstance(table, Mapping):
        raise c.fail("decisions.hedge", f"must map accuracy targets to λ values, got {table!r}")
    for target, lam in table.items():
        try:
            ok = 0 < float(target) < 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise c.fail("decisions.hedge", f"accuracy target {target!r} must lie in (0, 1)")
        if c.number("decisions.hedge", lam) < 0:
            raise c.fail("decisions.hedge", f"λ for {target} must be ≥ 0, got {lam!r}")


def _check_quantization(c: _Check, q: Any, has_step: bool) -> None:
    """``quantization``: absent/null for a float export, else what ``export --quantize`` did to each graph."""
    if q is None:
        return
    if not isinstance(q, Mapping):
        raise c.fail("quantization", f"must be an object (kind, format, calibration_images), got {q!r}")
    if q.get("kind") not in QUANTIZATION_KINDS:
        raise c.fail("quantization.kind", f"must be one of {', '.join(QUANTIZATION_KINDS)}, got {q.get('kind')!r}")
    if q.get("format") not in QUANTIZATION_FORMATS:
        raise c.fail("quantization.format", f"must be one of {', '.join(QUANTIZATION_FORMATS)}, "
                                            f"got {q.get('format')!r}")
    n = c.integer("quantization.calibration_images", q.get("calibration_images"), lo=0)
    if (n > 0) != (q["kind"] == "int8-static"):
        raise c.fail("quantization.calibration_images", f"{n} for kind {q['kind']!r} (static quantisation is "
                                                        "calibrated on ≥ 1 image, dynamic on none)")
    if not isinstance(q.get("per_channel", False), bool):
        raise c.fail("quantization.per_channel", f"must be true or false, got {q['per_channel']!r}")
    if "step_graph" in q and (not has_step or q["step_graph"] not in QUANTIZATION_KINDS):
        what = f"one of {', '.join(QUANTIZATION_KINDS)}" if has_step else "absent (the model has no step graph)"
        raise c.fail("quantization.step_graph", f"must be {what}, got {q['step_graph']!r}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in blocks: graphs can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_sidecar(path: str | os.PathLike) -> dict:
    """The checked ``.json`` next to an exported ``.onnx`` (one-line errors naming the file and key)."""
    p = Path(path)
    if p.suffix.lower() != ".onnx":
        raise ValueError(f"{p}: expected an exported .onnx file")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    side = p.with_suffix(".json")
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{side}: missing sidecar (hiervision export writes it next to the .onnx)") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"{side}: cannot read ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side}: not a hiervision export sidecar (format must be {SIDECAR_FORMAT!r})")
    version = data.get("version")
    if version not in READS_VERSIONS:
        if isinstance(version, int) and not isinstance(version, bool) and version > SIDECAR_VERSION:
            raise ValueError(f"{side}: key 'version': {version} was written by a newer hiervision (this one reads "
                             f"{SIDECAR_VERSION}); upgrade hiervision")
        raise ValueError(f"{side}: key 'version': {version!r} predates the checked sidecar (version "
                         f"{SIDECAR_VERSION}: tree fingerprint and content hashes); export the run again")
    data = check_sidecar(data, str(side))
    if (data["decoder"]["kind"] == "beam") != bool(data.get("step_graph")):
        raise ValueError(f"{side}: key 'step_graph': a 'beam' decoder needs its step graph, other decoders have none")
    if not isinstance(data["taxonomy"].get("fingerprint"), str):
        raise ValueError(f"{side}: key 'taxonomy.fingerprint': missing (export writes it to detect an edited tree)")
    hashes = data.get("sha256")
    graphs = {"graph": p, **({"step_graph": p.with_name(data["step_graph"])} if data.get("step_graph") else {})}
    if not isinstance(hashes, Mapping) or set(hashes) != set(graphs):
        raise ValueError(f"{side}: key 'sha256': must hold the hash of {' and '.join(graphs)}, got {hashes!r}")
    for key, file in graphs.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (the step graph named by {side})")
        if file_sha256(file) != hashes[key]:
            raise ValueError(f"{file}: content differs from the sha256 its sidecar recorded at export (the file was "
                             f"truncated, replaced or edited; key 'sha256.{key}' of {side.name})")
    return data


def check_width(source: str, name: str, width: Any, tree: TreeView) -> None:
    """A graph output over the tree's nodes must be ``N+1`` wide (one column per node, the root included)."""
    if isinstance(width, int) and width != tree.num_nodes:
        raise ValueError(f"{source}: output {name!r} has {width} columns but the sidecar's tree has {tree.num_nodes} "
                         "nodes (key 'taxonomy': the graph was exported for another tree)")
