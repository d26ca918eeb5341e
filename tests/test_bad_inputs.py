"""The bad-input corpus (issue 13, item 6): what a hostile but realistic user throws at the CLI.

Each case asserts the exit status, a one-line message that names the culprit (the file, key or
flag), and that nothing already written was lost. The CLI runs in-process through
``hiervision.cli.main``; a real subprocess is used only where a lock or a signal needs one.
docs/reliability.md holds the same cases as a table.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision import runfolder
from hiervision.checkpoint import load_checkpoint
from hiervision.cli import main
from hiervision.taxonomy import Taxonomy

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = """\
seed: 0
data: {name: synthetic, n_train: 96, n_test: 32, size: 16}
model: {name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}
train: {epochs: 1, batch_size: 32, progress: false, amp: none, device: cpu, threads: 1}
eval: {batch_size: 64}
"""


# ----------------------------------------------------------------------------- helpers
def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: ``(exit status, the stderr error line, stdout)``.

    A user error must be exactly one ``hiervision: error:`` line; argparse's own errors (status 2)
    end with one ``error: argument ...`` line after the usage.
    """
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 2:
        assert lines and "error: argument" in lines[-1], err
        return rc, lines[-1], out
    if rc != 0:
        assert len(lines) == 1 and lines[0].startswith("hiervision: error: "), err
        return rc, lines[0], out
    return rc, "", out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_kept(folder: Path, before: dict[str, bytes]) -> None:
    """Every file written before is still there with the same bytes (or was moved to ``previous/``)."""
    for rel, data in before.items():
        here, moved = folder / rel, folder / runfolder.PREVIOUS / rel
        assert (here.is_file() and here.read_bytes() == data) or (moved.is_file() and moved.read_bytes() == data), \
            f"{rel} was lost or changed"


