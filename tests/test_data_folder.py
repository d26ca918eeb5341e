"""Folder and zip datasets (real Omniglot zip) and CSV manifests."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision import Taxonomy
from hiervision.data import BatchLoader, build_data
from hiervision.data.folder import folder_index, load_folder

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "images_background_small1.zip"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_file(), reason=f"Omniglot zip not found at {OMNIGLOT}")


def _png(path: Path, value: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (value,) * 3 if mode == "RGB" else value).save(path)


@needs_omniglot
def test_omniglot_zip_tree_and_labels() -> None:
    ds = load_folder(OMNIGLOT)
    tax = ds.taxonomy
    alphabets = [tax.names[n] for n in tax.children[0]]
    assert alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert len(tax.leaves) == 136 and tax.is_fixed_depth and tax.max_depth == 2
    assert len(ds) == 2720 and torch.bincount(ds.targets)[list(tax.leaves)].tolist() == [20] * 136
    with zipfile.ZipFile(OMNIGLOT) as zf:
        members = [n for n in zf.namelist() if n.endswith(".png")]
    assert sorted(ds.sources) == sorted(members)
    for src, t in zip(ds.sources[::97], ds.targets[::97]):
        alphabet, character = src.split("/")[1:3]
        assert tax.path_name(int(t)) == f"{alphabet}/{character}"
    x, y = ds[0]
    assert x.shape == (1, 105, 105) and x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    assert tax.path_name(y) == "Balinese/character01"


@needs_omniglot
def test_omniglot_bundle_split_and_lazy_loader() -> None:
    b = build_data({"name": "folder", "root": str(OMNIGLOT), "image_size": 28, "test_fraction": 0.25})
    assert len(b.train) + len(b.val) + len(b.test) == 2720 and 620 < len(b.test) < 740  # ~25 % by path hash
    assert b.in_chans == 1 and b.image_size == 28 and 0.8 < b.mean[0] < 1
    per_class = torch.bincount(b.test.targets, minlength=b.taxonomy.num_nodes)[list(b.taxonomy.leaves)]
    assert per_class.float().mean() == len(b.test) / 136 and per_class.max() <= 12  # every class near its 5
    assert b.test.ids[0].startswith("Balinese/character01/") and not set(b.test.ids) & set(b.train.ids)
    xb, yb = next(iter(BatchLoader(b.train, 16, shuffle=True, seed=1, num_workers=2)))
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.long


def test_zip_and_folder_give_the_same_tree(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for rel in ("animal/cat/a.png", "animal/cat/b.png", "animal/dog/c.png", "animal/d.png", "plant/e.png"):
        _png(root / rel, 10)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for f in sorted(root.rglob("*.png")):
            zf.write(f, f"top/{f.relative_to(root).as_posix()}")  # no folder entries, one wrapper folder
    tax_dir, _, folders_dir, _ = folder_index(root)
    tax_zip, _, folders_zip, archive = folder_index(tmp_path / "imgs.zip")
    assert tax_dir == tax_zip and tax_dir.external_ids == tax_zip.external_ids
    assert sorted(folders_dir) == sorted(folders_zip)
    assert archive == str(tmp_path / "imgs.zip")
    ds = load_folder(root)
    # images directly in an inner folder are labelled with the inner (coarse) node
    labels = {Path(s).name: tax_dir.path_name(int(t)) for s, t in zip(ds.sources, ds.targets)}
    assert labels == {"a.png": "animal/cat", "b.png": "animal/cat", "c.png": "animal/dog", "d.png": "animal",
                      "e.png": "plant"}
    assert Taxonomy.from_paths({"x/y", "z"}) == Taxonomy.from_parent_map({"x": None, "y": "x", "z": None})


def test_corrupt_image_names_file(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "ok.png", 5)
    (tmp_path / "a" / "z_bad.png").write_bytes(b"\x89PNG not really")
    ds = load_folder(tmp_path)
    bad = [i for i, s in enumerate(ds.sources) if s.endswith("z_bad.png")][0]
    with pytest.raises(ValueError, match=r"bad\.png: cannot read image"):
        ds[bad]


def _manifest_setup(tmp_path: Path, rows: list[str]) -> tuple[Path, Path]:
    tax = Taxonomy.from_parent_map({"animal": None, "plant": None, "cat": "animal", "dog": "animal", "tree": "plant"},
                                   external_ids={"cat": "n001"})
    tax.save(tmp_path / "tax.json")
    for i in range(len(rows)):
        _png(tmp_path / "img" / f"{i}.png", 20 * i, size=(10, 6))
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n" + "".join(f"img/{i}.png,{r}\n" for i, r in enumerate(rows)))
    return csv, tmp_path / "tax.json"


def test_manifest_single_label(tmp_path: Path) -> None:
    csv, tj = _manifest_setup(tmp_path, ["cat", "n001", "animal/dog", "plant", "tree"] * 2)
    b = build_data({"name": "manifest", "manifest": str(csv), "taxonomy": str(tj), "val_fraction": 0.0,
                    "test_fraction": 0.2})
    assert not b.multi_label and b.image_size == (6, 10) and b.in_chans == 3
    all_t = torch.cat([b.train.targets, b.test.targets]).sort().values
    tax = b.taxonomy
    want = sorted([tax.index(x) for x in ["cat", "cat", "dog", "plant", "tree"]] * 2)
    assert all_t.tolist() == want and len(b.test) == 2 and len(b.val) == 0
    x, y = b.train[0]
    assert x.shape == (3, 6, 10) and isinstance(y, int)


def test_manifest_multi_label_and_errors(tmp_path: Path) -> None:
    csv, tj = _manifest_setup(tmp_path, ["cat;tree", "dog", "animal;cat", "plant"])
    b = build_data({"name": "manifest", "manifest": str(csv), "taxonomy": str(tj), "val_fraction": 0.0,
                    "test_fraction": 0.25, "image_size": 4})
    assert b.multi_label and b.image_size == 4
    from hiervision.data.manifest import load_manifest

    ds, splits = load_manifest(csv, tj)
    tax = ds.taxonomy
    ends = [{tax.names[n] for n in row.nonzero().flatten().tolist()} for row in ds.targets]
    assert ends == [{"cat", "tree"}, {"dog"}, {"cat"}, {"plant"}] and splits is None
    x, y = ds[0]
    assert y.dtype == torch.bool and y.shape == (tax.num_nodes,)
    xb, yb = next(iter(BatchLoader(ds, 4)))
    assert yb.shape == (4, tax.num_nodes) and yb.dtype == torch.bool
    with pytest.raises(ValueError, match="several labels but multi_label is false"):
        load_manifest(csv, tj, multi_label=False)
    csv.write_text(csv.read_text() + "img/0.png,cat;unicorn\n")
    with pytest.raises(ValueError, match=r"m\.csv: line 6: label 'unicorn' is not in the taxonomy"):
        load_manifest(csv, tj)
    csv.write_text("path,label\nimg/missing.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.png: image listed in .*m\.csv line 2"):
        load_manifest(csv, tj)


def test_manifest_split_column(tmp_path: Path) -> None:
    csv, tj = _manifest_setup(tmp_path, ["cat", "dog", "tree", "plant"])
    lines = csv.read_text().splitlines()
    splits = ["train", "train", "val", "test"]
    csv.write_text("path,label,split\n" + "".join(f"{ln},{s}\n" for ln, s in zip(lines[1:], splits)))
    b = build_data({"name": "manifest", "manifest": str(csv), "taxonomy": str(tj), "channels": 1})
    assert (len(b.train), len(b.val), len(b.test)) == (2, 1, 1) and b.in_chans == 1
    assert b.taxonomy.names[b.test[0][1]] == "plant"
    assert np.isclose(b.val[0][0].mean().item(), 40 / 255, atol=1e-6)
