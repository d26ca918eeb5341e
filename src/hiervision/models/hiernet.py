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

``branch_depth`` (big trees, issue 23): only inner nodes at depth < ``k`` get their own branch and router;
a node at depth ``k - 1`` with deeper nodes below runs its route to the last block and scores its whole
sub-tree with one linear layer (a softmax among each node's siblings, path log-probabilities summed level
by level), so the sub-trees cost O(nodes) in all, not a module per node. ``None`` is the paper (every
level). The default, ``"auto"``, keeps the paper on every tree with at most ``AUTO_ROUTERS`` (256) routers —
each one is a module, a kernel launch and a Python step, fine for the papers' trees (any tree of ≤ 257
classes: CIFAR-100, Tiny-ImageNet's WordNet tree) but 1,400 of them on a 10,000-node tree cost 7× a flat
step. A bigger tree gets the deepest ``k`` whose branches add at most half the backbone's blocks (a
conditional train step then stays near 1.5× the backbone's, the issue's budget) and at most
``BIG_TREE_ROUTERS`` (64) routers; on trees whose top already branches into several groups that is
``k = 1``: the whole backbone and one per-parent softmax over the tree.

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

__all__ = ["AUTO_ROUTERS", "BIG_TREE_ROUTERS", "HierNet"]

#: ``branch_depth="auto"``: every level (the paper) on trees with at most this many routers
AUTO_ROUTERS = 256
#: ... and on bigger trees at most this many routers (with branches adding ≤ half the backbone's blocks)
BIG_TREE_ROUTERS = 64


class _Router(nn.Module):
    """Extra blocks (router only), global average pooling, dropout, linear over the node's children."""

    def __init__(self, extra: nn.Module, channels: int, num_children: int, dropout: float) -> None:
        super().__init__()
        self.extra = extra
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.extra(x).mean(dim=(2, 3))))