def write_png(path: Path, value: int = 128, size: int = 16, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = (rng.integers(0, 256, (size, size)) // 2 + value // 2).astype(np.uint8)
    Image.fromarray(arr, mode="L").convert(mode).save(path)
    return path


def image_folder(root: Path, per_class: int = 4) -> Path:
    """A two-level folder data set: animal/{cat,dog}, plant/tree."""
    for i, cls in enumerate(["animal/cat", "animal/dog", "plant/tree"]):
        for j in range(per_class):
            write_png(root / cls / f"{j}.png", value=40 * i + j)
    return root


def folder_cfg(tmp_path: Path, root: Path, epochs: int = 1) -> Path:
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(
        f"seed: 0\ndata: {{name: folder, root: {root}, val_fraction: 0.25, test_fraction: 0.25}}\n"
        "model: {name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}\n"
        f"train: {{epochs: {epochs}, batch_size: 8, progress: false, amp: none, device: cpu, threads: 1}}\n"
    )
    return cfg


def child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hiervision.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.2)


class Boom:
    """A pickle that runs a shell command when loaded: what a hostile checkpoint or data file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(TINY)
    return f


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_yaml) -> Path:
    """One tiny synthetic run (1 epoch, 96 images), shared; tests that change it use ``run``."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ============================================================================= config (13 cases)
CONFIG_CASES = [
    # (file content or None for a missing file, --set overrides, text the message must hold)
    (None, [], "cfg.yaml: cannot read"),
    ("train: {epochs: 2\n", [], "cfg.yaml: invalid YAML at line"),
    ("train: {epoch: 2}\n", [], "'train.epoch' is not known (did you mean 'train.epochs'?)"),
    ("train: {epochs: 2.7}\n", [], "'train.epochs' must be a whole number, got 2.7"),
    ("", ["train.lr=-1"], "'train.lr' must be > 0, got -1"),
    ("", ["train.batch_size=0"], "'train.batch_size' must be ≥ 1"),
    ("", ["eval.batch_size=-3"], "'eval.batch_size' must be ≥ 1"),
    ("", ["train.momentum=1.5"], "'train.momentum' must be < 1"),
    ("", ["trainlr"], "override 'trainlr' must look like key.sub=value"),
    ("base: cfg.yaml\n", [], "'base' chain loops back to itself"),
    ("data: {root: x}\n", [], "'data.name' is required"),
    ("", ["data={name: synthetic, colour: red}"], "data.colour: not a setting of dataset 'synthetic'"),
    ("", ["data={name: imagenet22k}"], "data.name: unknown dataset 'imagenet22k'"),
]
DATA_KEYS = 2  # the last cases are checked by the data layer, after the run folder exists


@pytest.mark.parametrize("text,sets,message", CONFIG_CASES, ids=[c[2][:40] for c in CONFIG_CASES])
def test_config(capsys, tmp_path, text, sets, message):
    early = (text, sets, message) not in CONFIG_CASES[-DATA_KEYS:]
    cfg = tmp_path / "cfg.yaml"
    if text is not None:
        cfg.write_text(text)
    args = ["train", cfg, "--out", tmp_path / "out", "--quiet"]
    for s in sets:
        args += ["--set", s]
    rc, err, _ = cli(capsys, *args)
    assert rc == 1 and message in err
    assert not early or not (tmp_path / "out").exists()  # refused before anything was written


def test_config_not_utf8(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"seed: \xff\n")
    rc, err, _ = cli(capsys, "train", cfg, "--out", tmp_path / "out")
    assert rc == 1 and "cfg.yaml: not a UTF-8 text file" in err


# ============================================================================= taxonomy (12 cases)
TAXONOMY_CASES = [
    ("t.json", None, "t.json: cannot read"),
    ("t.json", '{"format": "hiervision-taxonomy", "nodes": [', "t.json: invalid JSON"),
    ("t.json", '{"nodes": []}', "t.json: not a hiervision taxonomy"),
    ("t.json", '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r", "parent": -1}, '
               '{"id": 2, "name": "a", "parent": 0}]}', "node ids must be 0..N without gaps"),
    ("t.json", '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r", "parent": -1}, '
               '{"id": 1, "name": "a", "parent": 0}, {"id": 2, "name": "a", "parent": 0}]}',
     "duplicate name 'a' under parent 'r'"),
    ("t.json", '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r", "parent": -1}]}',
     "empty tree"),
    ("t.json", '{"format": "hiervision-taxonomy", "nodes": [{"id": 0, "name": "r", "parent": -1}, '
               '{"id": 1, "name": "a", "parent": "x"}]}', "t.json: malformed node entry"),
    ("t.csv", "parent,child\na,b\nb,c\nc,a\n", "cycle through node"),
    ("t.csv", "parent,child\na,c\nb,c\n", "node 'c' has two parents: 'a' and 'b'"),
    ("t.csv", "from,to\na,b\n", "t.csv: header must name 'parent' and 'child' columns"),
    ("t.csv", "parent,child\na,\n", "t.csv:2: row needs both a parent and a child"),
    ("t.csv", "parent,child\nanimal,root\n", "node 'root' is the root: it cannot be the child of 'animal'"),
]


@pytest.mark.parametrize("name,text,message", TAXONOMY_CASES, ids=[c[2][:40] for c in TAXONOMY_CASES])
def test_taxonomy(capsys, tmp_path, name, text, message):
    f = tmp_path / name
    if text is not None:
        f.write_text(text)
    for action in ("validate", "show"):
        rc, err, _ = cli(capsys, "taxonomy", action, f)
        assert rc == 1 and message in err
    if text is not None:
        assert f.read_text() == text


def test_taxonomy_binary_garbage(capsys, tmp_path):
    f = tmp_path / "t.json"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    rc, err, _ = cli(capsys, "taxonomy", "show", f)
    assert rc == 1 and "t.json: not a UTF-8 text file" in err


def test_taxonomy_csv_naming_the_root_is_the_root(capsys, tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("parent,child\nroot,animal\nanimal,cat\nroot,plant\n")
    rc, _, out = cli(capsys, "taxonomy", "validate", f)
    assert rc == 0 and "2 classes · 3 nodes · depth 2" in out


def test_taxonomy_build_disk_full_keeps_the_old_file(capsys, tmp_path, monkeypatch):
    src, dst = tmp_path / "t.csv", tmp_path / "tree.json"
    src.write_text("parent,child\na,b\n")
    dst.write_text("old tree")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)
    rc, err, _ = cli(capsys, "taxonomy", "build", src, "--out", dst)
    assert rc == 1 and f"{dst}: cannot write (disk full)" in err
    assert dst.read_text() == "old tree" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "tree.json"]


def test_taxonomy_build_read_only_keeps_the_old_file(capsys, tmp_path, monkeypatch):
    src, dst = tmp_path / "t.csv", tmp_path / "tree.json"
    src.write_text("parent,child\na,b\n")
    dst.write_text("old tree")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runfolder, "open", read_only, raising=False)
    rc, err, _ = cli(capsys, "taxonomy", "build", src, "--out", dst)
    assert rc == 1 and f"{dst}: cannot write (folder is read-only)" in err
    assert dst.read_text() == "old tree"


