"""The deploy twin of the bad-input corpus (issue 25): an exported model whose files were edited, damaged or
mismatched, flags out of range, the last unclear data errors, and the statistics a run was trained with.

Each case asserts the exit status and the one-line message naming the file, key or flag (the ``cli``
helper of ``test_bad_inputs`` enforces "exactly one line"). docs/reliability.md holds the same cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from hiervision.records import TreeView
from test_bad_inputs import SRC, TINY, cli, folder_cfg, image_folder, write_png

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
pytest.importorskip("onnxscript", reason="the [export] extra is not installed")


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(TINY)
    return f


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_yaml) -> Path:
    """A tiny trained run and its export (``m.onnx`` + ``m.json``) next to it."""
    d = tmp_path_factory.mktemp("deploy")
    from hiervision.cli import main

    assert main(["train", str(tiny_yaml), "--out", str(d / "run"), "--quiet"]) == 0
    assert main(["export", str(d / "run"), "--out", str(d / "m.onnx")]) == 0
    write_png(d / "a.png", mode="RGB")
    return d


def copy_export(src: Path, dst: Path, edit=None, graph=None) -> Path:
    """A copy of the export with the sidecar edited by ``edit(side)`` and the graph's bytes by ``graph(b)``."""
    dst.mkdir(parents=True, exist_ok=True)
    data = (src / "m.onnx").read_bytes()
    (dst / "m.onnx").write_bytes(graph(data) if graph else data)
    side = json.loads((src / "m.json").read_text())
    if edit:
        edit(side)
    (dst / "m.json").write_text(json.dumps(side))
    return dst / "m.onnx"


def nodes(side: dict) -> list[dict]:
    return side["taxonomy"]["nodes"]


def swap_two_classes(side):
    a, b = nodes(side)[1], nodes(side)[2]
    a["name"], b["name"] = b["name"], a["name"]


def move_a_leaf(side):
    nodes(side)[-1]["parent"] = 1


def drop_a_leaf(side):
    nodes(side).pop()


def refingerprint(edit):
    """The same edit with the stored fingerprint recomputed: the graph's own metadata still refuses it."""
    def both(side):
        edit(side)
        side["taxonomy"]["fingerprint"] = TreeView.from_dict(side["taxonomy"]).fingerprint
    return both


SIDECAR_CASES = [  # (id, edit of the sidecar, words in the one-line error)
    ("std zero", lambda s: s.update(std=[0.0, 1.0, 1.0]), "m.json: key 'std': must be a finite number > 0, got 0"),
    ("temperature negative", lambda s: s.update(temperature=-1), "key 'temperature': must be a finite number > 0"),
    ("temperature per level of wrong length", lambda s: s.update(temperature=[1.0]), "key 'temperature': one per"),
    ("in_chans changed", lambda s: s.update(in_chans=1, mean=[0.5], std=[0.2]),
     "m.onnx: the graph's input has 3 at dimension 1 but the sidecar's key 'in_chans' says 1"),
    ("in_chans 2", lambda s: s.update(in_chans=2), "key 'in_chans': must be 1 or 3, got 2"),
    ("mean text", lambda s: s.update(mean="abc"), "m.json: key 'mean': must be a list of 3 number(s)"),
    ("mean nan", lambda s: s.update(mean=[float("nan")] * 3), "key 'mean': must be a finite number"),
    ("image size changed", lambda s: s.update(image_size=[28, 28]), "sidecar's key 'image_size' says 28"),
    ("decoder kind unknown", lambda s: s["decoder"].update(kind="magic"), "key 'decoder': kind must be one of"),
    ("decoder beam width 0", lambda s: s["decoder"].update(kind="beam_steps", beam_width=0),
     "key 'decoder.beam_width': must be a whole number ≥ 1, got 0"),
    ("decoder end nodes", lambda s: s["decoder"].update(end_nodes="some"), "key 'decoder.end_nodes'"),
    ("decoder kind another valid one", lambda s: s["decoder"].update(kind="routing"),
     "m.onnx: the sidecar's key 'decoder' ({'kind': 'routing'"),
    ("decoder end nodes another valid one", lambda s: s["decoder"].update(end_nodes="all"),
     "is not the decoder the graph was exported with"),
    ("decoder candidates text", lambda s: s["decoder"].update(candidates="yes"),
     "key 'decoder.candidates': must be true or false, got 'yes'"),
    ("step graph outside the folder", lambda s: s.update(step_graph="../x.onnx"), "key 'step_graph': must be a file"),
    ("hedge target out of range", lambda s: s["decisions"]["hedge"].update({"1.5": 1.0}),
     "key 'decisions.hedge': accuracy target '1.5' must lie in (0, 1)"),
    ("two classes swapped", swap_two_classes, "key 'taxonomy': the tree was edited after export"),
    ("a leaf moved", move_a_leaf, "key 'taxonomy': the tree was edited after export"),
    ("a leaf dropped", drop_a_leaf, "key 'taxonomy': the tree was edited after export"),
    ("swapped, fingerprint redone", refingerprint(swap_two_classes), "m.onnx: the graph was exported for another tree"),
    ("dropped, fingerprint redone", refingerprint(drop_a_leaf), "m.onnx: the graph was exported for another tree"),
    ("version 1", lambda s: s.update(version=1), "key 'version': 1 predates the checked sidecar"),
    ("version from the future", lambda s: s.update(version=9), "key 'version': 9 was written by a newer hiervision"),
    ("no content hash", lambda s: s.pop("sha256"), "key 'sha256': must hold the hash of graph"),
    ("not a sidecar", lambda s: s.update(format="other"), "not a hiervision export sidecar"),
]


