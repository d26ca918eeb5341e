"""CIFAR-100 reader on the real ``meta`` and real image rows rewritten in the standard pickle format."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hiervision.data import build_data
from hiervision.data.cifar100 import (
    CIFAR100_MD5,
    CIFAR100_URL,
    load_cifar100,
    read_cifar100_meta,
    read_cifar100_split,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
META = SHARED / "cifar-100-python" / "meta"
EXTRACTED = SHARED / "cifar-100-extracted"
pytestmark = pytest.mark.skipif(
    not META.is_file() or not (EXTRACTED / "train_first486.npz").is_file(),
    reason=f"real CIFAR-100 meta/sample not found under {SHARED}",
)


def _write_batch(path: Path, npz: Path, label: bytes) -> dict:
    d = np.load(npz, allow_pickle=False)
    batch = {
        b"filenames": list(d["filenames"]),
        b"batch_label": label,
        b"fine_labels": [int(x) for x in d["fine_labels"]],
        b"coarse_labels": [int(x) for x in d["coarse_labels"]],
        b"data": d["data"],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("c100") / "cifar-100-python"
    root.mkdir()
    shutil.copy(META, root / "meta")
    _write_batch(root / "train", EXTRACTED / "train_first486.npz", b"training batch 1 of 1")
    _write_batch(root / "test", EXTRACTED / "test_first916.npz", b"testing batch 1 of 1")
    return root


def test_meta_names() -> None:
    fine, coarse = read_cifar100_meta(META.parent)
    assert len(fine) == 100 and len(coarse) == 20
    assert fine[:2] == ["apple", "aquarium_fish"] and "vehicles_2" in coarse


def test_reader_labels_match_real_hierarchy(folder: Path) -> None:
    train, test = load_cifar100(folder.parent)  # the parent folder is accepted too
    tax = train.taxonomy
    assert len(tax) == 120 and [len(level) for level in tax.levels] == [20, 100] and tax.is_fixed_depth
    with open(EXTRACTED / "fine_to_coarse.csv", newline="") as f:
        table = {r["fine_name"]: r["coarse_name"] for r in csv.DictReader(f)}
    for leaf in tax.leaves:
        assert tax.names[tax.parents[leaf]] == table[tax.names[leaf]]
    # coarse label c is node c + 1, in the order of meta's coarse names
    _, coarse_names = read_cifar100_meta(folder)
    assert [tax.names[n] for n in tax.levels[0]] == coarse_names
    with open(EXTRACTED / "test_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[: len(test)]
    fine_names, _ = read_cifar100_meta(folder)
    assert [tax.names[int(t)] for t in test.targets] == [fine_names[int(r["fine_label"])] for r in rows]
    assert tax.names[test[0][1]] == "mountain" and tax.names[train[0][1]] == "cattle"
    raw = np.load(EXTRACTED / "test_first916.npz")["data"]
    assert test.images.shape == (916, 3, 32, 32)
    assert torch.equal(test.images[5].permute(1, 2, 0), torch.from_numpy(raw[5].reshape(3, 32, 32).transpose(1, 2, 0)))


def test_bundle_and_missing_files(folder: Path, tmp_path: Path) -> None:
    b = build_data({"name": "cifar100", "root": str(folder), "val_fraction": 0.2})
    assert len(b.train) + len(b.val) == 486 and 70 < len(b.val) < 125 and len(b.test) == 916  # val by index hash
    assert b.in_chans == 3 and b.image_size == 32 and b.val.ids[0].startswith("train/")
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/train: CIFAR-100 train pickle missing"):
        build_data({"name": "cifar100", "root": str(META.parent)})
    (tmp_path / "train").write_bytes(b"not a pickle")
    shutil.copy(folder / "test", tmp_path / "test")
    shutil.copy(META, tmp_path / "meta")
    with pytest.raises(ValueError, match="train: corrupt CIFAR-100 pickle"):
        load_cifar100(tmp_path)
    assert CIFAR100_URL.endswith("cifar-100-python.tar.gz") and CIFAR100_MD5["train"].startswith("16019d7e")


def _evil(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when plain ``pickle.load`` reads it (a real code-execution payload)."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({b"data": Payload(), b"fine_labels": [1]}, protocol=2)


def test_crafted_pickle_is_refused_not_run(folder: Path, tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    payload = _evil(proof)
    pickle.loads(payload)  # noqa: S301 - shows the payload is live: plain pickle runs it
    assert proof.exists()
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    shutil.copy(META, bad / "meta")
    shutil.copy(folder / "test", bad / "test")
    (bad / "train").write_bytes(_evil(marker))
    with pytest.raises(ValueError, match=r"train: refused to unpickle: it names posix\.system") as err:
        load_cifar100(tmp_path)
    assert "\n" not in str(err.value) and not marker.exists()
    # an object array would unpickle its items as code too
    (bad / "train").write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(ValueError, match="refused to unpickle"):
        load_cifar100(tmp_path)


def test_python2_style_globals_are_read(folder: Path, tmp_path: Path) -> None:
    """The official files were pickled by Python 2's numpy, which names ``numpy.core.multiarray``."""
    raw = (folder / "train").read_bytes()
    old_style = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old_style != raw
    for name in ("meta", "test"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "train").write_bytes(old_style)
    x, fine, _ = read_cifar100_split(tmp_path, "train")
    assert x.shape == (486, 3, 32, 32) and x.dtype == np.uint8 and len(fine) == 486