# ============================================================================= checkpoints and run folders read back
def test_checkpoint_truncated(capsys, run):
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    rc, err, _ = cli(capsys, "evaluate", run)
    assert rc == 1 and f"{run / 'best.pt'}: not a readable hiervision checkpoint" in err
    assert_kept(run, before)


def test_checkpoint_with_code_is_refused_and_never_run(capsys, run, tmp_path):
    marker = tmp_path / "pwned"
    (run / "best.pt").write_bytes(pickle.dumps({"model": Boom(marker)}, protocol=2))
    rc, err, _ = cli(capsys, "evaluate", run)
    assert rc == 1 and "best.pt: not a readable hiervision checkpoint" in err
    assert not marker.exists()


def test_checkpoint_without_weights(capsys, run):
    torch.save({"weights": 1}, run / "best.pt")
    rc, err, _ = cli(capsys, "predict", run, run / "config.yaml")
    assert rc == 1 and "best.pt: not a hiervision checkpoint (no 'model' entry)" in err


def test_checkpoint_missing(capsys, run):
    (run / "best.pt").unlink()
    rc, err, _ = cli(capsys, "evaluate", run)
    assert rc == 1 and "best.pt: checkpoint not found" in err


def test_checkpoint_of_another_taxonomy(capsys, run):
    Taxonomy.from_parent_map({"x": None, "y": None}).save(run / "taxonomy.json")
    rc, err, _ = cli(capsys, "evaluate", run, "--checkpoint", "last")
    assert rc == 1 and "last.pt: checkpoint was trained on another taxonomy" in err


def test_run_without_config(capsys, run):
    (run / "config.yaml").unlink()
    rc, err, _ = cli(capsys, "evaluate", run)
    assert rc == 1 and f"{run}: not a hiervision run folder (no config.yaml)" in err


def test_run_config_tampered(capsys, run):
    text = (run / "config.yaml").read_text().replace("epochs: 1", "epochs: 2.7")
    (run / "config.yaml").write_text(text)
    rc, err, _ = cli(capsys, "evaluate", run)
    assert rc == 1 and "'train.epochs' must be a whole number, got 2.7" in err


def test_run_taxonomy_garbage(capsys, run):
    (run / "taxonomy.json").write_text("{")
    rc, err, _ = cli(capsys, "predict", run, run)
    assert rc == 1 and "taxonomy.json: invalid JSON" in err


# ============================================================================= predict / evaluate (12 cases)
@pytest.mark.parametrize("value", ["-3", "0", "many"])
def test_predict_batch_size(capsys, trained, value):
    rc, err, out = cli(capsys, "predict", trained, trained, "--batch-size", value)
    assert rc == 2 and "argument --batch-size: must be" in err and out == ""


