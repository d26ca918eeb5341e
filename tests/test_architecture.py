"""The package's layout rules, read from the source and from docs/architecture.md's layer table (the one
place the layers are written down): every module has one layer, no import runs upwards, the lowest layer
imports no PyTorch, the import graph has no cycle, export knows no concrete head, functions stay short."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "hiervision"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

def layer_table(text: str | None = None) -> list[tuple[str, list[str]]]:
    """``[(layer, module patterns)]`` bottom first, from the table under "## The layers": `name` is a module
    (``tree/tables`` → ``hiervision.tree.tables``), `name/` a package with its modules."""
    text = ARCHITECTURE.read_text(encoding="utf-8") if text is None else text
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ")]
    return [(layer.strip(), re.findall(r"`([^`]+)`", mods)) for layer, mods in rows[2:]]  # header, rule


def _module_name(pattern: str) -> str:
    name = pattern.rstrip("/").replace("/", ".")
    return name if name == "hiervision" else f"hiervision.{name}"


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """The index of ``module``'s layer: the most specific pattern that names it (a module, or a package)."""
    best: tuple[int, int] | None = None  # (specificity, layer index)
    for index, (_, patterns) in enumerate(table):
        for pattern in patterns:
            name = _module_name(pattern)
            if module == name or (pattern.endswith("/") and module.startswith(name + ".")):
                rank = len(name) + (1 if module == name and not pattern.endswith("/") else 0)
                best = max(best or (rank, index), (rank, index))
    return None if best is None else best[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the hiervision modules it imports (at top level or inside a function)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hiervision"):
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{node.module}.{alias.name}"
                    targets.add(resolve(full if full in mods else node.module))
            elif isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names if a.name.startswith("hiervision"))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layer_table_parses_and_picks_the_most_specific_name() -> None:
    table = layer_table("## The layers\n\n| layer | modules | what |\n| --- | --- | --- |\n"
                        "| low | `tree/`, `x` | a |\n| high | `tree/tables`, `cli/` | b |\n\n## Next\n| no | `y` |")
    assert table == [("low", ["tree/", "x"]), ("high", ["tree/tables", "cli/"])]
    names = ("hiervision.tree", "hiervision.tree.core", "hiervision.tree.tables", "hiervision.x",
             "hiervision.cli.train", "hiervision.y")
    assert [layer_of(m, table) for m in names] == [0, 0, 1, 0, 1, None]


def test_every_module_has_a_layer_and_every_name_in_the_table_is_a_module() -> None:
    table, mods = layer_table(), modules()
    assert [layer for layer, _ in table][:2] == ["numpy core", "torch tree"], "the table starts at the bottom"
    missing = sorted(m for m in mods if layer_of(m, table) is None)
    assert not missing, f"modules in no layer of docs/architecture.md: {', '.join(missing)}"
    stale = [p for _, patterns in table for p in patterns if _module_name(p) not in mods]
    assert not stale, f"docs/architecture.md names modules that do not exist: {', '.join(stale)}"


def test_no_import_runs_upwards() -> None:
    table = layer_table()
    wrong = []
    for module, targets in import_graph().items():
        own = layer_of(module, table)
        for t in targets:
            if layer_of(t, table) > own:
                wrong.append(f"{module} ({table[own][0]}) imports {t} ({table[layer_of(t, table)][0]})")
    assert not wrong, "; ".join(sorted(wrong))


def test_the_lowest_layer_imports_no_torch() -> None:
    """The numpy core is what the torch-free runtime stands on: not even a function may import PyTorch."""
    table = layer_table()
    heavy = []
    for module, path in modules().items():
        if layer_of(module, table) == 0:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                heavy += [f"{module} imports {n}" for n in names if n.split(".")[0] == "torch"]
    assert not heavy, "; ".join(heavy)


def test_export_and_runtime_know_no_concrete_model_class() -> None:
    for name in ("export.py", "runtime.py"):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("hiervision.models.") or node.module == "hiervision.models.base", (
                    f"{name} imports {node.module}")


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "; ".join(long)


def test_no_library_function_is_named_like_a_test() -> None:
    named = [f"{path.relative_to(SRC)}: {node.name}" for path in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test")]
    assert not named, "; ".join(named)
