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


# ------------------------------------------------------------------ folder safety: symlinks, empty classes, checks
def _tree(root: Path, counts: dict[str, int]) -> None:
    for folder, n in counts.items():
        for i in range(n):
            _png(root / folder / f"{i:03d}.png", (37 * i) % 256)


def test_symlinked_class_folder_is_read_once(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "dog"
    _tree(tmp_path / "elsewhere", {"dog": 3})
    root = tmp_path / "data"
    _tree(root, {"animal/cat": 2})
    (root / "animal" / "dog").symlink_to(elsewhere, target_is_directory=True)
    tax, sources, folders, _ = folder_index(root)
    assert sorted(tax.external_ids[1:]) == ["animal", "animal/cat", "animal/dog"]
    assert folders.count("animal/dog") == 3 and folders.count("animal/cat") == 2
    ds = load_folder(root)
    assert sorted(ds.ids)[2:] == ["animal/dog/000.png", "animal/dog/001.png", "animal/dog/002.png"]
    # a second way into the same folder would count its images under two classes
    (root / "twin").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"data/animal/dog: the same folder as .*data/twin \(symlink\)"):
        folder_index(root)


def test_symlink_loop_is_named(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"a/b": 1})
    (root / "a" / "b" / "back").symlink_to(root / "a", target_is_directory=True)
    with pytest.raises(ValueError, match=r"a/b/back: symlink loop \(points back to .*/data/a, a folder above it\)"):
        build_data({"name": "folder", "root": str(root)})


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"cat": 2, "dog": 1})
    (root / "bird" / "sparrow").mkdir(parents=True)
    (root / "bird" / ".hidden.png").write_bytes(b"")  # hidden files are not images
    with pytest.raises(ValueError, match=r"data/bird: class folder holds no images \(and 1 more\)"):
        folder_index(root)
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("cat/a.png", (root / "cat" / "000.png").read_bytes())
        zf.writestr("empty/", b"")
    with pytest.raises(ValueError, match=r"z\.zip:/?empty: class folder holds no images"):
        folder_index(tmp_path / "z.zip")


def test_check_lists_every_bad_file_and_skip_counts_them(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"cat": 6, "dog": 6})
    (root / "cat" / "bad1.png").write_bytes(b"\x89PNG truncated")
    (root / "dog" / "bad2.jpg").write_bytes(b"")
    Image.new("L", (300, 300)).save(root / "dog" / "huge.png")
    cfg = {"name": "folder", "root": str(root), "check_cache": None, "max_pixels": 200 * 200, "val_fraction": 0.0}
    with pytest.raises(ValueError, match=r"data\.check: 3 of 15 images cannot be used") as e:
        build_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("bad1.png", "bad2.jpg", "huge.png: image is 300x300"))
    b = build_data({**cfg, "on_bad_image": "skip"})
    assert b.skipped == 3 and len(b.bad_images) == 3 and len(b.train) + len(b.test) == 12
    assert "3 unreadable images skipped" in b.note
    assert not any("bad" in i or "huge" in i for i in b.train.ids + b.test.ids)
    with pytest.raises(ValueError, match="on_bad_image: 'skip' needs data.check: true"):
        build_data({**cfg, "on_bad_image": "skip", "check": False})
    with pytest.raises(ValueError, match="data.on_bad_image: must be 'error' or 'skip'"):
        build_data({**cfg, "on_bad_image": "ignore"})
    with pytest.raises(ValueError, match="data.max_pixels: must be a positive integer"):
        build_data({**cfg, "max_pixels": -1})
    unchecked = build_data({**cfg, "check": False})  # the statistics pass over bad files ...
    split, at = next((ds, i) for ds in (unchecked.train, unchecked.val, unchecked.test)
                     for i, n in enumerate(ds.ids) if "bad1" in n)
    with pytest.raises(ValueError, match="cannot read image"):  # ... and a bad file fails when it is read
        split[at]


def test_check_cache_skips_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hiervision.data import check

    root = tmp_path / "data"
    _tree(root, {"cat": 4, "dog": 4})
    calls: list[str] = []
    real = check._verify
    monkeypatch.setattr(check, "_verify", lambda reader, s: calls.append(s) or real(reader, s))
    cfg = {"name": "folder", "root": str(root), "check_cache": str(tmp_path / "c.json")}
    build_data(cfg)
    assert len(calls) == 8
    calls.clear()
    build_data(cfg)
    assert calls == []  # all cached by size + mtime
    _png(root / "cat" / "000.png", 99, size=(9, 9))  # changed file, and one new one
    _png(root / "dog" / "new.png", 1)
    build_data(cfg)
    assert sorted(Path(c).name for c in calls) == ["000.png", "new.png"]
    calls.clear()
    b = build_data({**cfg, "max_pixels": 70, "on_bad_image": "skip"})  # a lower limit: the cache cannot vouch
    assert sorted(Path(c).name for c in calls) == ["000.png"] and b.skipped == 1  # for the 9x9 image any more
    (tmp_path / "c.json").write_text("{broken")
    calls.clear()
    build_data(cfg)
    assert len(calls) == 9  # a damaged cache costs a re-check, not an error


def test_manifest_check_skip_duplicates_and_ids(tmp_path: Path) -> None:
    csv, tj = _manifest_setup(tmp_path, ["cat", "dog", "tree", "plant", "cat", "dog"])
    (tmp_path / "img" / "3.png").write_bytes(b"broken")
    cfg = {"name": "manifest", "manifest": str(csv), "taxonomy": str(tj), "val_fraction": 0.0, "check_cache": None}
    with pytest.raises(ValueError, match=r"data\.check: 1 of 6 images cannot be used .*img/3\.png: cannot read"):
        build_data(cfg)
    b = build_data({**cfg, "on_bad_image": "skip"})
    assert b.skipped == 1 and sorted(b.train.ids + b.test.ids) == [f"img/{i}.png" for i in (0, 1, 2, 4, 5)]
    csv.write_text(csv.read_text() + "img/1.png,cat\n")
    with pytest.raises(ValueError, match=r"m\.csv: line 8: 'img/1\.png' already listed on line 3"):
        build_data(cfg)
    (tmp_path / "img" / ".x.png").write_bytes((tmp_path / "img" / "0.png").read_bytes())
    csv.write_text("path,label\nimg/.x.png,cat\n")
    with pytest.raises(ValueError, match=r"line 2: 'img/\.x\.png' is a hidden file"):
        build_data(cfg)


def test_link_to_a_real_class_is_named(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _tree(root, {"zcat": 1})
    (root / "a_link").symlink_to(root / "zcat", target_is_directory=True)
    with pytest.raises(ValueError, match=r"data/a_link: the same folder as .*data/zcat \(symlink\)"):
        folder_index(root)
    (root / "a_link").unlink()
    (root / "zcat" / "self").symlink_to(".", target_is_directory=True)
    with pytest.raises(ValueError, match=r"zcat/self: symlink loop"):
        folder_index(root)
