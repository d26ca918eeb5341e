"""benchmarks/profiles/*.yaml: every experiment table loads, names configs that exist, and a broken one says where."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run  # noqa: E402  (benchmarks/ is not a package)

PROFILE_FILES = sorted((ROOT / "benchmarks" / "profiles").glob("*.yaml"))


def test_every_profile_file_is_a_profile():
    assert PROFILE_FILES and set(run.PROFILES) == {p.stem for p in PROFILE_FILES}
    assert "comparison" not in run.PROFILES  # benchmarks/comparison.py's own, not a table


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_a_profile_loads_and_its_configs_exist(path: Path):
    prof = run.load_profile(path)
    assert prof["description"] and prof["seeds"] and prof["rows"]
    for label, config, overrides, *rest in prof["rows"]:
        assert (ROOT / "configs" / config).is_file(), f"{path.name}: {label!r} names a missing configs/{config}"
        assert all(isinstance(o, str) for o in overrides)  # {runs}/{seed} stay placeholders until run_profile
        assert len(rest) <= 2


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD_ROW = "  - {label: flat, config: fmnist-flat.yaml, overrides: [train.epochs=1]}\n"


@pytest.mark.parametrize("text, field", [
    ("description: d\nseeds: [0]\nrows:\n  - {label: flat, config: fmnist-flat.yaml}\n", "rows[0].overrides"),
    ("description: d\nseeds: [zero]\nrows:\n" + GOOD_ROW, "seeds"),
    ("seeds: [0]\nrows:\n" + GOOD_ROW, "description"),
    ("description: d\nseeds: [0]\nrows:\n" + GOOD_ROW + "  - {label: flat, config: x.yaml, overrides: []}\n",
     "rows[1].label"),
    ("description: d\nseeds: [0]\nrows:\n" + GOOD_ROW
     + "  - {label: b, config: x.yaml, overrides: [], group: g, options: {run: nobody}}\n", "rows[1].options.run"),
    ("description: d\nseeds: [0]\nrows:\n" + GOOD_ROW + "  - {label: b, config: x.yaml, overrides: [], colour: red}\n",
     "rows[1].colour"),
    ("description: d\nseeds: [0]\nrows: [\n", "not valid YAML"),
])
def test_a_broken_profile_names_its_file_and_field(tmp_path, text: str, field: str):
    with pytest.raises(run.ProfileError) as e:
        run.load_profile(_profile(tmp_path, text))
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "broken.yaml")) and field in message
