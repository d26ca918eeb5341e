"""``data.keep_classes``: train on part of a label set (e.g. half of Tiny-ImageNet's classes), the tree pruned."""

from __future__ import annotations

import pytest
import torch

from hiervision.data import build_data
from hiervision.data.base import TensorImageDataset, class_keys, keep_classes
from hiervision.taxonomy import Taxonomy

TREE = Taxonomy.from_paths(["Animals/Dogs/Beagle", "Animals/Dogs/Pug", "Animals/Cats", "Plants/Oak", "Plants/Fir"])


def _data(targets: list[str]) -> TensorImageDataset:
    nodes = torch.tensor([TREE.index(t) for t in targets])
    return TensorImageDataset(torch.zeros(len(nodes), 1, 4, 4, dtype=torch.uint8), nodes, TREE,
                              ids=[f"i{k}" for k in range(len(nodes))])


def test_kept_classes_keep_their_samples_and_ancestors_and_the_rest_go():
    ds = _data(["Beagle", "Pug", "Cats", "Oak", "Fir", "Dogs", "Plants"])
    (kept,) = keep_classes([ds], ["Beagle", "Animals/Cats"])  # a name or an A/B/C path
    tree = kept.taxonomy
    assert sorted(tree.path_name(n) for n in tree.leaves) == ["Animals/Cats", "Animals/Dogs/Beagle"]
    # Beagle, Cats, and the coarse label "Dogs" (a kept class lies below it); Plants has none
    assert [tree.path_name(int(t)) for t in kept.targets] == ["Animals/Dogs/Beagle", "Animals/Cats", "Animals/Dogs"]
    assert kept.ids == ["i0", "i2", "i5"]


def test_unknown_or_repeated_classes_are_one_line():
    with pytest.raises(ValueError, match="data.keep_classes: 1 name.*'Tiger'"):
        class_keys(TREE, ["Beagle", "Tiger"])
    with pytest.raises(ValueError, match="named twice"):
        class_keys(TREE, ["Beagle", "Animals/Dogs/Beagle"])
    with pytest.raises(ValueError, match="no end class"):
        class_keys(TREE, ["Dogs"])  # an inner node is not a class to keep


def test_build_data_keeps_the_named_classes_in_every_split():
    full = build_data({"name": "synthetic", "n_train": 200, "n_test": 100, "size": 8})
    names = [full.taxonomy.path_name(n) for n in full.taxonomy.leaves[:3]]
    part = build_data({"name": "synthetic", "n_train": 200, "n_test": 100, "size": 8, "keep_classes": names})
    assert sorted(part.taxonomy.path_name(n) for n in part.taxonomy.leaves) == sorted(names)
    for split in (part.train, part.val, part.test):
        assert len(split) and split.taxonomy is part.taxonomy
        assert {part.taxonomy.path_name(int(t)) for t in split.targets} <= set(names)


def test_a_name_two_classes_share_must_be_given_as_a_path():
    tree = Taxonomy.from_paths(["A/x", "B/x"])
    with pytest.raises(ValueError, match="'x' names 2 classes; give its A/B/C path"):
        class_keys(tree, ["x"])
    assert class_keys(tree, ["B/x"]) == [tree.index("B/x")]
