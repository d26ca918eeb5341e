"""What the server predicts with: one small interface over a trained run (PyTorch) or an ONNX file.

A predictor turns decoded images into result records (the fields of ``hiervision predict``:
``path``, ``path_ids``, ``path_probability``, ``node_probabilities``, ``top_k``), so the server,
the micro-batcher and the web page never care which backend answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hiervision.records import TreeView, prediction_record, top_k_ends
from hiervision.taxonomy import Taxonomy

__all__ = ["ImagePredictor", "TorchRunPredictor", "load_predictor"]


class ImagePredictor(Protocol):
    """The server's view of a model."""

    taxonomy: Taxonomy
    in_chans: int
    #: ``(H, W)`` every image is resized to, or ``None`` to keep the upload's size
    image_size: tuple[int, int] | None

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """``uint8`` arrays ``H×W`` or ``H×W×C`` (already at ``image_size``) → one record per image."""
        ...


def _records(tree: TreeView, paths: np.ndarray, scores: np.ndarray, path_prob: np.ndarray, top_k: int,
             ends: np.ndarray) -> list[dict[str, Any]]:
    """Records (:func:`hiervision.records.prediction_record`) of a batch's decoded paths ``(B, D)``, node
    scores ``(B, N+1)`` and path probabilities ``(B,)``. Alternatives rank the allowed path ends by their
    score; ``node_scores`` (every node's score) is added so the web page can colour the whole tree."""
    nodes, probs = top_k_ends(np.where(ends, scores, 0.0), top_k)
    out = []
    for i in range(len(paths)):
        alts = [(tree.path(int(n)), float(p)) for n, p in zip(nodes[i], probs[i]) if n > 0]
        rec = prediction_record("", tree, paths[i], float(path_prob[i]), scores[i], alts)
        rec["node_scores"] = [round(float(s), 6) for s in scores[i]]
        out.append(rec)
    return out


class TorchRunPredictor:
    """A run folder written by ``hiervision train``, predicted with PyTorch on the CPU."""

    def __init__(self, run_dir: str | Path, top_k: int = 3, checkpoint: str = "best") -> None:
        import torch

        from hiervision.training import load_run

        _, self.taxonomy, self.model, meta = load_run(run_dir, which=checkpoint)
        self.in_chans = int(meta.get("in_chans", 3))
        size = meta.get("image_size")
        self.image_size = (size, size) if isinstance(size, int) else (tuple(int(s) for s in size) if size else None)
        self.top_k = top_k
        self._tree = TreeView(self.taxonomy.names, self.taxonomy.parents)
        # where a path may end: leaves, or every class of a variable-depth tree whose labels stop inside it
        stop_inside = meta.get("end_nodes") == "all" or getattr(self.model, "end_nodes", None) == "all"
        self._ends = self._tree.end_mask("all" if stop_inside else "leaves")
        self._mean = torch.tensor(meta.get("mean", [0.0] * self.in_chans), dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(meta.get("std", [1.0] * self.in_chans), dtype=torch.float32).view(1, -1, 1, 1)

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        batch = np.stack([im[..., None] if im.ndim == 2 else im for im in images])  # B×H×W×C
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            pred = self.model.predict((x - self._mean) / self._std)
        return _records(self._tree, pred.paths.numpy(), pred.scores.float().numpy(),
                        pred.path_prob.float().numpy(), self.top_k, self._ends)


def load_predictor(path: str | Path, top_k: int = 3) -> ImagePredictor:
    """A run folder → :class:`TorchRunPredictor`; an ``.onnx`` file → the PyTorch-free runtime."""
    p = Path(path)
    if p.is_dir():
        return TorchRunPredictor(p, top_k=top_k)
    if p.suffix.lower() == ".onnx" and p.is_file():
        # HOOK (branch export): hiervision.runtime.Predictor is the ONNX backend; it keeps this interface
        try:
            from hiervision.runtime import Predictor  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError(f"{p}: serving an .onnx file needs hiervision.runtime and onnxruntime ({e})") from None

        return Predictor(p, top_k=top_k)  # type: ignore[return-value]
    raise FileNotFoundError(f"{p}: neither a run folder nor an .onnx file")
