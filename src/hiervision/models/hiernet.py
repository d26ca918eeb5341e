"""HierNet (Tempfli & Sándor): a backbone cut into a tree of routes, one router classifier per node.

Every root-to-leaf route of the network is the whole backbone: a shared trunk (stem + the first
``split`` residual blocks), then one branch per inner node of the taxonomy holding the next blocks
(copies, so each branch learns its own weights), down to the last block. In each inner node a
router — optional extra blocks (Sec. 3.3, the backbone's next blocks, used only by the router),
global average pooling and a linear layer — scores the node's children.

* **Conditional** output (training, Sec. 3.2): every branch is computed; a class's probability is its
  leaf-level softmax times the router probabilities along its path. The same product gives every
  node's route probability (``scores``), and a coarse-only label is trained by its node's probability.
* **Routing** (Algorithm 1, ``eval_mode="routing"``): follow the argmax router from the root and
  evaluate only that route. Images are batched by route — each node runs once on the images routed
  to it — so one image costs one backbone pass plus its routers.

``split``: blocks in the trunk (default 70 % of them, the paper's best range); a list cuts deeper trees
level by level (``[s1, s2]``: trunk to block ``s1``, depth-1 branches to ``s2``, deeper branches to
the end; a repeated value leaves a level's branches empty, so ``[6, 6, 6]`` branches at depth 3). A
node whose children are all classes always runs to the last block. Nodes with one child need no
router; when that child is a class, no branch either.

Transfer (Sec. 5.4): give a trained backbone — a flat run's ``best.pt`` works — as
``backbone_kwargs.pretrained_path``; trunk, branches and extra blocks are copies of its weights.
Backbones need ``stem`` and ``blocks`` (the CIFAR ResNets, ELU ResNets, WRN, wider-ResNet); a final
``norm``/``act`` pair (pre-activation nets) is copied to the end of every route.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from hiervision.decoding import Prediction, best_leaf_below, end_mask, full_precision
from hiervision.losses import check_loss_type, hxe_loss, soft_label_loss
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.registry import register_model
from hiervision.taxonomy import Taxonomy

__all__ = ["HierNet"]


class _Router(nn.Module):
    """Extra blocks (router only), global average pooling, dropout, linear over the node's children."""

    def __init__(self, extra: nn.Module, channels: int, num_children: int, dropout: float) -> None:
        super().__init__()
        self.extra = extra
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.extra(x).mean(dim=(2, 3))))


