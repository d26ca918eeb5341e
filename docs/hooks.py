"""MkDocs hook: the pages that are generated rather than written, so none of them can go stale.

* ``cli.md`` — the CLI reference, from ``hiervision.cli.build_parser()`` (every subcommand and argument).
* ``api/<module>.md`` — one mkdocstrings page per module of the package, found by walking ``src/hiervision``:
  a new module appears in the reference (and the nav) without anyone editing this site.
* ``<!-- include: FILE -->`` and ``<!-- include: FILE#Heading -->`` in a page pull in a repository file (or
  the section under one of its ``##`` headings), with its links rewritten to the site's pages — so the
  benchmark tables, the changelog and the README's method sections are the files themselves, never a copy.
  ``<!-- include: README.md#which-method -->`` takes the generated "Which method?" paragraph between its markers.
* The pictures those files show (``benchmarks/results/*.png``) are copied into the site.
"""

from __future__ import annotations

import argparse
import html
import pkgutil
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
#: repository paths that are pages of this site (links to them are rewritten to the page)
SITE_PAGES = {
    "docs/serving.md": "serving.md",
    "docs/encoders.md": "encoders.md",
    "docs/unsure.md": "unsure.md",
    "docs/reliability.md": "reliability.md",
    "benchmarks/RESULTS.md": "benchmarks.md",
    "benchmarks/DECISIONS.md": "decisions.md",
    "CHANGELOG.md": "changelog.md",
    "CONTRIBUTING.md": "contributing.md",
    "README.md": "index.md",
}
INCLUDE = re.compile(r"<!-- include: (?P<file>[^#\s]+)(?:#(?P<section>[^>]+?))? -->")
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
WHICH_START, WHICH_END = "<!-- which-method:start -->", "<!-- which-method:end -->"


# ----------------------------------------------------------------------------- the API reference
def api_modules() -> list[str]:
    """Every public module of the package (names with a leading underscore and ``__main__`` left out)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    names = ["hiervision"]
    for info in pkgutil.walk_packages([str(SRC / "hiervision")], "hiervision."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def _api_page(module: str) -> str:
    note = ("The package's top level loads `Taxonomy`, `TaxonomyError`, `PAD`, `EOS` and `IGNORE` from "
            "[`hiervision.taxonomy`](taxonomy.md) on first use (so `hiervision.runtime` imports without PyTorch).\n\n"
            if module == "hiervision" else "")
    return (f"# `{module}`\n\n{note}::: {module}\n    options:\n      show_root_heading: false\n"
            "      show_root_toc_entry: false\n      show_if_no_docstring: true\n")


def _api_index(modules: list[str]) -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings of every module of the package (one page each; a new module appears "
             "here by itself). Start with `hiervision.taxonomy` (the tree), `hiervision.data.build_data`, "
             "`hiervision.models.create_model`, `hiervision.training.train` and `hiervision.runtime.Predictor`.", ""]
    lines += [f"- [`{m}`]({posixpath.relpath(_api_path(m), 'api')})" for m in modules]
    return "\n".join(lines) + "\n"


def _api_path(module: str) -> str:
    """``hiervision.data.base`` → ``api/data/base.md``; the package itself → ``api/hiervision.md``."""
    return f"api/{module.removeprefix('hiervision.').replace('.', '/')}.md"


# ----------------------------------------------------------------------------- the CLI reference
def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code_cell(text: object) -> str:
    """Code in a table cell: ``\\|`` would show its backslash inside backticks, so HTML with ``&#124;``."""
    return f"<code>{html.escape(' '.join(str(text).split())).replace('|', '&#124;')}</code>"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {"default": action.default, "prog": "hiervision"}
    return text


