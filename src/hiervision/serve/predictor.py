"""What the server predicts with: one small interface over a trained run (PyTorch) or an ONNX file.

Both backends decode with :mod:`hiervision.runtime` (one decoding implementation: a run folder runs
its PyTorch modules through :func:`hiervision.export.torch_engine`, an ``.onnx`` runs onnxruntime), and
build records with :mod:`hiervision.records` — the fields of ``hiervision predict``: ``path``,
``path_ids``, ``path_probability``, ``node_probabilities``, ``top_k``. The server adds ``node_scores``
(every node's score, for drawing the tree), so the micro-batcher and the page never care which
backend answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hiervision.records import TreeView

if TYPE_CHECKING:
    from hiervision.restrict import Allowed
    from hiervision.rollup import Thresholds

__all__ = ["ImagePredictor", "RuntimePredictor", "load_predictor"]


class ImagePredictor(Protocol):
    """The server's view of a model."""

    tree: TreeView
    in_chans: int
    #: ``(H, W)`` every image is resized to, or ``None`` to keep the upload's size
    image_size: tuple[int, int] | None

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """``uint8`` arrays ``H×W`` or ``H×W×C`` (already at ``image_size``) → one record per image.

        A predictor that also takes ``allowed=``/``thresholds=`` (and has ``end_nodes``, ``multi_label``,
        ``allowed``, ``thresholds`` attributes, as :class:`RuntimePredictor`) answers the per-request
        ``within``/``min_prob``/``min_prob_at`` fields of ``POST /predict``; the server checks for them."""
        ...


class RuntimePredictor:
    """Adapts a :class:`hiervision.runtime.Predictor` (ONNX or PyTorch engine) to decoded uploads."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.tree: TreeView = runtime.tree
        self.in_chans = int(runtime.in_chans)
        size = runtime.image_size
        self.image_size = (int(size[0]), int(size[1])) if size else None
        decoder = runtime.sidecar["decoder"]
        #: where a path may stop ("leaves" or "all"): what an end class is, for restrictions and /health
        self.end_nodes: str = decoder.get("end_nodes", "leaves")
        #: a multi-label model answers sets of nodes: no restriction or roll-up applies
        self.multi_label = decoder["kind"] == "multi_label"
        #: the names of the tree's levels: a request's min_prob_at may use them (species=0.8)
        self.ranks: tuple[str, ...] = getattr(runtime, "ranks", ())

    @property
    def allowed(self) -> Allowed | None:
        """The server's default restriction (``serve --within/--classes`` or the sidecar's): the runtime's."""
        return self.runtime.allowed

    @allowed.setter
    def allowed(self, value: Allowed | None) -> None:
        self.runtime.allowed = value

    @property
    def thresholds(self) -> Thresholds | None:
        """The server's default roll-up thresholds (``serve --min-prob/--min-prob-at`` or the sidecar's)."""
        return self.runtime.thresholds

    @thresholds.setter
    def thresholds(self, value: Thresholds | None) -> None:
        self.runtime.thresholds = value

    def predict_arrays(self, images: list[np.ndarray], allowed: Allowed | None = None,
                       thresholds: Thresholds | None = None) -> list[dict[str, Any]]:
        """Records for decoded uploads; ``allowed``/``thresholds``: one request's restriction and roll-up
        instead of the server's defaults (``None``: the defaults)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape, []).append(i)
        if len(groups) > 1:  # no fixed input size: one forward pass per image size
            out: list[dict[str, Any]] = [{}] * len(images)
            for idx in groups.values():
                for i, rec in zip(idx, self.predict_arrays([images[i] for i in idx], allowed, thresholds)):
                    out[i] = rec
            return out
        batch = np.stack([im[..., None] if im.ndim == 2 else im for im in images]).transpose(0, 3, 1, 2)
        return self.runtime.predict_arrays(batch.astype(np.float32) / 255, [""] * len(images), node_scores=True,
                                           allowed=allowed, thresholds=thresholds)


def load_predictor(path: str | Path, top_k: int = 3, checkpoint: str = "best",
                   beam_width: int | None = None, decode: str | None = None) -> RuntimePredictor:
    """A run folder (PyTorch on the CPU) or an exported ``.onnx`` (onnxruntime, no PyTorch);
    ``beam_width`` replaces the configured width of a decoder with a beam search, ``decode`` the decision
    rule (:mod:`hiervision.bayes`)."""
    p = Path(path)
    if p.is_dir():
        from hiervision.export import run_predictor

        return RuntimePredictor(run_predictor(p, top_k=top_k, which=checkpoint, beam_width=beam_width,
                                              decode=decode))
    if p.suffix.lower() == ".onnx" and p.is_file():
        try:
            from hiervision.runtime import Predictor

            return RuntimePredictor(Predictor(p, top_k=top_k, beam_width=beam_width, decode=decode))
        except ImportError as e:
            raise ValueError(f"{p}: serving an .onnx file needs onnxruntime: pip install 'hiervision[export]' "
                             f"({e.name} missing)") from None
    raise FileNotFoundError(f"{p}: neither a run folder nor an .onnx file")
