"""The contract every hiervision model keeps, and the flow they share.

A model is a plain ``nn.Module`` built on one :class:`~hiervision.taxonomy.Taxonomy` and one
backbone. Methods override only what differs: :meth:`forward` (raw outputs), :meth:`loss`
(targets are node ids, or path-end marks for multi-label) and :meth:`decode` (outputs →
:class:`~hiervision.decoding.Prediction`). ``predict`` and the parameter groups used by freeze
schedules are shared, the way HiClass's local classifiers share one base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hiervision.decoding import Prediction, prefix_logprob
from hiervision.models.backbones import create_backbone
from hiervision.taxonomy import Taxonomy, TreeTables

__all__ = ["HierarchicalClassifier"]


class HierarchicalClassifier(nn.Module):
    """Base class: backbone → head → per-method decoding into tree paths.

    Every head's constructor takes the taxonomy, its own keyword arguments, and passes the rest
    (``**kwargs``: the ones below) here unchanged: one constructor path for every model.

    ``extendable``: the head's output layer is ``fc``, one row per entry of its ``classes``, so new classes
    can join a trained model (:mod:`hiervision.extend`).

    Args:
        taxonomy: the class tree every output refers to.
        backbone: a registered backbone name or a module keeping the backbone contract
            (``forward_features``, ``feature_info``, ``num_features``).
        in_chans: image channels (used when ``backbone`` is a name).
        multi_label: sigmoid outputs and a set of paths per image (threshold stored with the model).
        image_size: training image size (``int`` or ``(H, W)``); heads that read intermediate
            feature maps size themselves from it.
    """

    extendable = False

    #: other ways the model can predict (HierNet: conditional, routing); training reports each on test
    eval_modes: tuple[str, ...] = ()
    #: DDP: some parameters may get no gradient in a step (e.g. a branch no image reached)
    ddp_unused_parameters: bool = False

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        backbone: str | nn.Module = "resnet20",
        in_chans: int = 3,
        multi_label: bool = False,
        backbone_kwargs: dict | None = None,
        image_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__()
        self.image_size = image_size if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if not isinstance(taxonomy, Taxonomy):
            raise TypeError(f"taxonomy must be a hiervision.Taxonomy, got {type(taxonomy).__name__}")
        self.taxonomy = taxonomy
        # the tree's lookup tables as non-persistent buffers: they follow .to(device), never leave it per step
        self.tables = TreeTables(taxonomy)
        self.multi_label, self.in_chans = multi_label, in_chans
        self.backbone = (
            create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
            if isinstance(backbone, str)
            else backbone
        )
        # decision threshold for multi-label decoding, tuned on validation data and saved with the weights
        self.register_buffer("threshold", torch.tensor(0.5))
        # calibration temperature fitted on validation data after training (hiervision.decisions): it
        # rescales the end-class distribution read from the node scores; a scalar, or one per level
        self.register_buffer("temperature", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # checkpoints written before the temperature existed load as uncalibrated (T = 1); the buffer
        # takes the saved shape (one temperature, or one per level)
        saved = state_dict.setdefault(prefix + "temperature", torch.tensor(1.0))
        if saved.shape != self.temperature.shape:
            self.temperature = torch.empty(saved.shape, device=self.temperature.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- to override ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs from the backbone's pooled ``(B, num_features)`` features. Heads that read only
        those implement it (and ``forward`` is then ``forward_head(backbone(images))``), which lets
        training run on features computed once (``train.freeze_backbone``)."""
        raise NotImplementedError(f"model {type(self).__name__} does not run on one backbone's pooled features: "
                                  "train.precompute_features does not apply to it")

    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        """Like :meth:`decode`, but every path must pass through ``given`` ``(B,)`` node ids."""
        raise NotImplementedError(f"model {type(self).__name__} cannot condition its prediction on a given label")

    # -- shared ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Paths (node ids), per-node scores and path probability for a batch of images."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(self(images))
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict_given(self, images: torch.Tensor, given: torch.Tensor) -> Prediction:
        """Predict the rest of the path when part of it is known: ``given`` ``(B,)`` node ids that
        every returned path passes through (Guo et al.'s CNN-RNN*, which is fed the true coarse label;
        also how coarse-only samples get pseudo fine labels)."""
        was_training = self.training
        self.eval()
        try:
            return self.decode_given(self(images), given)
        finally:
            self.train(was_training)

    def set_beam_width(self, width: int) -> None:
        """Decode with the tree-restricted beam search at this width from now on (1 = greedy): a decoding
        choice, tuned on val without retraining. Heads whose best path needs no search refuse."""
        raise ValueError(f"model {type(self).__name__}: its decoding has no beam search to set a width for")

    def path_logprob(self, outputs: dict[str, torch.Tensor], paths: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-probability the decoder gives ``paths`` ``(B, D)`` (PAD after the end), fed the
        path itself: the score its beam search ranks by. Comparing the true path's score with the
        decoded one's tells a search error (a wider beam would help) from a model error (it would not)."""
        raise ValueError(f"model {type(self).__name__}: its decoding has no beam search whose score to read")

    # -- deployment: what hiervision.export puts in the graph and how hiervision.runtime decodes it ------
    def decoder_settings(self) -> dict:
        """How :mod:`hiervision.runtime` turns this model's exported outputs into the paths ``predict`` gives:
        ``{"kind": ..., "end_nodes": ..., ...}`` with a kind the runtime knows (``exact``: the most probable
        path ending at an allowed node; ``independent``: each level's argmax; ``routing``: follow the best
        child; ``beam_steps``: beam search over exported per-step log-probabilities; ``beam``: beam search
        calling the exported decoder step, whose state tensors ``"state"`` names (with ``"candidates"``: the
        step scores only the tokens it is asked for, see :meth:`export_step`); ``multi_label``: every
        path whose nodes pass ``threshold``). Multi-label heads share the last one."""
        if self.multi_label:
            return {"kind": "multi_label", "end_nodes": "leaves", "threshold": float(self.threshold)}
        raise NotImplementedError(f"model {type(self).__name__} does not say how it is decoded when exported")

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The exported graph of a head that scores every path at once: ``scores`` ``(B, N+1)`` (its
        :attr:`Prediction.scores`), ``path_logprob`` ``(B, N+1)`` (log-probability of the path ending at each
        node), and any other output its decoder kind reads (``step_logprob`` for ``beam_steps``)."""
        raise NotImplementedError(f"model {type(self).__name__} has no exportable graph")

    def export_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Autoregressive heads (decoder kind ``beam``): images → the decoder's start state, batch-first."""
        raise NotImplementedError(f"model {type(self).__name__} has no exportable decoder")

    def export_step(self, tokens: torch.Tensor, *state: torch.Tensor,
                    candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Autoregressive heads: ONE decoder step, ``(tokens, *state) → (next-token log-probs (M, N+1), *state)``.
        The search stays outside the graph (in numpy), so every beam width decodes the same exported step.
        A head whose :meth:`decoder_settings` say ``"candidates": true`` (a children softmax) takes the tokens
        the search may take next, ``candidates`` ``(U,)``, and returns their raw logits ``(M, U)`` instead; the
        runtime normalises each row over the tokens allowed after its node — on a big tree a step then costs
        what its candidates cost, not N."""
        raise NotImplementedError(f"model {type(self).__name__} has no exportable decoder")

    def _multi_label_outputs(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exported outputs of independent sigmoid scores ``(B, N+1)``."""
        return {"scores": scores, "path_logprob": prefix_logprob(self.tables, torch.log(scores.clamp_min(1e-12)))}

    def backbones(self) -> list[nn.Module]:
        """The image encoders whose parameters form the ``backbone`` group (an ensemble has several)."""
        return [self.backbone]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups that freeze schedules refer to (``backbone``/``cnn`` and ``head``/``rnn``)."""
        backbone = [p for module in self.backbones() for p in module.parameters()]
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return {"backbone": backbone, "cnn": backbone, "head": head, "rnn": head}

    def extra_repr(self) -> str:
        return f"taxonomy={self.taxonomy!r}, multi_label={self.multi_label}"
