"""The package's layout rules (docs/architecture.md), read from the source: the import graph has no
cycle, layers never import upwards, export knows no concrete head, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hiervision"

# the layers on top: nothing below may import them (their own sub-packages aside)
UPPER = ("hiervision.__main__", "hiervision.cli", "hiervision.serve", "hiervision.runtime", "hiervision.export",
         "hiervision.training", "hiervision.posthoc", "hiervision.report", "hiervision.induce")
# what each upper layer may import of the others
ALLOWED_UP = {
    "hiervision.__main__": {"hiervision.cli"},
    "hiervision.cli": set(UPPER),
    "hiervision.serve": {"hiervision.runtime", "hiervision.export", "hiervision.posthoc"},
    "hiervision.export": {"hiervision.runtime"},
    "hiervision.training": {"hiervision.posthoc"},
    "hiervision.induce": set(),
    "hiervision.posthoc": set(),
    "hiervision.report": set(),
    "hiervision.runtime": set(),
}


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


def layer(module: str) -> str | None:
    return next((u for u in UPPER if module == u or module.startswith(u + ".")), None)


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_layer_imports_upwards() -> None:
    wrong = []
    for module, targets in import_graph().items():
        own = layer(module)
        for t in targets:
            up = layer(t)
            if up and up != own and up not in ALLOWED_UP.get(own, set()):
                wrong.append(f"{module} imports {t}")
    assert not wrong, "; ".join(sorted(wrong))


def test_export_and_runtime_know_no_concrete_model_class() -> None:
    for name in ("export.py", "runtime.py"):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("hiervision.models.") or node.module == "hiervision.models.base", (
                    f"{name} imports {node.module}")


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "; ".join(long)


def test_no_library_function_is_named_like_a_test() -> None:
    named = [f"{path.relative_to(SRC)}: {node.name}" for path in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test")]
    assert not named, "; ".join(named)
