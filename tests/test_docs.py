"""The docs site: generated CLI and API reference, includes of repository files, a strict build."""

import argparse
import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs")


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public(module_name: str) -> list[str]:
    """A module's public functions and classes: its ``__all__``, else the names without ``_`` defined in it."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, o in vars(module).items()
                 if not n.startswith("_") and getattr(o, "__module__", None) == module_name]
    return [n for n in names if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))]


def test_cli_reference_has_every_subcommand_and_option(hooks):
    from hiervision.cli import build_parser

    text = hooks.cli_reference()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"## `hiervision {name}`" in text
        section = text.split(f"## `hiervision {name}`", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"<code>{option}" in section or f", {option}" in section, (name, option)


def test_every_module_has_an_api_page(hooks):
    found = {p.relative_to(ROOT / "src").with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
             for p in (ROOT / "src" / "hiervision").rglob("*.py") if p.name != "__main__.py"}
    assert set(hooks.api_modules()) == found


def test_includes_resolve_and_links_point_into_the_site(hooks):
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").as_posix()
        out = hooks.expand_includes(page.read_text(encoding="utf-8"), rel)
        assert "<!-- include:" not in out, rel
    scaling = hooks.expand_includes("<!-- include: README.md#Command line -->", "methods/x.md")
    assert "](../serving.md)" in scaling and "(docs/serving.md)" not in scaling
    which = hooks.expand_includes("<!-- include: README.md#which-method -->", "methods/index.md")
    assert "Fashion-MNIST" in which and "which-method:" not in which
    with pytest.raises(ValueError, match="no section headed 'Nope'"):
        hooks.expand_includes("<!-- include: README.md#Nope -->", "x.md")


@pytest.mark.slow
def test_strict_build_lists_every_public_function(hooks, tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs not installed (pip install '.[docs]')")
    site = tmp_path / "site"
    run = subprocess.run([mkdocs, "build", "--strict", "-d", str(site)], cwd=ROOT, capture_output=True, text=True,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ids: set[str] = set()
    for module in hooks.api_modules():
        html = (site / hooks._api_path(module).removesuffix(".md") / "index.html").read_text(encoding="utf-8")
        ids |= set(re.findall(r'id="([^"]+)"', html))
    missing, undocumented = [], []
    for module in hooks.api_modules():
        for name in _public(module):
            obj = getattr(importlib.import_module(module), name)
            # listed under this module, or (a lazy re-export such as hiervision.Taxonomy) under its own module
            if f"{module}.{name}" not in ids and f"{obj.__module__}.{obj.__qualname__}" not in ids:
                missing.append(f"{module}.{name}")
            if not (obj.__doc__ or "").strip():
                undocumented.append(f"{module}.{name}")
    assert not missing, f"not in the API reference: {missing}"
    assert not undocumented, f"public without a docstring: {undocumented}"
    pages = {f: f.read_text(encoding="utf-8") for f in site.rglob("*.html")}
    raw = [f"{f.relative_to(site)}: {m}" for f, text in pages.items()
           for m in re.findall(r":(?:class|mod|func|meth|attr|data|exc|obj):<code>", text)]
    assert not raw, f"raw Sphinx roles in the built site: {raw[:5]} ({len(raw)} in all)"
    links = sum(t.count('class="autorefs autorefs-internal"') for t in pages.values())
    assert links > 100  # the roles became links
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "CONFIG|FOLDER|CSV" in cli.replace("&#124;", "|") and "\\|" not in cli
    assert (site / "benchmarks" / "results" / "comparison-fmnist.png").is_file()
    assert "comparison" in (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
