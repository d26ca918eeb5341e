"""Issue 14's comparison profile: cells cached by config digest, resumable runs, paired statistics, outputs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision import Taxonomy
from hiervision.cli import main as cli_main
from hiervision.config import load_config
from hiervision.data import iter_batches
from hiervision.experiment import load_run, run_data
from hiervision.models import create_model
from hiervision.taxonomy import PAD

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import comparison as C  # noqa: E402  (benchmarks/ is not a package)
import comparison_plan as P  # noqa: E402  (benchmarks/ is not a package)
import comparison_report as R  # noqa: E402  (benchmarks/ is not a package)
import comparison_stats as S  # noqa: E402  (benchmarks/ is not a package)

FLAT = """data: {name: synthetic_var, n_train: 256, n_test: 96, size: 16}
model: {name: flat, backbone: resnet20, backbone_kwargs: {width: 0.25}}
train: {epochs: 1, batch_size: 64, amp: none}
eval: {batch_size: 256}
"""


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    d = tmp_path / "configs"
    d.mkdir()
    (d / "flat.yaml").write_text(FLAT)
    (d / "guo.yaml").write_text("base: flat.yaml\nmodel: {name: guo_rnn, embed_size: 8, hidden_size: 16}\n")
    (d / "hiernet.yaml").write_text("base: flat.yaml\ndata: {tree: null}\n"
                                    "model: {name: hiernet, backbone_kwargs: {pretrained_path: null}}\n")
    return d


def _tiny(induced: bool = False) -> tuple[P.DataSet, ...]:
    methods = [P.Method("flat", "flat", "flat.yaml"), P.Method("guo_rnn", "Guo CNN-RNN", "guo.yaml")]
    if induced:
        methods.append(P.Method("hiernet", "HierNet", "hiernet.yaml", induced=True))
    return (P.DataSet("toy", "toy tree", tuple(methods), epochs={"cpu": 4 if induced else 1}, induce=(0.05, 3)),)


# ----------------------------------------------------------------------------- statistics
def test_paired_difference_and_t_interval_by_hand():
    method = {0: 0.90, 1: 0.80, 2: 0.85}
    flat = {0: 0.88, 1: 0.79, 2: 0.80, 3: 0.70}  # seed 3 has no partner: left out
    d = S.paired_difference(method, flat)
    diffs = [0.02, 0.01, 0.05]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.303 * std / math.sqrt(3)  # t(0.975, 2 df)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(std)
    assert (d["lo"], d["hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert d["lo"] < 0 < d["hi"]  # +2.7 pt, but three seeds do not pin it down
    one = S.paired_difference({0: 0.9}, {0: 0.8})
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1) and one["lo"] is None
    assert S.t_quantile(1) == 12.706 and S.t_quantile(30) == 2.042 and S.t_quantile(100) == 1.96
    with pytest.raises(ValueError):
        S.t_quantile(0)
    assert S.mean_std([1.0, None, 3.0]) == {"n": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2))}


def _row(label: str, n: int, mean: float, lo: float | None, hi: float | None) -> dict:
    d = {"n": n, "mean": mean, "lo": lo, "hi": hi}
    return {"label": label, "n": n, "vs_flat": {"leaf_accuracy": d}}


def test_the_words_follow_the_declared_margin_on_each_side():
    """Made-up intervals on each side of 0, −0.5 pt and +0.5 pt: each word is said only where the rule allows it."""
    assert R.MARGIN_PT == 0.5

    def words(lo_pt: float, hi_pt: float, n: int = 5) -> str:
        return R.top1_words({"n": n, "mean": (lo_pt + hi_pt) / 200, "lo": lo_pt / 100, "hi": hi_pt / 100})

    assert words(0.01, 0.9) == "beats flat"
    assert words(-0.9, -0.01) == "loses"
    assert words(-0.49, -0.01) == "loses by less than 0.5 pt (keeps top-1)"
    assert words(-0.51, -0.01) == "loses"
    assert words(-0.49, 0.49) == "ties (within ±0.5 pt)"
    assert words(-0.5, 0.5) == "ties (within ±0.5 pt)"  # the margin's ends belong to it
    assert words(-0.49, 0.51) == "keeps top-1 (a gain not settled at n = 5)"
    assert words(-0.51, 0.49) == "not settled at n = 5"
    assert words(-3.73, 0.85, 3) == "not settled at n = 3"  # HAFrame on Tiny-ImageNet, three seeds


def test_which_method_is_generated_from_intervals_only():
    rows = {"flat": {"label": "flat", "n": 3}, "a": _row("A", 3, 0.02, 0.01, 0.03),
            "b": _row("B", 3, -0.1, -0.12, -0.08), "c": _row("C", 3, 0.01, -0.01, 0.03)}
    text = R.which_method({"x": {"label": "X", "rows": rows}})
    assert "| A | 3 | +2.00 pt [+1.00, +3.00] | beats flat | – | – | – |" in text
    assert "| B | 3 | -10.00 pt [-12.00, -8.00] | loses |" in text
    assert "| C | 3 | +1.00 pt [-1.00, +3.00] | not settled at n = 3 |" in text
    assert "distinguishable" not in text
    rows["c"] = _row("C", 2, 0.01, -0.01, 0.03)  # claims only where the seeds are there; the rest is named
    text = R.which_method({"x": {"label": "X", "rows": rows}})
    assert "| A |" in text and "| B |" in text and "| C |" not in text
    assert "Not measured yet with >= 3 seeds: C;" in text
    rows["d"] = {**_row("D", 1, 0.05, None, None), "optional": True}  # an exploratory row: tables only
    assert R.which_method({"x": {"label": "X", "rows": rows}}) == text
    # a row with all three intervals says whether it meets the rule; an ensemble says it is one
    rows["e"] = {"label": "E", "n": 3, "vs_flat": {"leaf_accuracy": _paired(0.001, 0.004),
                                                    "mistake_severity": _paired(-0.1, 0.02),
                                                    "hdist@5": _paired(-0.1, 0.02)}}
    rows["hie"] = {**rows["e"], "label": "HiE"}
    text = R.which_method({"x": {"label": "X", "rows": rows}})
    assert "| E | 3 | +0.10 pt [-0.30, +0.50] | ties (within ±0.5 pt) | -0.10 [-0.12, -0.08] | -0.10 [-0.12, -0.08] " \
        "| yes |" in text and "| yes (2 networks) |" in text
    rows["flat"]["n"] = 2
    for r in ("a", "b", "e", "hie"):
        rows[r] = _row(rows[r]["label"], 2, 0.02, 0.01, 0.03)
    text = R.which_method({"x": {"label": "X", "rows": rows}})
    assert "beats" not in text and "loses" not in text
    assert "*X*: not measured yet with >= 3 seeds: flat, A, B, C, E, HiE" in text


def _paired(mean: float, half: float, n: int = 3) -> dict:
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def test_the_recommended_recipe_follows_the_rule_on_every_data_set():
    def row(label, top1, sev, hd5, n=3, half=0.004):
        return {"label": label, "n": n, "vs_flat": {"leaf_accuracy": _paired(top1, half, n),
                                                     "mistake_severity": _paired(sev, 0.02, n),
                                                     "hdist@5": _paired(hd5, 0.02, n)}}

    def summary(**rows):
        both = {"flat": {"label": "flat", "n": 3}}
        return {d: {"label": d.upper(), "rows": {**both, **rows}} for d in ("a", "b")}

    assert "not decided yet" in R.recommendation(summary(x=row("X", 0.0, -0.1, -0.1, n=2)))
    assert R.recipe_choice(summary(x=row("X", 0.0, -0.1, -0.1, n=2))) is None
    # X keeps top-1 (lower end -0.3 pt, inside the margin) and cuts both mistake measures; Y gains top-1 but not
    # severity
    text = R.recommendation(summary(x=row("X", 0.001, -0.1, -0.1), y=row("Y", 0.01, 0.0, -0.1)))
    assert text.startswith("*Recommended recipe*: **X**") and "Δ top-1 pt +0.10 [-0.30, +0.50]" in text
    # the same means with a wider interval (lower end -0.6 pt): not shown to keep top-1, so flat stays
    wide = summary(x=row("X", 0.001, -0.1, -0.1, half=0.007))
    assert R.recipe_choice(wide)["recipe"] is None
    assert R.recommendation(wide).startswith("*Recommended recipe*: **flat** — no single-network row keeps")
    # an ensemble (HiE: two networks) that does better still is shown in the tables but is not equal budget
    assert R.ENSEMBLES == {"hie", "hie_crm"}
    text = R.recommendation(summary(x=row("X", 0.001, -0.1, -0.1), hie=row("HiE", 0.02, -0.3, -0.3)))
    assert text.startswith("*Recommended recipe*: **X**")
    # meets on one data set only: flat, with the row named where it meets the rule and the best trade-off elsewhere
    s = summary(x=row("X", 0.001, -0.1, -0.1), z=row("Z", -0.02, -0.5, -0.5), hie=row("HiE", 0.0, -0.1, -0.1))
    s["b"]["rows"]["x"] = row("X", -0.02, -0.1, -0.1)  # loses 2 pt on B
    s["b"]["rows"]["z"] = row("Z", -0.01, -0.5, -0.5)  # loses 1 pt on B: the smaller loss
    choice = R.recipe_choice(s)
    assert choice["recipe"] is None and choice["per_data"]["a"]["meets"] == "x"
    assert choice["per_data"]["b"] == {"meets": None, "trade_off": "z", "ensembles": ["hie"]}
    text = R.recommendation(s)
    assert "A: **X** meets it" in text and "B: no row meets it; the best trade-off there is **Z**" in text
    assert "HiE meets it at more compute" in text
    # nothing lowers a mistake measure on a data set: flat there, said so
    s["b"]["rows"]["x"] = s["b"]["rows"]["z"] = row("X", -0.02, 0.1, 0.1)
    assert "B: no row meets it or lowers a mistake measure (flat)" in R.recommendation(s)


def test_the_recipe_the_package_trains_is_the_one_the_rule_picks_on_the_committed_comparison():
    """`train FOLDER`'s head, the demo's first row and configs/recommended-*.yaml follow ``recipe_choice`` on
    benchmarks/results/comparison.json: a new comparison that changes the pick fails here until they follow."""
    import yaml

    from hiervision.cli.demo import DEMO_METHODS
    from hiervision.recipe import RECOMMENDED_HEAD

    summary = json.loads((ROOT / "benchmarks" / "results" / "comparison.json").read_text(encoding="utf-8"))
    choice = R.recipe_choice(summary["summary"])
    methods = {d.key: {m.key: m for m in d.methods} for d in P.DATASETS}
    recipe = methods["fmnist"][choice["recipe"] or "flat"].config
    recipe_head = yaml.safe_load((ROOT / "configs" / "comparison" / recipe).read_text(encoding="utf-8"))["model"]
    assert RECOMMENDED_HEAD == recipe_head["name"]
    assert DEMO_METHODS[0][1] == RECOMMENDED_HEAD and DEMO_METHODS[0][0].endswith("(recommended)")
    for data_key, name in (("fmnist", "fmnist"), ("tiny32", "tinyimagenet")):
        cfg = yaml.safe_load((ROOT / "configs" / f"recommended-{name}.yaml").read_text(encoding="utf-8"))
        m = methods[data_key][choice["per_data"][data_key]["meets"] or "flat"]
        assert cfg["base"] == f"comparison/{m.config}" and cfg["eval"]["decode"] == (m.decode or "argmax")


def test_the_crm_note_quotes_the_paired_cost_and_the_synthetic_decomposition(tmp_path):
    crm = {"label": "flat + CRM", "n": 3, "vs_flat": {k: _paired(v, 0.01) for k, v in (
        ("leaf_accuracy", -0.013), ("mistake_severity", -0.29), ("depth_severity", -0.28))}}
    summary = {"tiny": {"label": "TINY", "rows": {"flat": {"label": "flat", "n": 3}, "flat_crm": crm}}}
    synthetic = tmp_path / "crm-depth.json"
    assert R.crm_on_deep_trees(summary, synthetic) == ""  # without the decomposition: no note

    def rule(top1, crm):
        return {"argmax": {"top1": top1}, "crm": {"top1": crm}}
    synthetic.write_text(json.dumps({"hier@0.284": {"wordnet": rule(0.28, 0.27), "padded": rule(0.28, 0.271)},
                                     "hier@0.75": {"wordnet": rule(0.75, 0.749), "padded": rule(0.75, 0.75)}}))
    text = R.crm_on_deep_trees(summary, synthetic)
    assert "TINY: Δ top-1 pt -1.30 [-2.30, -0.30], Δ mistake sev. -0.29 [-0.30, -0.28]" in text
    assert "CRM costs 1.00 pt top-1 on the WordNet tree and 0.90 pt on the same tree padded" in text
    assert "0.10 pt on WordNet at 75 %: the cost comes from low confidence" in text


# ----------------------------------------------------------------------------- the profile end to end
@pytest.mark.slow
def test_profile_is_resumable_and_cumulative(tmp_path, configs):
    runs = tmp_path / "runs"
    cells = P.plan("cpu", [0, 1], runs, datasets=_tiny(), config_dir=configs)
    assert [c.name for c in cells] == ["flat/toy/s0", "guo_rnn/toy/s0", "flat/toy/s1", "guo_rnn/toy/s1"]
    assert "0 of 4 cells done" in P.status(cells)
    first = P.run_cells(cells, log=lambda *_: None)
    assert len(first["ran"]) == 4 and not first["skipped"]
    assert "4 of 4 cells done" in P.status(cells) and "todo" not in P.status(cells)

    def must_not_train(*_a, **_k):
        raise AssertionError("a finished cell was trained again")

    again = P.plan("cpu", [0, 1], runs, datasets=_tiny(), config_dir=configs)
    second = P.run_cells(again, train_fn=must_not_train, log=lambda *_: None)
    assert second["ran"] == [] and len(second["skipped"]) == 4
    # a changed recipe is a new cell (new digest, new folder): cached results are never mixed in
    changed = P.plan("cpu", [0], runs, datasets=_tiny(), config_dir=configs, extra=["train.lr=0.05"])
    assert not any(c.done() for c in changed) and changed[0].run_dir != cells[0].run_dir
    # a third seed adds to the table: n grows per cell
    more = P.plan("cpu", [0, 1, 2], runs, datasets=_tiny(), config_dir=configs, only=["flat"])
    assert [c.state() for c in more] == ["done", "done", "todo"]

    summary = S.summarize(again)
    rows = summary["toy"]["rows"]
    assert rows["flat"]["n"] == 2 and rows["guo_rnn"]["n"] == 2 and "vs_flat" not in rows["flat"]
    pa = rows["guo_rnn"]["vs_flat"]["path_accuracy"]
    per = rows["guo_rnn"]["per_seed"]["path_accuracy"], rows["flat"]["per_seed"]["path_accuracy"]
    assert pa["n"] == 2 and pa["mean"] == pytest.approx(sum(per[0][s] - per[1][s] for s in (0, 1)) / 2)
    assert pa["lo"] is not None and pa["lo"] <= pa["mean"] <= pa["hi"]
    assert rows["guo_rnn"]["diagnostics"]  # variable-depth tree: the stop-early/late breakdown is there

    results, md, readme = tmp_path / "results", tmp_path / "RESULTS.md", tmp_path / "README.md"
    md.write_text("# Benchmark results\n\n## quick\n\nkept\n")
    readme.write_text(f"intro\n{R.README_START}\nold: not measured yet, not measured yet\n{R.README_END}\nrest\n")
    body = R.write_outputs(summary, "cpu", "python benchmarks/run.py --profile comparison", "test machine", 1.0,
                           results, md, readme)
    assert "Protocol (issue 14)" in body and "| flat | 2 |" in body and "| Guo CNN-RNN | 2 |" in body
    assert "Machine: test machine" in body and "too short" in body
    text = md.read_text()
    assert "## quick\n\nkept" in text and text.count("## comparison") == 1
    R.write_outputs(summary, "cpu", "cmd", "m", 1.0, results, md, readme)  # replaces its section, once
    assert md.read_text().count("## comparison") == 1
    assert json.loads((results / "comparison.json").read_text())["summary"]["toy"]["rows"]["flat"]["n"] == 2
    assert (results / "comparison-toy.png").stat().st_size > 0
    r = readme.read_text()
    assert "\nold\n" not in r and "not measured yet with >= 3 seeds" in r and r.endswith("rest\n")
    # a paragraph with measured claims (intervals) is never replaced by one with fewer
    claim = "| A | 3 | +1.00 pt [+0.50, +1.50] | beats flat |"
    readme.write_text(f"intro\n{R.README_START}\n{claim}\n{R.README_END}\nrest\n")
    R.write_outputs(summary, "cpu", "cmd", "m", 1.0, results, md, readme)
    assert claim in readme.read_text()


def test_a_decoding_only_row_decodes_the_trained_run_and_trains_nothing(tmp_path, configs):
    from hiervision.training import train

    beam = P.Method("guo_rnn_beam", "Guo CNN-RNN, beam", "guo.yaml", reuses="guo_rnn", beam_widths=(1, 2))
    toy = _tiny()[0]
    data = (dataclasses.replace(toy, methods=(*toy.methods, beam)),)
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=data, config_dir=configs)
    flat, guo, dec = cells
    assert dec.name == "guo_rnn_beam/toy/s0" and (dec.run_dir, dec.digest) == (guo.run_dir, guo.digest)
    trained = []

    def train_fn(cfg, run_dir, resume):
        trained.append(run_dir)
        return train(cfg, run_dir, resume=resume)

    P.run_cells(cells, train_fn=train_fn, log=lambda *_: None)
    assert trained == [flat.run_dir, guo.run_dir] and dec.done()
    m, own = dec.metrics(), guo.metrics()
    val = {int(k): v for k, v in m["val_path_accuracy_by_width"].items()}
    assert set(val) == {1, 2} and m["beam_width"] == max(val, key=lambda k: (val[k], -k))
    assert m["train_images_per_s"] == own["train_images_per_s"]  # the same training run
    if m["beam_width"] == 1:  # width 1 is the run's own greedy decoding
        assert m["path_accuracy"] == pytest.approx(own["path_accuracy"])
    summary = S.summarize(cells)
    row = summary["toy"]["rows"]["guo_rnn_beam"]
    assert row["n"] == 1 and row["vs_flat"]["path_accuracy"]["n"] == 1 and row["beam_width"] == {0: m["beam_width"]}
    text = R.section(summary, "cpu", "cmd", "machine", 1.0, "comparison")
    assert f"Guo CNN-RNN, beam: beam width picked on val per seed: s0: {m['beam_width']}." in text
    assert "Wall time of this sitting: 0.0 min" in text  # 1.0 s trained
    assert "this sitting trained nothing" in R.section(summary, "cpu", "cmd", "machine", None, "comparison")
    dec.decoded.unlink()  # e.g. a row added after its run was trained: only the decoding is left to do
    assert dec.state() == "trained; to decode"
    assert P.run_cells(cells, train_fn=train_fn, log=lambda *_: None)["ran"] == [dec.name] and len(trained) == 2


def test_induced_hiernet_gets_flat_pretrain_and_the_rest_of_the_budget(tmp_path, configs):
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=_tiny(induced=True), config_dir=configs,
                   only=["hiernet/*"])
    assert [c.name for c in cells] == ["flat-pretrain/toy/s0", "hiernet/toy/s0"]
    pre, hier = cells
    assert pre.cfg["train"]["epochs"] == 2 and hier.cfg["train"]["epochs"] == 2  # 2 + 2 = flat's 4
    assert pre.cfg["model"]["name"] == "flat" and hier.needs is pre
    assert hier.cfg["data"]["tree"] == str(hier.tree) and hier.tree.parent == pre.run_dir
    assert hier.cfg["model"]["backbone_kwargs"]["pretrained_path"] == str(pre.run_dir / "best.pt")
    calls = []

    def fake_train(cfg, out, resume=True):
        calls.append(("train", cfg["model"]["name"], cfg["train"]["epochs"]))
        Path(out).mkdir(parents=True, exist_ok=True)  # as the engine does
        (Path(out) / "metrics.json").write_text(json.dumps({"path_accuracy": 0.5}))

    def fake_induce(run_dir, p_min, g_max):
        calls.append(("induce", Path(run_dir), p_min, g_max))
        return Taxonomy.from_parent_map({"g": None, "a": "g", "b": "g"})

    def fake_score(run_dir):
        calls.append(("score", Path(run_dir)))
        return {"path_accuracy": 0.25, "scored_in": "given tree"}

    P.run_cells(cells, train_fn=fake_train, induce_fn=fake_induce, score_fn=fake_score, log=lambda *_: None)
    assert calls == [("train", "flat", 2), ("induce", pre.run_dir, 0.05, 3), ("train", "hiernet", 2),
                     ("score", hier.run_dir)]
    assert hier.tree.exists() and all(c.done() for c in cells)
    assert hier.metrics()["path_accuracy"] == 0.25  # the given tree's numbers replace the induced tree's
    # a trained cell whose given-tree scores are missing only gets scored (no training)
    (hier.run_dir / P.GIVEN_TREE).unlink()
    assert hier.trained() and not hier.done()
    calls.clear()
    P.run_cells(cells, train_fn=fake_train, induce_fn=fake_induce, score_fn=fake_score, log=lambda *_: None)
    assert calls == [("score", hier.run_dir)]
    summary = S.summarize(cells)  # the pre-train is not a row: flat is there (the baseline) with n = 0
    assert set(summary["toy"]["rows"]) == {"flat", "hiernet"}
    assert summary["toy"]["rows"]["hiernet"]["n"] == 1 and summary["toy"]["rows"]["flat"]["n"] == 0


def test_status_reports_partial_cells_and_max_hours_stops(tmp_path, configs):
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=_tiny(), config_dir=configs)
    cells[0].run_dir.mkdir(parents=True)
    (cells[0].run_dir / "last.pt").write_bytes(b"x")
    assert cells[0].state() == "partial (0/1 epochs)"
    out = P.run_cells(cells, max_hours=0.0, train_fn=lambda *a, **k: None, log=lambda *_: None)
    assert out["stopped"] and out["ran"] == []
    with pytest.raises(ValueError, match="--budget"):
        P.plan("tpu", [0], tmp_path, datasets=_tiny(), config_dir=configs)


def test_the_ledger_keeps_finished_cells_across_machines(tmp_path, configs):
    """Run folders are not committed: a fresh checkout's tables come from the ledger, a sitting adds to it,
    and a post-hoc row whose trained run is only in the ledger trains that run again."""
    crm = P.Method("flat_crm", "flat + CRM", "flat.yaml", reuses="flat", decode="crm")
    toy = _tiny()[0]
    data = (dataclasses.replace(toy, methods=(*toy.methods, crm)),)
    trained, bump = [], [0.0]

    def train_fn(cfg, run_dir, resume):  # a stand-in run: the seed (and the machine's precision) decide it
        trained.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        acc = 0.5 + 0.1 * cfg["seed"] + (0.05 if cfg["model"]["name"] == "guo_rnn" else 0.0) + bump[0]
        (run_dir / "metrics.json").write_text(json.dumps({"path_accuracy": acc, "other": 1}))

    def rule_fn(run_dir, rule):
        return {"path_accuracy": json.loads((run_dir / "metrics.json").read_text())["path_accuracy"] - 0.01}

    ledger_path = tmp_path / "results" / "comparison-cells.json"
    first = tmp_path / "machine-a"
    cells = P.plan("cpu", [0, 1], first, datasets=data, config_dir=configs, only=["flat", "guo_rnn"],
                   ledger=P.Ledger(ledger_path))
    P.run_cells(cells, train_fn=train_fn, log=lambda *_: None, on_done=P.recorder(cells[0].ledger, cells, "machine A"))
    assert len(trained) == 4
    kept = json.loads(ledger_path.read_text())
    assert set(kept) == {"flat/toy/s0", "guo_rnn/toy/s0", "flat/toy/s1", "guo_rnn/toy/s1"}
    assert kept["flat/toy/s1"]["metrics"] == {"path_accuracy": pytest.approx(0.6)}  # only what the tables read

    # another machine, no run folders: the ledger's cells are done, the new row trains flat again
    second = tmp_path / "machine-b"
    ledger = P.Ledger(ledger_path)
    cells = P.plan("cpu", [0, 1], second, datasets=data, config_dir=configs, ledger=ledger)
    assert [c.state() for c in cells if c.method.key != "flat_crm"] == ["done (ledger)"] * 4
    trained.clear()
    table = P.plan("cpu", [0, 1], second, datasets=data, config_dir=configs, only=["flat_crm"], ledger=ledger)
    assert [c.method.key for c in table] == ["flat_crm"] * 2  # a sitting that names the post-hoc row only
    bump[0] = -0.02  # machine B's runs come out lower (another precision)
    P.run_cells(table, train_fn=train_fn, rule_fn=rule_fn, log=lambda *_: None,
                on_done=P.recorder(ledger, cells, "machine B"))
    assert sorted(trained) == sorted(c.run_dir.name for c in cells if c.method.key == "flat_crm")
    rows = S.summarize(cells)["toy"]["rows"]
    assert rows["guo_rnn"]["n"] == 2 and rows["flat_crm"]["n"] == 2
    # each row pairs with flat's run on its own machine: guo (A) with flat's earlier A run, CRM with B's
    assert rows["guo_rnn"]["vs_flat"]["path_accuracy"]["mean"] == pytest.approx(0.05)
    assert rows["flat_crm"]["vs_flat"]["path_accuracy"]["mean"] == pytest.approx(-0.01)
    assert rows["flat"]["per_seed"]["path_accuracy"][0] == pytest.approx(0.48)
    kept = json.loads(ledger_path.read_text())
    assert kept["flat/toy/s0"]["machine"] == "machine B" and kept["guo_rnn/toy/s0"]["machine"] == "machine A"
    assert "2 on machine A (guo_rnn)" in R.machines_note(cells, ledger, "machine B")
    # a changed recipe is a new cell: the ledger's numbers never stand in for it
    changed = P.plan("cpu", [0], second, datasets=data, config_dir=configs, extra=["train.lr=0.05"], ledger=ledger)
    assert not any(c.done() for c in changed)
    # a rerun of a recorded cell left in its folder by another script does not replace the recorded metrics;
    # a finished cell the ledger has never seen is recorded
    guo = next(c for c in P.plan("cpu", [0], first, datasets=data, config_dir=configs, ledger=ledger)
               if c.method.key == "guo_rnn")
    (guo.run_dir / "metrics.json").write_text(json.dumps({"path_accuracy": 0.1}))
    new = next(c for c in changed if c.method.key == "flat")
    train_fn(new.cfg, new.run_dir, True)
    (new.run_dir / "cell.json").write_text(json.dumps({"digest": new.digest}))
    P.record_new([guo, new], ledger, "machine B")
    assert ledger.get(guo) == {"path_accuracy": pytest.approx(0.55)} and ledger.machine(guo) == "machine A"
    assert ledger.get(new) == {"path_accuracy": pytest.approx(0.48)}


@pytest.mark.slow
def test_run_py_status_lists_every_cell_of_the_real_plan(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--profile", "comparison",
                          "--status", "--out", str(tmp_path), "--seeds", "0", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = out.stdout.strip().splitlines()
    # per seed: fmnist and tiny32 each flat, DHNN, Guo, Guo decoded with a tuned beam, HierNet + its flat pre-train
    # a fresh --out: the committed ledger's cells are done, the rest (pre-trains included) to do
    assert re.fullmatch(r"\d+ of 24 cells done", lines[-1]) and any("done (ledger)" in x for x in lines)
    assert any(x.startswith("hiernet/tiny32/s1") for x in lines)
    assert any(x.startswith("flat-pretrain/fmnist/s0") for x in lines)
    gpu = P.plan("gpu", [0], tmp_path, device="cuda")
    assert {c.data.key for c in gpu} == {"fmnist", "tiny32", "tiny64"}
    assert all(c.cfg["train"]["device"] == "cuda" for c in gpu)
    assert {c.cfg["data"]["image_size"] for c in gpu if c.data.key == "tiny64"} == {64}
    flat = {c.data.key: c.cfg["train"]["epochs"] for c in gpu if c.method.key == "flat" and not c.hidden}
    assert flat == {"fmnist": 20, "tiny32": 30, "tiny64": 30}
    tuned = P.plan("cpu", [0], tmp_path, only=["guo_rnn_tuned/tiny32"])
    assert [c.name for c in tuned] == ["guo_rnn_tuned/tiny32/s0"]
    assert not any(c.method.optional for c in P.plan("cpu", [0], tmp_path, only=["*/tiny32"]))
    assert any(c.method.optional for c in P.plan("cpu", [0], tmp_path, only=["*/tiny32"], optional=True))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "comparison").glob("*.yaml")), ids=lambda p: p.stem)
def test_comparison_configs_build_their_models(path):
    cfg = load_config(path)
    model = dict(cfg["model"])
    model["backbone_kwargs"] = {"width": 0.25}
    if cfg["data"]["name"] == "fashion_mnist":
        tax, sizes = Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y/3", "b/z/4", "b/z/5", "b/w/6"]), [28]
    else:
        tax, sizes = Taxonomy.from_paths(["a/x/1", "a/x/2", "a/y", "b/z/4/q", "b/w"]), [32, 64]
    for size in sizes:  # the gpu budget's Tiny-ImageNet at 64x64 too
        create_model(model["name"], tax, in_chans=3, image_size=size,
                     **{k: v for k, v in model.items() if k != "name"})


def test_diagnose_reports_a_trained_run(tmp_path, configs, capsys):
    import diagnose

    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=_tiny(), config_dir=configs, only=["guo_rnn"])
    P.run_cells(cells, log=lambda *_: None)
    report = diagnose.diagnose(cells[0].run_dir)
    saved = cells[0].metrics()
    assert report["path_accuracy"] == pytest.approx(saved["path_accuracy"])  # the same predictions again
    assert report["length_diagnostics"]["right_length"] == pytest.approx(
        saved["length_diagnostics"]["right_length"])
    out = tmp_path / "d.json"
    assert diagnose.main([str(cells[0].run_dir), "--json", str(out)]) == 0
    text = diagnose.table({"run": report})
    assert text.startswith("| run | path acc | too short") and "length 2" in text  # variable-depth tree
    assert json.loads(out.read_text())[str(cells[0].run_dir)]["num_samples"] == report["num_samples"]

    # decoding vs model errors: width 1 is the run's own greedy decoder; every image is counted once
    wide = len(load_run(cells[0].run_dir)[1].names)  # keeps every partial path: an exhaustive search
    found = diagnose.search_errors(cells[0].run_dir, [1, 4, wide])
    assert found[1]["path_accuracy"] == pytest.approx(saved["path_accuracy"])
    assert found[wide]["search_error"] == 0  # nothing scores above what an exhaustive search returns
    assert diagnose.search_table({"run": [found, found]}).count("\n| run | 2 | ") == 3  # one row per width
    assert diagnose.main([f"guo={cells[0].run_dir}", "--search", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["guo"][0]["1"] == pytest.approx(found[1])
    # the same width through the CLI: `hiervision evaluate --beam-width`
    capsys.readouterr()
    assert cli_main(["evaluate", str(cells[0].run_dir), "--beam-width", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["path_accuracy"] == pytest.approx(found[4]["path_accuracy"])
    # the score compared is the one the beam search ranks by: the decoded path's own probability
    cfg, _, model, _ = load_run(cells[0].run_dir)
    data = run_data(cfg, cells[0].run_dir)
    images, _ = next(iter_batches(data.test, 16))
    with torch.no_grad():
        outputs = model.eval()(data.normalize(images))
        pred = model.decode(outputs)
        lp = model.path_logprob(outputs, pred.paths)
    assert torch.allclose(lp.exp(), pred.path_prob, atol=1e-5)
    # `predict --beam-width K` ships a tuned width: the paths the model gives at width K
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, image in enumerate(images[:4]):
        pixels = (image.permute(1, 2, 0).squeeze(2).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).save(pictures / f"{i}.png")
    for width in (1, wide):
        assert cli_main(["predict", str(cells[0].run_dir), str(pictures), "--beam-width", str(width)]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        model.set_beam_width(width)
        assert len(records) == 4
        for record in records:
            pixels = torch.from_numpy(np.asarray(Image.open(record["file"]), dtype=np.float32) / 255)
            x = (pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None])[None]
            assert record["path_ids"] == [n for n in model.predict(data.normalize(x)).paths[0].tolist() if n != PAD]


def test_the_table_command_drops_only():
    # a sitting with --only or --seeds still records (and tells you to continue with) the whole profile
    argv = ["--profile", "comparison", "--only", "hiernet/fmnist", "guo_rnn", "--seeds", "3", "4", "--table-only",
            "--optional"]
    assert C._without_only(argv) == ["--profile", "comparison", "--optional"]


def test_the_contenders_run_five_seeds_and_the_other_rows_three(tmp_path):
    cells = P.plan("cpu", None, tmp_path, optional=True, datasets=P.DATASETS[:1])
    seeds: dict[str, set[int]] = {}
    for c in cells:
        seeds.setdefault(c.method.key, set()).add(c.seed)
    five = {k for k, s in seeds.items() if s == set(range(5))}
    assert five == {"flat", "flat_crm", "flat_bayes_hf1", "haframe", "haframe_crm", "soft_max_margin",
                    "soft_max_margin_crm", "hie", "hie_crm"}
    assert all(s == {0, 1, 2} for k, s in seeds.items() if k not in five)
    assert {c.seed for c in P.plan("cpu", [3], tmp_path, only=["haf"])} == {3}  # named seeds: every row's


def test_cached_cells_keep_their_identity(tmp_path):
    # A cell's cache key is the digest of its resolved config, defaults included: a new config default
    # would silently orphan every cell already run (hours of CPU). Add options so that their absence
    # resolves as before (e.g. a new value of an existing key), or rerun the comparison on purpose.
    first = P.plan("cpu", [0], tmp_path)[0]
    assert (first.name, first.digest) == ("flat/fmnist/s0", "fc91a7fd508d")


def test_induced_hiernet_cell_for_real_is_scored_in_the_given_tree(tmp_path, configs):
    """Pre-train, induce, HierNet, then its predictions moved to the given tree and scored there."""
    cells = P.plan("cpu", [0], tmp_path / "runs", datasets=_tiny(induced=True), config_dir=configs,
                   only=["hiernet/*"], extra=["data.val_fraction=0.4"])  # every class in val: the confusion matrix
    P.run_cells(cells, log=lambda *_: None)
    hier = cells[-1]
    assert hier.done()
    given = json.loads((hier.run_dir / P.GIVEN_TREE).read_text())
    assert given["scored_in"] == "given tree" and given["num_samples"] == 96
    assert 0 <= given["path_accuracy"] <= given["node_accuracy"] <= 1 and 0 <= given["ece"] <= 1
    # HierNet answers its most probable leaf, the rank-1 class of hdist@1: a right answer adds an LCA height
    # of 0, a wrong one at least 1 and at most the given tree's depth
    wrong, depth = 1 - given["path_accuracy"], load_run(cells[0].run_dir)[1].max_depth  # the pre-training's tree
    assert wrong - 1e-6 <= given["hdist@1"] <= depth * wrong + 1e-6


def test_the_haframe_diagnosis_table_pairs_each_arm_with_its_flat_and_the_default_and_reads_the_declared_rule():
    import haframe_diagnosis as HD

    def entry(h: float, f: float) -> dict:
        return {"digests": ["f", "h"], "haframe": {"leaf_accuracy": h, "mistake_severity": 2.0, "hdist@5": 3.0},
                "flat": {"leaf_accuracy": f, "mistake_severity": 2.1, "hdist@5": 3.2}}

    flat = {0: 0.280, 1: 0.285, 2: 0.282}
    default = {0: 0.260, 1: 0.272, 2: 0.269}
    ledger = {f"default/s{s}": entry(default[s], flat[s]) for s in flat}
    ledger |= {f"authors_split/s{s}": entry(default[s] + 0.015 + 0.001 * s, flat[s]) for s in flat}  # recovers
    ledger |= {f"no_cosine/s{s}": entry(default[s] + (0.01 if s else -0.01), flat[s]) for s in flat}  # noise
    text = HD.section(ledger, "python benchmarks/haframe_diagnosis.py")
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"arm", "default", "authors_split", "no_cosine"}  # unmeasured arms get no row
    assert "| 3 | 26.7 ± 0.6 | -1.53 [" in rows["default"] and "| – |" in rows["default"]
    assert "+1.60 [+1.35, +1.85]" in rows["authors_split"]  # paired with the default arm, seed by seed
    assert rows["no_cosine"].endswith("| -0.10 [-0.10, -0.10] | -0.20 [-0.20, -0.20] |")  # severity, hdist@5 vs flat
    assert "Arms that recover top-1 (Δ vs default HAFrame above 0): authors_split." in text


def test_the_open_world_section_says_which_parts_of_a_data_set_are_not_measured_yet():
    import open_world as OW

    ledger = {"coarse/tiny32/s0": {"digests": ["a"], "flat": {"coarse": 0.20, "full": 0.21},
                                   "haframe": {"coarse": 0.19, "full": 0.20}}}
    tiny = OW.section(ledger, "python benchmarks/open_world.py").split("### Tiny")[1]
    assert "Novelty: not measured yet" in tiny and "open-world-tiny32.png" not in tiny  # no verdict, no figure
    assert "| flat | 21.0 (n = 1) | 20.0 (n = 1) | 0.952 | yes |" in tiny  # one seed has no spread to show


def test_the_hiercos_collapse_table_marks_an_arm_by_its_top1_and_its_most_common_answer(tmp_path):
    import hiercos_collapse as HC

    ledger = {"flat": {"digest": "a", "top1": 0.08, "most_common_share": 0.03},
              "hiercos": {"digest": "b", "top1": 0.006, "most_common_share": 0.9},
              "no_aux": {"digest": "c", "top1": 0.014, "most_common_share": 0.1}}  # near chance, answers spread
    text = HC.section(ledger, "python benchmarks/hiercos_collapse.py", tmp_path)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"arm", "flat", "hiercos", "no_aux"}  # an unmeasured arm gets no row
    assert rows["flat"].endswith("| 8.0 | 3.0 | no |")
    assert rows["hiercos"].endswith("| 0.6 | 90.0 | yes |")
    assert rows["no_aux"].endswith("| 1.4 | 10.0 | no |")
