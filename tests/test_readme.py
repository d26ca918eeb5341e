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


def _bash_lines(text: str) -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments cut)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_hiervision_commands_parse():
    """Each ``hiervision ...`` command the README shows is accepted by the CLI as written (flags, choices);
    the five of "Your own images" run end to end in tests/test_quickstart.py."""
    import shlex

    from hiervision.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for line in _bash_lines(text):
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            words = shlex.split(part)
            if words and words[0].endswith("hiervision") and not words[0].startswith("pip"):
                commands.append(words[1:])
    section = text.split("## Your own images\n", 1)[1].split("\n## ", 1)[0]
    encoder, own = re.findall(r"```bash\n(.*?)```", section, re.S)[:2]  # the encoder first, then the five
    assert shlex.split(encoder)[1:3] == ["train", "my-photos"] and "--encoder" in encoder
    assert [shlex.split(x)[1] for x in own.strip().splitlines()] == ["train", "evaluate", "predict", "export", "serve"]
    assert len(commands) >= 10
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"README command does not parse: hiervision {' '.join(args)}")


def test_readme_install_extras_exist():
    """The extras the README installs are the package's own."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set()
    for line in _bash_lines((root / "README.md").read_text()):
        for group in re.findall(r"-e '\.\[([^\]]+)\]'", line):
            named |= set(group.split(","))
    assert named and named <= extras, named - extras


def test_the_recipe_is_described_in_one_set_of_words_everywhere(capsys):
    from hiervision.cli import build_parser
    from hiervision.recipe import RECIPE_WORDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert RECIPE_WORDS in readme
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if a.dest == "config")
    assert train.help.endswith(RECIPE_WORDS)


def test_every_interval_and_mean_std_the_docs_quote_is_a_measured_cell():
    """Issue 40: the README's and the docs' numbers about methods are the tables' own, digit for digit — every
    ``x [lo, hi]`` interval and every ``mean ± std`` they quote is in benchmarks/RESULTS.md (a fraction there may be
    quoted as a percentage with one decimal), so a rerun that moves a table cannot leave a stale claim behind."""
    root = Path(__file__).resolve().parents[1]

    def norm(s: str) -> str:
        return s.replace("−", "-").replace(" pt", "").replace(" %", "")

    interval = re.compile(r"([+\-−]?\d+\.\d+)(?: pt| %)? \[([+\-−]?\d+\.\d+), ([+\-−]?\d+\.\d+)\]")
    pm = re.compile(r"(\d+\.\d+) ± (\d+\.\d+)")
    results = norm((root / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8"))
    intervals = {tuple(float(x) for x in m.groups()) for m in interval.finditer(results)}
    pairs = {m.groups() for m in pm.finditer(results)}
    pairs |= {(f"{float(a) * 100:.1f}", f"{float(b) * 100:.1f}") for a, b in list(pairs) if float(a) <= 1}
    stale, quoted = [], 0
    for f in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        text = f.read_text(encoding="utf-8")
        for m in interval.finditer(text):
            quoted += 1
            if tuple(float(norm(x)) for x in m.groups()) not in intervals:
                stale.append(f"{f.name}: {m.group(0)}")
        for m in pm.finditer(text):
            quoted += 1
            if m.groups() not in pairs:
                stale.append(f"{f.name}: {m.group(0)}")
    assert quoted > 100 and not stale, stale
