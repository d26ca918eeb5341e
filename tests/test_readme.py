"""The README's Python example must keep working."""

import re
from pathlib import Path

import pytest

from conftest import FMNIST


def test_readme_python_example_runs(capsys):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vehicle/car/taxi vehicle"
    assert 0.0 <= float(out[1]) <= 1.0
