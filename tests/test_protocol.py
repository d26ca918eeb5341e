"""The comparison's protocol, by test (issue 40): model selection never sees the test split, and evaluation counts
every image.

The test split of every data set built during a test is *sealed*: any read of its images or labels raises while
a run is training (its epochs, per-epoch validation and the choice of ``best.pt``) or while the comparison picks
something on validation (HierNet's induced tree, the beam width). Only the split's size and image ids stay
readable (the run records which images each split holds before it trains), and how its images are preprocessed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

import hiervision.experiment as experiment
import hiervision.training.engine as engine
from hiervision.config import load_config
from hiervision.models import list_models, model_info
from hiervision.training import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import comparison_plan as P  # noqa: E402  (benchmarks/ is not a package)
from test_comparison import _tiny, configs  # noqa: E402,F401  (the toy comparison and its configs fixture)

#: what a sealed split still answers: its size, its image ids (the split record) and its eval transform (the
#: preprocessing a checkpoint records)
METADATA = frozenset({"ids", "taxonomy", "transform"})


class SealedRead(AssertionError):
    """The test split was read while the protocol forbids it."""


class Seal:
    """The switch every sealed split reads; ``reads`` counts the reads refused."""

    def __init__(self) -> None:
        self.on, self.reads = False, []

    @contextlib.contextmanager
    def closed(self, why: str):
        before, self.on = self.on, why
        try:
            yield
        finally:
            self.on = before


def sealed(ds, seal: Seal):
    """``ds`` as an instance of a subclass of its own class whose images and labels raise while ``seal`` is on."""
    base = type(ds)

    class Sealed(base):  # type: ignore[misc,valid-type]
        def __getattribute__(self, name: str):
            if seal.on and not name.startswith("__") and name not in METADATA:
                seal.reads.append(name)
                raise SealedRead(f"test split read ({name}) during {seal.on}")
            return object.__getattribute__(self, name)

        def __getitem__(self, i):
            if seal.on:
                raise SealedRead(f"test split read (image {i}) during {seal.on}")
            return base.__getitem__(self, i)

        def __len__(self) -> int:
            return len(object.__getattribute__(self, "targets"))

    ds.__class__ = Sealed
    return ds


@pytest.fixture
def seal(monkeypatch) -> Seal:
    """Every data set built from here on has a sealed test split, closed while a run trains."""
    s = Seal()
    build = experiment.build_data

    def build_sealed(cfg):
        data = build(cfg)
        sealed(data.test, s)
        return data

    monkeypatch.setattr(experiment, "build_data", build_sealed)
    run_epochs = engine.run_epochs

    def training(*args, **kwargs):
        with s.closed("training"):
            return run_epochs(*args, **kwargs)

    monkeypatch.setattr(engine, "run_epochs", training)
    return s


def _cfg(name: str) -> dict:
    model = {"name": name, "backbone": "resnet20", "backbone_kwargs": {"width": 0.25}, **model_info(name).tiny}
    return load_config(overrides=[
        "data={name: synthetic, n_train: 96, n_test: 37, size: 12}",  # 37: no batch size divides it
        f"model={json.dumps(model)}", "train.epochs=2", "train.batch_size=16", "train.progress=false",
        "train.amp=none", "eval.batch_size=16"])


def test_the_seal_catches_a_read(seal, tmp_path):
    data = experiment.run_data(_cfg("flat"))
    with seal.closed("a test"), pytest.raises(SealedRead, match="test split read"):
        data.test[0]
    with seal.closed("a test"), pytest.raises(SealedRead):
        data.test.targets  # noqa: B018 (the read itself is the point)
    assert len(data.test) == 37 and data.test.targets.shape == (37,)  # open again


def test_a_loop_that_selects_on_the_test_split_is_caught(seal, tmp_path, monkeypatch):
    """The seal can fail: validation that (wrongly) scores the test split raises, and the run writes no metrics."""
    validate = engine.validate

    def on_test(loop, *args, **kwargs):
        loop.data.test.targets  # noqa: B018 (the read itself is the point)
        return validate(loop, *args, **kwargs)

    monkeypatch.setattr(engine, "validate", on_test)
    with pytest.raises(SealedRead, match="during training"):
        train(_cfg("flat"), tmp_path / "run", resume=False)
    assert seal.reads == ["targets"] and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("name", [n for n in list_models() if n != "hiernet"] + ["hiernet"])
def test_no_head_reads_the_test_split_while_it_trains_and_evaluation_counts_every_image(name, seal, tmp_path):
    """Every registered head trains two epochs (validation each epoch, ``best.pt`` chosen on it) under the seal;
    then the test report counts all 37 test images, though no evaluation batch size divides 37."""
    cfg = _cfg(name)
    if name == "hiernet":  # the given tree's two levels: one router
        cfg["model"].update(split=[1], extra_blocks=0)
    metrics = train(cfg, tmp_path / name, resume=False)
    assert not seal.reads, seal.reads
    assert metrics["num_samples"] == 37
    assert sum(sum(v.values()) for v in metrics["length_diagnostics"]["length_confusion"].values()) == 37


def test_the_comparisons_cells_pick_on_validation_only(seal, tmp_path, configs, monkeypatch):  # noqa: F811
    """The toy comparison (flat, Guo's CNN-RNN with its beam row, HierNet on a tree induced from the flat
    pre-train's validation confusion, a CRM row): no cell reads the test split while it trains or while the tree is
    induced, and the beam width is chosen on validation before the one test evaluation."""
    table = (P.DataSet("toy", "toy tree", (*_tiny(induced=True)[0].methods,
                                           P.Method("guo_rnn_beam", "beam", "guo.yaml", reuses="guo_rnn",
                                                    beam_widths=(1, 3)),
                                           P.Method("flat_crm", "CRM", "flat.yaml", reuses="flat", decode="crm")),
                       epochs={"cpu": 2}, induce=(0.05, 3)),)
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=table, config_dir=configs,
                   extra=["data.val_fraction=0.4"])  # every class in val: the confusion matrix needs them
    from hiervision.induce import induce_from_run

    def induce(*args, **kwargs):
        with seal.closed("tree induction"):
            return induce_from_run(*args, **kwargs)

    import hiervision.evaluation as evaluation

    splits = []
    evaluate_split = evaluation.evaluate_split

    def recorded(model, data, split, bs):
        splits.append(split)
        return evaluate_split(model, data, split, bs)

    monkeypatch.setattr(evaluation, "evaluate_split", recorded)
    out = P.run_cells(cells, induce_fn=induce, log=lambda *_: None)
    assert all(c.done() for c in cells) and len(out["ran"]) == len(cells) and not seal.reads
    assert splits[:3] == ["val", "val", "test"]  # both widths on val, then the chosen one on test
    for c in cells:
        if not c.hidden:
            m = c.metrics()
            assert m["num_samples"] == len(experiment.run_data(c.cfg).test)