class HierNet(HierarchicalClassifier):
    """Tempfli & Sándor's HierNet on any taxonomy (see the module docstring).

    Args:
        split: trunk length in residual blocks, or a list of cut points per depth.
        extra_blocks: blocks added before each router (the backbone's next ones; none where the
            route has reached the last block, as for the paper's leaf nodes).
        dropout: before every router's linear layer.
        eval_mode: ``"conditional"`` or ``"routing"`` — how :meth:`predict` works in eval mode.
    """

    eval_modes = ("conditional", "routing")

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        split: int | Sequence[int] | None = None,
        extra_blocks: int = 0,
        dropout: float = 0.0,
        eval_mode: str = "conditional",
        loss_type: str = "ce",
        loss_beta: float = 10.0,
        loss_alpha: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(taxonomy, **kwargs)
        if self.multi_label:
            raise ValueError("model hiernet is single-label (one route per image)")
        # the conditional output is a softmax over the leaves (products of routers): the flat losses apply
        self.loss_type = check_loss_type(loss_type, ("ce", "soft_labels", "hxe"), "hiernet")
        self.loss_beta, self.loss_alpha = float(loss_beta), float(loss_alpha)
        net = self.backbone
        if not hasattr(net, "stem") or not hasattr(net, "blocks"):
            raise ValueError(f"model hiernet: backbone {type(net).__name__} has no 'stem' and 'blocks' to cut")
        blocks = list(net.blocks)
        nb = len(blocks)
        cuts = [round(0.7 * nb)] if split is None else ([int(split)] if isinstance(split, int) else
                                                         [int(s) for s in split])
        if not cuts or any(not 1 <= c < nb for c in cuts) or cuts != sorted(cuts):
            raise ValueError(f"model.split: cut points must not decrease and lie within 1..{nb - 1} (the backbone "
                             f"has {nb} blocks), got {split}")
        if extra_blocks < 0:
            raise ValueError(f"model.extra_blocks must be ≥ 0, got {extra_blocks}")
        tail = [net.norm, net.act] if hasattr(net, "norm") and hasattr(net, "act") else []
        channels = self._block_channels(net, blocks, self.in_chans)
        self.split, self.extra_blocks = cuts, int(extra_blocks)
        self.set_eval_mode(eval_mode)

        def ops(start: int, end: int) -> nn.Sequential:
            """Copies of blocks [start, end), plus the final norm/act where the route ends."""
            mods = [copy.deepcopy(b) for b in blocks[start:end]]
            if end == nb and start < end:
                mods += [copy.deepcopy(m) for m in tail]
            return nn.Sequential(*mods)

        kids = taxonomy.children
        inner = [n for level in ((0,), *taxonomy.levels) for n in level if kids[n]]  # parents first
        self.trunk = nn.Sequential(copy.deepcopy(net.stem), *ops(0, cuts[0]))
        end = {0: cuts[0]}
        self.edges, self.routers = nn.ModuleDict(), nn.ModuleDict()
        for n in inner:
            d = taxonomy.depth(n)
            if n:
                start = end[taxonomy.parents[n]]
                stop = nb if all(not kids[c] for c in kids[n]) or d >= len(cuts) else max(cuts[d], start)
                end[n] = stop
                if len(kids[n]) > 1 or kids[kids[n][0]]:  # a lone class below needs no features
                    self.edges[str(n)] = ops(start, stop)
            if len(kids[n]) > 1:
                stop = min(end[n] + self.extra_blocks, nb)
                self.routers[str(n)] = _Router(ops(end[n], stop), channels[stop - 1], len(kids[n]), dropout)
        del self.backbone  # its weights live on, copied, in trunk / edges / routers
        self.register_buffer("leaf_mask", end_mask(taxonomy, "leaves"), persistent=False)
        # (N+1, max children) node ids, row n = n's children: indexing on the device, no list → tensor per call
        width = max(len(kids[n]) for n in inner)
        child_table = torch.zeros(taxonomy.num_nodes, width, dtype=torch.long)
        for n in inner:
            child_table[n, : len(kids[n])] = torch.tensor(kids[n])
        self.register_buffer("child_table", child_table, persistent=False)
        self._inner = inner

    @staticmethod
    @torch.no_grad()
    def _block_channels(net: nn.Module, blocks: list[nn.Module], in_chans: int) -> list[int]:
        """Output channels after each block (a dry run on a small image; BN statistics untouched)."""
        was = net.training
        net.eval()
        x = net.stem(torch.zeros(1, in_chans, 32, 32))
        out = []
        for b in blocks:
            x = b(x)
            out.append(x.shape[1])
        net.train(was)
        return out

    def set_eval_mode(self, mode: str) -> None:
        """``"conditional"`` (every branch, product of probabilities) or ``"routing"`` (one route per image)."""
        if mode not in self.eval_modes:
            raise ValueError(f"model.eval_mode must be one of {', '.join(self.eval_modes)}, got {mode!r}")
        self.eval_mode = mode

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        convs = [*self.trunk.parameters(), *self.edges.parameters()]
        routers = list(self.routers.parameters())
        return {"backbone": convs, "cnn": convs, "head": routers, "rnn": routers}

    # -- conditional: every branch -----------------------------------------------------------------
    def _node_logprob(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N+1)`` log-probability of reaching each node (the product of routers on its path)."""
        tax = self.taxonomy
        feats = {0: self.trunk(images)}
        lp = images.new_zeros(len(images), tax.num_nodes, dtype=torch.float32)
        for n in self._inner:
            if n:
                p = tax.parents[n]
                feats[n] = self.edges[str(n)](feats[p]) if str(n) in self.edges else feats[p]
            kids = self.child_table[n, : len(tax.children[n])]
            if str(n) in self.routers:
                step = self.routers[str(n)](feats[n]).float().log_softmax(1)
                lp[:, kids] = lp[:, n : n + 1] + step
            else:  # one child: it inherits its parent's log-probability (a copy: with one image both views alias)
                lp[:, kids] = lp[:, n : n + 1].clone()
        return lp

    # -- routing: Algorithm 1, batched by route ----------------------------------------------------
    def _route(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each node runs once, on the images routed to it. One host sync per router (the sizes of
        its children's groups, which the next kernels' shapes depend on); nodes without a router
        (one child) pass their images on without any."""
        tax = self.taxonomy
        b = len(images)
        node = torch.zeros(b, dtype=torch.long, device=images.device)
        lp = torch.zeros(b, device=images.device)
        scores = torch.zeros(b, tax.num_nodes, device=images.device)

        def visit(n: int, x: torch.Tensor, idx: torch.Tensor) -> None:
            kids = tax.children[n]
            if str(n) in self.routers:
                best_lp, best = self.routers[str(n)](x).float().log_softmax(1).max(1)
                lp[idx] += best_lp
                child = self.child_table[n][best]
                # group the images by chosen child: one sort on the device, one sync for the group sizes
                order = best.argsort(stable=True)
                # (bincount would sync twice on CUDA: once for its output size, once here)
                counts = torch.zeros(len(kids), dtype=torch.long, device=best.device)
                sizes = counts.scatter_add_(0, best, torch.ones_like(best)).tolist()
                groups = zip(kids, x[order].split(sizes), idx[order].split(sizes))
            else:
                child = self.child_table[n, :1].expand(len(idx))
                groups = zip(kids, [x], [idx])
            scores[idx, child] = lp[idx].exp()
            node[idx] = child  # the deepest node reached so far; a leaf's is final
            for c, xs, ids in groups:
                if len(ids) and tax.children[c]:
                    visit(c, self.edges[str(c)](xs) if str(c) in self.edges else xs, ids)

        visit(0, self.trunk(images), torch.arange(b, device=images.device))
        return {"route": node, "route_logprob": lp, "route_scores": scores}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training and self.eval_mode == "routing":
            return self._route(images)
        return {"node_logprob": self._node_logprob(images)}

    def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        # cross-entropy on the conditional output; a coarse-only label: -log P(route passes its node)
        if self.loss_type == "ce":
            return -outputs["node_logprob"].gather(1, targets.unsqueeze(1)).mean()
        leaves = self.leaf_mask.nonzero().squeeze(1)
        logp = outputs["node_logprob"][:, leaves]
        if self.loss_type == "soft_labels":
            return soft_label_loss(logp, targets, leaves, self.taxonomy, self.loss_beta)
        return hxe_loss(logp, targets, leaves, self.taxonomy, self.loss_alpha)

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        paths = self.tables.paths
        if "route" in outputs:
            node = outputs["route"]
            return Prediction(paths[node], outputs["route_scores"], outputs["route_logprob"].exp())
        lp = outputs["node_logprob"]
        best, node = lp.masked_fill(~self.leaf_mask, float("-inf")).max(1)
        return Prediction(paths[node], lp.exp(), best.exp())

    @full_precision
    def decode_given(self, outputs: dict[str, torch.Tensor], given: torch.Tensor) -> Prediction:
        """The most probable class below ``given`` (conditional output)."""
        if "route" in outputs:
            return super().decode_given(outputs, given)
        lp = outputs["node_logprob"]  # already whole-path log-probabilities
        node, best = best_leaf_below(self.tables, lp, given)
        return Prediction(self.tables.paths[node], lp.exp(), best.exp())

    def decoder_settings(self) -> dict:
        return {"kind": "routing" if self.eval_mode == "routing" else "exact", "end_nodes": "leaves"}

    def export_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        lp = self._node_logprob(images)  # already whole-path log-probabilities
        return {"scores": lp.exp(), "path_logprob": lp}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split}, extra_blocks={self.extra_blocks}, eval={self.eval_mode}"


@register_model("hiernet")
def hiernet(taxonomy: Taxonomy, **kwargs) -> HierNet:
    """Tempfli & Sándor's HierNet: a tree-shaped CNN cut from a CIFAR-style backbone."""
    return HierNet(taxonomy, **kwargs)