def test_predict_not_an_image(capsys, trained, tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_text("this is text")
    rc, err, _ = cli(capsys, "predict", trained, bad)
    assert rc == 1 and f"{bad}: cannot read image" in err


def test_predict_missing_path(capsys, trained, tmp_path):
    rc, err, _ = cli(capsys, "predict", trained, tmp_path / "nope.png")
    assert rc == 1 and "nope.png: no such file or folder" in err


def test_predict_folder_without_images(capsys, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, err, _ = cli(capsys, "predict", trained, tmp_path / "empty")
    assert rc == 1 and "empty: folder holds no images" in err


def test_predict_good_image_works(capsys, trained, tmp_path):
    rc, _, out = cli(capsys, "predict", trained, write_png(tmp_path / "a.png", mode="RGB"))
    assert rc == 0 and '"path": [' in out


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that *claims* width×height (the decompression-bomb shape) without the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_predict_decompression_bomb(capsys, trained, tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    rc, err, _ = cli(capsys, "predict", trained, bomb)
    assert rc == 1 and "bomb.png" in err


def test_predict_skips_hidden_files(capsys, trained, tmp_path):
    write_png(tmp_path / "imgs" / "a.png", mode="RGB")
    (tmp_path / "imgs" / ".a.png").write_bytes(b"resource fork, not an image")
    rc, _, out = cli(capsys, "predict", trained, tmp_path / "imgs")
    assert rc == 0 and len(out.splitlines()) == 1


def test_predict_16_bit_png_reads_as_its_8_bit_twin(capsys, trained, tmp_path):
    arr = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (16, 1))
    Image.fromarray(arr.astype(np.uint8), mode="L").save(tmp_path / "g8.png")
    Image.fromarray(arr * 257).save(tmp_path / "g16.png")  # uint16 → a 16-bit grey PNG
    outs = []
    for f in ("g8.png", "g16.png"):
        rc, _, out = cli(capsys, "predict", trained, tmp_path / f)
        assert rc == 0
        outs.append(out.split('"path":')[1])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("level", ["99", "0", "-1"])
def test_evaluate_given_level_out_of_range(capsys, trained, level):
    rc, err, out = cli(capsys, "evaluate", trained, "--given-level", level)
    assert rc in (1, 2) and "--given-level" in err and out == ""


def test_evaluate_unknown_mode(capsys, trained):
    rc, err, _ = cli(capsys, "evaluate", trained, "--mode", "routing")
    assert rc == 1 and "--mode routing: model flat has modes []" in err


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_beam_width_of_a_head_without_search(capsys, trained, command):
    args = [command, trained, *(["nothing.png"] if command == "predict" else [])]
    rc, err, _ = cli(capsys, *args, "--beam-width", "3")
    assert rc == 1 and err.strip().count("\n") == 0 and "no beam search" in err  # before any image is read
    rc, err, _ = cli(capsys, *args, "--beam-width", "0")
    assert rc == 2 and "argument --beam-width: must be ≥ 1" in err


def test_evaluate_a_folder_that_is_not_a_run(capsys, tmp_path):
    rc, err, _ = cli(capsys, "evaluate", tmp_path)
    assert rc == 1 and f"{tmp_path}: not a hiervision run folder" in err


# ============================================================================= run folders written by train
def test_train_out_is_a_file(capsys, tiny_yaml, tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", f, "--quiet")
    assert rc == 1 and str(f) in err and f.read_text() == "mine"


def test_train_resume_with_another_config(capsys, run, tiny_yaml):
    before = snapshot(run)
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", run, "--set", "train.lr=0.05", "--quiet")
    assert rc == 1 and f"{run}: holds a run with another config" in err
    assert_kept(run, before)


def test_train_into_a_users_folder_is_refused(capsys, tiny_yaml, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own config")
    (out / "log.csv").write_text("my own log")
    before = snapshot(out)
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", out, "--quiet")
    assert rc == 1 and f"{out}: --out is a folder that is not a hiervision run" in err and "--force" in err
    assert snapshot(out) == before


def test_train_force_writes_beside_the_users_files(capsys, tiny_yaml, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, _ = cli(capsys, "train", tiny_yaml, "--out", out, "--quiet", "--force")
    assert rc == 0 and (out / "notes.txt").read_text() == "keep me" and (out / "best.pt").is_file()


def test_train_disk_full_keeps_the_previous_run(capsys, run, tiny_yaml, monkeypatch):
    before = snapshot(run)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)  # every atomic write fails as on a full disk
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", run, "--no-resume", "--quiet")
    assert rc == 1 and "cannot write (disk full)" in err
    assert_kept(run, before)


def test_checkpoint_write_on_a_full_disk_keeps_the_old_one(run, monkeypatch):
    from hiervision.checkpoint import save_checkpoint

    before = snapshot(run)
    state = load_checkpoint(run / "best.pt")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", full)
    with pytest.raises(runfolder.RunFolderError, match=r"best.pt: cannot write \(disk full\) \(the previous file"):
        save_checkpoint(run / "best.pt", state)
    assert snapshot(run) == before  # old checkpoint intact, no temp file left


@pytest.mark.slow
def test_second_training_into_the_same_run_fails_at_once(capsys, tiny_yaml, tmp_path):
    long_cfg = tmp_path / "long.yaml"
    long_cfg.write_text(TINY.replace("epochs: 1", "epochs: 200"))
    out = tmp_path / "run"
    first = child("train", str(long_cfg), "--out", str(out), "--quiet")
    try:
        wait_for(out / "last.pt", first)
        t0 = time.monotonic()
        rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", out, "--set", "seed=1", "--quiet")
        assert rc == 1 and "another hiervision process" in err and str(out) in err
        assert time.monotonic() - t0 < 30
    finally:
        first.kill()
        first.wait()


# ============================================================================= training faults and signals
def test_loss_nan_stops_with_one_line(capsys, tiny_yaml, tmp_path):
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", tmp_path / "out", "--set", "train.lr=1.0e+30",
                     "--set", "train.weight_decay=0", "--quiet")
    assert rc == 1 and "loss is not finite" in err and "train.lr" in err


def test_loss_explosion_stops_with_one_line(capsys, tiny_yaml, tmp_path):
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", tmp_path / "out", "--set", "train.max_loss=0.01", "--quiet")
    assert rc == 1 and "exceeds train.max_loss=0.01" in err


def _interrupt(tmp_path: Path, sig: int) -> tuple[subprocess.Popen, str, Path]:
    cfg = tmp_path / "long.yaml"
    cfg.write_text(TINY.replace("epochs: 1", "epochs: 200"))
    out = tmp_path / "run"
    proc = child("train", str(cfg), "--out", str(out), "--quiet")
    wait_for(out / "last.pt", proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc, err, out


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    proc, err, out = _interrupt(tmp_path, signal.SIGINT)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("hiervision: interrupted")
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1


@pytest.mark.slow
def test_sigterm_saves_and_says_so(tmp_path):
    proc, err, out = _interrupt(tmp_path, signal.SIGTERM)
    assert proc.returncode not in (0, -signal.SIGTERM)
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("hiervision:") and "resume" in lines[-1]
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1


# ============================================================================= data
def test_data_root_missing(capsys, tmp_path):
    cfg = folder_cfg(tmp_path, tmp_path / "nowhere")
    rc, err, _ = cli(capsys, "train", cfg, "--out", tmp_path / "out")
    assert rc == 1 and "nowhere: no such folder or zip file" in err


def test_data_fraction_out_of_range(capsys, tmp_path):
    cfg = folder_cfg(tmp_path, image_folder(tmp_path / "imgs"))
    rc, err, _ = cli(capsys, "train", cfg, "--out", tmp_path / "out", "--set", "data.val_fraction=1.5")
    assert rc == 1 and "data.val_fraction: must be a number in [0.0, 1.0)" in err


def test_data_image_at_the_top_has_no_class(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    write_png(root / "stray.png")
    rc, err, _ = cli(capsys, "train", folder_cfg(tmp_path, root), "--out", tmp_path / "out")
    assert rc == 1 and "stray.png: image at the top of the folder has no class folder" in err


def test_data_corrupt_images_listed_before_training(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    broken = ["animal/cat/broken1.png", "animal/dog/broken2.png", "plant/tree/broken3.png"]
    for rel in broken:  # one per class: some land in train, some in val/test
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rc, err, _ = cli(capsys, "train", folder_cfg(tmp_path, root), "--out", tmp_path / "out", "--quiet")
    assert rc == 1 and all(Path(rel).name in err for rel in broken)
    assert not (tmp_path / "out" / "last.pt").exists()  # failed before the first epoch


def test_data_empty_class_folder(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "plant" / "moss").mkdir()
    rc, err = 0, ""
    capsys.readouterr()
    try:
        rc = main(["train", str(folder_cfg(tmp_path, root)), "--out", str(tmp_path / "out"), "--quiet"])
    finally:
        err = capsys.readouterr().err
    assert "moss" in err and (rc == 1 or "warning" in err)


def test_data_symlink_loop(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    os.symlink(root / "animal", root / "animal" / "cat" / "loop")
    rc, err, _ = cli(capsys, "train", folder_cfg(tmp_path, root), "--out", tmp_path / "out", "--quiet")
    assert rc == 1 and "loop" in err


def test_data_symlinked_class_folder_keeps_its_images(tmp_path):
    from hiervision.data import build_data

    root = image_folder(tmp_path / "imgs")
    write_png(tmp_path / "elsewhere" / "fern" / "0.png")
    write_png(tmp_path / "elsewhere" / "fern" / "1.png")
    os.symlink(tmp_path / "elsewhere" / "fern", root / "plant" / "fern")
    data = build_data({"name": "folder", "root": str(root), "val_fraction": 0.0, "test_fraction": 0.0})
    assert len(data.train) + len(data.test) == 14


def test_data_cifar_pickle_with_code_never_runs(capsys, tiny_yaml, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "c" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps(Boom(marker)))
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", tmp_path / "out", "--quiet", "--set",
                     f"data={{name: cifar100, root: {tmp_path / 'c'}}}")
    assert not marker.exists()
    assert rc == 1 and "cifar-100-python" in err


def test_data_changed_after_training_is_refused(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=6)
    out = tmp_path / "out"
    assert cli(capsys, "train", folder_cfg(tmp_path, root), "--out", out, "--quiet")[0] == 0
    write_png(root / "animal" / "cat" / "new.png", value=7)
    before = snapshot(out)
    rc, err, _ = cli(capsys, "evaluate", out)
    assert rc == 1 and "--allow-changed-data" in err
    assert cli(capsys, "evaluate", out, "--allow-changed-data")[0] == 0
    assert_kept(out, before)
