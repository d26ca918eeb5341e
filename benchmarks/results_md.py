"""RESULTS.md is written by several benchmarks: each owns one ``## name`` section and replaces only that."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(text: str, name: str, body: str) -> str:
    """Replace ``## name`` (up to the next ``## ``) in a markdown file's text, or append it."""
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = body.rstrip() + "\n\n"
    return pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Put ``body`` (which starts with ``## name``) into ``path`` in place of that section."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(text, name, body).rstrip("\n") + "\n", encoding="utf-8")
