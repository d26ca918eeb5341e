"""Dataset base classes and the split/subset/coarsening helpers every loader shares.

Keeping these in one place means every dataset splits, limits and coarsens labels the same
seeded way, so a run is reproducible from its config alone.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hiervision.data.splits import hash_unit
from hiervision.taxonomy import Taxonomy

__all__ = [
    "FeatureDataset",
    "FileImageDataset",
    "HierDataset",
    "TensorImageDataset",
    "channel_stats",
    "class_keys",
    "coarsen_labels",
    "keep_classes",
    "move_to_tree",
    "shared_data_dir",
    "split_fine_coarse",
    "stratified_split",
    "stratified_subset",
]


def shared_data_dir() -> Path:
    """Where real data sets live: ``$HIERVISION_DATA``, else ``<checkout>/../shared/data`` (this project's layout)."""
    return Path(os.environ.get("HIERVISION_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))


class HierDataset(Dataset):
    """Common interface: ``targets`` (long ``(n,)`` node ids or bool ``(n, N+1)`` path ends), ``taxonomy``, ``subset``.

    Targets are kept as one tensor so splitting, limiting and coarsening never have to touch images.
    ``ids`` name each sample stably (a relative path, or ``train/123`` for an official index): splits
    are drawn from them, so they do not move when other samples are added or removed.
    """

    targets: torch.Tensor
    taxonomy: Taxonomy
    coarse_mask: torch.Tensor
    ids: list[str]

    @property
    def multi_label(self) -> bool:
        return self.targets.dim() == 2

    def __len__(self) -> int:
        return len(self.targets)

    def _target(self, i: int) -> int | torch.Tensor:
        return self.targets[i].clone() if self.multi_label else int(self.targets[i])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> HierDataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def with_targets(self, targets: torch.Tensor, coarse_mask: torch.Tensor) -> HierDataset:
        """Same images, new labels (used for coarse-only labels); images are shared, not copied."""
        out = copy.copy(self)
        out.targets = targets
        out.coarse_mask = coarse_mask
        return out


class TensorImageDataset(HierDataset):
    """In-memory images as one uint8 tensor: float conversion per access, whole-batch indexing via ``.images``.

    Args:
        images: uint8 ``(n, C, H, W)``.
        targets: long ``(n,)`` node ids, or bool ``(n, N+1)`` path-end marks for multi-label data.
        taxonomy: the tree the targets refer to.
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, taxonomy: Taxonomy, ids: Sequence[str] | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (n, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        _check_targets(targets, taxonomy)
        self.images = images
        self.targets = targets
        self.taxonomy = taxonomy
        self.coarse_mask = torch.zeros(len(targets), dtype=torch.bool)
        self.ids = _ids(ids, len(targets))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        return self.images[i].float().div_(255), self._target(i)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TensorImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = TensorImageDataset(self.images[idx], self.targets[idx], self.taxonomy, _pick(self.ids, idx))
        out.coarse_mask = self.coarse_mask[idx]
        return out


class FeatureDataset(HierDataset):
    """Pre-computed ``(n, F)`` backbone features with the labels of the images they came from."""

    def __init__(self, features: torch.Tensor, source: HierDataset) -> None:
        if len(features) != len(source):
            raise ValueError(f"{len(features)} feature rows but {len(source)} samples")
        self.features = features
        self.targets = source.targets
        self.taxonomy = source.taxonomy
        self.coarse_mask = source.coarse_mask
        self.ids = source.ids

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        return self.features[i], self._target(i)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FeatureDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = copy.copy(self)
        out.features, out.targets, out.coarse_mask = self.features[idx], self.targets[idx], self.coarse_mask[idx]
        out.ids = _pick(self.ids, idx)
        return out


class FileImageDataset(HierDataset):
    """Lazily decoded images (one file read per item) for sets too big or too varied to hold in memory.

    Args:
        sources: one entry per image, passed to ``read``.
        targets: as in :class:`TensorImageDataset`.
        taxonomy: the tree.
        read: ``read(source) -> uint8 (C, H, W)`` tensor; raises ``ValueError`` naming the file when corrupt.
        ids: stable sample names (default: the sources).
    """

    def __init__(
        self,
        sources: Sequence[str],
        targets: torch.Tensor,
        taxonomy: Taxonomy,
        read: Callable[[str], torch.Tensor],
        ids: Sequence[str] | None = None,
    ) -> None:
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} files but {len(targets)} targets")
        _check_targets(targets, taxonomy)
        self.sources = list(sources)
        self.targets = targets
        self.taxonomy = taxonomy
        self.read = read
        self.coarse_mask = torch.zeros(len(targets), dtype=torch.bool)
        self.ids = _ids(self.sources if ids is None else ids, len(targets))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        return self.read(self.sources[i]).float().div_(255), self._target(i)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FileImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = FileImageDataset([self.sources[i] for i in idx.tolist()], self.targets[idx], self.taxonomy, self.read,
                               _pick(self.ids, idx))
        out.coarse_mask = self.coarse_mask[idx]
        return out


def _ids(ids: Sequence[str] | None, n: int) -> list[str]:
    """Given ids (checked: one per sample, no repeats), else positions: a set built in memory is its own index."""
    if ids is None:
        return [str(i) for i in range(n)]
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"{len(out)} sample ids for {n} samples")
    if len(set(out)) != n:
        raise ValueError("sample ids repeat; every sample needs its own id")
    return out


def _pick(ids: list[str], idx: torch.Tensor) -> list[str]:
    return [ids[i] for i in idx.tolist()]


def _check_targets(targets: torch.Tensor, taxonomy: Taxonomy) -> None:
    """Fail at construction, not mid-epoch, when a label is outside the tree."""
    if targets.dim() == 2:
        if targets.dtype != torch.bool or targets.shape[1] != taxonomy.num_nodes:
            raise ValueError(f"multi-label targets must be bool (n, {taxonomy.num_nodes}), got {targets.dtype} "
                             f"{tuple(targets.shape)}")
        return
    if targets.dtype != torch.long or targets.dim() != 1:
        raise ValueError(f"targets must be a long (n,) tensor, got {targets.dtype} {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 1 or targets.max() >= taxonomy.num_nodes):
        raise ValueError(f"target node ids must be in 1..{len(taxonomy)}, got {targets.min()}..{targets.max()}")


# ---------------------------------------------------------------------------------------------- splitting
def _strata(targets: torch.Tensor) -> np.ndarray:
    """Class id per sample for stratification; multi-label sets are not stratified (one stratum)."""
    if targets.dim() == 2:
        return np.zeros(len(targets), dtype=np.int64)
    return targets.numpy().astype(np.int64)


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split into ``(rest, held_out)`` index tensors, ``held_out`` ≈ ``fraction`` of every class.

    Samples are shuffled, grouped by class, and every ``1/fraction``-th position of the grouped
    order is held out, so the total is exactly ``floor(n * fraction)`` and each class gets its
    share to within one sample. Both outputs are sorted.
    """
    n = len(targets)
    if not 0 <= fraction < 1:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(_strata(targets)[perm], kind="stable")]
    pos = np.arange(n)
    # position j is held out when floor((j + 1) f) > floor(j f): exactly floor(n f) hits, evenly spread
    held = np.floor((pos + 1) * fraction + 1e-9).astype(np.int64) > np.floor(pos * fraction + 1e-9).astype(np.int64)
    return torch.from_numpy(np.sort(order[~held])), torch.from_numpy(np.sort(order[held]))


def stratified_subset(targets: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded, class-balanced subset of size ``min(k, n)`` (for quick runs)."""
    n = len(targets)
    if k >= n:
        return torch.arange(n)
    _, keep = stratified_split(targets, k / n, seed)
    if len(keep) < k:  # floating point left one short
        extra = np.setdiff1d(np.arange(n), keep.numpy())[: k - len(keep)]
        keep = torch.from_numpy(np.sort(np.concatenate([keep.numpy(), extra])))
    return keep[:k] if len(keep) > k else keep


def coarsen_labels(
    targets: torch.Tensor,
    taxonomy: Taxonomy,
    fraction: float,
    level: int,
    seed: int,
    ids: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of a seeded ``fraction`` of samples by their ancestor at depth ``level``.

    Simulates coarse-only annotation. Only samples deeper than ``level`` can be coarsened; exactly
    ``round(fraction * n)`` of them are (fewer only if not enough are eligible). With ``ids`` the
    choice is the eligible samples of lowest seeded id hash (stable when other samples come or go),
    else a seeded permutation of positions.

    Returns:
        ``(new_targets, coarse_mask)``.
    """
    if targets.dim() != 1:
        raise ValueError("data.coarse_fraction: not supported for multi-label datasets")
    if not 1 <= level < taxonomy.max_depth:
        raise ValueError(f"data.coarse_level: must be in 1..{taxonomy.max_depth - 1} for this tree, got {level}")
    depth = taxonomy.depth_tensor[targets]
    eligible = torch.nonzero(depth > level).flatten().numpy()
    count = min(round(fraction * len(targets)), len(eligible))
    chosen = np.sort(_draw(eligible, count, seed, ids, "coarse"))
    mask = torch.zeros(len(targets), dtype=torch.bool)
    mask[torch.from_numpy(chosen)] = True
    new = targets.clone()
    new[mask] = taxonomy.path_matrix[targets[mask], level - 1]
    return new, mask


def split_fine_coarse(
    targets: torch.Tensor,
    taxonomy: Taxonomy,
    fine_fraction: float,
    coarse_fraction: float,
    level: int,
    seed: int,
    coarse_labels: str = "coarse",
    ids: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guo et al.'s Sec. 4.2 set-up: a training set split into disjoint S_fine (full labels, a
    ``fine_fraction`` of it) and S_coarse (labels cut to depth ``level``, a ``coarse_fraction``);
    the rest is not used.

    S_coarse is :func:`coarsen_labels`'s choice (it does not depend on ``fine_fraction``) and S_fine
    a seeded draw from the other samples, so the protocols compared at one setting see the same sets.
    ``ids``: draw by seeded id hash instead of by position (see :func:`coarsen_labels`).
    ``coarse_labels``: ``"coarse"`` (S_coarse keeps only its coarse labels), ``"oracle"`` (the oracle
    S_coarse⁺: true labels) or ``"drop"`` (S_fine alone).

    Returns:
        ``(keep, targets, coarse_mask)``: sorted indices of the kept samples, their labels, and which
        of them carry a cut label.
    """
    if coarse_labels not in ("coarse", "oracle", "drop"):
        raise ValueError(f"data.coarse_labels: must be 'coarse', 'oracle' or 'drop', got {coarse_labels!r}")
    if fine_fraction + coarse_fraction > 1 + 1e-9:
        raise ValueError(f"data.fine_fraction: {fine_fraction:g} + coarse_fraction {coarse_fraction:g} exceed the "
                         "training set")
    n = len(targets)
    if coarse_fraction > 0:
        cut, mask = coarsen_labels(targets, taxonomy, coarse_fraction, level, seed, ids)
    else:
        cut, mask = targets.clone(), torch.zeros(n, dtype=torch.bool)
    rest = torch.nonzero(~mask).flatten()
    n_fine = min(round(fine_fraction * n), len(rest))  # 0.5 + 0.5 of an odd count: both round up
    fine = torch.from_numpy(_draw(rest.numpy(), n_fine, seed + 1, ids, "fine"))
    coarse = torch.nonzero(mask).flatten() if coarse_labels != "drop" else fine[:0]
    keep = torch.cat([fine, coarse]).sort().values
    if coarse_labels == "oracle":
        return keep, targets[keep], torch.zeros(len(keep), dtype=torch.bool)
    return keep, cut[keep], mask[keep]


def coarsen_to_ancestors(targets: torch.Tensor, taxonomy: Taxonomy, fraction: float, seed: int,
                         ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.coarsen``: replace the labels of a seeded ``fraction`` of samples by a proper ancestor of each,
    its depth drawn uniformly (seeded) from those above the label — labels known only to the genus, or only as
    "bird", mixed in one set (the free-grain setting). Samples at depth 1 have no proper ancestor below the root
    and keep their labels. Returns ``(new_targets, coarse_mask)``."""
    if targets.dim() != 1:
        raise ValueError("data.coarsen: not supported for multi-label datasets")
    if not 0 < fraction < 1:
        raise ValueError(f"data.coarsen: a fraction must lie in (0, 1), got {fraction!r}")
    depth = taxonomy.depth_tensor[targets]
    eligible = torch.nonzero(depth > 1).flatten().numpy()
    chosen = np.sort(_draw(eligible, min(round(fraction * len(targets)), len(eligible)), seed, ids, "coarsen"))
    mask = torch.zeros(len(targets), dtype=torch.bool)
    mask[torch.from_numpy(chosen)] = True
    new = targets.clone()
    idx = torch.from_numpy(chosen).long()
    level = torch.from_numpy(np.random.default_rng(seed).integers(1, depth[idx].numpy()))  # depth 1 .. depth-1
    new[idx] = taxonomy.path_matrix[targets[idx], level - 1]
    return new, mask


def _draw(candidates: np.ndarray, count: int, seed: int, ids: Sequence[str] | None, salt: str) -> np.ndarray:
    """``count`` of the candidate indices: lowest id hash when ids are given, else a seeded permutation."""
    if ids is None:
        return candidates[np.random.default_rng(seed).permutation(len(candidates))[:count]]
    u = hash_unit([ids[i] for i in candidates.tolist()], seed, salt)
    return candidates[np.argsort(u, kind="stable")[:count]]


def move_to_tree(dataset: HierDataset, tree: Taxonomy, source: str = "data.tree", unused: str = "prune"
                 ) -> HierDataset:
    """The same samples labelled in another tree (one induced from a confusion matrix, or a larger one such as
    WordNet whose end classes include the data's). Classes are matched by external id where both trees have
    one, else by name. End classes of the tree that the data lacks are pruned away (``unused="prune"``, with
    the nodes only they reached) or kept as classes without images (``"keep"``); a data class the tree lacks is
    one line."""

    def key(t: Taxonomy, n: int) -> str:
        return t.external_ids[n] or t.names[n]

    old = dataset.taxonomy
    new_of = {key(tree, n): n for n in tree.leaves}
    old_keys = {key(old, n) for n in old.leaves}
    if len(new_of) != len(tree.leaves) or len(old_keys) != len(old.leaves):
        raise ValueError(f"{source}: leaf names repeat, so classes cannot be matched between the trees")
    if not old_keys <= set(new_of):
        raise ValueError(f"{source}: the data's class {sorted(old_keys - set(new_of))[0]!r} is no end class of "
                         f"the tree")
    if unused not in ("prune", "keep"):
        raise ValueError(f"data.tree_unused: must be 'prune' or 'keep', got {unused!r}")
    if unused == "prune" and old_keys != set(new_of):
        tree = tree.prune(new_of[k] for k in old_keys)
        new_of = {key(tree, n): n for n in tree.leaves}
    lut = torch.full((old.num_nodes,), -1, dtype=torch.long)
    for n in old.leaves:
        lut[n] = new_of[key(old, n)]
    if dataset.multi_label or bool((lut[dataset.targets] < 0).any()):
        raise ValueError(f"{source}: only single labels at the leaves can move to another tree")
    out = dataset.with_targets(lut[dataset.targets], dataset.coarse_mask)
    out.taxonomy = tree
    return out


def grow_tree(known: Taxonomy, data_tree: Taxonomy, source: str = "data.grow_from") -> Taxonomy:
    """``known`` (a trained run's tree) grown by the nodes of ``data_tree`` it lacks, matched by path from the
    root: every known node keeps its id (so the run's weights still fit), new ones follow in ``data_tree``'s
    order. Refused in one line: data with no class the run lacks, a known class that would become a group
    (its images would lose their class), a known class name at another place (a move, not an extension)."""

    def names(t: Taxonomy, n: int) -> tuple[str, ...]:
        return tuple(t.names[v] for v in t.path(n))

    ids = {names(known, n): n for n in range(1, known.num_nodes)}
    leaf_paths: dict[str, list[tuple[str, ...]]] = {}
    for n in known.leaves:
        leaf_paths.setdefault(known.names[n], []).append(names(known, n))
    out_names, parents, ext = list(known.names), list(known.parents), list(known.external_ids)
    added = 0
    for n in sorted(range(1, data_tree.num_nodes), key=lambda v: (len(data_tree.path(v)), v)):  # parents first
        path = names(data_tree, n)
        if path in ids:
            if not known.children[ids[path]] and data_tree.children[n]:
                raise ValueError(f"{source}: {'/'.join(path)} is a class of the run and would become a group here")
            continue
        leaf = not data_tree.children[n]
        if leaf and len(leaf_paths.get(path[-1], ())) == 1:
            raise ValueError(f"{source}: class {path[-1]!r} is at {'/'.join(path)} here but at "
                             f"{'/'.join(leaf_paths[path[-1]][0])} in the run: a known class cannot move")
        ids[path] = len(out_names)
        out_names.append(path[-1])
        parents.append(ids[path[:-1]] if len(path) > 1 else 0)
        ext.append(data_tree.external_ids[n])
        added += leaf
    if not added:
        raise ValueError(f"{source}: the data has no class the run lacks (its {len(data_tree.leaves)} classes are "
                         "all known): nothing to add")
    return Taxonomy(out_names, parents, ext)


def move_into(dataset: HierDataset, tree: Taxonomy) -> HierDataset:
    """``dataset`` labelled in ``tree``, a tree that holds every node of the dataset's own at the same path
    (:func:`grow_tree`'s): the ids change, the classes do not."""
    old = dataset.taxonomy
    by_path = {tuple(tree.names[v] for v in tree.path(n)): n for n in range(1, tree.num_nodes)}
    lut = torch.tensor([0] + [by_path[tuple(old.names[v] for v in old.path(n))] for n in range(1, old.num_nodes)])
    if dataset.multi_label:
        raise ValueError("data.grow_from: new classes join single-label runs only")
    out = dataset.with_targets(lut[dataset.targets], dataset.coarse_mask)
    out.taxonomy = tree
    return out


def class_keys(taxonomy: Taxonomy, spec: Sequence[str], key: str = "data.keep_classes") -> list[int]:
    """The end classes ``spec`` names (a leaf's name, its ``A/B/C`` path or its external id, e.g. a WordNet id),
    in tree order; an unknown, ambiguous (a name several classes share) or repeated name is a one-line
    ``ValueError`` naming it (and the config ``key``)."""
    by_key: dict[str, set[int]] = {}
    for n in taxonomy.leaves:
        for k in {taxonomy.names[n], taxonomy.path_name(n), taxonomy.external_ids[n] or taxonomy.names[n]}:
            by_key.setdefault(k, set()).add(n)
    unknown = [k for k in spec if k not in by_key]
    if unknown:
        raise ValueError(f"{key}: {len(unknown)} name(s) are no end class of the tree, e.g. {unknown[0]!r}")
    shared = next((k for k in spec if len(by_key[k]) > 1), None)
    if shared is not None:
        raise ValueError(f"{key}: {shared!r} names {len(by_key[shared])} classes; give its A/B/C path")
    nodes = [next(iter(by_key[k])) for k in spec]
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"{key}: a class is named twice")
    return sorted(nodes)


def held_out_leaves(taxonomy: Taxonomy, spec: float | Sequence[str], seed: int = 0) -> list[int]:
    """The end classes ``data.holdout_leaves`` takes out: a list of names (:func:`class_keys`), or a fraction of
    the end classes chosen by a seeded hash of each one's path — skipping any whose removal would leave an inner
    node with no class (its images could have no right answer below the root). A list that empties a group is
    refused in one line naming the group."""
    key = "data.holdout_leaves"
    leaves = list(taxonomy.leaves)
    under = {n: 0 for n in range(taxonomy.num_nodes)}
    for leaf in leaves:
        for a in taxonomy.path(leaf)[:-1]:
            under[a] += 1
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0 < spec < 1:
            raise ValueError(f"{key}: a fraction must lie in (0, 1), got {spec!r}")
        want = max(1, round(spec * len(leaves)))
        order = sorted(leaves, key=lambda n: hashlib.sha256(f"{seed}/{taxonomy.path_name(n)}".encode()).hexdigest())
        held: list[int] = []
        for leaf in order:
            if len(held) == want:
                break
            if all(under[a] > 1 for a in taxonomy.path(leaf)[:-1]):
                held.append(leaf)
                for a in taxonomy.path(leaf)[:-1]:
                    under[a] -= 1
        if len(held) < want:
            raise ValueError(f"{key}: only {len(held)} of the {want} classes asked for can go without emptying a "
                             "group; ask for a smaller fraction")
        return sorted(held)
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(k, str) for k in spec):
        raise ValueError(f"{key}: must be a fraction in (0, 1) or a list of class names, A/B/C paths or ids")
    held = class_keys(taxonomy, spec, key)
    for leaf in held:
        for a in taxonomy.path(leaf)[:-1]:
            under[a] -= 1
    empty = next((a for a in range(1, taxonomy.num_nodes) if under[a] == 0 and a not in set(leaves)), None)
    if empty is not None:
        raise ValueError(f"{key}: holding these out empties the group {taxonomy.path_name(empty)!r} (no class of it "
                         "would be left to answer under); keep one of its classes")
    if len(held) == len(leaves):
        raise ValueError(f"{key}: holds out every class")
    return held


def hold_out(datasets: Sequence[HierDataset], spec: float | Sequence[str], seed: int = 0
             ) -> tuple[list[HierDataset], torch.Tensor]:
    """The open-world protocol (Lee et al., CVPR 2018): the held-out end classes (:func:`held_out_leaves`) leave
    the training and validation splits and the tree; the last split (test) keeps their images, labelled with
    their nearest ancestor that is still in the tree — the right answer for a class the model never saw.
    Returns the splits (in the pruned tree) and the test split's ``(n,)`` bool mask of those novel images."""
    *fitted, test = datasets
    old = test.taxonomy
    held = set(held_out_leaves(old, spec, seed))
    tree = old.prune([n for n in old.leaves if n not in held])
    new_of = {old_key: n for n in range(1, tree.num_nodes) for old_key in [tree.external_ids[n] or tree.path_name(n)]}
    lut = torch.zeros(old.num_nodes, dtype=torch.long)  # every node -> itself or its nearest kept ancestor
    for n in range(1, old.num_nodes):
        a = n
        while a > 0 and (old.external_ids[a] or old.path_name(a)) not in new_of:
            a = old.parents[a]
        lut[n] = new_of[old.external_ids[a] or old.path_name(a)] if a > 0 else 0
    is_held = torch.zeros(old.num_nodes, dtype=torch.bool)
    is_held[sorted(held)] = True
    out = []
    for ds in fitted:
        if ds.multi_label:
            raise ValueError("data.holdout_leaves: applies to single-label data")
        part = ds.subset(torch.nonzero(~is_held[ds.targets]).flatten())
        part = part.with_targets(lut[part.targets], part.coarse_mask)
        part.taxonomy = tree
        out.append(part)
    novel = is_held[test.targets]
    test = test.with_targets(lut[test.targets], test.coarse_mask | novel)
    test.taxonomy = tree
    return [*out, test], novel


def keep_classes(datasets: Sequence[HierDataset], spec: Sequence[str]) -> list[HierDataset]:
    """The samples of the named end classes only, relabelled into the tree pruned to those classes and their
    ancestors (an image labelled with an inner node stays if one of the kept classes lies below it) — for
    training on part of a label set, e.g. pretraining on half of Tiny-ImageNet's classes."""
    old = datasets[0].taxonomy
    leaves = class_keys(old, spec)
    if not leaves:
        raise ValueError("data.keep_classes: names no class")
    tree = old.prune(leaves)

    def key(t: Taxonomy, n: int) -> str:  # pruning keeps every kept node's id and path
        return t.external_ids[n] or t.path_name(n)

    new_of = {key(tree, n): n for n in range(1, tree.num_nodes)}
    lut = torch.full((old.num_nodes,), -1, dtype=torch.long)
    for n in range(1, old.num_nodes):
        lut[n] = new_of.get(key(old, n), -1)
    if int((lut >= 0).sum()) != tree.num_nodes - 1:
        raise ValueError("data.keep_classes: the tree's node names or ids repeat, so the pruned tree cannot be matched")
    out = []
    for ds in datasets:
        if ds.multi_label:
            raise ValueError("data.keep_classes: applies to single-label data")
        keep = torch.nonzero(lut[ds.targets] >= 0).flatten()
        part = ds.subset(keep)
        part = part.with_targets(lut[part.targets], part.coarse_mask)
        part.taxonomy = tree
        out.append(part)
    return out


def channel_stats(images: torch.Tensor, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units of a uint8 ``(n, C, H, W)`` tensor (evenly spaced sample for speed)."""
    if len(images) > max_images:
        images = images[torch.linspace(0, len(images) - 1, max_images).long()]
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    std = x.std(dim=1).clamp(min=1e-3)
    return tuple(float(v) for v in x.mean(dim=1)), tuple(float(v) for v in std)