def cli_reference() -> str:
    """Markdown for every subcommand of ``hiervision``: usage, what it does, one table row per argument."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from hiervision.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = ["# CLI reference", "",
           "Generated from the argument parser (`hiervision.cli.build_parser()`); `hiervision COMMAND --help` prints "
           "the same. Every user error ends in one line on stderr and exit status 1 (see "
           "[Reliability](reliability.md)).", ""]
    for name, sp in sub.choices.items():
        usage = " ".join(sp.format_usage().split()).removeprefix("usage: ")
        out += [f"## `hiervision {name}`", "", _cell(sp.description or helps.get(name, "")), "",
                "```text", usage, "```", "", "| argument | what it does | default |", "| --- | --- | --- |"]
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = ", ".join(action.option_strings) or (action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                names += f" {action.metavar or action.dest.upper()}"
            what = _help(action)
            if action.choices is not None and not isinstance(action.choices, dict):
                what += f" (one of: {', '.join(map(str, action.choices))})"
            default = "" if action.default in (None, False, [], argparse.SUPPRESS) else f"`{action.default}`"
            out.append(f"| {_code_cell(names)} | {_cell(what)} | {default} |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- includes
def _section(text: str, file: str, section: str) -> str:
    """The body under the heading ``section`` (up to the next heading of its level or above; code fences,
    whose ``# comments`` look like headings, are skipped), or the generated "Which method?" block."""
    if section == "which-method":
        if WHICH_START not in text or WHICH_END not in text:
            raise ValueError(f"{file}: no {WHICH_START} ... {WHICH_END} block")
        return text.split(WHICH_START, 1)[1].split(WHICH_END, 1)[0].strip() + "\n"
    body: list[str] | None = None
    level, fenced = 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) (.*)", line)
        if body is None:
            if heading and heading[2].strip() == section:
                body, level = [], len(heading[1])
        elif heading and len(heading[1]) <= level:
            break
        else:
            body.append(line)
    if body is None:
        raise ValueError(f"{file}: no section headed {section!r}")
    return "".join(body).strip() + "\n"


def _rewrite_links(text: str, source: str, page: str) -> str:
    """Links of an included repository file, made to work from ``page``: site pages and copied pictures by
    relative path; anything else (a script, a config) as the path in the repository, in code."""
    here = posixpath.dirname(page)

    def fix(m: re.Match) -> str:
        target = m["target"]
        if re.match(r"[a-z]+://|#|mailto:", target):
            return m[0]
        path, _, anchor = target.partition("#")
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if repo in SITE_PAGES:
            dest = SITE_PAGES[repo]
        elif repo.startswith("benchmarks/results/") and repo.endswith(".png"):
            dest = repo
        else:
            return f"{m['text']} (`{repo}` in the repository)"
        rel = posixpath.relpath(dest, here or ".")
        return f"{m['bang']}[{m['text']}]({rel}{'#' + anchor if anchor else ''})"

    return LINK.sub(fix, text)


def expand_includes(markdown: str, page: str) -> str:
    def include(m: re.Match) -> str:
        file = m["file"]
        text = (ROOT / file).read_text(encoding="utf-8")
        if m["section"]:
            text = _section(text, file, m["section"].strip())
        return _rewrite_links(text, file, page)

    return INCLUDE.sub(include, markdown)


# ----------------------------------------------------------------------------- mkdocs events
def on_config(config):
    """Fill the nav's "API reference" entry with one page per module."""
    modules = api_modules()
    pages = [{"Overview": "api/index.md"}, *({m: _api_path(m)} for m in modules)]
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and "API reference" in entry:
            config["nav"][i] = {"API reference": pages}
    return config


def on_files(files: Files, config) -> Files:
    modules = api_modules()
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    files.append(File.generated(config, "api/index.md", content=_api_index(modules)))
    for m in modules:
        files.append(File.generated(config, _api_path(m), content=_api_page(m)))
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return expand_includes(markdown, page.file.src_uri)


#: a Sphinx role left in a rendered docstring, ``:class:<code>~hiervision.taxonomy.Taxonomy</code>``
_ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|attr|data|exc|obj):"
                   r"<code>(~?)([\w.]+)(?:\s*&lt;([\w.]+)&gt;)?</code>")


def _role_link(m: re.Match) -> str:
    """The role as a cross-reference that autorefs resolves across the site (plain code where it finds no
    target: ``optional``); ``~`` shows only the last name, as Sphinx does."""
    short, target, explicit = m.group(1), m.group(2), m.group(3)
    title = target.rsplit(".", 1)[-1] if short else target
    if explicit:  # :attr:`title <target>`
        title, target = target, explicit
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def on_page_content(html_text: str, page, config, files) -> str:
    """Docstrings are written with Sphinx roles (``:func:`x```); the API pages render them as links, never as
    raw roles."""
    return _ROLE.sub(_role_link, html_text)
