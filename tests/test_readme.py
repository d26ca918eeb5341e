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
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vehicle/car/taxi vehicle"
    assert 0.0 <= float(out[1]) <= 1.0
    # the DHNN snippet continues the same session
    dhnn = re.search(r"## DHNN \(Koo et al.\)\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(dhnn, "README.md", "exec"), namespace)
    model, images = namespace["model"], namespace["images"]
    pred = model.predict(namespace["data"].normalize(images))
    assert pred.paths.shape == (64, 3) and (pred.paths >= 1).all()
    # the Guo snippet too: greedy paths and CNN-RNN* paths through the given level-2 nodes
    guo = re.search(r"## CNN-RNN \(Guo et al.\)\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(guo, "README.md", "exec"), namespace)
    pred, star, groups = namespace["pred"], namespace["star"], namespace["groups"]
    assert pred.paths.shape == (64, 3) and (pred.paths >= 1).all()
    assert (star.paths[:, 1] == groups).all()