@pytest.mark.parametrize("edit,words", [c[1:] for c in SIDECAR_CASES], ids=[c[0] for c in SIDECAR_CASES])
def test_edited_sidecar_is_refused(capsys, exported, tmp_path, edit, words):
    onnx = copy_export(exported, tmp_path, edit)
    rc, err, _ = cli(capsys, "predict", onnx, exported / "a.png")
    assert rc == 1 and words in err, err


GRAPH_CASES = [("truncated", lambda b: b[: len(b) // 2]), ("empty", lambda b: b""),
               ("random bytes", lambda b: os.urandom(4096))]


@pytest.mark.parametrize("damage", [c[1] for c in GRAPH_CASES], ids=[c[0] for c in GRAPH_CASES])
@pytest.mark.parametrize("command", ["predict", "serve"])
def test_damaged_graph_is_one_line(capsys, exported, tmp_path, damage, command):
    onnx = copy_export(exported, tmp_path, graph=damage)
    args = [exported / "a.png"] if command == "predict" else ["--port", "1"]  # refused before it listens
    rc, err, _ = cli(capsys, command, onnx, *args)
    assert rc == 1 and "m.onnx: content differs from the sha256 its sidecar recorded at export" in err
    # the same bytes with a matching hash (a sidecar edited to fit): onnxruntime's own refusal, one line
    digest = hashlib.sha256(onnx.read_bytes()).hexdigest()
    copy_export(tmp_path, tmp_path, lambda s: s["sha256"].update(graph=digest))
    rc, err, _ = cli(capsys, command, onnx, *args)
    assert rc == 1 and "m.onnx: not a loadable ONNX graph (" in err


def test_graph_output_width_is_checked_against_the_tree(capsys, exported, tmp_path):
    """A graph without the tree metadata (exported by hand) and a sidecar with one leaf less, fingerprint
    redone: the output width no longer fits the tree."""
    import onnx

    model = onnx.load(str(exported / "m.onnx"))
    del model.metadata_props[:]
    bare = tmp_path / "bare"
    bare.mkdir()
    onnx.save(model, str(bare / "m.onnx"))
    digest = hashlib.sha256((bare / "m.onnx").read_bytes()).hexdigest()
    side = json.loads((exported / "m.json").read_text())
    (bare / "m.json").write_text(json.dumps(side))
    def cut(s):
        refingerprint(drop_a_leaf)(s)
        s["sha256"].update(graph=digest)

    dst = copy_export(bare, tmp_path / "cut", cut)
    rc, err, _ = cli(capsys, "predict", dst, exported / "a.png")
    n = len(side["taxonomy"]["nodes"])
    assert rc == 1 and f"output 'scores' has {n} columns but the sidecar's tree has {n - 1} nodes" in err


def test_hedged_answers_from_the_onnx_equal_the_runs(capsys, exported):
    rc, _, from_run = cli(capsys, "predict", exported / "run", exported / "a.png", "--accuracy", "0.9")
    assert rc == 0
    rc, _, from_onnx = cli(capsys, "predict", exported / "m.onnx", exported / "a.png", "--accuracy", "0.9")
    assert rc == 0
    run, onnx = json.loads(from_run), json.loads(from_onnx)
    assert onnx["hedged"]["path"] == run["hedged"]["path"]
    assert onnx["hedged"]["probability"] == pytest.approx(run["hedged"]["probability"], abs=1e-4)
    rc, err, _ = cli(capsys, "predict", exported / "m.onnx", exported / "a.png", "--accuracy", "0.8")
    assert rc == 1 and "m.onnx: no hedging λ for accuracy 0.8 (fitted: 0.9, 0.95, 0.99)" in err


@pytest.mark.parametrize("command,flag", [("predict", "--accuracy"), ("serve", "--hedge-accuracy"),
                                          ("evaluate", "--accuracy")])
@pytest.mark.parametrize("value", ["1.5", "0", "-1"])
def test_accuracy_target_must_lie_in_0_1(capsys, exported, command, flag, value):
    extra = [exported / "a.png"] if command == "predict" else []
    rc, err, _ = cli(capsys, command, exported / "m.onnx", *extra, flag, value)
    assert rc == 2 and f"argument {flag}: must lie in (0, 1), got {value}" in err


@pytest.mark.parametrize("value", ["5", "-1", "0", "1"])
def test_induce_p_min_must_lie_in_0_1(capsys, exported, tmp_path, value):
    rc, err, _ = cli(capsys, "induce", exported / "run", "--p-min", value, "--out", tmp_path / "t.json")
    assert rc == 2 and f"argument --p-min: must lie in (0, 1), got {value}" in err
    assert not (tmp_path / "t.json").exists()


def test_induce_refuses_a_tree_too_big_for_its_dense_matrix(capsys, exported, tmp_path, monkeypatch):
    monkeypatch.setattr("hiervision.induce.MAX_INDUCE_CLASSES", 2)
    rc, err, _ = cli(capsys, "induce", exported / "run", "--p-min", "0.1", "--out", tmp_path / "t.json")
    assert rc == 1 and "inducing a tree reads a dense confusion matrix" in err and "give the tree" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t.json").exists()


def test_csv_path_separator_never_found_in_a_class_name(capsys, exported):
    rc, _, out = cli(capsys, "predict", exported / "m.onnx", exported / "a.png", "--format", "csv")
    assert rc == 0
    header, row = out.splitlines()[:2]
    assert "path_ids" in header.split(",") and " > " in row
    name = json.loads((exported / "m.json").read_text())["taxonomy"]["nodes"][1]["name"]
    rc, err, _ = cli(capsys, "predict", exported / "m.onnx", exported / "a.png", "--format", "csv",
                     "--path-sep", name[1:3])
    assert rc == 1 and f"--path-sep {name[1:3]!r}: the class name" in err


@pytest.mark.parametrize("setting,words", [
    ("model.beam_width=0", "config key 'model.beam_width' must be ≥ 1, got 0"),
    ("model.dropout=1.5", "config key 'model.dropout' must be < 1, got 1.5"),
    ("model.hidden_size=-4", "config key 'model.hidden_size' must be a whole number ≥ 1 or auto, got -4"),
])
def test_model_keys_with_a_range_fail_before_any_data_loads(capsys, tiny_yaml, tmp_path, setting, words):
    rc, err, _ = cli(capsys, "train", tiny_yaml, "--out", tmp_path / "out", "--set", setting)
    assert rc == 1 and words in err
    assert not (tmp_path / "out").exists()  # refused before the run folder (or any data) was touched


def _train_on(capsys, tmp_path, root) -> tuple[int, str]:
    rc, err, _ = cli(capsys, "train", folder_cfg(tmp_path, root), "--out", tmp_path / "out", "--quiet")
    return rc, err


def test_data_root_a_file_that_is_not_a_zip(capsys, tmp_path):
    (tmp_path / "data.zip").write_text("hello")
    rc, err = _train_on(capsys, tmp_path, tmp_path / "data.zip")
    assert rc == 1 and "data.zip: data.root is a file but not a zip archive" in err


def test_data_root_an_empty_zip(capsys, tmp_path):
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    rc, err = _train_on(capsys, tmp_path, tmp_path / "empty.zip")
    assert rc == 1 and "empty.zip: the zip archive holds no images" in err


def test_class_folder_name_with_a_newline(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    write_png(root / "plant" / "sub\nline" / "0.png")
    rc, err = _train_on(capsys, tmp_path, root)
    assert rc == 1 and "plant/sub\\nline: name holds a control character" in err


def test_file_name_not_utf8(capsys, tmp_path):
    root = image_folder(tmp_path / "imgs")
    write_png(Path(os.fsdecode(os.fsencode(root / "plant" / "tree") + b"/caf\xe9.png")))
    rc, err = _train_on(capsys, tmp_path, root)
    assert rc == 1 and "plant/tree/caf\\xe9.png: file name is not valid UTF-8" in err


def test_evaluate_changed_data_uses_the_runs_normalisation(capsys, tmp_path):
    """Images added after training change the training split's statistics; --allow-changed-data evaluates
    with the checkpoint's mean/std all the same."""
    from hiervision.experiment import load_run, run_data

    root = image_folder(tmp_path / "imgs", per_class=6)
    assert _train_on(capsys, tmp_path, root)[0] == 0
    for j in range(8):  # much brighter images: the recomputed mean would move
        write_png(root / "animal" / "cat" / f"new{j}.png", value=250)
    cfg, _, _, meta = load_run(tmp_path / "out")
    fresh = run_data(cfg, tmp_path / "out", allow_changed=True)
    assert list(fresh.mean) != pytest.approx(meta["mean"])  # what evaluate used to normalise with
    kept = run_data(cfg, tmp_path / "out", allow_changed=True, meta=meta)
    assert list(kept.mean) == meta["mean"] and list(kept.std) == meta["std"]
    assert cli(capsys, "evaluate", tmp_path / "out", "--allow-changed-data")[0] == 0


def test_export_is_quiet_by_default(exported, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-m", "hiervision", "export", str(exported / "run"), "--out",
                           str(tmp_path / "q.onnx")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tmp_path / "q.onnx"), str(tmp_path / "q.json")]


def test_resume_on_changed_data_keeps_the_runs_normalisation(tmp_path):
    from hiervision.checkpoint import load_checkpoint
    from hiervision.config import load_config
    from hiervision.training import train

    root = image_folder(tmp_path / "imgs", per_class=6)
    cfg = load_config(folder_cfg(tmp_path, root, epochs=2))
    train(cfg, tmp_path / "out", max_epochs_this_call=1)
    first = load_checkpoint(tmp_path / "out" / "last.pt")["meta"]
    for j in range(8):
        write_png(root / "animal" / "cat" / f"new{j}.png", value=250)
    train(cfg, tmp_path / "out", allow_changed_data=True)
    last = load_checkpoint(tmp_path / "out" / "last.pt")
    assert last["epoch"] == 2 and last["meta"]["mean"] == first["mean"] and last["meta"]["std"] == first["std"]


def test_a_nan_from_the_model_never_leaves_the_runtime_or_the_server_as_an_answer():
    import torch

    from conftest import post_image, serving
    from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
    from hiervision.export import sidecar, torch_engine
    from hiervision.models import create_model
    from hiervision.runtime import Predictor
    from hiervision.serve import create_app
    from hiervision.serve.predictor import RuntimePredictor

    model = create_model("flat", fashion_mnist_taxonomy(), backbone="resnet20", backbone_kwargs={"width": 0.25},
                         in_chans=1, image_size=28).eval()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))  # a diverged model
    runtime = Predictor("nan", sidecar=sidecar(model, {"in_chans": 1, "image_size": 28}), engine=torch_engine(model))
    records = runtime.predict_arrays(np.random.default_rng(0).random((3, 1, 28, 28)))
    assert all("not a number (NaN)" in r["error"] and "path" not in r for r in records)
    image = Path(tempfile.mkdtemp()) / "a.png"
    write_png(image, 128, 28)
    with serving(create_app(RuntimePredictor(runtime))) as port:
        with pytest.raises(urllib.error.HTTPError) as e:
            post_image(f"http://127.0.0.1:{port}", image)
    assert e.value.code == 500 and "not a number (NaN)" in json.load(e.value)["detail"]
