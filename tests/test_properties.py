"""Property-based tests: the taxonomy parsers and the config loader, fed generated input, either
return a valid object or raise the package's one-line error — never another exception."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hiervision import Taxonomy, TaxonomyError
from hiervision.config import ConfigError, load_config, validate_config

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=6)
small_names = st.sampled_from(["root", "a", "b", "c", "d", "", " ", "a/b", "ä", "x\ny", "0"])


def _valid(tax: Taxonomy) -> None:
    """The invariants every tree keeps: root first, parents before children, depths consistent."""
    assert tax.parents[0] == -1 and len(tax) >= 1
    for n in range(1, tax.num_nodes):
        assert 0 <= tax.parents[n] < tax.num_nodes
        assert tax.depths[n] == tax.depths[tax.parents[n]] + 1
    assert Taxonomy.from_dict(json.loads(json.dumps(tax.to_dict()))) == tax  # the JSON format round-trips


def _one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e)


def _tmp(content: bytes, suffix: str) -> Path:
    d = Path(tempfile.mkdtemp())
    f = d / f"t{suffix}"
    f.write_bytes(content)
    return f


@SETTINGS
@given(st.dictionaries(st.one_of(small_names, names), st.one_of(st.none(), small_names, names), max_size=8))
def test_parent_map(parent_of):
    try:
        tax = Taxonomy.from_parent_map(parent_of)
    except TaxonomyError as e:
        _one_line(e)
    else:
        _valid(tax)


rows = st.lists(st.tuples(st.one_of(small_names, names), st.one_of(small_names, names)), max_size=10)


@SETTINGS
@given(rows, st.sampled_from(["parent,child", "child,parent", "parent", "parent,child,extra", ""]))
def test_csv_rows(edges, header):
    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf).writerows(edges)
    try:
        tax = Taxonomy.from_csv(_tmp(buf.getvalue().encode("utf-8"), ".csv"))
    except TaxonomyError as e:
        _one_line(e)
    else:
        _valid(tax)


@SETTINGS
@given(st.binary(max_size=200))
def test_csv_bytes(data):
    try:
        tax = Taxonomy.from_csv(_tmp(b"parent,child\n" + data, ".csv"))
    except TaxonomyError as e:
        _one_line(e)
    else:
        _valid(tax)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5) | st.floats(allow_nan=False, allow_infinity=False) | small_names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(small_names, inner, max_size=4),
    max_leaves=12,
)
nodes = st.lists(
    st.fixed_dictionaries(
        {"id": st.integers(-1, 5), "name": st.one_of(small_names, st.integers(0, 3)), "parent": st.integers(-2, 5)},
        optional={"external_id": st.one_of(st.none(), small_names)},
    ),
    max_size=7,
)


@SETTINGS
@given(st.one_of(nodes, json_values))
def test_json_documents(node_list):
    doc = {"format": "hiervision-taxonomy", "version": 1, "nodes": node_list}
    for text in (json.dumps(doc), json.dumps(node_list)):
        try:
            tax = Taxonomy.load(_tmp(text.encode(), ".json"))
        except TaxonomyError as e:
            _one_line(e)
        else:
            _valid(tax)


@SETTINGS
@given(st.binary(max_size=120))
def test_json_bytes(data):
    try:
        Taxonomy.load(_tmp(data, ".json"))
    except TaxonomyError as e:
        _one_line(e)


config_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["sgd", "adam", "cosine", "auto", "cpu", "1e-3", "", "none", "fast"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["epochs", "frozen", "pad", "flip"]),
                                                                inner, max_size=3),
    max_leaves=6,
)
train_keys = st.sampled_from(["epochs", "batch_size", "lr", "momentum", "optimizer", "schedule", "milestones",
                              "warmup_epochs", "augment", "freeze", "amp", "device", "threads", "grad_clip",
                              "max_loss", "accumulate", "checkpoint_every", "sync_bn", "nesterov", "epoch"])
configs = st.fixed_dictionaries(
    {},
    optional={
        "seed": config_values,
        "train": st.one_of(config_values, st.dictionaries(train_keys, config_values, max_size=4)),
        "eval": st.dictionaries(st.sampled_from(["batch_size", "select", "given_level", "x"]), config_values,
                                max_size=3),
        "data": st.one_of(config_values, st.just({"name": "synthetic"})),
        "base": config_values,
        "bogus": config_values,
    },
)


@SETTINGS
@given(configs)
def test_config_files(cfg):
    text = yaml.safe_dump(cfg)
    try:
        out = load_config(_tmp(text.encode(), ".yaml"))
    except ConfigError as e:
        _one_line(e)
    else:
        assert validate_config(out) == out  # what the loader returns is valid and already normal


@SETTINGS
@given(st.lists(st.text(max_size=25), max_size=3))
def test_config_overrides(overrides):
    try:
        load_config(overrides=overrides)
    except ConfigError as e:
        _one_line(e)


@SETTINGS
@given(st.binary(max_size=120))
def test_config_bytes(data):
    try:
        load_config(_tmp(data, ".yaml"))
    except ConfigError as e:
        _one_line(e)