class _SubtreeRouter(nn.Module):
    """Every node below ``top`` from the features where ``top``'s route ends: one linear layer over the
    sub-tree's nodes, a softmax among each node's siblings, path log-probabilities (relative to ``top``)
    summed level by level. Nodes are stored breadth-first, so each level is a slice and siblings share a
    group id; O(sub-tree size) memory per image."""

    def __init__(self, taxonomy: Taxonomy, top: int, channels: int, dropout: float) -> None:
        super().__init__()
        kids = taxonomy.children
        ids, group, child_group, parent_pos, bounds = [], [], [], [], []
        gid, pos = {top: 0}, {top: -1}
        level = [top]
        while level:
            below = []
            for p in level:
                for c in kids[p]:
                    pos[c] = len(ids)
                    ids.append(c)
                    group.append(gid[p])
                    if bounds:  # below the first level: the parent's position within the level above
                        parent_pos.append(pos[p] - (bounds[-2] if len(bounds) > 1 else 0))
                    if kids[c]:
                        gid[c] = len(gid)
                        below.append(c)
                    child_group.append(gid.get(c, -1))
            bounds.append(len(ids))
            level = below
        self.sizes, self.groups = [b - a for a, b in zip([0, *bounds], bounds)], len(gid)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, len(ids))
        for name, values in (("ids", ids), ("group", group), ("child_group", child_group),
                             ("parent_pos", parent_pos)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` log-probability of the path from ``top`` to each node below it (order: :attr:`ids`), a
        view of an ``(M, B)`` tensor: sums and maxima over sibling groups then run along rows, several times
        faster than along columns."""
        pooled = self.dropout(x.mean(dim=(2, 3)))
        z = torch.addmm(self.fc.bias[:, None], self.fc.weight, pooled.t()).float()  # (M, B)
        rows = self.group[:, None].expand(-1, z.shape[1])
        top = z.new_full((self.groups, z.shape[1]), float("-inf")).scatter_reduce(0, rows, z.detach(), "amax")
        # without autograd (and outside export, whose graph would keep copies for in-place ops: more memory
        # in onnxruntime) the (M, B) passes run in place: at 10^5 nodes each fresh (M, B) tensor costs a
        # page-faulting allocation, and the level sums need no final cat
        grad = torch.is_grad_enabled() or torch.compiler.is_compiling()
        z = z - top.index_select(0, self.group) if grad else z.sub_(top.index_select(0, self.group))  # max logit 0
        sums = z.new_zeros(top.shape).scatter_add(0, rows, z.exp())
        local = z - sums.log().index_select(0, self.group) if grad else z.sub_(sums.log_().index_select(0, self.group))
        # one split (whose backward is one cat), not a slice per level (each slice's backward is a (M, B) tensor)
        levels = local.split(self.sizes)
        out = [levels[0]]
        for level, parent in zip(levels[1:], self.parent_pos.split(self.sizes[1:])):
            out.append(level + out[-1].index_select(0, parent) if grad else level.add_(out[-1].index_select(0, parent)))
        return (torch.cat(out) if grad else local).t()

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 inside the sub-tree: from ``top``, each group's best child (the first on ties)
        down to a leaf. ``(B, L)`` node ids visited (the leaf repeated once reached) and their path
        log-probabilities relative to ``top``."""
        path = self(x).t()  # (M, B), contiguous: per-group reductions along rows, as in forward
        m, b = path.shape
        rows = self.group[:, None].expand(-1, b)
        best = path.new_full((self.groups, b), float("-inf")).scatter_reduce(0, rows, path, "amax")
        at = torch.arange(m, device=path.device)[:, None].expand(-1, b)
        first = at.masked_fill(path != best.index_select(0, self.group), m)
        choice = torch.full_like(first[: self.groups], m).scatter_reduce(0, rows, first, "amin")  # (G, B)
        g = torch.zeros(b, dtype=torch.long, device=path.device)
        done = torch.zeros(b, dtype=torch.bool, device=path.device)
        cur, visited = g, []
        for _ in self.sizes:
            cur = torch.where(done, cur, choice.gather(0, g[None]).squeeze(0))
            visited.append(cur)
            done = self.child_group[cur] < 0
            g = self.child_group[cur].clamp_min(0)
        visited = torch.stack(visited, 1)
        path = path.t()
        return self.ids[visited], path.gather(1, visited)


class HierNet(HierarchicalClassifier):
    """Tempfli & Sándor's HierNet on any taxonomy (see the module docstring).

    Args:
        split: trunk length in residual blocks, or a list of cut points per depth.
        extra_blocks: blocks added before each router (the backbone's next ones; none where the
            route has reached the last block, as for the paper's leaf nodes).
        dropout: before every router's linear layer.
        eval_mode: ``"conditional"`` or ``"routing"`` — how :meth:`predict` works in eval mode.
        branch_depth: inner nodes at depth < this get a branch and router; the sub-trees below depth
            ``branch_depth - 1`` one linear layer each. ``None``: every level; ``"auto"``: see the module docstring.
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
        branch_depth: int | str | None = "auto",
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
        if branch_depth == "auto":
            branch_depth = self._auto_depth(taxonomy, inner, cuts, nb)
        elif branch_depth is not None and (isinstance(branch_depth, bool) or not isinstance(branch_depth, int)
                                           or branch_depth < 1):
            raise ValueError(f"model.branch_depth must be an integer ≥ 1, 'auto' or null, got {branch_depth!r}")
        self.branch_depth = branch_depth
        routed, frontier, end = self._layout(taxonomy, inner, cuts, nb, branch_depth)
        self.trunk = nn.Sequential(copy.deepcopy(net.stem), *ops(0, end[0]))
        self.edges, self.routers = nn.ModuleDict(), nn.ModuleDict()
        for n in routed:
            if n and self._has_edge(kids, n):
                self.edges[str(n)] = ops(end[taxonomy.parents[n]], end[n])
            if n in frontier:
                self.routers[str(n)] = _SubtreeRouter(taxonomy, n, channels[-1], dropout)
            elif len(kids[n]) > 1:
                stop = min(end[n] + self.extra_blocks, nb)
                self.routers[str(n)] = _Router(ops(end[n], stop), channels[stop - 1], len(kids[n]), dropout)
        del self.backbone  # its weights live on, copied, in trunk / edges / routers
        self.register_buffer("leaf_ids", end_mask(taxonomy, "leaves").nonzero().squeeze(1), persistent=False)
        # the columns _node_logprob builds, in order (each routed node's children or sub-tree): one index_copy
        # places them all, no per-node write into (B, N+1)
        covered = [0]
        self._first_child: dict[int, int] = {}  # routed node → where its children start in child_ids
        for n in routed:
            if n not in frontier:
                self._first_child[n] = len(covered) - 1
            covered += self.routers[str(n)].ids.tolist() if n in frontier else list(kids[n])
        if sorted(covered) != list(range(taxonomy.num_nodes)):
            raise AssertionError("hiernet: the routed nodes and sub-trees must cover every node once")
        self.register_buffer("child_ids", torch.tensor(covered[1:]), persistent=False)
        self._routed, self._frontier = routed, frontier
        routed_set = set(routed)
        self._routed_kids = {n: [(j, c) for j, c in enumerate(kids[n]) if c in routed_set]
                             for n in routed if n not in frontier}

    @staticmethod
    def _has_edge(kids: Sequence[Sequence[int]], n: int) -> bool:
        """A (non-root) routed node has a branch unless its lone child is a class (which needs no features)."""
        return len(kids[n]) > 1 or bool(kids[kids[n][0]])

    @staticmethod
    def _layout(taxonomy: Taxonomy, inner: list[int], cuts: list[int], nb: int,
                branch_depth: int | None) -> tuple[list[int], set[int], dict[int, int]]:
        """The routed inner nodes (parents first), the frontier (routed nodes at depth ``branch_depth - 1``
        with deeper nodes below: one sub-tree classifier each) and the block where each route ends."""
        kids, depth = taxonomy.children, taxonomy.depths
        routed = [n for n in inner if branch_depth is None or depth[n] < branch_depth]
        frontier = {n for n in routed if depth[n] == (branch_depth or 0) - 1 and any(kids[c] for c in kids[n])}
        end = {0: nb if 0 in frontier else cuts[0]}
        for n in routed[1:]:
            d, start = depth[n], end[taxonomy.parents[n]]
            leafy = n in frontier or all(not kids[c] for c in kids[n]) or d >= len(cuts)
            end[n] = nb if leafy else max(cuts[d], start)
        return routed, frontier, end

    def _auto_depth(self, taxonomy: Taxonomy, inner: list[int], cuts: list[int], nb: int) -> int | None:
        """``branch_depth="auto"`` (see the module docstring)."""
        kids = taxonomy.children
        if sum(len(kids[n]) > 1 for n in inner) <= AUTO_ROUTERS:
            return None
        best = 1
        for k in range(2, taxonomy.max_depth + 1):
            routed, frontier, end = self._layout(taxonomy, inner, cuts, nb, k)
            blocks = end[0] - nb + sum(end[n] - end[taxonomy.parents[n]] for n in routed[1:] if self._has_edge(kids, n))
            blocks += sum(min(end[n] + self.extra_blocks, nb) - end[n] for n in routed
                          if n not in frontier and len(kids[n]) > 1)
            routers = sum(n in frontier or len(kids[n]) > 1 for n in routed)
            if 2 * blocks > nb or routers > BIG_TREE_ROUTERS:
                break
            best = k
        return best

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
        feats = {0: self.trunk(images)}
        reach = {0: images.new_zeros(len(images), 1, dtype=torch.float32)}  # log P(route reaches routed node)
        columns = [reach[0]]
        for n in self._routed:
            if n:
                p = self.taxonomy.parents[n]
                feats[n] = self.edges[str(n)](feats[p]) if str(n) in self.edges else feats[p]
            if n in self._frontier:  # the whole sub-tree below, already summed along its paths
                columns.append(reach[n] + self.routers[str(n)](feats[n]))
                continue
            if str(n) in self.routers:
                step = reach[n] + self.routers[str(n)](feats[n]).float().log_softmax(1)
            else:  # one child: it inherits its parent's log-probability
                step = reach[n]
            columns.append(step)
            for j, c in self._routed_kids[n]:
                reach[c] = step[:, j : j + 1]
        # placed as rows (one node per row: each copy is contiguous), the root's row stays 0; (B, N+1) view
        rows = [c.t() for c in columns[1:]]
        out = columns[0].new_zeros(self.taxonomy.num_nodes, len(images))
        return out.index_copy(0, self.child_ids, torch.cat(rows) if len(rows) > 1 else rows[0]).t()

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
            if n in self._frontier:  # the sub-tree's own descent, all images at once
                nodes, path_lp = self.routers[str(n)].route(x)
                scores[idx[:, None], nodes] = (lp[idx, None] + path_lp).exp()
                node[idx], lp[idx] = nodes[:, -1], lp[idx] + path_lp[:, -1]
                return
            first = self._first_child[n]
            if str(n) in self.routers:
                best_lp, best = self.routers[str(n)](x).float().log_softmax(1).max(1)
                lp[idx] += best_lp
                child = self.child_ids[first : first + len(kids)][best]
                # group the images by chosen child: one sort on the device, one sync for the group sizes
                order = best.argsort(stable=True)
                # (bincount would sync twice on CUDA: once for its output size, once here)
                counts = torch.zeros(len(kids), dtype=torch.long, device=best.device)
                sizes = counts.scatter_add_(0, best, torch.ones_like(best)).tolist()
                groups = zip(kids, x[order].split(sizes), idx[order].split(sizes))
            else:
                child = self.child_ids[first : first + 1].expand(len(idx))
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
        logp = outputs["node_logprob"][:, self.leaf_ids]
        if self.loss_type == "soft_labels":
            return soft_label_loss(logp, targets, self.leaf_ids, self.taxonomy, self.loss_beta)
        return hxe_loss(logp, targets, self.leaf_ids, self.taxonomy, self.loss_alpha)

    @full_precision
    def decode(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        paths = self.tables.paths
        if "route" in outputs:
            node = outputs["route"]
            return Prediction(paths[node], outputs["route_scores"], outputs["route_logprob"].exp())
        lp = outputs["node_logprob"]
        # lp is the (B, N+1) view of a node-major table (_node_logprob): copy its leaf rows (contiguous) and
        # reduce along rows: a leaf mask over the view copies it column by column, and max over dim 0 is slow
        best, at = lp.t().index_select(0, self.leaf_ids).t().contiguous().max(1)
        node = self.leaf_ids[at]
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
        return (f"{super().extra_repr()}, split={self.split}, extra_blocks={self.extra_blocks}, "
                f"branch_depth={self.branch_depth}, eval={self.eval_mode}")


@register_model("hiernet", multi_label=False)
def hiernet(taxonomy: Taxonomy, **kwargs) -> HierNet:
    """Tempfli & Sándor's HierNet: a tree-shaped CNN cut from a CIFAR-style backbone."""
    return HierNet(taxonomy, **kwargs)
